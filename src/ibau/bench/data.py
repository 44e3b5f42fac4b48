"""Datasets for the grid and the evaluation protocol (which images are the defender's
clean set and which measure ACC/ASR).

Datasets are the ones of the registry :data:`ibau.data.DATASETS` (one loader for the
command line, the grid and the benchmarks): CIFAR-10 / GTSRB under the runner's data
folder, as arrays (``x_{split}.npy[.xz]``, ``y_{split}.npy``, optionally
``test_eval.npy`` / ``test_lossless.npy``: a boolean mask of the test images that
measure the result; the others form the clean-set pool) or in their standard formats;
``digits`` (scikit-learn's bundled 8x8 digits) needs no folder: it is what the tests
and the tiny example grid use.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ..data.datasets import DATASETS
from ..errors import InputError, check_int

__all__ = ["DATASETS", "NUM_CLASSES", "Split", "load", "num_classes", "protocol_split"]

Split = tuple[Tensor, Tensor]


def num_classes(name: str) -> int | None:
    """The class count the registry records for dataset ``name`` (None when unknown)."""
    ds = DATASETS.get(name)
    return None if ds is None else ds.num_classes


class _NumClasses(Mapping):
    """Read-only ``name -> num_classes`` view of the registry."""

    def __getitem__(self, name: str) -> int:
        n = num_classes(name)
        if n is None:
            raise KeyError(name)
        return n

    def __iter__(self) -> Iterator[str]:
        return iter(DATASETS)

    def __len__(self) -> int:
        return len(DATASETS)


NUM_CLASSES: Mapping[str, int] = _NumClasses()


@functools.lru_cache(maxsize=8)
def load(name: str, root: str | None, split: str) -> dict[str, Any]:
    """A split of a dataset as ``{"x", "y", "eval_mask"}`` (cached per process)."""
    part = DATASETS.get_or_raise(name).load(root, split)
    return {"x": part.x, "y": part.y, "eval_mask": part.eval_mask}


def protocol_split(name: str, root: str | None, protocol: dict[str, Any]) -> tuple[Split, Split]:
    """(clean set, evaluation set) from the test split, as in the paper: a seeded random
    ``clean_size`` images are the defender's; ACC/ASR are measured on the others (on
    the ``eval_mask`` images where the folder marks some, e.g. CIFAR-10's lossless
    1,000), optionally a seeded ``eval_size`` of them."""
    d = load(name, root, "test")
    x, y, mask = d["x"], d["y"], d["eval_mask"]
    g = torch.Generator().manual_seed(check_int("split_seed", protocol.get("split_seed", 0), low=0))
    n_clean = check_int("clean_size", protocol["clean_size"], low=1)
    if mask is not None:
        pool, ev = torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()
        pool = pool[torch.randperm(len(pool), generator=g)]
    else:
        perm = torch.randperm(len(x), generator=g)
        pool, ev = perm, perm[n_clean:]
    if n_clean > len(pool) or (mask is None and n_clean >= len(x)):
        raise InputError(f"{name}: clean_size {n_clean} leaves no evaluation images ({len(x)} test images)")
    clean = pool[:n_clean]
    if protocol.get("eval_size"):
        ev = ev[torch.randperm(len(ev), generator=g)[: check_int("eval_size", protocol["eval_size"], low=1)]]
    return (x[clean], y[clean]), (x[ev], y[ev])


def unseen_train_split(name: str, root: str | None, protocol: dict[str, Any], train_size: int | None,
                       train_seed: int) -> Split:
    """A seeded random ``clean_size`` of the training images that a model trained on
    ``poisoning.subset(train, train_size, train_seed)`` never saw (``protocol["clean_from"]
    = "train_unseen"``): lossless clean images that are new to the model."""
    from ..poisoning import subset_indices

    d = load(name, root, "train")
    x, y = d["x"], d["y"]
    _, unseen = subset_indices(len(x), train_size, train_seed)
    n_clean = check_int("clean_size", protocol["clean_size"], low=1)
    if n_clean > len(unseen):
        raise InputError(f"{name}: clean_size {n_clean} exceeds the {len(unseen)} training images the model never saw")
    g = torch.Generator().manual_seed(check_int("split_seed", protocol.get("split_seed", 0), low=0))
    pick = unseen[torch.randperm(len(unseen), generator=g)[:n_clean]]
    return x[pick], y[pick]
