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

from ..errors import InputError
from ..metrics import model_device
from ..perturbation import wrap as _wrap

Evaluate = Callable[[nn.Module], dict[str, float]]
StopWhen = Callable[[dict[str, Any]], "bool | str"]

__all__ = ["Defense", "DefenseResult", "Evaluate", "StopWhen", "Trace", "StopDefense", "Run", "check_images",
           "check_labels", "time_to_effect", "ROLES"]

#: what a defense is in the paper's comparison: I-BAU, a published baseline, the naive heuristic
ROLES = ("ours", "baseline", "heuristic")


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
        self.end: float | None = None  # seconds of work at the end, when work followed the last point

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
        if self.end is not None:  # the run ended on work after its last point (e.g. a check that stopped it)
            seconds = self.end
        else:
            seconds = self.history[-1]["elapsed"] if self.history and self.history[-1]["point"] != "before" else self.elapsed()
        return DefenseResult(model=model, history=self.history, seconds=seconds, extras=extras or {},
                             stop_reason=self.stop_reason or default_reason)


def check_images(x: Tensor, y: Tensor, *, min_size: int = 1) -> tuple[Tensor, Tensor]:
    """Validate a defender's data: finite float images (N, C, H, W) in [0, 1] and N integer
    labels; :class:`~ibau.errors.InputError` naming ``x`` or ``y`` otherwise."""
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.dim() != 4:
        raise InputError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if y.dim() != 1:
        raise InputError(f"y must hold one label per image (shape (N,)), got shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise InputError(f"x has {len(x)} images but y has {len(y)} labels")
    if len(x) == 0:
        raise InputError("the data is empty (x and y have no images)")
    if len(x) < min_size:
        raise InputError(f"the data has {len(x)} images; this defense needs at least {min_size}")
    if not torch.is_floating_point(x):
        raise InputError("x must be a float tensor in [0, 1]")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x holds NaN or infinite values")
    if torch.is_floating_point(y) and not (bool(torch.isfinite(y).all()) and torch.equal(y, y.round())):
        raise InputError("y must hold integer labels")
    if torch.is_complex(y) or y.dtype == torch.bool:
        raise InputError("y must hold integer labels")
    return x, y.long()


def check_labels(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """The labels ``y`` lie in ``[0, classes)`` for the model's ``classes`` outputs (one
    forward pass on one image, in eval mode, without gradients); returns ``classes``."""
    was = model.training
    ref = next((t for t in model.parameters() if t.is_floating_point()), None)
    try:
        model.eval()
        with torch.no_grad():
            out = model(x[:1].to(model_device(model), ref.dtype if ref is not None else x.dtype))
    finally:
        model.train(was)
    classes = int(out.shape[-1])
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        raise InputError(f"y holds labels in [{low}, {high}] but the model has {classes} outputs "
                         f"(labels must lie in [0, {classes - 1}])")
    return classes


def took_effect(rec: dict[str, Any], start_acc: float | None, threshold: float = 0.2,
                max_drop: float | None = None, key: str = "asr") -> bool:
    """Whether a history point has ``key`` below ``threshold`` and, with ``max_drop``, keeps
    ``acc`` within ``max_drop`` of ``start_acc`` (issue 15: a defense does not take effect
    by wrecking the model)."""
    if key not in rec or not rec[key] < threshold:
        return False
    return max_drop is None or start_acc is None or start_acc - rec.get("acc", -math.inf) <= max_drop + 1e-12


def time_to_effect(history: list[dict[str, Any]], key: str = "asr", threshold: float = 0.2,
                   max_drop: float | None = None) -> float | None:
    """``elapsed`` at the first point (not ``before``) that :func:`took_effect`, or ``None`` if
    there is none (the paper's Table 6 measure with ``key="asr"``; ``max_drop`` against the
    ``before`` point's accuracy)."""
    start = next((rec.get("acc") for rec in history if rec.get("point") == "before"), None)
    for rec in history:
        if rec.get("point") != "before" and took_effect(rec, start, threshold, max_drop, key):
            return float(rec["elapsed"])
    return None


@dataclass
class Run:
    """One call of :meth:`Defense.fit`, as the method's own steps see it.

    Attributes:
        model: the caller's model (the ``before`` point describes it).
        x, y: the validated data (``y`` as int64 labels).
        trace: the clock and history; use :meth:`point`.
        extras: method-specific outputs, filled as the run goes (kept when it stops early).
        result: the model returned; ``model`` itself unless the method builds a new one
            (DP-SGD). Points are recorded on it.
        reason: the stop reason when the run completes (``stop_when`` overrides it).
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    trace: Trace
    extras: dict[str, Any] = field(default_factory=dict)
    result: nn.Module | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.result is None:
            self.result = self.model

    def point(self, label: str, **numbers: Any) -> dict[str, Any]:
        """Record a point of :attr:`result` (may end the run, see :meth:`Trace.point`)."""
        return self.trace.point(self.result, label, **numbers)


class Defense(abc.ABC):
    """Base class of defenses. Settings go to the constructor as keyword arguments
    (the paper's defaults), validated there; ``fit`` takes the model and the defender's data.

    ``fit`` is a template: it validates the data (:func:`check_images`, and the labels
    against the model's outputs), runs :meth:`_prepare` (not timed), then the method's own
    :meth:`_fit` under the :class:`Trace` (clock, ``before`` point, ``stop_when``), and
    always restores the model's train/eval mode and clears the gradients it leaves on
    the returned model. A new defense implements :meth:`_fit` (and :meth:`_prepare` where
    something must happen before the clock starts).

    Class attributes (the registry :data:`ibau.defenses.DEFENSES`, the benchmark report,
    its runner and the command line read them; nothing else lists the defenses):
        name: the registry name.
        display_name: the method's name in prose ("Neural Cleanse").
        short_name: its column heading in the paper's tables ("NC").
        role: ``"ours"`` (I-BAU), ``"baseline"`` (a published defense the paper compares
            with) or ``"heuristic"`` (the naive UAP heuristic of Section 4).
        cost_order: rank by typical cost, cheap first (the runner's ``order="defense"``).
        data_role: ``"clean"`` (the defender's small clean set; every method but DP) or
            ``"training"`` (the possibly poisoned training set: DP-SGD trains from it).
        min_images: the fewest images ``fit`` accepts.
        point_key: a history field (``"round"``, ``"epoch"``) that the ``before`` record
            gets as 0, or ``None``.
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    short_name: ClassVar[str] = ""
    role: ClassVar[str] = "baseline"
    cost_order: ClassVar[int] = 100
    data_role: ClassVar[str] = "clean"
    min_images: ClassVar[int] = 1
    point_key: ClassVar[str | None] = None

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as the method sees it: taking [0, 1] pixels (``normalize`` inside)."""
        return _wrap(model, getattr(self, "normalize", None))

    def check_data(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``fit``'s validation: :func:`check_images` and :func:`check_labels`."""
        x, y = check_images(x, y, min_size=self.min_images)
        check_labels(model, x, y)
        return x, y

    def fit(self, model: nn.Module, x: Tensor, y: Tensor, *, evaluate: Evaluate | None = None,
            stop_when: StopWhen | None = None) -> DefenseResult:
        """Repair ``model`` using images ``x`` and labels ``y``.

        Args:
            model: a classifier taking float NCHW images in [0, 1] (or normalised inputs
                with ``normalize`` set, where the method has it), returning logits. Its
                device is used.
            x: images (N, C, H, W), float in [0, 1]: the defender's clean set, or the
                training set when ``data_role == "training"``.
            y: their labels (N,), in ``[0, classes)``.
            evaluate: optional ``evaluate(model) -> dict`` called before the defense and
                at every point (round, epoch, ...); its numbers join the history (not timed).
            stop_when: optional ``stop_when(record) -> bool | str`` called at every point;
                a truthy value ends the run (a string is kept as the stop reason).

        Returns:
            :class:`DefenseResult`: the repaired model (updated in place, except DP-SGD's
            new module), the history and the method's extras.

        Raises:
            InputError: bad data (shapes, non-finite values, labels out of range).
        """
        x, y = self.check_data(model, x, y)
        run = Run(model, x, y, Trace(evaluate, stop_when))
        was = model.training
        try:
            setup = self._prepare(run)
            with run.trace.run(model):
                self._fit(run, setup)
        finally:
            model.train(was)
            for p in run.result.parameters():
                p.grad = None
        if self.point_key is not None:
            for rec in run.trace.history:
                if rec["point"] == "before":
                    rec[self.point_key] = 0
        return run.trace.result(run.result, run.extras, default_reason=run.reason)

    def _prepare(self, run: Run) -> Any:
        """Work before the clock starts (wrapping, batching, checks that need the model);
        its return value is passed to :meth:`_fit`. Default: nothing."""
        return None

    @abc.abstractmethod
    def _fit(self, run: Run, setup: Any) -> None:
        """The method itself: update ``run.result`` (``run.model`` in place), recording
        ``run.point(label, **numbers)`` at every usable state and filling ``run.extras``."""

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
