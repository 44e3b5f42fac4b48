"""The practitioner's job: sanitise an untrusted model with a small clean set, and report.

:func:`unlearn` splits the clean data into a held-out part (to measure clean accuracy
before and after) and the defender's clean set, runs I-BAU, and measures backdoor
robustness without knowing the trigger (:mod:`ibau.robustness`): the success rate of
the strongest universal perturbation within the norm bound, searched on the clean
set and measured on the held-out images.

With ``rounds="auto"`` it keeps running rounds until that success rate falls below
``threshold`` (the paper's 20% effectiveness line), stops improving, or
``max_rounds`` is reached; the report says which. When the last round made the model
less robust than an earlier one, the weights of the most robust round are kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .defenses.ibau import IBAU
from .metrics import clean_accuracy, predict
from .robustness import universal_attack
from .utils import environment

__all__ = ["UnlearnResult", "unlearn", "split_holdout", "scaled_norm_bound", "REPORT_SCHEMA_VERSION"]

REPORT_SCHEMA_VERSION = 1


@dataclass
class UnlearnResult:
    model: nn.Module
    report: dict[str, Any]
    artifacts: dict[str, Tensor] = field(default_factory=dict)  # tensors for plots (delta, samples)


def scaled_norm_bound(image_shape: tuple[int, ...], reference: float = 10.0) -> float:
    """The paper's l2 bound (10 for 3x32x32 CIFAR images) scaled to another image size
    so that the per-pixel RMS budget stays the same: ``10 * sqrt(C*H*W / 3072)``."""
    d = 1
    for s in image_shape:
        d *= int(s)
    return reference * (d / 3072) ** 0.5


def split_holdout(n: int, holdout: float | int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of ``range(n)`` into (clean-set indices, held-out indices).

    ``holdout`` is a fraction in (0, 1) or a count >= 1.
    """
    if isinstance(holdout, float) and 0 < holdout < 1:
        k = max(1, round(holdout * n))
    elif float(holdout).is_integer() and 1 <= int(holdout) < n:
        k = int(holdout)
    else:
        raise ValueError(f"holdout must be a fraction in (0, 1) or a count in [1, {n - 1}], got {holdout}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[k:].sort().values, perm[:k].sort().values


def _accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    """Clean accuracy; under torchrun each process counts its shard and the counts are summed."""
    from .distributed import count_correct, current

    if current() is None:
        return clean_accuracy(net, x, y)
    correct, total = count_correct(net, x, y)
    return correct / total


def unlearn(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    holdout: float | int = 0.1,
    rounds: int | Literal["auto"] = "auto",
    max_rounds: int = 10,
    threshold: float = 0.2,
    min_improvement: float = 0.02,
    robustness_passes: int = 5,
    robustness_images: int = 1000,
    seed: int = 0,
    progress: bool = True,
    samples: int = 8,
    norm_bound: float | None | Literal["auto"] = "auto",
    robustness_bound: float | None = None,
    **ibau_kwargs: Any,
) -> UnlearnResult:
    """Run I-BAU on ``model`` (updated in place) and build the report.

    Args:
        model: the untrusted classifier (float NCHW [0, 1] in, logits out; or pass
            ``normalize=(mean, std)`` among ``ibau_kwargs``).
        x, y: the defender's clean data.
        holdout: fraction or count of ``x`` held out to measure accuracy and robustness.
        rounds: a number of I-BAU rounds, or ``"auto"``.
        max_rounds: the most rounds ``"auto"`` runs.
        threshold: ``"auto"`` stops once the universal-perturbation success rate on the
            held-out images is below this.
        min_improvement: ``"auto"`` stops when a round lowers the success rate by less
            than this compared with the best so far.
        robustness_passes: passes of the universal-perturbation search.
        robustness_images: at most this many clean-set images are used for that search.
        seed: seeds the split, I-BAU and the search.
        progress: progress bars.
        samples: held-out images kept (with predictions) for the report's figures.
        norm_bound: I-BAU's l2 bound; ``"auto"`` (default) is the paper's 10 for
            3x32x32 images, scaled by :func:`scaled_norm_bound` for other sizes.
        robustness_bound: l2 bound of the universal-perturbation search (default: the
            I-BAU bound). At the paper's bound of 10 a universal perturbation fools even
            a sanitised CIFAR-10 model; a smaller bound (near trigger norms, 3-9) makes the
            measure tell backdoored and sanitised models apart better.
        **ibau_kwargs: settings of :class:`ibau.IBAU` (``norm_bound``, ``outer_lr``, ...).
    """
    if rounds != "auto" and not (isinstance(rounds, int) and rounds >= 0):
        raise ValueError(f"rounds must be a non-negative integer or 'auto', got {rounds!r}")
    if max_rounds < 1:
        raise ValueError("max_rounds must be >= 1")
    t_start = time.perf_counter()
    clean_idx, hold_idx = split_holdout(len(x), holdout, seed)
    x_clean, y_clean, x_hold, y_hold = x[clean_idx], y[clean_idx], x[hold_idx], y[hold_idx]
    if norm_bound == "auto":
        norm_bound = scaled_norm_bound(tuple(x.shape[1:]))
    defense = IBAU(rounds=max_rounds if rounds == "auto" else rounds, seed=seed, progress=progress,
                   norm_bound=norm_bound, **ibau_kwargs)
    search = x_clean[torch.randperm(len(x_clean), generator=torch.Generator().manual_seed(seed + 1))[:robustness_images]]
    net = defense.wrap(model)

    def robustness(m: nn.Module) -> tuple[dict, Tensor]:
        bound = defense.norm_bound if robustness_bound is None else robustness_bound
        res, delta = universal_attack(m, search, x_hold, y_hold, norm_bound=bound,
                                      passes=robustness_passes, batch_size=defense.batch_size, seed=seed)
        return res.as_dict(), delta

    acc_before = _accuracy(net, x_hold, y_hold)
    rob_before, udelta_before = robustness(net)
    sample_x = x_hold[:samples]
    preds_before = {"clean": predict(net, sample_x), "perturbed": predict(net, sample_x + udelta_before)}

    best = [rob_before["success_rate"]]
    # the best round so far (rounds >= 1 only: never roll back to the poisoned model)
    kept: dict[str, Any] = {"rate": float("inf"), "state": None}

    def evaluate(m: nn.Module) -> dict[str, float]:
        rec = {"holdout_accuracy": _accuracy(defense.wrap(m), x_hold, y_hold)}
        if rounds == "auto":
            rate = robustness(defense.wrap(m))[0]["success_rate"]
            rec["universal_success_rate"] = rate
            if rate < kept["rate"]:
                kept.update(rate=rate, state={k: v.detach().clone() for k, v in m.state_dict().items()})
        return rec

    def stop_when(rec: dict) -> str | bool:
        if rounds != "auto":
            return False
        s = rec["universal_success_rate"]
        if s < threshold:
            return f"robust: universal-perturbation success {s:.1%} is below the threshold {threshold:.0%}"
        if s > best[0] - min_improvement:
            return (f"stopped improving: universal-perturbation success {s:.1%} after round {rec['round']} "
                    f"(best so far {best[0]:.1%})")
        best[0] = s
        return False

    # round 0 is measured above; evaluate() is only called after rounds
    result = defense.fit(model, x_clean, y_clean, evaluate=evaluate, stop_when=stop_when)
    history = [h for h in result.history if h.get("round", 0) > 0]
    if rounds == "auto" and result.stop_reason.startswith("completed"):
        stop_reason = f"reached max_rounds={max_rounds}"
    elif rounds != "auto":
        stop_reason = f"ran the requested {rounds} round(s)"
    else:
        stop_reason = result.stop_reason
    kept_round = len(history)
    if rounds == "auto" and history:
        best_round = min(history, key=lambda h: h["universal_success_rate"])["round"]
        if best_round != history[-1]["round"] and kept["state"] is not None:
            model.load_state_dict(kept["state"])  # the last round made it worse: keep the best one
            kept_round = best_round
            stop_reason += f"; kept the weights of round {best_round}, the most robust"
    acc_after = _accuracy(net, x_hold, y_hold)
    rob_after, udelta_after = robustness(net)
    preds_after = {"clean": predict(net, sample_x), "perturbed_before_delta": predict(net, sample_x + udelta_before)}
    warnings = []
    if acc_before - acc_after > 0.10:
        warnings.append(f"clean accuracy fell by {100 * (acc_before - acc_after):.1f} points (more than 10)")
    if rob_after["success_rate"] >= threshold:
        warnings.append(f"a universal perturbation within the bound still changes {rob_after['success_rate']:.1%} of "
                        "correct held-out predictions; at large bounds this holds for clean models too, so compare "
                        "with the value before and try a trigger-sized --robustness-bound (3-9 for 32x32 RGB)")
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "clean_accuracy_before": acc_before,
        "clean_accuracy_after": acc_after,
        "robustness_before": rob_before,
        "robustness_after": rob_after,
        "holdout_size": len(hold_idx),
        "clean_set_size": len(clean_idx),
        "rounds": len(history),
        "kept_round": kept_round,
        "stop_reason": stop_reason,
        "seconds": time.perf_counter() - t_start,
        "seconds_unlearning": result.seconds,
        "history": history,
        "warnings": warnings,
        "config": {**defense.config(), "rounds": rounds, "max_rounds": max_rounds, "threshold": threshold,
                   "min_improvement": min_improvement, "robustness_passes": robustness_passes,
                   "robustness_images": len(search), "holdout": holdout, "seed": seed,
                   "robustness_bound": defense.norm_bound if robustness_bound is None else robustness_bound},
        "samples": {"labels": y_hold[:samples].tolist(),
                    "before": {k: v.tolist() for k, v in preds_before.items()},
                    "after": {k: v.tolist() for k, v in preds_after.items()}},
        "environment": environment(),
    }
    artifacts = {"ibau_delta": result.extras["delta"], "universal_delta_before": udelta_before,
                 "universal_delta_after": udelta_after, "samples": sample_x.cpu()}
    return UnlearnResult(model=model, report=report, artifacts=artifacts)
