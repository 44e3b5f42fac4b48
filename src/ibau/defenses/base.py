"""The interface every defense shares: a model and data in, a repaired model and a record out.

Every defense records *points*: the moments at which its model is in a usable state
(after a round, an epoch, a pruning pass...). At each point the optional
``evaluate(model)`` callback is run (its time is not counted) and ``stop_when(record)``
may end the run. The record carries ``elapsed``: seconds of the defense's own work up
to that point, so "time to take effect" (the paper's Table 6: the first point with
ASR < 20%) is read off the history of any method the same way.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

Evaluate = Callable[[nn.Module], dict[str, float]]
StopWhen = Callable[[dict[str, Any]], "bool | str"]

__all__ = ["Defense", "DefenseResult", "Evaluate", "StopWhen", "Trace", "StopDefense", "check_images",
           "time_to_effect"]


@dataclass
class DefenseResult:
    """What a defense returns.

    Attributes:
        model: the repaired model (the object that was passed in, updated in place;
            DP-SGD, which changes the architecture, returns a new module).
        history: one record per point (round, epoch, pruning pass...), each with
            ``point`` (a label), ``elapsed`` (seconds of defense work so far, evaluation
            excluded) and the numbers of ``evaluate``; entry 0 (``point="before"``)
            describes the model before the defense when ``evaluate`` was given.
        seconds: wall time of the defense itself (evaluation excluded).
        extras: method-specific outputs (I-BAU's last perturbation, Neural Cleanse's
            reversed triggers and anomaly indices, ...), tensors on the CPU.
        stop_reason: why the defense stopped.
    """

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = ""


class StopDefense(Exception):
    """Raised by :meth:`Trace.point` when ``stop_when`` asks to stop; caught by ``Trace.run``."""


class Trace:
    """The clock and history of one defense run.

    ``point(model, label, **numbers)`` appends a record, runs ``evaluate`` outside the
    clock and raises :class:`StopDefense` when ``stop_when`` says so. Use as::

        trace = Trace(evaluate, stop_when)
        with trace.run(model):
            ... trace.point(model, "epoch 1", loss=...) ...
        return trace.result(model, extras)
    """

    def __init__(self, evaluate: Evaluate | None = None, stop_when: StopWhen | None = None):
        self.evaluate = evaluate
        self.stop_when = stop_when
        self.history: list[dict[str, Any]] = []
        self.stop_reason = ""
        self._start = time.perf_counter()
        self._excluded = 0.0

    def elapsed(self) -> float:
        """Seconds since the start, minus the time spent in ``evaluate``."""
        return time.perf_counter() - self._start - self._excluded

    def _measure(self, model: nn.Module) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        t = time.perf_counter()
        was = model.training
        try:
            return dict(self.evaluate(model))
        finally:
            model.train(was)
            self._excluded += time.perf_counter() - t

    def before(self, model: nn.Module) -> None:
        if self.evaluate is not None:
            self.history.append({"point": "before", "elapsed": 0.0, **self._measure(model)})
        self._start = time.perf_counter()
        self._excluded = 0.0

    def point(self, model: nn.Module, label: str, **numbers: Any) -> dict[str, Any]:
        record = {"point": label, "elapsed": self.elapsed(), **numbers}
        record.update(self._measure(model))
        self.history.append(record)
        if self.stop_when is not None:
            verdict = self.stop_when(record)
            if verdict:
                self.stop_reason = verdict if isinstance(verdict, str) else f"stop_when at {label}"
                raise StopDefense(self.stop_reason)
        return record

    def run(self, model: nn.Module):
        """Context manager: records ``before``, swallows :class:`StopDefense`, restores
        the model's train/eval mode."""
        trace = self

        class _Run:
            def __enter__(self_inner):
                self_inner.was = model.training
                trace.before(model)
                return trace

            def __exit__(self_inner, exc_type, exc, tb):
                model.train(self_inner.was)
                return exc_type is StopDefense

        return _Run()

    def result(self, model: nn.Module, extras: dict[str, Any] | None = None, default_reason: str = "") -> DefenseResult:
        seconds = self.history[-1]["elapsed"] if self.history and self.history[-1]["point"] != "before" else self.elapsed()
        return DefenseResult(model=model, history=self.history, seconds=seconds, extras=extras or {},
                             stop_reason=self.stop_reason or default_reason)


def check_images(x: Tensor, y: Tensor, *, min_size: int = 1) -> tuple[Tensor, Tensor]:
    """Validate a defender's data: float (N, C, H, W) in [0, 1] and N integer labels."""
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
    if len(x) == 0:
        raise ValueError("the data is empty")
    if len(x) < min_size:
        raise ValueError(f"the data has {len(x)} images; this defense needs at least {min_size}")
    if not torch.is_floating_point(x):
        raise ValueError("x must be a float tensor in [0, 1]")
    if torch.is_floating_point(y) and not torch.equal(y, y.round()):
        raise ValueError("y must hold integer labels")
    return x, y.long()


def time_to_effect(history: list[dict[str, Any]], key: str = "asr", threshold: float = 0.2) -> float | None:
    """``elapsed`` at the first point (not ``before``) whose ``key`` is below ``threshold``,
    or ``None`` if there is none (the paper's Table 6 measure with ``key="asr"``)."""
    for rec in history:
        if rec.get("point") != "before" and key in rec and rec[key] < threshold:
            return float(rec["elapsed"])
    return None


class Defense(abc.ABC):
    """Base class of defenses. Settings go to the constructor as keyword arguments
    (the paper's defaults); ``fit`` takes the model and the defender's data.

    Class attributes:
        name: the registry name.
        data_role: ``"clean"`` (the defender's small clean set; every method but DP) or
            ``"training"`` (the possibly poisoned training set: DP-SGD trains from it).
    """

    name: ClassVar[str] = ""
    data_role: ClassVar[str] = "clean"

    @abc.abstractmethod
    def fit(self, model: nn.Module, x: Tensor, y: Tensor, *, evaluate: Evaluate | None = None,
            stop_when: StopWhen | None = None) -> DefenseResult:
        """Repair ``model`` using images ``x`` (N, C, H, W, float in [0, 1]) and labels ``y``."""

    def config(self) -> dict[str, Any]:
        """The settings as plain data (for results files)."""
        out = {}
        for k, v in vars(self).items():
            if k.startswith("_"):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            out[k] = v
        return out
