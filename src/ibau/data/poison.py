"""Poisoning a dataset the way the paper does, without copying it.

A poisoned set keeps the clean tensors and a boolean mask of the poisoned samples;
the trigger is applied (and the label rewritten) when a batch is drawn. Poisoned
samples are drawn (seeded) from the images whose label the attack would change --
the non-target classes for a one-target attack, every class for all-to-all -- and
``ratio`` is the poisoned share of the whole set (the paper's 20%).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["TensorSet", "PoisonedSet", "ConcatSet", "poison", "poison_multi"]


class TensorSet:
    """Images and labels in memory, drawn by index: ``batch(idx) -> (x, y)``."""

    def __init__(self, x: Tensor, y: Tensor):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x, self.y = x, torch.as_tensor(y).long()

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[idx], self.y[idx]


class PoisonedSet(TensorSet):
    """A view of ``(x, y)`` where the samples in ``poisoned`` carry the trigger of
    ``apply`` and the label from ``target_of`` (both applied per batch)."""

    def __init__(self, x: Tensor, y: Tensor, apply, target_of, poisoned: Tensor):
        super().__init__(x, y)
        self.apply, self.target_of = apply, target_of
        self.mask = torch.zeros(len(self.y), dtype=torch.bool)
        self.mask[poisoned] = True

    @property
    def poisoned_indices(self) -> Tensor:
        return torch.nonzero(self.mask).flatten()

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        xb, yb = self.x[idx].clone(), self.y[idx].clone()
        m = self.mask[idx]
        if m.any():
            xb[m] = self.apply(xb[m])
            yb[m] = self.target_of(yb[m])
        return xb, yb


class ConcatSet:
    """Several sets one after the other (the paper's seven poisoned copies)."""

    def __init__(self, parts: Sequence[TensorSet]):
        self.parts = list(parts)
        self.offsets = torch.tensor([0] + [len(p) for p in self.parts]).cumsum(0)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def mask(self) -> Tensor:
        """The poisoned samples of all parts, in order."""
        return torch.cat([p.mask for p in self.parts])

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(idx)
        part = torch.bucketize(idx, self.offsets[1:], right=True)
        x, y = None, torch.empty(len(idx), dtype=torch.long)
        for p in part.unique().tolist():
            sel = torch.nonzero(part == p).flatten()
            xb, yb = self.parts[p].batch(idx[sel] - self.offsets[p])
            if x is None:
                x = xb.new_empty((len(idx), *xb.shape[1:]))
            x[sel], y[sel] = xb, yb
        return x, y


def poison(x: Tensor, y: Tensor, attack, ratio: float = 0.2, *, seed: int = 0) -> PoisonedSet:
    """Poison ``ratio`` of ``(x, y)`` with ``attack`` (an :class:`ibau.attacks.Attack`, or
    any object with ``apply`` and ``target_of``)."""
    return _poison(x, y, attack.apply, attack.target_of, ratio, seed)


def _poison(x, y, apply, target_of, ratio: float, seed: int) -> PoisonedSet:
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    y = torch.as_tensor(y).long()
    candidates = torch.nonzero(target_of(y) != y).flatten()
    n = round(ratio * len(y))
    if n > len(candidates):
        raise ValueError(f"cannot poison {n} samples: only {len(candidates)} have a label the attack changes")
    g = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(len(candidates), generator=g)[:n]]
    return PoisonedSet(x, y, apply, target_of, chosen)


def poison_multi(x: Tensor, y: Tensor, multi, ratio: float = 0.2, *, seed: int = 0) -> ConcatSet:
    """The paper's multi-trigger setting: one copy of the set per (trigger, target) pair,
    each with ``ratio`` poisoned by its own trigger, concatenated."""
    parts = []
    for i in range(len(multi.attacks)):
        parts.append(_poison(x, y, lambda t, i=i: multi.apply(t, which=i), lambda t, i=i: multi.target_of(t, which=i),
                             ratio, seed + i))
    return ConcatSet(parts)
