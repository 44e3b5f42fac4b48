"""The interface every defense shares: a model and clean data in, a repaired model and a record out."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class DefenseResult:
    """What a defense returns.

    Attributes:
        model: the repaired model (the same object that was passed in, updated in place).
        history: one dict per round / epoch (losses, seconds, metrics from ``evaluate``);
            entry 0 describes the model before the defense when ``evaluate`` was given.
        seconds: wall time of the defense itself (evaluation excluded).
        extras: method-specific outputs (e.g. I-BAU's last perturbation).
        stop_reason: why the defense stopped.
    """

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = ""


class Defense(abc.ABC):
    """Base class of defenses. Settings go to the constructor as keyword arguments
    (the paper's defaults); ``fit`` takes the model and the defender's clean data."""

    name: str = ""

    @abc.abstractmethod
    def fit(self, model: nn.Module, x: Tensor, y: Tensor, *, evaluate: Evaluate | None = None) -> DefenseResult:
        """Repair ``model`` (in place) using clean images ``x`` (N, C, H, W, [0, 1]) and labels ``y``."""

    def config(self) -> dict[str, Any]:
        """The settings as plain data (for results files)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
