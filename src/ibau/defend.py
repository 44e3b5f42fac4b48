"""Any registered defense on a model, with the same measurements and report as
:func:`ibau.unlearn.unlearn`: clean accuracy before/after on held-out images, the
defense's own history and outputs (e.g. Neural Cleanse's anomaly indices and reversed
triggers), timings and the environment, as plain data."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .defenses import DEFENSES, Defense
from .metrics import clean_accuracy
from .unlearn import REPORT_SCHEMA_VERSION, split_holdout
from .utils import environment

__all__ = ["DefendResult", "defend", "settings_of", "check_settings", "split_extras"]


@dataclass
class DefendResult:
    model: nn.Module
    report: dict[str, Any]
    artifacts: dict[str, Tensor] = field(default_factory=dict)


def settings_of(cls: type[Defense]) -> dict[str, Any]:
    """Keyword settings of a defense class and their defaults, base classes included
    (for classes that pass ``**kwargs`` on)."""
    out: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for name, p in inspect.signature(init).parameters.items():
            if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            out.setdefault(name, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
            break
    return out


def check_settings(cls: type[Defense], settings: dict[str, Any]) -> dict[str, Any]:
    """The class's settings (:func:`settings_of`); ``ValueError`` naming any key of
    ``settings`` that the class does not take."""
    known = settings_of(cls)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"{cls.name} has no setting {', '.join(unknown)}; its settings: {', '.join(sorted(known))}")
    return known


def split_extras(extras: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Separate a defense's extras into JSON-able data and tensors (flattened names)."""
    data: dict[str, Any] = {}
    tensors: dict[str, Tensor] = {}
    for k, v in extras.items():
        if isinstance(v, Tensor):
            if v.dim() == 0:
                data[k] = v.item()
            else:
                tensors[prefix + k] = v.detach().cpu()
        elif isinstance(v, dict):
            sub_data, sub_tensors = split_extras(v, prefix=f"{prefix}{k}.")
            if sub_data:
                data[k] = sub_data
            tensors.update(sub_tensors)
        else:
            data[k] = v
    return data, tensors


def defend(model: nn.Module, x: Tensor, y: Tensor, method: str, *, holdout: float | int = 0.1, seed: int = 0,
           progress: bool = True, **settings: Any) -> DefendResult:
    """Run the defense ``method`` (a name of :data:`ibau.defenses.DEFENSES`) on ``model``.

    ``x, y`` is the defender's clean set, or for DP-SGD (``data_role == "training"``) the
    training set; ``holdout`` of it is kept aside to measure clean accuracy before and
    after. ``settings`` go to the defense's constructor (its defaults are the paper's).
    Returns the repaired model (a new module for DP-SGD), the report and tensors for
    figures (e.g. reversed triggers).
    """
    try:
        cls = DEFENSES[method]
    except KeyError:
        raise KeyError(f"unknown defense {method!r}; known: {', '.join(sorted(DEFENSES))}") from None
    known = check_settings(cls, settings)
    if "seed" in known:
        settings.setdefault("seed", seed)
    if "progress" in known:
        settings.setdefault("progress", progress)
    defense = cls(**settings)
    t_start = time.perf_counter()
    keep_idx, hold_idx = split_holdout(len(x), holdout, seed)
    x_use, y_use, x_hold, y_hold = x[keep_idx], y[keep_idx], x[hold_idx], y[hold_idx]
    wrap = getattr(defense, "wrap", lambda m: m)
    acc_before = clean_accuracy(wrap(model), x_hold, y_hold)
    result = defense.fit(model, x_use, y_use,
                         evaluate=lambda m: {"holdout_accuracy": clean_accuracy(wrap(m), x_hold, y_hold)})
    acc_after = clean_accuracy(wrap(result.model), x_hold, y_hold)
    extras, tensors = split_extras(result.extras)
    warnings = []
    if acc_before - acc_after > 0.10:
        warnings.append(f"clean accuracy fell by {100 * (acc_before - acc_after):.1f} points (more than 10)")
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": method,
        "data_role": cls.data_role,
        "clean_accuracy_before": acc_before,
        "clean_accuracy_after": acc_after,
        "holdout_size": len(hold_idx),
        "data_size": len(keep_idx),
        "stop_reason": result.stop_reason,
        "seconds": time.perf_counter() - t_start,
        "seconds_defense": result.seconds,
        "history": result.history,
        "extras": extras,
        "warnings": warnings,
        "config": {**defense.config(), "holdout": holdout, "seed": seed},
        "environment": environment(),
    }
    return DefendResult(model=result.model, report=report, artifacts=tensors)
