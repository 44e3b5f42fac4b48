"""The dataset registry: every named dataset, one loader signature.

``DATASETS`` (an :class:`ibau.registry.Registry`) maps a name to a :class:`Dataset`,
whose attributes say what it is (``title``, ``num_classes``, ``needs_data_dir``) and
whose :meth:`Dataset.load` reads one split::

    >>> from ibau.data import DATASETS
    >>> part = DATASETS.get_or_raise("digits").load(split="test")
    >>> part.x.shape, part.y.shape, part.eval_mask
    (torch.Size([697, 1, 8, 8]), torch.Size([697]), None)

The command line (:func:`ibau.data.load_dataset`), the benchmark grid
(:mod:`ibau.bench.data`) and the benchmark scripts all read named datasets through it.
Add one with ``DATASETS.register()(Dataset(name=..., reader=...))``; a reader takes
``(data_dir, split, size)`` and returns a :class:`Split`.

Named datasets
--------------
``cifar10``, ``gtsrb``
    Under ``data_dir`` either as arrays -- ``x_{split}.npy[.xz]`` (uint8 N,H,W,C or
    N,H,W), ``y_{split}.npy`` and optionally ``test_eval.npy`` / ``test_lossless.npy``
    (a boolean mask of the test images that measure ACC/ASR; the benchmark grid draws
    the defender's clean set from the others) -- in ``data_dir/cifar10`` /
    ``data_dir/gtsrb32`` or ``data_dir`` itself, or in their standard formats
    (:func:`ibau.data.load_cifar10`, :func:`ibau.data.load_gtsrb`).
``digits``
    scikit-learn's bundled handwritten digits (1,797 8x8 grayscale scans, no download,
    ``pip install scikit-learn``), split by a seeded permutation (seed 0): the first
    1,100 images are ``train``, the other 697 ``test`` (:func:`split_digits`, which
    ``ibau demo`` also uses, further splits those 697 into 400 clean and 297 test).
"""

from __future__ import annotations

import lzma
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..registry import Registry

__all__ = ["DATASETS", "Dataset", "Split", "load_arrays", "load_digits_tensors", "split_digits"]

PathLike = Union[str, os.PathLike]
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Split:
    """One split of a dataset: float32 (N, C, H, W) images in [0, 1], int64 labels, and
    optionally the boolean mask of the images that measure the results."""

    x: Tensor
    y: Tensor
    eval_mask: Tensor | None = None


Reader = Callable[[Union[Path, None], str, Union[tuple[int, int], None]], Split]


@dataclass(frozen=True)
class Dataset:
    """A named dataset: what it is, and its reader ``(data_dir, split, size) -> Split``."""

    name: str
    reader: Reader
    title: str = ""
    num_classes: int | None = None
    needs_data_dir: bool = True

    def load(self, data_dir: PathLike | None = None, split: str = "test", *,
             size: int | tuple[int, int] | None = None) -> Split:
        """One split (``"train"`` or ``"test"``); ``size`` resizes where the format allows."""
        from .readers import DataError, _check_size

        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
        hw = _check_size(size)
        if self.needs_data_dir and data_dir is None:
            raise DataError(f"dataset {self.name!r} needs data_dir, the folder holding its files")
        return self.reader(None if data_dir is None else Path(data_dir), split, hw)


DATASETS: Registry[Dataset] = Registry("dataset")
"""name -> :class:`Dataset`."""


# ------------------------------------------------------------------ array layout


def _npy(path: Path) -> np.ndarray:
    """``path`` or ``path.xz`` as a plain array (never unpickles); DataError otherwise."""
    from .readers import DataError

    xz = path.with_name(path.name + ".xz")
    source = path if path.exists() else xz
    if not source.exists():
        raise DataError(f"{path} (or {xz.name}) not found: save the array with np.save")
    try:
        if source is xz:
            with lzma.open(xz) as fh:
                arr = np.load(fh, allow_pickle=False)
        else:
            arr = np.load(path, allow_pickle=False)
    except Exception as e:  # any failure while decoding an untrusted file
        raise DataError(f"cannot read {source} ({type(e).__name__}): save a plain numeric array "
                        "with np.save (no object arrays)") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{source} is not a single .npy array: save it with np.save")
    return arr


def load_arrays(folder: PathLike, split: str, size: tuple[int, int] | None = None) -> Split | None:
    """``folder/x_{split}.npy[.xz]`` and ``y_{split}.npy`` (plus the test split's mask
    ``test_eval.npy`` / ``test_lossless.npy``) as a :class:`Split`; None when the folder
    holds no such arrays."""
    from .readers import DataError, _check_basic, _labels_from_array, _x_from_array

    folder = Path(folder)
    if not any(folder.glob(f"x_{split}.npy*")):
        return None
    xpath = folder / f"x_{split}.npy"
    x = _x_from_array(_npy(xpath), str(xpath))
    ypath = folder / f"y_{split}.npy"
    y = torch.from_numpy(_labels_from_array(_npy(ypath), int(x.shape[0]), str(ypath)))
    _check_basic(x, y)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        raise DataError(f"the arrays in {folder} hold {x.shape[-2]}x{x.shape[-1]} images, got "
                        f"size={size!r}: leave size unset or save arrays of that size")
    mask = None
    if split == "test":
        for name in ("test_eval.npy", "test_lossless.npy"):
            if (folder / name).exists():
                m = _npy(folder / name)
                if m.shape != (len(y),) or not (m.dtype == np.bool_ or np.issubdtype(m.dtype, np.integer)):
                    raise DataError(f"{folder / name} must be a boolean mask of shape ({len(y)},), got "
                                    f"{m.dtype} {tuple(m.shape)}")
                mask = torch.from_numpy(m.astype(bool))
                break
    return Split(x, y, mask)


def _named(name: str, folders: tuple[str, ...], standard: Callable[[Path, str, tuple[int, int] | None], Split]
           ) -> Reader:
    def read(root: Path | None, split: str, size: tuple[int, int] | None) -> Split:
        assert root is not None
        for sub in folders:
            got = load_arrays(root / sub, split, size)
            if got is not None:
                return got
        return standard(root, split, size)

    read.__doc__ = f"{name}: arrays in DATA_DIR/{{{','.join(folders)}}}, else its standard format."
    return read


def _cifar10_standard(root: Path, split: str, size: tuple[int, int] | None) -> Split:
    from .readers import DataError, load_cifar10

    if size not in (None, (32, 32)):
        raise DataError(f"cifar10 images are 32x32, got size={size!r}: leave size unset or use 32")
    x, y = load_cifar10(root, split=split)
    return Split(x, y)


def _gtsrb_standard(root: Path, split: str, size: tuple[int, int] | None) -> Split:
    from .readers import DataError, load_gtsrb

    if size is not None and size[0] != size[1]:
        raise DataError(f"GTSRB images are resized to squares, got size={size!r}: give one int")
    x, y = load_gtsrb(root, split=split, size=32 if size is None else size[0])
    return Split(x, y)


# ------------------------------------------------------------------------ digits


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 digits: float32 (1797, 1, 8, 8) in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the digits dataset ships with scikit-learn: pip install 'ibau[demo]' "
                         "(or pip install scikit-learn)") from None
    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16).unsqueeze(1)  # pixel values 0..16
    return x, torch.from_numpy(d.target).long()


def split_digits(seed: int = 0):
    """The digits and a seeded split of their indices: 1,100 training, 400 clean (the
    defender's), the rest (297) test; also the generator that drew it, for the draws
    that follow (which images get poisoned). Returns ``(x, y, train, clean, test, gen)``."""
    x, y = load_digits_tensors()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    return x, y, perm[:1100], perm[1100:1500], perm[1500:], g


def _digits(root: Path | None, split: str, size: tuple[int, int] | None) -> Split:
    from .readers import DataError

    if size not in (None, (8, 8)):
        raise DataError(f"digits images are 8x8, got size={size!r}: leave size unset or use 8")
    x, y, train, clean, test, _ = split_digits(0)
    idx = train if split == "train" else torch.cat([clean, test])
    return Split(x[idx], y[idx])


DATASETS.register()(Dataset("cifar10", _named("cifar10", ("cifar10", "cifar-10-batches-py", "."), _cifar10_standard),
                            title="CIFAR-10", num_classes=10))
DATASETS.register()(Dataset("gtsrb", _named("gtsrb", ("gtsrb32", "gtsrb", "."), _gtsrb_standard),
                            title="GTSRB", num_classes=43))
DATASETS.register()(Dataset("digits", _digits, title="Digits (scikit-learn)", num_classes=10, needs_data_dir=False))
