"""Datasets: the registry of named datasets (``DATASETS``), readers for standard formats,
and poisoning.

Every way in gives float32 (N, C, H, W) images in [0, 1] and int64 labels; any problem
with a file or argument raises :class:`DataError` (an :class:`ibau.InputError`).
"""

from .datasets import DATASETS, Dataset, Split, load_arrays, load_digits_tensors, split_digits
from .readers import (
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
    "Dataset",
    "Split",
    "check_dataset",
    "load_arrays",
    "load_cifar10",
    "load_dataset",
    "load_digits_tensors",
    "load_gtsrb",
    "load_image_folder",
    "load_npz",
    "split_digits",
]
