"""Datasets: readers for standard formats and a generated toy task (``synthetic``)."""

from .readers import (
    DATASETS,
    DataError,
    check_dataset,
    load_cifar10,
    load_dataset,
    load_gtsrb,
    load_image_folder,
    load_npz,
)

__all__ = [
    "DATASETS",
    "DataError",
    "check_dataset",
    "load_cifar10",
    "load_dataset",
    "load_gtsrb",
    "load_image_folder",
    "load_npz",
]
