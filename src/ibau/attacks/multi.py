"""Multi-trigger, multi-target: several (trigger, target) pairs in one attack."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .badnets import BadNets
from ..errors import InputError, check_int, check_number
from .base import Attack, register_attack
from .blend import Blend
from .invisible import L0Inv, L2Inv
from .smooth import Smooth
from .trojan import TrojanSquare, TrojanWatermark

__all__ = ["MultiTrigger"]


@register_attack
class MultiTrigger(Attack):
    """Multi-trigger multi-target attack (the I-BAU paper's Table 3 setting): several
    triggers, each sending its images to its own target.

    Args:
        pairs: list of ``(attack, target)``. A model-dependent attack must be built with
            the same ``target`` as its pair (it is optimised towards it); a mismatch
            raises ValueError.

    ``apply(x, which=i)`` applies trigger ``i``; ``target_of(y, which=i)`` gives its
    target. ``attacks``/``targets`` list the pairs. ``prepare(model, x, y)`` prepares
    every sub-attack (generating the model-dependent ones, re-fitting the fixed ones to
    the size of ``x``). ``state_dict`` holds each sub-attack's tensors under
    ``"{i}.name"``. :meth:`paper` builds the paper's seven-trigger preset.
    ``target`` is None (no single target).

    Example:
        >>> atk = MultiTrigger.paper().prepare(model, x_clean, y_clean)
        >>> for i in range(len(atk)):
        ...     xt, yt = atk.apply(x, which=i), atk.target_of(y, which=i)
    """

    name = "multi"

    def __init__(self, pairs: Sequence[tuple[Attack, int]], *, seed: int = 0):
        super().__init__(target=0, seed=seed)
        self.target = None  # type: ignore[assignment]
        pairs = list(pairs)
        if not pairs:
            raise InputError("pairs: MultiTrigger needs at least one (attack, target) pair")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], Attack):
                raise InputError(f"pairs[{i}] is not an (Attack, target) pair: {pair!r}")
            atk, tgt = pair
            check_int(f"pairs[{i}] target", tgt, low=0)
            if atk.needs_model and isinstance(atk.target, int) and atk.target != int(tgt):
                raise InputError(f"pair {i}: {atk.name} is generated towards {atk.target}, but its target is {tgt}")
        self.attacks: list[Attack] = [a for a, _ in pairs]
        self.targets: list[int] = [int(t) for _, t in pairs]
        self.needs_model = any(a.needs_model for a in self.attacks)

    @classmethod
    def paper(cls, num_classes: int = 10, seed: int = 0, *, image_shape: Sequence[int] = (3, 32, 32),
              **generation: Any) -> "MultiTrigger":
        """The paper's seven triggers: Trojan WM->9, Trojan SQ->2, BadNets->0, Smooth->1,
        Blend->3, l0-inv->4, l2-inv->5, each with its class's defaults and ``seed``.
        ``generation`` (e.g. ``steps=50, batch_size=64``) goes to every model-dependent
        attack."""
        if check_int("num_classes", num_classes, low=2) < 10:
            raise InputError("the paper's preset uses targets up to 9: num_classes must be >= 10")
        kw = dict(seed=seed, image_shape=image_shape, **generation)
        pairs: list[tuple[Attack, int]] = [
            (TrojanWatermark(target=9, **kw), 9),
            (TrojanSquare(target=2, **kw), 2),
            (BadNets(target=0, image_shape=image_shape), 0),
            (Smooth(target=1, **kw), 1),
            (Blend(target=3, seed=seed, image_shape=image_shape), 3),
            (L0Inv(target=4, **kw), 4),
            (L2Inv(target=5, **kw), 5),
        ]
        return cls(pairs, seed=seed)

    def config(self) -> dict[str, Any]:
        """The per-pair settings: ``{"parts": [{"attack", "config", "target"}, ...]}``."""
        return {"parts": [{"attack": a.name, "config": a.config(), "target": t}
                          for a, t in zip(self.attacks, self.targets)]}

    def __len__(self) -> int:
        return len(self.attacks)

    def _index(self, which: int) -> int:
        if not -len(self.attacks) <= which < len(self.attacks):
            raise IndexError(f"trigger {which} out of range (0..{len(self.attacks) - 1})")
        return which % len(self.attacks)

    def apply(self, x: Tensor, which: int = 0) -> Tensor:
        return self.attacks[self._index(which)].apply(x)

    def target_of(self, y: Tensor, which: int = 0) -> Tensor:
        return torch.full_like(torch.as_tensor(y).long(), self.targets[self._index(which)])

    def poisoned_set(self, x: Tensor, y: Tensor, ratio: float, *, seed: int = 0):
        """The paper's multi-trigger training set: one copy of ``(x, y)`` per trigger, each
        with ``ratio`` poisoned by it (:func:`ibau.data.poison.poison_multi`)."""
        from ..data.poison import poison_multi

        return poison_multi(x, y, self, ratio, seed=seed)

    def trigger_fn(self, which: int) -> Callable[[Tensor], Tensor]:
        """``x -> apply(x, which)`` (for metrics that take a trigger function)."""
        i = self._index(which)
        return lambda x: self.attacks[i].apply(x)

    def prepare(self, model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None) -> "MultiTrigger":
        for atk in self.attacks:
            if atk.needs_model or x is not None:
                atk.prepare(model, x, y)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{i}.{k}": v for i, atk in enumerate(self.attacks) for k, v in atk.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> "MultiTrigger":
        parts: list[dict[str, Tensor]] = [{} for _ in self.attacks]
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if not head.isdigit() or not rest or int(head) >= len(self.attacks):
                raise KeyError(f"unexpected key {key!r} in a MultiTrigger state")
            parts[int(head)][rest] = value
        for atk, part in zip(self.attacks, parts):
            if part:
                atk.load_state_dict(part)
        return self
