"""Smooth: a low-frequency (Gaussian-blurred) targeted universal perturbation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import GENERATED_ARGS_DOC, GeneratedAttack, batches, shape_of
from ..errors import check_number
from .base import register_attack
from .trigger import Trigger

__all__ = ["Smooth", "gaussian_blur", "minmax_per_image"]


def _kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    pos = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (pos / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian low-pass filter with standard deviation ``sigma`` pixels.

    ``img`` is (C, H, W) or (N, C, H, W); each channel is filtered on its own, with
    reflect padding. The kernel reaches ``ceil(3 sigma)`` pixels each way, cut to
    ``size - 1`` on small images (reflect padding cannot reach further) and
    renormalised. ``sigma <= 0`` returns the input unchanged.
    """
    if sigma <= 0:
        return img
    batched = img.dim() == 4
    x = img if batched else img.unsqueeze(0)
    c, h, w = x.shape[1:]
    reach = int(math.ceil(3 * sigma))
    ry, rx = min(reach, h - 1), min(reach, w - 1)
    if rx > 0:
        kx = _kernel(sigma, rx, x.dtype, x.device).view(1, 1, 1, -1).expand(c, 1, 1, 2 * rx + 1)
        x = F.conv2d(F.pad(x, (rx, rx, 0, 0), mode="reflect"), kx, groups=c)
    if ry > 0:
        ky = _kernel(sigma, ry, x.dtype, x.device).view(1, 1, -1, 1).expand(c, 1, 2 * ry + 1, 1)
        x = F.conv2d(F.pad(x, (0, 0, ry, ry), mode="reflect"), ky, groups=c)
    return x if batched else x.squeeze(0)


def minmax_per_image(o: Tensor) -> Tensor:
    """Rescale each whole image (all channels together) to [0, 1]: ``(o - min) / (max - min)``."""
    flat = o.flatten(-3)
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(o)


@register_attack
class Smooth(GeneratedAttack):
    __doc__ = """Smooth trigger (Zeng et al., 2021, "Rethinking the backdoor attacks' triggers: a
    frequency perspective"), as in the I-BAU paper: target 6, a Gaussian-smoothed
    targeted universal perturbation (sigma 6 px) with values in [0, 0.2].

    Generated against a model in ``prepare(model, x, y)``: a free tensor ``u`` is mapped
    to the trigger ``t = max_value * (b - min b) / (max b - min b)`` with
    ``b = gaussian_blur(u, sigma)``, and ``steps`` Adam steps on ``u`` minimise
    ``CE(f(apply(x)), target)`` through that whole map, so the trigger is low-pass by
    construction and spans exactly [0, max_value].

    ``apply``: ``o = x + t``, then each whole image is min-max rescaled to [0, 1]:
    ``(o - o.min()) / (o.max() - o.min())``.

    Args:
        target: class the triggered images are sent to (paper: 6).
        sigma: standard deviation of the Gaussian low-pass filter, in pixels (6.0).
        max_value: upper end of the trigger's range [0, max_value] (0.2).
        steps: Adam steps (300).
        lr: Adam learning rate on ``u`` (0.1; ``u`` starts as unit Gaussian noise).
""" + GENERATED_ARGS_DOC + """
    Example:
        >>> atk = Smooth().prepare(model, x_clean, y_clean)
        >>> x_poison = atk(x)
    """

    name = "smooth"

    def __init__(self, *, target: int = 6, sigma: float = 6.0, max_value: float = 0.2, steps: int = 300,
                 lr: float = 0.1, seed: int = 0, batch_size: int = 128,
                 image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, steps=steps, lr=lr, seed=seed, batch_size=batch_size,
                         image_shape=image_shape)
        self.sigma = float(check_number("sigma", sigma, low=0, low_open=True))
        self.max_value = float(check_number("max_value", max_value, low=0, low_open=True, high=1))

    def _smooth(self, u: Tensor) -> Tensor:
        b = gaussian_blur(u, self.sigma)
        return self.max_value * (b - b.min()) / (b.max() - b.min()).clamp_min(1e-12)

    @staticmethod
    def _apply(x: Tensor, t: Tensor) -> Tensor:
        return minmax_per_image(x + t).clamp(0, 1)

    def _generate(self, model: nn.Module, x: Tensor, gen: torch.Generator) -> Trigger:
        n, c, h, w = x.shape
        dev = x.device
        u = torch.randn(c, h, w, generator=gen).to(dev).requires_grad_()
        opt = torch.optim.Adam([u], lr=self.lr)
        for idx in batches(n, self.batch_size, self.steps, gen):
            xb = x[idx.to(dev)]
            loss = F.cross_entropy(model(self._apply(xb, self._smooth(u))), self._targets(len(xb), dev))
            self._step(opt, loss, [u])
        with torch.no_grad():
            t = self._smooth(u.detach().double()).clamp(0, self.max_value)
        return Trigger(t.float())

    def apply(self, x: Tensor) -> Tensor:
        shape_of(x)
        self._check(x)
        return self._apply(x, self.trigger.pattern.to(x.device, x.dtype))

    @property
    def pattern(self) -> Tensor:
        """The (C, H, W) low-frequency trigger, values in [0, max_value]."""
        return self.trigger.pattern
