"""The optimisers the defenses build, by name (one place, one set of choices).

``make_optimizer("adam" | "sgd", params, lr=..., ...)``: I-BAU's inner and outer steps,
the naive heuristic's outer step, the fine-tuning of the baselines and DP-SGD all take
their optimiser from here, so a name accepted by one defense is accepted by all.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .errors import check_choice
from .registry import Registry

__all__ = ["OPTIMIZERS", "make_optimizer"]


def _adam(params, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _sgd(params, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


#: name -> factory ``(params, lr, momentum, weight_decay, nesterov) -> Optimizer``
OPTIMIZERS: Registry = Registry("optimizer")
OPTIMIZERS.register("adam")(_adam)
OPTIMIZERS.register("sgd")(_sgd)


def make_optimizer(name: str, params: Iterable[Tensor], *, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0, nesterov: bool = False,
                   parameter: str = "optimizer") -> torch.optim.Optimizer:
    """The optimiser ``name`` over ``params``. ``momentum`` and ``nesterov`` apply to SGD only
    (Adam keeps its default betas). An unknown name raises :class:`~ibau.errors.InputError`
    naming ``parameter`` (the caller's argument)."""
    check_choice(parameter, name, OPTIMIZERS)
    return OPTIMIZERS[name](params, lr, momentum, weight_decay, nesterov)
