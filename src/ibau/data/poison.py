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

from ..errors import InputError, check_int, check_number

__all__ = ["TensorSet", "PoisonedSet", "ConcatSet", "check_attack_targets", "check_ratio", "poison", "poison_multi"]


def check_ratio(ratio: float, name: str = "ratio") -> float:
    """The poisoned share: a finite number in (0, 1]; :class:`InputError` otherwise."""
    return float(check_number(name, ratio, low=0.0, low_open=True, high=1.0))


def _check_targets(target_of, y: Tensor, num_classes: int | None) -> None:
    """Every label the attack would give lies in [0, num_classes) (when known)."""
    if num_classes is None or not len(y):
        return
    check_int("num_classes", num_classes, low=2)
    t = target_of(y)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_classes:
        raise InputError(f"target {hi if hi >= num_classes else lo} is not a class of this data/model "
                         f"({num_classes} classes): choose a target in 0..{num_classes - 1}")


class TensorSet:
    """Images and labels in memory, drawn by index: ``batch(idx) -> (x, y)``."""

    def __init__(self, x: Tensor, y: Tensor):
        if len(x) != len(y):
            raise InputError(f"{len(x)} images but {len(y)} labels")
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


def check_attack_targets(attack, num_classes: int) -> None:
    """The labels ``attack`` sends images to are classes below ``num_classes``:
    :class:`InputError` naming ``target`` otherwise (one-target and multi-trigger attacks;
    all-to-all must not cycle through more classes than there are)."""
    check_int("num_classes", num_classes, low=1)
    targets = getattr(attack, "targets", None)
    if targets is None:
        t = getattr(attack, "target", None)
        targets = [t] if isinstance(t, int) else []
    for t in targets:
        if not 0 <= int(t) < num_classes:
            raise InputError(f"target {t} is not a class of the model ({num_classes} classes): "
                             f"choose a target in 0..{num_classes - 1}")
    cycle = getattr(attack, "num_classes", None)
    if getattr(attack, "target", 0) is None and isinstance(cycle, int) and cycle > num_classes:
        raise InputError(f"num_classes: the all-to-all attack cycles through {cycle} classes but the model "
                         f"has {num_classes}")


def poison(x: Tensor, y: Tensor, attack, ratio: float = 0.2, *, seed: int = 0,
           num_classes: int | None = None) -> PoisonedSet:
    """Poison ``ratio`` (in (0, 1]) of ``(x, y)`` with ``attack`` (an
    :class:`ibau.attacks.Attack`, or any object with ``apply`` and ``target_of``).
    Given ``num_classes``, the attack's targets must be classes below it."""
    return _poison(x, y, attack.apply, attack.target_of, ratio, seed, num_classes)


def _poison(x, y, apply, target_of, ratio: float, seed: int, num_classes: int | None = None) -> PoisonedSet:
    check_ratio(ratio)
    check_int("seed", seed, low=0)
    y = torch.as_tensor(y).long()
    if len(x) != len(y):
        raise InputError(f"{len(x)} images but {len(y)} labels")
    _check_targets(target_of, y, num_classes)
    candidates = torch.nonzero(target_of(y) != y).flatten()
    n = round(ratio * len(y))
    if n > len(candidates):
        raise InputError(f"ratio: cannot poison {n} samples: only {len(candidates)} have a label the attack "
                         "changes; lower the ratio")
    g = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(len(candidates), generator=g)[:n]]
    return PoisonedSet(x, y, apply, target_of, chosen)


def poison_multi(x: Tensor, y: Tensor, multi, ratio: float = 0.2, *, seed: int = 0,
                 num_classes: int | None = None) -> ConcatSet:
    """The paper's multi-trigger setting: one copy of the set per (trigger, target) pair,
    each with ``ratio`` poisoned by its own trigger, concatenated."""
    parts = []
    for i in range(len(multi.attacks)):
        parts.append(_poison(x, y, lambda t, i=i: multi.apply(t, which=i), lambda t, i=i: multi.target_of(t, which=i),
                             ratio, seed + i, num_classes))
    return ConcatSet(parts)
