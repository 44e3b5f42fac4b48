"""The attack interface: a trigger function plus a label rule, with a registry.

An :class:`Attack` turns clean images into triggered ones (``apply``) and says which
label each triggered image should get (``target_of``). Attacks whose trigger is
*generated* against a model (l0/l2-inv, Smooth, Trojan) do so in ``prepare`` and are
deterministic per ``seed``. ``state_dict``/``load_state_dict`` carry the trigger
tensors, so a saved manifest re-applies exactly the same trigger later.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, check_int
from ..registry import Registry

__all__ = ["Attack", "ATTACKS", "register_attack", "create_attack", "check_target"]


class Attack(abc.ABC):
    """Base class. Subclasses set ``name`` and take their settings as keyword arguments."""

    name: str = ""
    #: whether ``prepare`` needs a model (trigger optimised against it)
    needs_model: bool = False

    def __init__(self, *, target: int = 0, seed: int = 0):
        # the range of ``target`` is checked where the class count is known (prepare, poisoning)
        self.target = int(check_int("target", target, low=0))
        self.seed = int(check_int("seed", seed, low=0, high=2**63 - 1))

    # -- the two things every attack defines --------------------------------------
    @abc.abstractmethod
    def apply(self, x: Tensor) -> Tensor:
        """Triggered copies of ``x`` ((N, C, H, W) or (C, H, W), float in [0, 1])."""

    def target_of(self, y: Tensor) -> Tensor:
        """The label each triggered image is sent to (one-target attacks: ``target``)."""
        return torch.full_like(torch.as_tensor(y).long(), self.target)

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x)

    # -- optional -----------------------------------------------------------------
    def prepare(self, model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None) -> "Attack":
        """Generate the trigger (no-op for fixed triggers). Returns ``self``."""
        return self

    def poisoned_set(self, x: Tensor, y: Tensor, ratio: float, *, seed: int = 0):
        """The training set the attacker releases: by default ``ratio`` of ``(x, y)``
        triggered and relabelled (:func:`ibau.data.poison.poison`). Attacks with other
        recipes (WaNet's noise-mode samples, clean-label poisons) override this; the
        result is any set with ``__len__`` and ``batch(idx) -> (x, y)``."""
        from ..data.poison import poison

        return poison(x, y, self, ratio, seed=seed)

    def train_poisoned(self, model: nn.Module, data, config, *, checkpoint=None, progress: bool = True) -> None:
        """Train ``model`` on ``data`` (from :meth:`poisoned_set`). Attacks that train
        something with the model (IAB's trigger generator) override this."""
        from ..train import train

        train(model, data, config, checkpoint=checkpoint, progress=progress, desc=f"training ({self.name})")

    def state_dict(self) -> dict[str, Tensor]:
        """Trigger tensors (saved next to a poisoned model)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> "Attack":
        return self

    def config(self) -> dict[str, Any]:
        """Settings as plain data."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


ATTACKS: Registry[type[Attack]] = Registry("attack")
"""name -> attack class (``@register_attack`` fills it)."""


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: add ``cls`` to :data:`ATTACKS` under its ``name``."""
    return ATTACKS.register()(cls)


def create_attack(name: str, **kwargs: Any) -> Attack:
    """The attack ``name`` built with ``kwargs``; :class:`~ibau.errors.InputError` for an
    unknown name or a keyword the class does not take."""
    import inspect

    cls = ATTACKS.get_or_raise(name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL})
        if unknown:
            known = ", ".join(n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL)
            raise InputError(f"attack {name!r} has no setting {', '.join(unknown)}; its settings: {known}")
    return cls(**kwargs)


def check_target(target: int, num_classes: int | None, name: str = "target") -> int:
    """``target`` is a class id below ``num_classes`` (when known); else InputError."""
    return int(check_int(name, target, low=0, high=None if num_classes is None else int(num_classes) - 1))


TriggerFn = Callable[[Tensor], Tensor]
