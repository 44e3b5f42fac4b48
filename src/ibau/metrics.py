"""Clean accuracy, attack success rate (ASR) and robust accuracy (RA).

All take float images in [0, 1] (N, C, H, W), integer labels, and run the model in
eval mode under ``torch.no_grad`` in batches on the model's device.

ASR conventions (reference.md §2): the primary ASR counts only images whose true
label differs from the target they would be sent to (BackdoorBench's convention);
``include_target=True`` gives the authors' variant, which triggers every image and
therefore floors near 1/C.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["predict", "clean_accuracy", "near_chance_warning", "attack_success_rate", "robust_accuracy", "backdoor_metrics", "model_device"]

TargetSpec = int | Callable[[Tensor], Tensor]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else first buffer; CPU when it has neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, *, batch_size: int = 500,
            transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Predicted labels for ``x`` (optionally passed through ``transform`` per batch)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device, torch.float32)
            if transform is not None:
                xb = transform(xb)
            out.append(model(xb).argmax(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _targets(y: Tensor, target: TargetSpec) -> Tensor:
    if callable(target):
        return torch.as_tensor(target(y)).long()
    return torch.full_like(y, int(target))


def clean_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500) -> float:
    """Fraction of ``x`` classified as ``y``."""
    y = torch.as_tensor(y).long()
    return float((predict(model, x, batch_size=batch_size) == y).float().mean())


#: share of the way from always answering the most common label to perfect accuracy under which a model is
#: said not to recognise the data (:func:`near_chance_warning`)
NEAR_CHANCE = 0.1
#: how :func:`near_chance_warning` begins (reports that collect warnings from several measurements keep one)
NEAR_CHANCE_WARNING = "the model classifies only"


def near_chance_warning(accuracy: float, y: Tensor) -> str | None:
    """A warning when ``accuracy`` on images labelled ``y`` is barely above always answering their most
    common label (less than :data:`NEAR_CHANCE` of the way from that share to 100%), else ``None``.

    A model that does not recognise the user's clean images is almost always a setup error (inputs
    normalised differently, another class order, channels swapped), not a backdoor: every universal
    perturbation and reversed trigger then looks like one, and unlearning has nothing to keep.
    """
    y = torch.as_tensor(y).long()
    if len(y) == 0:
        return None
    common = float(torch.bincount(y).max()) / len(y)
    if accuracy >= common + NEAR_CHANCE * (1 - common):
        return None
    return (f"{NEAR_CHANCE_WARNING} {accuracy:.1%} of the clean images correctly (always answering their most "
            f"common label would give {common:.1%}): check that the images are prepared as the model expects "
            "(--normalize, channel order, size) and that the labels use the model's class order; scans and "
            "unlearning mean nothing on a model that does not recognise the data")


def attack_success_rate(model: nn.Module, x: Tensor, y: Tensor, trigger: Callable[[Tensor], Tensor],
                        target: TargetSpec, *, include_target: bool = False, batch_size: int = 500) -> float:
    """Fraction of triggered images classified as their attack target.

    ``target`` is a class index or a function mapping true labels to targets (e.g.
    ``lambda y: (y + 1) % C`` for all-to-all).
    """
    y = torch.as_tensor(y).long()
    t = _targets(y, target)
    keep = torch.ones_like(y, dtype=torch.bool) if include_target else t != y
    if not keep.any():
        raise ValueError("no image has a true label different from its target")
    pred = predict(model, x[keep], batch_size=batch_size, transform=trigger)
    return float((pred == t[keep]).float().mean())


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, trigger: Callable[[Tensor], Tensor],
                    target: TargetSpec, *, batch_size: int = 500) -> float:
    """Fraction of triggered non-target images still classified as their true label."""
    y = torch.as_tensor(y).long()
    keep = _targets(y, target) != y
    pred = predict(model, x[keep], batch_size=batch_size, transform=trigger)
    return float((pred == y[keep]).float().mean())


def backdoor_metrics(model: nn.Module, x: Tensor, y: Tensor, trigger: Callable[[Tensor], Tensor],
                     target: TargetSpec, *, batch_size: int = 500) -> dict[str, float]:
    """ACC, ASR (non-target), ASR with the target class included, and RA in one pass
    over the clean and one over the triggered images."""
    y = torch.as_tensor(y).long()
    t = _targets(y, target)
    clean_pred = predict(model, x, batch_size=batch_size)
    trig_pred = predict(model, x, batch_size=batch_size, transform=trigger)
    non_target = t != y
    return {
        "acc": float((clean_pred == y).float().mean()),
        "asr": float((trig_pred[non_target] == t[non_target]).float().mean()),
        "asr_all": float((trig_pred == t).float().mean()),
        "ra": float((trig_pred[non_target] == y[non_target]).float().mean()),
    }
