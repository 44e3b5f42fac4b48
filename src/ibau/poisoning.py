"""Make a poisoned model: prepare the attack, poison the data, train, measure, save."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .attacks.base import Attack
from .metrics import backdoor_metrics
from .train import TrainConfig

__all__ = ["poison_and_train", "evaluate_attack"]


def evaluate_attack(model: nn.Module, attack: Attack, x: Tensor, y: Tensor, *, batch_size: int = 500) -> dict[str, Any]:
    """ACC / ASR / ASR (target class included) / RA; per trigger for several triggers."""
    parts = getattr(attack, "attacks", None)
    if parts is None:
        return backdoor_metrics(model, x, y, attack.apply, attack.target_of, batch_size=batch_size)
    per = [backdoor_metrics(model, x, y, lambda t, i=i: attack.apply(t, which=i),
                            lambda t, i=i: attack.target_of(t, which=i), batch_size=batch_size)
           for i in range(len(parts))]
    return {"acc": per[0]["acc"], "asr": sum(p["asr"] for p in per) / len(per),
            "asr_min": min(p["asr"] for p in per), "per_trigger": per}


def poison_and_train(model: nn.Module, x: Tensor, y: Tensor, attack: Attack, *, ratio: float = 0.2,
                     config: TrainConfig = TrainConfig(), seed: int = 0,
                     checkpoint: str | os.PathLike | None = None, progress: bool = True,
                     eval_data: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
    """Poison ``ratio`` of ``(x, y)`` with ``attack`` (already prepared) and train ``model`` on it.

    Returns a record with the poisoned count and, given ``eval_data``, ACC/ASR/RA.
    """
    from .data.poison import check_attack_targets, check_ratio

    check_ratio(ratio)
    check_attack_targets(attack, _output_classes(model, x))
    data = attack.poisoned_set(x, y, ratio, seed=seed)
    attack.train_poisoned(model, data, config, checkpoint=checkpoint, progress=progress)
    record: dict[str, Any] = {"attack": attack.name, "ratio": ratio, "training_size": len(data),
                              "poisoned": int(data.mask.sum()), "train_config": config.as_dict(), "seed": seed}
    if eval_data is not None:
        record["metrics"] = evaluate_attack(model, attack, *eval_data)
    return record


def _output_classes(model: nn.Module, x: Tensor) -> int:
    """The model's number of outputs (classes), from one image; modes are restored."""
    from .metrics import model_device

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1].to(model_device(model)))
    finally:
        for m, mode in modes:
            m.training = mode
    return int(out.shape[-1])


def subset_indices(total: int, n: int | None, seed: int) -> tuple[Tensor | None, Tensor]:
    """Which of ``total`` items :func:`subset` keeps (``None``: all of them, when ``n`` is None
    or at least ``total``) and, in a seeded order, the ones it leaves out."""
    from .errors import check_int

    check_int("subset", n, low=1, allow_none=True)
    if n is None or n >= total:
        return None, torch.zeros(0, dtype=torch.long)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return perm[:n], perm[n:]


def subset(x: Tensor, y: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random ``n`` (>= 1) of ``(x, y)`` (all of it when ``n`` is None)."""
    idx, _ = subset_indices(len(x), n, seed)
    return (x, y) if idx is None else (x[idx], y[idx])


def default_checkpoint(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")
