"""One defense runner and one report builder, shared by ``unlearn``, ``defend`` and the grid.

:func:`make_defense` builds a registered defense from its settings (checked against
its signature, seeded, with progress); :func:`run_measured` splits off the held-out
images, measures clean accuracy before, runs ``Defense.fit`` with the caller's extra
measurements at every point, and measures after; :func:`base_report` gives every
report the same skeleton (schema version, times, accuracies, warnings, config,
environment).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..errors import InputError
from ..metrics import near_chance_warning

__all__ = ["REPORT_SCHEMA_VERSION", "JobResult", "settings_of", "check_settings", "defense_class", "make_defense", "split_holdout",
           "Measured", "run_measured", "accuracy_warnings", "base_report", "ACCURACY_WARNING_DROP"]

REPORT_SCHEMA_VERSION = 1
#: a drop of clean accuracy larger than this is flagged (the paper's line, Section 5)
ACCURACY_WARNING_DROP = 0.10


@dataclass
class JobResult:
    """What a job returns: the (repaired) model, the report as plain data, and tensors
    for figures (perturbations, reversed triggers, sample images)."""

    model: nn.Module
    report: dict[str, Any]
    artifacts: dict[str, Tensor] = field(default_factory=dict)


def settings_of(cls: type) -> dict[str, Any]:
    """Keyword settings of a defense class and their defaults, base classes included
    (for classes that pass ``**kwargs`` on)."""
    out: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters
        for name, p in params.items():
            if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            out.setdefault(name, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return out


def check_settings(cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """The class's settings (:func:`settings_of`); :class:`InputError` naming any key of
    ``settings`` that the class does not take."""
    known = settings_of(cls)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise InputError(f"{getattr(cls, 'name', cls.__name__)} has no setting {', '.join(unknown)}; "
                         f"its settings: {', '.join(sorted(known))}")
    return known


def defense_class(name: str) -> type:
    """The class registered as ``name``; :class:`~ibau.registry.UnknownName` listing the known ones."""
    from ..defenses import DEFENSES

    return DEFENSES.get_or_raise(name)


def make_defense(method: str | type, settings: dict[str, Any] | None = None, *, seed: int = 0,
                 progress: bool = False):
    """A defense of the registry built from ``settings`` (checked), with ``seed`` and
    ``progress`` filled in where the method takes them. A ``recipe`` setting names a
    recipe of a method that has several (:meth:`ibau.IBAU.from_recipe`: ``"default"``,
    ``"paper"``). Bad values raise :class:`InputError` from the method's own validation."""
    cls = defense_class(method) if isinstance(method, str) else method
    settings = dict(settings or {})
    recipe = settings.pop("recipe", None)
    if recipe is not None and not hasattr(cls, "from_recipe"):
        raise InputError(f"{getattr(cls, 'name', cls.__name__)} has no recipes (setting recipe)")
    known = check_settings(cls, settings)
    if "seed" in known:
        settings.setdefault("seed", seed)
    if "progress" in known:
        settings.setdefault("progress", progress)
    try:
        return cls(**settings) if recipe is None else cls.from_recipe(recipe, **settings)
    except InputError:
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(f"{getattr(cls, 'name', cls.__name__)}: {exc}") from None


def split_holdout(n: int, holdout: float | int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of ``range(n)`` into (kept indices, held-out indices).

    ``holdout`` is a fraction in (0, 1) or a count in ``[1, n - 1]``.
    """
    import math

    import torch

    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not math.isfinite(holdout):
        raise InputError(f"holdout must be a fraction in (0, 1) or a count, got {holdout!r}")
    if isinstance(holdout, float) and 0 < holdout < 1:
        k = max(1, round(holdout * n))
    elif float(holdout).is_integer() and 1 <= int(holdout) < n:
        k = int(holdout)
    else:
        raise InputError(f"holdout must be a fraction in (0, 1) or a count in [1, {n - 1}], got {holdout}")
    if k >= n:
        raise InputError(f"holdout {holdout} leaves no images of the {n} to work with")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[k:].sort().values, perm[:k].sort().values


def holdout_accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    """Clean accuracy; under torchrun each process counts its shard and the counts are summed."""
    from ..distributed import count_correct, current
    from ..metrics import clean_accuracy

    if current() is None:
        return clean_accuracy(net, x, y)
    correct, total = count_correct(net, x, y)
    return correct / total


@dataclass
class Measured:
    """A defense run with held-out accuracy before and after."""

    result: Any  # DefenseResult
    acc_before: float
    acc_after: float
    keep_idx: Tensor
    hold_idx: Tensor
    seconds: float
    warnings: list[str] = field(default_factory=list)


def run_measured(defense, model: nn.Module, x: Tensor, y: Tensor, *, holdout: float | int, seed: int,
                 split: tuple[Tensor, Tensor] | None = None,
                 extra: Callable[[nn.Module], dict[str, Any]] | None = None,
                 stop_when: Callable[[dict[str, Any]], bool | str] | None = None,
                 before: Callable[[nn.Module, Tensor, Tensor], None] | None = None,
                 after_fit: Callable[[Any], None] | None = None) -> Measured:
    """Split ``holdout`` off ``(x, y)``, measure, run ``defense.fit`` on the rest, measure.

    ``extra(model)`` adds numbers at every point (after the held-out accuracy);
    ``before(net, x_hold, y_hold)`` runs once before the defense (e.g. a scan);
    ``after_fit(result)`` may change the model before the final measurement (e.g. keep
    an earlier round's weights). ``split``: the (kept, held-out) indices when the caller
    has drawn them already (:func:`split_holdout` with the same ``holdout`` and ``seed``).
    """
    t_start = time.perf_counter()
    keep_idx, hold_idx = split if split is not None else split_holdout(len(x), holdout, seed)
    x_use, y_use, x_hold, y_hold = x[keep_idx], y[keep_idx], x[hold_idx], y[hold_idx]
    wrap = getattr(defense, "wrap", lambda m: m)
    acc_before = holdout_accuracy(wrap(model), x_hold, y_hold)
    if before is not None:
        before(wrap(model), x_hold, y_hold)

    def evaluate(m: nn.Module) -> dict[str, Any]:
        rec: dict[str, Any] = {"holdout_accuracy": holdout_accuracy(wrap(m), x_hold, y_hold)}
        if extra is not None:
            rec.update(extra(m))
        return rec

    result = defense.fit(model, x_use, y_use, evaluate=evaluate, stop_when=stop_when)
    if after_fit is not None:
        after_fit(result)
    acc_after = holdout_accuracy(wrap(result.model), x_hold, y_hold)
    chance = near_chance_warning(acc_before, y_hold)
    return Measured(result=result, acc_before=acc_before, acc_after=acc_after, keep_idx=keep_idx,
                    hold_idx=hold_idx, seconds=time.perf_counter() - t_start, warnings=[chance] if chance else [])


def accuracy_warnings(acc_before: float, acc_after: float, limit: float = ACCURACY_WARNING_DROP) -> list[str]:
    if acc_before - acc_after > limit:
        return [f"clean accuracy fell by {100 * (acc_before - acc_after):.1f} points (more than {100 * limit:g})"]
    return []


def base_report(run: Measured, *, config: dict[str, Any], warnings: list[str] = (), **fields: Any) -> dict[str, Any]:
    """The skeleton every job's report shares; ``fields`` are added after the accuracies."""
    from ..utils import environment

    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "clean_accuracy_before": run.acc_before,
        "clean_accuracy_after": run.acc_after,
        "holdout_size": len(run.hold_idx),
        **fields,
        "warnings": run.warnings + accuracy_warnings(run.acc_before, run.acc_after) + list(warnings),
        "config": config,
        "environment": environment(),
    }
