"""One universal additive perturbation: the pieces I-BAU, the naive heuristic, the
trigger scans and the robustness measure share.

The backdoor minimax of the I-BAU paper (Section 3, Eq. 1),
``min_theta max_{||delta|| <= C} mean_i CE(f_theta(x_i + delta), y_i)``, is about ONE
perturbation ``delta`` (1, C, H, W) in [0, 1] pixel space added to every image:

* :func:`wrap`: the model as these methods see it, taking [0, 1] pixels (a model that
  expects normalised inputs is wrapped in :class:`ibau.models.Normalized`);
* :func:`add`: ``x + delta``, clamped to [0, 1] when asked;
* :func:`project_l2`: the projection onto the l2 ball, ``delta * min(1, C / ||delta||)``;
* :func:`perturbed_count` / :func:`choose_perturbed`: which images of an outer batch
  receive ``delta`` (I-BAU's ``perturb_fraction``);
* :func:`universal_search`: projected, l2-normalised gradient ascent for a universal
  adversarial perturbation (the naive heuristic's UAP step, Section 4; the trigger-free
  robustness measure of Section 3, :mod:`ibau.robustness`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError
from .metrics import model_device

__all__ = ["wrap", "check_normalize", "add", "project_l2", "perturbed_count", "choose_perturbed", "universal_search"]

def check_normalize(normalize) -> tuple[list[float], list[float]] | None:
    """``normalize`` is ``None`` or ``(mean, std)`` of equal lengths with finite means and
    positive finite stds; else :class:`~ibau.errors.InputError`."""
    if normalize is None:
        return None
    try:
        mean, std = normalize
        mean, std = [float(m) for m in mean], [float(s) for s in std]
    except (TypeError, ValueError):
        raise InputError(f"normalize must be (mean, std), two sequences of numbers, got {normalize!r}") from None
    if len(mean) != len(std) or not mean:
        raise InputError(f"normalize: mean and std must have the same (non-zero) length, got {normalize!r}")
    if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
        raise InputError(f"normalize: means must be finite and stds positive, got {normalize!r}")
    return normalize


def wrap(model: nn.Module, normalize) -> nn.Module:
    """``model`` taking [0, 1] pixels: itself, or wrapped to compute ``(x - mean) / std``
    first (on the model's device) when ``normalize = (mean, std)``."""
    if normalize is None:
        return model
    from .models.normalize import Normalized

    return Normalized(model, *normalize).to(model_device(model))


def add(x: Tensor, delta: Tensor, clip: bool) -> Tensor:
    """``x + delta``, clamped to [0, 1] when ``clip``."""
    out = x + delta
    return out.clamp(0, 1) if clip else out


def project_l2(delta: Tensor, norm_bound: float | None) -> Tensor:
    """``delta * min(1, norm_bound / ||delta||_2)``: onto the l2 ball (``None``: unchanged)."""
    if norm_bound is None:
        return delta
    return delta * min(1.0, norm_bound / max(float(delta.norm()), 1e-12))


def perturbed_count(batch: int, fraction: float) -> int:
    """Images of an outer batch that receive the perturbation: ``floor(fraction * batch)``
    as in the I-BAU authors' code, but never fewer than one. (At batch < 100 the authors'
    count rounds to 0 and I-BAU silently degrades into plain fine-tuning.)"""
    return min(batch, max(1, int(fraction * batch)))


def choose_perturbed(n: int, fraction: float, generator: torch.Generator) -> Tensor:
    """Indices of the images of an ``n``-image batch that receive ``delta`` (seeded)."""
    return torch.randperm(n, generator=generator)[: perturbed_count(n, fraction)]


def universal_search(net: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], *, norm_bound: float | None,
                     clip: bool, step_size: float, steps_per_batch: int = 1, passes: int = 1, decay: bool = False,
                     generator: torch.Generator | None = None, progress: bool = False,
                     desc: str = "universal perturbation search") -> Tensor:
    """A universal adversarial perturbation by projected, normalised gradient ascent.

    From ``delta = 0``: for ``passes`` passes over ``batches`` (``(images, labels)`` on the
    model's device; in order, or in a random order drawn from ``generator`` each pass),
    ``steps_per_batch`` steps per batch of
    ``delta <- project(delta + size * g / ||g||)``, ``g`` the gradient of
    ``CE(net(add(x, delta)), labels)``. ``size`` is ``step_size``, or with ``decay`` falls
    linearly from ``step_size`` towards 0 over all steps. A batch whose gradient is zero
    or not finite ends that batch's steps (no ascent direction). This is the stochastic
    projected-gradient form of a UAP (Shafahi et al., AAAI 2020). ``net`` should be in
    eval mode; it is not changed. ``progress`` shows a bar over the batches.
    Returns ``delta`` (1, C, H, W), detached.
    """
    x0 = batches[0][0]
    delta = torch.zeros((1, *x0.shape[1:]), device=x0.device, dtype=x0.dtype)
    total = passes * len(batches) * steps_per_batch
    from tqdm.auto import tqdm

    bar = tqdm(total=passes * len(batches), desc=desc, unit="batch", leave=False, disable=not progress)
    for p in range(passes):
        order = torch.randperm(len(batches), generator=generator).tolist() if generator is not None \
            else range(len(batches))
        for pos, b in enumerate(order):
            xb, labels = batches[b]
            for s in range(steps_per_batch):
                d = delta.requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(net(add(xb, d, clip)), labels), [d])
                gn = float(g.norm())
                delta = delta.detach()
                if gn == 0 or not math.isfinite(gn):
                    break
                k = (p * len(batches) + pos) * steps_per_batch + s
                size = step_size * (1 - k / total) if decay else step_size
                delta = project_l2(delta + (size / gn) * g, norm_bound)
            bar.update(1)
    bar.close()
    return delta.detach()
