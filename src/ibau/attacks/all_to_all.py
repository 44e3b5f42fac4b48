"""All-to-all: one trigger, every label ``y`` sent to ``(y + 1) mod num_classes``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._common import as_shape, constructor_config, shape_of
from .badnets import BadNets
from ..errors import InputError, check_int, check_number
from .base import Attack, register_attack

__all__ = ["AllToAll"]


@register_attack
class AllToAll(Attack):
    """All-to-all attack (Gu et al., 2017, "BadNets"; the I-BAU paper's all-to-all
    setting): the BadNets trigger, and each triggered image of label ``y`` goes to
    ``(y + 1) % num_classes``.

    Args:
        num_classes: number of classes (10).
        trigger: the trigger: an :class:`Attack` (its ``apply``, ``prepare`` and
            ``state_dict`` are used) or any callable ``x -> x_triggered``; ``None``
            (default): ``BadNets(image_shape=image_shape)``.
        image_shape: (C, H, W) of the default BadNets trigger ((3, 32, 32)).

    There is no single target (``target`` is None); use :meth:`target_of`. A plain
    callable trigger has no state to save (``state_dict`` is then empty).

    Example:
        >>> atk = AllToAll(num_classes=10)
        >>> xt, yt = atk(x), atk.target_of(y)      # yt == (y + 1) % 10
    """

    name = "all_to_all"

    def __init__(self, num_classes: int = 10, trigger: Attack | Callable[[Tensor], Tensor] | None = None, *,
                 image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=0, seed=getattr(trigger, "seed", 0))
        check_int("num_classes", num_classes, low=2)
        if trigger is not None and not callable(trigger):
            raise InputError(f"trigger must be an Attack or a callable, got {type(trigger).__name__}")
        self.target = None  # type: ignore[assignment]
        self.num_classes = int(num_classes)
        self.image_shape = as_shape(image_shape)
        self.trigger = BadNets(image_shape=image_shape) if trigger is None else trigger
        self.needs_model = bool(getattr(self.trigger, "needs_model", False))

    def config(self) -> dict[str, Any]:
        """``num_classes`` and ``image_shape`` (a custom trigger is not plain data)."""
        return constructor_config(self)

    def apply(self, x: Tensor) -> Tensor:
        return self.trigger(x)

    def target_of(self, y: Tensor) -> Tensor:
        return (torch.as_tensor(y).long() + 1) % self.num_classes

    def prepare(self, model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None) -> "AllToAll":
        # labels are not passed on: a wrapped one-target attack would drop its own target class
        if isinstance(self.trigger, Attack):
            self.trigger.prepare(model, x, None)
        if x is not None:
            self.image_shape = shape_of(x)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        return self.trigger.state_dict() if isinstance(self.trigger, Attack) else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> "AllToAll":
        if isinstance(self.trigger, Attack):
            self.trigger.load_state_dict(state)
        return self
