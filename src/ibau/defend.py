"""Any registered defense on a model, with the same measurements and report as
:func:`ibau.unlearn.unlearn`: clean accuracy before/after on held-out images, the
defense's own history and outputs (e.g. Neural Cleanse's anomaly indices and reversed
triggers), timings and the environment, as plain data."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .jobs.runner import JobResult, base_report, check_settings, make_defense, run_measured, settings_of

__all__ = ["DefendResult", "defend", "settings_of", "check_settings", "split_extras"]

#: what :func:`defend` returns (the model, the report, tensors for figures)
DefendResult = JobResult


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
           progress: bool = True, **settings: Any) -> JobResult:
    """Run the defense ``method`` (a name of :data:`ibau.defenses.DEFENSES`) on ``model``.

    ``x, y`` is the defender's clean set, or for DP-SGD (``data_role == "training"``) the
    training set; ``holdout`` of it is kept aside to measure clean accuracy before and
    after. ``settings`` go to the defense's constructor (its defaults are the paper's).
    Returns the repaired model (a new module for DP-SGD), the report and tensors for
    figures (e.g. reversed triggers). Bad settings raise :class:`ibau.InputError`
    before any work.
    """
    defense = make_defense(method, settings, seed=seed, progress=progress)
    run = run_measured(defense, model, x, y, holdout=holdout, seed=seed)
    extras, tensors = split_extras(run.result.extras)
    report = base_report(
        run, config={**defense.config(), "holdout": holdout, "seed": seed},
        method=defense.name, data_role=defense.data_role, data_size=len(run.keep_idx),
        stop_reason=run.result.stop_reason, seconds=run.seconds, seconds_defense=run.result.seconds,
        history=run.result.history, extras=extras)
    return JobResult(model=run.result.model, report=report, artifacts=tensors)
