"""Datasets for the grid and the evaluation protocol (which images are the defender's
clean set and which measure ACC/ASR).

A dataset is found under the runner's data folder in one of two layouts:

* arrays: ``DIR/x_{split}.npy[.xz]`` (uint8 N,H,W,C or N,H,W) and ``DIR/y_{split}.npy``,
  optionally ``DIR/test_eval.npy`` / ``DIR/test_lossless.npy`` (a boolean mask of the
  test images that measure the result; the others form the clean-set pool);
* the standard format the CLI reads (CIFAR-10 batches, GTSRB's official folders):
  :func:`ibau.data.readers.load_dataset`.

``digits`` (scikit-learn's bundled 8x8 digits, no download) needs no folder: it is
what the tests and the tiny example grid use.
"""

from __future__ import annotations

import functools
import lzma
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "Split", "load", "protocol_split"]

Split = tuple[Tensor, Tensor]


def _npy(path: Path) -> np.ndarray:
    if path.exists():
        return np.load(path, allow_pickle=False)
    xz = path.with_name(path.name + ".xz")
    if xz.exists():
        with lzma.open(xz) as fh:
            return np.load(fh, allow_pickle=False)
    raise FileNotFoundError(path)


def _images(x: np.ndarray) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dim() == 3:
        t = t.unsqueeze(-1)
    return t.permute(0, 3, 1, 2).float().div_(255)


def _arrays(folder: Path, split: str) -> Split | None:
    if not any(folder.glob(f"x_{split}.npy*")):
        return None
    return _images(_npy(folder / f"x_{split}.npy")), torch.from_numpy(_npy(folder / f"y_{split}.npy").astype(np.int64))


def _eval_mask(folder: Path) -> Tensor | None:
    for name in ("test_eval.npy", "test_lossless.npy"):
        if (folder / name).exists():
            return torch.from_numpy(np.load(folder / name, allow_pickle=False).astype(bool))
    return None


def _folder_dataset(name: str, folders: tuple[str, ...]) -> Callable[[Path | None, str], dict[str, Any]]:
    def load(root: Path | None, split: str) -> dict[str, Any]:
        if root is None:
            raise FileNotFoundError(f"dataset {name} needs a data folder (--data-dir)")
        for sub in folders:
            got = _arrays(root / sub, split)
            if got is not None:
                return {"x": got[0], "y": got[1], "eval_mask": _eval_mask(root / sub) if split == "test" else None}
        from ..data.readers import load_dataset

        x, y = load_dataset(name, root, split=split)
        return {"x": x, "y": y, "eval_mask": None}

    return load


def _digits(root: Path | None, split: str) -> dict[str, Any]:
    from ..demo import load_digits_tensors

    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    idx = perm[:1100] if split == "train" else perm[1100:]
    return {"x": x[idx], "y": y[idx], "eval_mask": None}


#: name -> loader(root, split) -> {"x", "y", "eval_mask"}; add your own
DATASETS: dict[str, Callable[[Path | None, str], dict[str, Any]]] = {
    "cifar10": _folder_dataset("cifar10", ("cifar10", "cifar-10-batches-py", ".")),
    "gtsrb": _folder_dataset("gtsrb", ("gtsrb32", "gtsrb", ".")),
    "digits": _digits,
}
NUM_CLASSES = {"cifar10": 10, "gtsrb": 43, "digits": 10}


@functools.lru_cache(maxsize=8)
def load(name: str, root: str | None, split: str) -> dict[str, Any]:
    """A split of a dataset (cached per process)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None
    return loader(Path(root) if root else None, split)


def protocol_split(name: str, root: str | None, protocol: dict[str, Any]) -> tuple[Split, Split]:
    """(clean set, evaluation set) from the test split, as in the paper: a seeded random
    ``clean_size`` images are the defender's; ACC/ASR are measured on the others (on
    the ``eval_mask`` images where the folder marks some, e.g. CIFAR-10's lossless
    1,000), optionally a seeded ``eval_size`` of them."""
    d = load(name, root, "test")
    x, y, mask = d["x"], d["y"], d["eval_mask"]
    g = torch.Generator().manual_seed(int(protocol.get("split_seed", 0)))
    n_clean = int(protocol["clean_size"])
    if mask is not None:
        pool, ev = torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()
        pool = pool[torch.randperm(len(pool), generator=g)]
    else:
        perm = torch.randperm(len(x), generator=g)
        pool, ev = perm, perm[n_clean:]
    if n_clean > len(pool) or (mask is None and n_clean >= len(x)):
        raise ValueError(f"{name}: clean_size {n_clean} leaves no evaluation images ({len(x)} test images)")
    clean = pool[:n_clean]
    if protocol.get("eval_size"):
        ev = ev[torch.randperm(len(ev), generator=g)[: int(protocol["eval_size"])]]
    return (x[clean], y[clean]), (x[ev], y[ev])
