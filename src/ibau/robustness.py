"""A trigger-free measure of backdoor robustness (paper Section 3).

The minimax formulation gives a quantitative measure that needs no knowledge of the
trigger: how well the *strongest universal perturbation within the norm bound* fools
the model. A backdoored model has one (its trigger, or something close), and it sends
most images to one class; after a successful unlearning it should not.

:func:`universal_attack` searches for that perturbation by projected, normalised
gradient ascent on the clean images (the model's own predictions as labels, like
I-BAU's inner maximisation), then measures on separate images how often it changes a
correct prediction (``success_rate``) and how concentrated the perturbed predictions
are on one class (``top_class`` / ``top_class_share``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .errors import InputError, check_int, check_number
from .metrics import model_device, predict
from .perturbation import add, universal_search

__all__ = ["UniversalAttackResult", "universal_attack", "find_universal_perturbation"]


@dataclass
class UniversalAttackResult:
    success_rate: float  # correctly classified images whose prediction the perturbation changes
    top_class: int  # most frequent prediction on perturbed images
    top_class_share: float  # its share of all perturbed predictions
    delta_norm: float
    images: int  # images the rate was measured on

    def as_dict(self) -> dict:
        return asdict(self)


def find_universal_perturbation(model: nn.Module, x: Tensor, *, norm_bound: float | None = 10.0,
                                passes: int = 5, batch_size: int = 100, step: float | None = None,
                                seed: int = 0, clip_images: bool = False, progress: bool = False) -> Tensor:
    """Projected gradient ascent on ``mean CE(f(x + delta), f(x).argmax())`` over ``||delta|| <= norm_bound``.

    Each step moves ``delta`` by ``step`` (default: a quarter of the bound, decaying
    linearly to 0) along the normalised gradient; batches are visited in a seeded
    random order for ``passes`` passes (:func:`ibau.perturbation.universal_search`).
    With ``norm_bound=None`` the images are clipped to [0, 1] and the step is 2.0.
    """
    if len(x) == 0:
        raise InputError("x is empty: no images to search a perturbation on")
    check_number("norm_bound", norm_bound, low=0, low_open=True, allow_none=True)
    check_int("passes", passes, low=1)
    check_int("batch_size", batch_size, low=1)
    check_number("step", step, low=0, low_open=True, allow_none=True)
    device = model_device(model)
    was_training = model.training
    model.eval()
    base_step = step if step is not None else (0.25 * norm_bound if norm_bound is not None else 2.0)
    labels = predict(model, x, batch_size=batch_size)
    batches = [(x[i:i + batch_size].to(device, torch.float32), labels[i:i + batch_size].to(device))
               for i in range(0, len(x), batch_size)]
    try:
        return universal_search(model, batches, norm_bound=norm_bound, clip=clip_images or norm_bound is None,
                                step_size=base_step, passes=passes, decay=True,
                                generator=torch.Generator().manual_seed(seed), progress=progress)
    finally:
        model.train(was_training)


def universal_attack(model: nn.Module, x_search: Tensor, x_eval: Tensor, y_eval: Tensor, *,
                     norm_bound: float | None = 10.0, passes: int = 5, batch_size: int = 100,
                     seed: int = 0, progress: bool = False) -> tuple[UniversalAttackResult, Tensor]:
    """Search a universal perturbation on ``x_search``; measure it on ``(x_eval, y_eval)``.

    Returns the measurements and the perturbation (1, C, H, W).
    """
    delta = find_universal_perturbation(model, x_search, norm_bound=norm_bound, passes=passes,
                                        batch_size=batch_size, seed=seed, progress=progress)
    y_eval = torch.as_tensor(y_eval).long()
    clean = predict(model, x_eval, batch_size=batch_size)
    pert = predict(model, x_eval, batch_size=batch_size,
                   transform=lambda xb: add(xb, delta.to(xb.device), clip=norm_bound is None))
    correct = clean == y_eval
    success = float((pert[correct] != y_eval[correct]).float().mean()) if correct.any() else 0.0
    counts = torch.bincount(pert)
    top = int(counts.argmax())
    return UniversalAttackResult(success_rate=success, top_class=top, top_class_share=float(counts[top]) / len(pert),
                                 delta_norm=float(delta.norm()), images=int(correct.sum())), delta.cpu()
