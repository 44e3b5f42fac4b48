"""Readers that turn a user's clean dataset into the tensors the library takes.

Every reader returns ``x`` as a float32 tensor of shape (N, C, H, W) with values in
[0, 1] and ``y`` as an int64 tensor of shape (N,). Any problem with the input raises
:class:`DataError` (a ``ValueError``) whose one-line message names the problem and
how to fix it.

Supported inputs
----------------
``.npz`` file (:func:`load_npz`)
    Arrays ``x`` and ``y``. ``x`` is either uint8 (N, H, W, C) or (N, H, W) with
    values 0..255 (as most image libraries store pixels), or floating (N, C, H, W)
    with values in [0, 1]. ``y`` holds non-negative integer class ids (an integer
    dtype, or a float dtype whose values are whole numbers).

Image folder (:func:`load_image_folder`)
    One sub-folder per class; sub-folders sorted by name get labels 0, 1, ...
    Images (png, jpg, jpeg, bmp, gif, ppm, tif, tiff, webp) are read with Pillow and
    converted to RGB, unless every image is grayscale, in which case C = 1.

CIFAR-10 (:func:`load_cifar10`)
    Either distributed format, found in ``root/cifar-10-batches-py`` /
    ``root/cifar-10-batches-bin`` or directly in ``root``: the "python version"
    (pickled dicts ``data_batch_1`` .. ``data_batch_5``, ``test_batch``) or the
    "binary version" (``data_batch_1.bin`` .. ``test_batch.bin``, records of one
    label byte plus 3072 pixel bytes: R, G and B planes of 32x32, row-major).

GTSRB (:func:`load_gtsrb`)
    The official layout: ``GTSRB/Final_Training/Images/<class id>/GT-<class id>.csv``
    with the ``.ppm`` images for training, and ``GTSRB/Final_Test/Images/*.ppm`` plus
    the labelled annotation file ``GT-final_test.csv`` for testing. Each image is
    cropped to its region of interest (the ``Roi.*`` columns) and resized to
    ``size`` x ``size`` with Pillow's bilinear filter.

:func:`load_dataset` picks the right reader from a string (a ``.npz`` path, a folder,
or a name in the registry :data:`ibau.data.DATASETS`), and :func:`check_dataset` validates tensors.

Safety rule
-----------
Nothing here ever unpickles arbitrary objects. ``.npz`` files are opened with
``allow_pickle=False``. The CIFAR-10 python batches are pickles, so they are read
with a restricted unpickler that only admits the few numpy functions needed to
rebuild a plain array; any other global (for example ``os.system`` in a tampered
file) is refused with a :class:`DataError` before it can run.
"""

from __future__ import annotations

import csv
import os
import pickle
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import torch
from PIL import Image
from ..errors import InputError
from .datasets import DATASETS

__all__ = [
    "DataError",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "check_dataset",
    "load_cifar10",
    "load_dataset",
    "load_gtsrb",
    "load_image_folder",
    "load_npz",
]

PathLike = Union[str, os.PathLike[str]]  # a path given as str or Path

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp"}
)
_SPLITS = ("train", "test")
_RANGE_TOL = 1e-6
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR
# Pillow raises many kinds of exception for damaged files (OSError, ValueError, SyntaxError,
# struct.error, IndexError, DecompressionBombError...): every one is a refusal of the file.
_PIL_ERRORS: tuple[type[BaseException], ...] = (Exception,)


class DataError(InputError):
    """A dataset that cannot be used as given; the message says what to change."""


# --------------------------------------------------------------------------- checks


def _shape(t: torch.Tensor | np.ndarray) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _check_basic(x: torch.Tensor, y: torch.Tensor, *, min_size: int = 1) -> None:
    """Shape, dtype, value-range and length checks shared by every loader."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError(
            f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}: "
            "convert with torch.from_numpy or load the data with ibau.data.readers"
        )
    if x.dim() != 4:
        raise DataError(
            f"x must have 4 dimensions (N,C,H,W), got shape {_shape(x)}: "
            "add the missing axis (e.g. x[:, None] for grayscale)"
        )
    if not x.is_floating_point():
        raise DataError(
            f"x must be a float tensor in [0,1], got dtype {x.dtype}: "
            "use x.float() / 255 for 0..255 pixels"
        )
    if y.dim() != 1:
        raise DataError(f"y must be 1-D (N,), got shape {_shape(y)}: flatten it with y.reshape(-1)")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise DataError(f"y must hold integer class ids, got dtype {y.dtype}: convert with y.long()")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"x has {x.shape[0]} images but y has {y.shape[0]} labels: give one label per image"
        )
    if x.shape[0] < min_size:
        raise DataError(
            f"the dataset has {x.shape[0]} images but at least {min_size} are needed: "
            "give more data"
        )
    if x.numel() == 0:
        return
    if not bool(torch.isfinite(x).all()):
        raise DataError("x contains NaN or inf values: remove or repair those images")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise DataError(
            f"x values must lie in [0,1], got [{lo:g}, {hi:g}]: "
            "divide 0..255 pixels by 255 and undo any mean/std normalisation"
        )
    if y.numel() and int(y.min()) < 0:
        raise DataError(
            f"labels must be non-negative class ids, got {int(y.min())}: map classes to 0..C-1"
        )


def check_dataset(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int | None = None,
    min_size: int = 1,
) -> None:
    """Validate a dataset for use with a classifier; raise :class:`DataError` if unfit.

    Checks that ``x`` is a 4-D (N, C, H, W) float tensor with finite values in [0, 1],
    that ``y`` is a 1-D integer tensor with one non-negative label per image, that
    there are at least ``min_size`` images and at least two distinct classes, and,
    when ``num_classes`` is given, that every label is below it.
    """
    _check_basic(x, y, min_size=min_size)
    present = torch.unique(y) if y.numel() else y
    if present.numel() < 2:
        which = f"only class {int(present[0])}" if present.numel() else "no labels"
        raise DataError(
            f"the data holds {which}: at least 2 classes are needed, so give a clean set "
            "that covers several classes"
        )
    if num_classes is not None:
        top = int(y.max())
        if top >= num_classes:
            raise DataError(
                f"labels go up to {top} but the model has {num_classes} classes: "
                f"set num_classes to {top + 1} or check the data"
            )


def _to_tensors(x_u8_nhwc: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N,H,W,C) pixels and integer labels -> float (N,C,H,W) in [0,1], int64 (N,)."""
    x = torch.from_numpy(np.ascontiguousarray(x_u8_nhwc)).permute(0, 3, 1, 2)
    x = x.to(torch.float32).div_(255.0).contiguous()
    return x, torch.from_numpy(np.asarray(y, dtype=np.int64).copy())


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
    return split


def _check_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """None, an int or (H, W) -> None or (H, W) of positive ints."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    elif (
        isinstance(size, Sequence)
        and not isinstance(size, (str, bytes))
        and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
    ):
        hw = (int(size[0]), int(size[1]))
    else:
        raise DataError(f"size must be an int or a pair (H, W) of ints, got {size!r}: e.g. size=32")
    if min(hw) < 1:
        raise DataError(f"size must be positive, got {size!r}: e.g. size=32")
    return hw


# ------------------------------------------------------------------------------ npz


def _labels_from_array(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """Validate a label array from a file and return it as int64."""
    if not isinstance(y, np.ndarray):
        raise DataError(f"y in {where} is not array data (got {type(y).__name__}): save a numeric array")
    if y.ndim != 1:
        raise DataError(f"y in {where} must be 1-D (N,), got shape {_shape(y)}: save y.reshape(-1)")
    if y.shape[0] != n:
        raise DataError(
            f"x in {where} has {n} images but y has {y.shape[0]} labels: save one label per image"
        )
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(
            f"y in {where} has dtype {y.dtype}: save integer class ids (e.g. y.astype(np.int64))"
        )
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise DataError(
                f"y in {where} holds non-integer labels (dtype {y.dtype}): "
                "save integer class ids, not probabilities or one-hot rows"
            )
    if y.size and y.min() < 0:
        raise DataError(
            f"y in {where} has negative label {y.min():g}: map classes to 0..C-1"
        )
    if y.size and np.issubdtype(y.dtype, np.unsignedinteger) and int(y.max()) > np.iinfo(np.int64).max:
        raise DataError(f"y in {where} has labels too large for int64: map classes to 0..C-1")
    return y.astype(np.int64)


def load_npz(path: PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``x`` and ``y`` from a ``.npz`` file (never unpickles).

    ``x``: uint8 (N, H, W, C) or (N, H, W) with 0..255 pixels, or float (N, C, H, W)
    in [0, 1]. ``y``: 1-D non-negative integer labels, one per image.
    Returns ``(x, y)`` as float32 (N, C, H, W) in [0, 1] and int64 (N,).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"file not found: {p}: check the path")
    if not p.is_file():
        raise DataError(f"{p} is not a file: give a .npz file with arrays x and y")
    try:
        archive = np.load(p, allow_pickle=False)
    except Exception as e:  # any failure while decoding an untrusted file
        raise DataError(
            f"{p} is not a readable .npz archive ({type(e).__name__}): "
            "save it with np.savez(path, x=x, y=y)"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{p} holds a single array, not a .npz archive: save it with np.savez(path, x=x, y=y)"
        )
    with archive:
        keys = list(archive.files)
        missing = [k for k in ("x", "y") if k not in keys]
        if missing:
            raise DataError(
                f"{p} has no array {' or '.join(repr(k) for k in missing)} (it has: "
                f"{', '.join(keys) or 'nothing'}): save it with np.savez(path, x=images, y=labels)"
            )
        try:
            x = archive["x"]
            y = archive["y"]
        except Exception as e:  # any failure while decoding an untrusted member
            reason = (str(e).splitlines() or [""])[0]
            raise DataError(
                f"cannot read x/y from {p} ({type(e).__name__}: {reason}): "
                "save plain numeric arrays (no object arrays) with np.savez"
            ) from None
    for key, arr in (("x", x), ("y", y)):
        if not isinstance(arr, np.ndarray):
            raise DataError(
                f"member {key!r} of {p} is not array data (got {type(arr).__name__}): "
                "save plain numeric arrays with np.savez(path, x=x, y=y)"
            )
    x_t = _x_from_array(x, str(p))
    y_np = _labels_from_array(y, int(x_t.shape[0]), str(p))
    y_t = torch.from_numpy(y_np)
    _check_basic(x_t, y_t)
    return x_t, y_t


def _x_from_array(x: np.ndarray, where: str) -> torch.Tensor:
    """uint8 NHWC / NHW or float NCHW array -> float32 NCHW tensor in [0,1]."""
    layouts = "N,H,W,C uint8 or N,C,H,W float"
    if not isinstance(x, np.ndarray):
        raise DataError(f"x in {where} is not array data (got {type(x).__name__}): save a numeric array")
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise DataError(
                f"x must have 4 dimensions ({layouts}), got shape {_shape(x)} in {where}: "
                "add the missing axis"
            )
        if x.shape[-1] > 4 and x.shape[1] <= 4:
            raise DataError(
                f"uint8 x in {where} has shape {_shape(x)}, which looks like N,C,H,W: "
                "uint8 images must be N,H,W,C (x.transpose(0, 2, 3, 1)), or save float N,C,H,W in [0,1]"
            )
        x_t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
        return x_t.to(torch.float32).div_(255.0).contiguous()
    if np.issubdtype(x.dtype, np.floating):
        if x.ndim != 4:
            raise DataError(
                f"x must have 4 dimensions ({layouts}), got shape {_shape(x)} in {where}: "
                "float images must be N,C,H,W (e.g. x[:, None] for grayscale)"
            )
        if x.shape[1] > 4 and x.shape[-1] <= 4:
            raise DataError(
                f"float x in {where} has shape {_shape(x)}, which looks like N,H,W,C: "
                "float images must be N,C,H,W (x.transpose(0, 3, 1, 2))"
            )
        if x.size and not np.isfinite(x).all():
            raise DataError(f"x in {where} contains NaN or inf values: remove or repair those images")
        if x.size:
            lo, hi = float(x.min()), float(x.max())
            if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
                raise DataError(
                    f"float x in {where} must lie in [0,1], got [{lo:g}, {hi:g}]: divide 0..255 "
                    "pixels by 255 (or save uint8) and undo any mean/std normalisation"
                )
        x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return x_t.clamp_(0.0, 1.0)
    raise DataError(
        f"x in {where} has dtype {x.dtype}: save uint8 pixels 0..255 (N,H,W,C) or "
        "float values in [0,1] (N,C,H,W)"
    )


# --------------------------------------------------------------------- image folder


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        f for f in folder.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
    )


def _open_header(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and (W, H) of an image, reading only its header."""
    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except _PIL_ERRORS as e:
        raise DataError(
            f"cannot read image {path} ({type(e).__name__}): replace or delete the file"
        ) from None


def _decode(path: Path, mode: str) -> Image.Image:
    """Fully decode an image file and convert it to ``mode`` ('RGB' or 'L')."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except _PIL_ERRORS as e:
        raise DataError(
            f"cannot read image {path} ({type(e).__name__}): replace or delete the file"
        ) from None


def _pixels(img: Image.Image, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize (bilinear) to ``size_wh`` = (W, H) if needed; -> uint8 (H, W, C)."""
    if img.size != size_wh:
        img = img.resize(size_wh, _BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def load_image_folder(
    path: PathLike, *, size: int | Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read a folder with one sub-folder of images per class.

    Class sub-folders sorted by name get labels 0..C-1 (hidden folders are skipped).
    Images are converted to RGB unless all are grayscale ('L'), giving C = 1. If they
    differ in size, pass ``size`` (an int or ``(H, W)``) to resize all with bilinear.
    Returns ``(x, y, class_names)``.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"folder not found: {root}: check the path")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: give a folder with one sub-folder of images per class")
    hw = _check_size(size)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = _image_files(root)
        hint = f" (it holds {len(loose)} loose images)" if loose else ""
        raise DataError(
            f"{root} has no class sub-folders{hint}: put the images of each class in "
            "their own sub-folder, e.g. root/cat/*.png, root/dog/*.png"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _image_files(root / name)
        if not found:
            raise DataError(
                f"class folder {root / name} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                "add images or remove the folder"
            )
        files.extend(found)
        labels.extend([label] * len(found))

    headers = [_open_header(f) for f in files]
    gray = all(m in ("L", "1") for m, _ in headers)
    mode = "L" if gray else "RGB"
    if hw is None:
        first_size = headers[0][1]
        for f, (_, s) in zip(files, headers):
            if s != first_size:
                raise DataError(
                    f"images differ in size ({files[0].relative_to(root)} is {first_size[0]}x{first_size[1]}, "
                    f"{f.relative_to(root)} is {s[0]}x{s[1]} WxH): pass size=(H, W) or an int "
                    "to resize them all"
                )
        size_wh = first_size
    else:
        size_wh = (hw[1], hw[0])
    out = np.empty((len(files), size_wh[1], size_wh[0], 1 if gray else 3), dtype=np.uint8)
    for i, f in enumerate(files):
        out[i] = _pixels(_decode(f, mode), size_wh)
    x, y = _to_tensors(out, np.asarray(labels))
    _check_basic(x, y)
    return x, y, classes


# ------------------------------------------------------------------------- CIFAR-10


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals the CIFAR unpickler may resolve: what rebuilds a plain array."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar
        # Pickle protocol 5 (Python >= 3.14 default) rebuilds arrays from a byte buffer.
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


_ALLOWED_GLOBALS = _numpy_globals()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except the numpy array reconstructors."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self._source}: CIFAR batches hold "
                "only numpy arrays, so the file is corrupt or tampered with; re-download the dataset"
            ) from None


def _get(d: dict, key: str) -> Any:
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _read_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, str(path)).load()
    except DataError:
        raise
    except Exception as e:  # any failure while decoding an untrusted file
        raise DataError(
            f"cannot read CIFAR batch {path} ({type(e).__name__}): the file is damaged; "
            "re-download and extract cifar-10-python.tar.gz"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"CIFAR batch {path} holds a {type(obj).__name__}, not a dict: "
            "re-download and extract cifar-10-python.tar.gz"
        )
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if labels is None and _get(obj, "fine_labels") is not None:
        raise DataError(f"{path} is a CIFAR-100 batch (it has fine_labels): give CIFAR-10 files")
    if data is None or labels is None:
        keys = ", ".join(k.decode() if isinstance(k, bytes) else str(k) for k in obj)
        raise DataError(
            f"CIFAR batch {path} lacks 'data' or 'labels' (it has: {keys}): "
            "re-download and extract cifar-10-python.tar.gz"
        )
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {_shape(data)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"CIFAR batch {path} has data {desc}, expected uint8 (N, 3072): "
            "re-download and extract cifar-10-python.tar.gz"
        )
    try:
        y = np.asarray(labels)
    except (ValueError, TypeError):
        y = np.asarray([], dtype=object)
    if y.ndim != 1 or y.shape[0] != data.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"CIFAR batch {path} has {data.shape[0]} images but its labels are not "
            f"{data.shape[0]} integers: re-download and extract cifar-10-python.tar.gz"
        )
    return data.reshape(-1, 3, 32, 32), y


def _read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    record = 1 + 3072
    nbytes = path.stat().st_size
    if nbytes == 0 or nbytes % record:
        hint = ""
        if nbytes and nbytes % 3074 == 0:
            hint = " (CIFAR-100 records are 3074 bytes: give CIFAR-10 files)"
        raise DataError(
            f"{path} has {nbytes} bytes, not a multiple of {record} (1 label + 3072 pixel bytes)"
            f"{hint}: the file is truncated or not CIFAR-10; re-download cifar-10-binary.tar.gz"
        )
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
    return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].copy()


_CIFAR_FORMATS: dict[str, tuple[str, str, Callable[[Path], tuple[np.ndarray, np.ndarray]]]] = {
    # name: (sub-folder, file suffix, reader)
    "python": ("cifar-10-batches-py", "", _read_cifar_pickle),
    "binary": ("cifar-10-batches-bin", ".bin", _read_cifar_bin),
}


def _cifar_files(split: str, suffix: str) -> list[str]:
    stems = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    return [s + suffix for s in stems]


def load_cifar10(root: PathLike, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 from its python (pickled) or binary distribution.

    Looks in ``root/cifar-10-batches-py``, ``root/cifar-10-batches-bin`` and ``root``
    itself. ``split="train"`` reads ``data_batch_1..5``; ``"test"`` reads ``test_batch``.
    Pickled batches are read with a numpy-only unpickler (see the module docstring).
    Returns ``(x, y)``: float32 (N, 3, 32, 32) in [0, 1] and int64 (N,).
    """
    _check_split(split)
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"CIFAR-10 folder not found: {base}: pass the folder that holds cifar-10-batches-py")
    looked: list[str] = []
    for sub, suffix, reader in _CIFAR_FORMATS.values():
        for folder in (base / sub, base):
            names = _cifar_files(split, suffix)
            looked.append(str(folder / (names[0] if len(names) == 1 else f"data_batch_1..5{suffix}")))
            present = [n for n in names if (folder / n).is_file()]
            if not present:
                continue
            missing = [n for n in names if n not in present]
            if missing:
                raise DataError(
                    f"CIFAR-10 files missing in {folder}: {', '.join(missing)}: "
                    "extract the complete archive"
                )
            parts = [reader(folder / n) for n in names]
            pixels = np.concatenate([p for p, _ in parts])
            labels = np.concatenate([lab for _, lab in parts]).astype(np.int64)
            if labels.size and (labels.min() < 0 or labels.max() > 9):
                raise DataError(
                    f"CIFAR-10 labels in {folder} range {labels.min()}..{labels.max()}, expected 0..9: "
                    "these are not CIFAR-10 files; re-download the dataset"
                )
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(255.0)
            y = torch.from_numpy(labels)
            _check_basic(x, y)
            return x, y
    archives = [a for a in ("cifar-10-python.tar.gz", "cifar-10-binary.tar.gz") if (base / a).is_file()]
    if archives:
        raise DataError(
            f"{base} holds {archives[0]} but not its contents: extract it there with "
            f"tar xzf {base / archives[0]} -C {base}"
        )
    raise DataError(
        f"no CIFAR-10 {split} files found (looked for {'; '.join(looked)}): pass the folder that "
        "holds the extracted cifar-10-batches-py or cifar-10-batches-bin"
    )


# ---------------------------------------------------------------------------- GTSRB

_GTSRB_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")


def _read_gtsrb_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=";")
            rows = list(reader)
            fields = [c.strip() for c in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(
            f"cannot read {path} ({type(e).__name__}): re-download the GTSRB annotations"
        ) from None
    if not rows:
        raise DataError(f"{path} has no annotation rows: re-download the GTSRB annotations")
    missing = [c for c in _GTSRB_COLUMNS if c not in fields]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {', '.join(missing)} (it has: {', '.join(fields)}): "
            "give the semicolon-separated GTSRB annotation file"
        )
    return [{(k or "").strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in rows]


def _gtsrb_row(row: dict[str, str], csv_path: Path) -> tuple[str, tuple[int, int, int, int], int]:
    try:
        x1, y1, x2, y2 = (int(row[c]) for c in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
        label = int(row["ClassId"])
    except ValueError:
        raise DataError(
            f"{csv_path}: row for {row.get('Filename')!r} has non-integer ROI or ClassId: "
            "re-download the GTSRB annotations"
        ) from None
    if label < 0:
        raise DataError(
            f"{csv_path}: negative ClassId {label} for {row['Filename']}: fix the annotation file"
        )
    return row["Filename"], (x1, y1, x2, y2), label


def _gtsrb_box(roi: tuple[int, int, int, int], wh: tuple[int, int], path: Path) -> tuple[int, int, int, int]:
    """Inclusive ROI -> PIL crop box, clamped to the image."""
    x1, y1, x2, y2 = roi
    box = (max(x1, 0), max(y1, 0), min(x2 + 1, wh[0]), min(y2 + 1, wh[1]))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise DataError(
            f"ROI {roi} of {path} is empty inside its {wh[0]}x{wh[1]} image: fix the annotation file"
        )
    return box


def _load_gtsrb_items(items: list[tuple[Path, tuple[int, int, int, int], int]], size: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    out = np.empty((len(items), size, size, 3), dtype=np.uint8)
    for i, (path, roi, _) in enumerate(items):
        if not path.is_file():
            raise DataError(
                f"GTSRB image listed in the annotations is missing: {path}: extract the complete archive"
            )
        img = _decode(path, "RGB")
        out[i] = _pixels(img.crop(_gtsrb_box(roi, img.size, path)), (size, size))
    x, y = _to_tensors(out, np.asarray([lab for _, _, lab in items]))
    _check_basic(x, y)
    return x, y


def _gtsrb_train(base: Path) -> list[tuple[Path, tuple[int, int, int, int], int]]:
    candidates = [base / "GTSRB" / "Final_Training" / "Images", base / "Final_Training" / "Images",
                  base / "Images", base]
    class_re = re.compile(r"^\d{5}$")
    for images in candidates:
        if not images.is_dir():
            continue
        class_dirs = sorted(d for d in images.iterdir() if d.is_dir() and class_re.match(d.name))
        if not class_dirs:
            continue
        items = []
        for d in class_dirs:
            csv_path = d / f"GT-{d.name}.csv"
            if not csv_path.is_file():
                raise DataError(
                    f"GTSRB annotation file missing: {csv_path}: extract the complete training archive"
                )
            for row in _read_gtsrb_csv(csv_path):
                name, roi, label = _gtsrb_row(row, csv_path)
                items.append((d / name, roi, label))
        return items
    raise DataError(
        "no GTSRB training images found (looked for 5-digit class folders in "
        f"{'; '.join(str(c) for c in candidates)}): pass the folder that holds GTSRB/Final_Training"
    )


def _gtsrb_test(base: Path) -> list[tuple[Path, tuple[int, int, int, int], int]]:
    image_dirs = [base / "GTSRB" / "Final_Test" / "Images", base / "Final_Test" / "Images",
                  base / "Images", base]
    csv_dirs = [base, base / "GTSRB", base / "GTSRB" / "Final_Test", base / "Final_Test", *image_dirs]
    csv_path = next((d / "GT-final_test.csv" for d in csv_dirs if (d / "GT-final_test.csv").is_file()), None)
    if csv_path is None:
        unlabelled = next((d / "GT-final_test.test.csv" for d in csv_dirs
                           if (d / "GT-final_test.test.csv").is_file()), None)
        if unlabelled is not None:
            raise DataError(
                f"only {unlabelled} was found, which has no ClassId column: the labelled "
                "GT-final_test.csv is needed (from GTSRB_Final_Test_GT.zip); put it in "
                f"{base} or next to the test images"
            )
        raise DataError(
            "GTSRB test annotations GT-final_test.csv not found (looked in "
            f"{'; '.join(str(d) for d in dict.fromkeys(csv_dirs))}): get it from "
            "GTSRB_Final_Test_GT.zip and put it in the data folder"
        )
    rows = [_gtsrb_row(r, csv_path) for r in _read_gtsrb_csv(csv_path)]
    first = rows[0][0]
    images = next((d for d in dict.fromkeys([csv_path.parent, *image_dirs]) if (d / first).is_file()), None)
    if images is None:
        raise DataError(
            f"GTSRB test image {first} (listed in {csv_path}) not found in "
            f"{'; '.join(str(d) for d in image_dirs)}: extract GTSRB_Final_Test_Images.zip into {base}"
        )
    return [(images / name, roi, label) for name, roi, label in rows]


def load_gtsrb(root: PathLike, split: str = "test", size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Read GTSRB from its official layout, cropped to each sign's ROI.

    ``train``: ``GTSRB/Final_Training/Images/<class>/GT-<class>.csv`` (also found under
    ``root/Final_Training/Images`` or ``root/Images``). ``test``: ``Final_Test/Images/*.ppm``
    with the labelled ``GT-final_test.csv``. Each image is cropped to its inclusive ROI,
    converted to RGB and resized to ``size`` x ``size`` (bilinear).
    Returns ``(x, y)``: float32 (N, 3, size, size) in [0, 1] and int64 (N,).
    """
    _check_split(split)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DataError(f"GTSRB size must be a positive int, got {size!r}: e.g. size=32")
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"GTSRB folder not found: {base}: pass the folder that holds GTSRB/")
    items = _gtsrb_train(base) if split == "train" else _gtsrb_test(base)
    return _load_gtsrb_items(items, int(size))


# ---------------------------------------------------------------------- dispatching


def _known() -> str:
    return ", ".join(sorted(DATASETS))


def load_dataset(
    spec: PathLike,
    *,
    data_dir: PathLike | None = None,
    split: str = "test",
    size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``(x, y)`` from a ``.npz`` file, an image folder, or a dataset name.

    ``spec`` is tried in this order: a name in the registry :data:`ibau.data.DATASETS`
    when ``data_dir`` is given or the dataset needs none (``digits``); an existing ``.npz`` file (:func:`load_npz`); an existing folder
    (:func:`load_image_folder`, resized to ``size`` if given); a known name, which then
    needs ``data_dir`` (the folder holding its files). ``split`` applies to named
    datasets only.
    """
    _check_split(split)
    text = os.fspath(spec)
    name = text.strip().lower()
    dataset = DATASETS.get(name)
    if dataset is not None and (data_dir is not None or not dataset.needs_data_dir):
        part = dataset.load(data_dir, split, size=size)
        return part.x, part.y
    p = Path(text)
    if p.is_file():
        if p.suffix.lower() != ".npz":
            raise DataError(
                f"data file {p} is not a .npz: save the images as np.savez(path, x=x, y=y) "
                "or give a folder with one sub-folder per class"
            )
        return load_npz(p)
    if p.is_dir():
        x, y, _ = load_image_folder(p, size=size)
        return x, y
    if dataset is not None:
        raise DataError(f"dataset {name!r} needs data_dir, the folder holding its files")
    if p.suffix.lower() == ".npz" or os.sep in text or (os.altsep and os.altsep in text):
        raise DataError(
            f"no such file or folder {text!r}: give an existing .npz file, an image folder, "
            f"or one of: {_known()}"
        )
    raise DataError(f"unknown data {text!r}: give a .npz file, an image folder, or one of: {_known()}")
