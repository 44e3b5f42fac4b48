"""The l0- and l2-constrained "invisible" triggers of Li et al. (2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import GENERATED_ARGS_DOC, GeneratedAttack, as_shape, batches
from ..errors import check_int, check_number
from .base import register_attack
from .trigger import Trigger

__all__ = ["L0Inv", "L2Inv"]


@register_attack
class L0Inv(GeneratedAttack):
    __doc__ = """l0-inv: a trigger that replaces a few pixels, after Li et al. (2020), "Invisible
    backdoor attacks on deep neural networks via steganography and regularization"
    (the I-BAU paper's "l0 inv", target 0).

    Generated against a model in ``prepare(model, x, y)``, in two phases of ``steps``
    Adam steps each (learning rate ``lr``, minibatches of ``batch_size``):

    1. a soft mask ``m = sigmoid(a)`` over the H*W positions and a colour pattern
       ``p = sigmoid(b)`` minimise ``CE(f(x (1 - m) + m p), target) + reg * ||m||_1``
       (the l1 norm standing in for l0);
    2. the ``pixels`` positions with the largest ``m`` become a hard 0/1 mask (all
       channels) and only the pattern values there are optimised again.

    The triggered image is ``x * (1 - mask) + mask * pattern``: at most ``pixels``
    pixel positions change. :meth:`fixed` wraps a given mask/pattern instead (the
    authors' released trigger replaces the last 9 pixels of the bottom row; see
    :meth:`bottom_row_mask`).

    Args:
        target: class the triggered images are sent to (paper: 0).
        pixels: number of pixel positions the trigger replaces (9).
        steps: Adam steps per phase (300).
        lr: Adam learning rate on the mask/pattern logits (0.1).
        reg: weight of the l1 mask penalty (1e-3).
""" + GENERATED_ARGS_DOC + """
    Example:
        >>> atk = L0Inv().prepare(model, x_clean, y_clean)
        >>> x_poison, y_poison = atk(x), atk.target_of(y)
    """

    name = "l0_inv"

    def __init__(self, *, target: int = 0, pixels: int = 9, steps: int = 300, lr: float = 0.1,
                 reg: float = 1e-3, seed: int = 0, batch_size: int = 128,
                 image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, steps=steps, lr=lr, seed=seed, batch_size=batch_size,
                         image_shape=image_shape)
        self.pixels = int(check_int("pixels", pixels, low=1))
        self.reg = float(check_number("reg", reg, low=0))
        self._fixed = False

    @classmethod
    def fixed(cls, mask: Tensor, pattern: Tensor, target: int = 0) -> "L0Inv":
        """An l0 trigger from a given ``mask`` ((H, W), (1, H, W) or (C, H, W), 0/1) and
        additive ``pattern`` (C, H, W): ``clip(x * (1 - mask) + pattern, 0, 1)``.
        ``prepare`` leaves it unchanged."""
        pattern = torch.as_tensor(pattern, dtype=torch.float32).detach().cpu()
        mask = torch.as_tensor(mask, dtype=torch.float32).detach().cpu()
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        mask = mask.expand(pattern.shape[0], *mask.shape[-2:]).clone()
        atk = cls(target=target, pixels=max(1, int((mask > 0).any(0).sum())), image_shape=pattern.shape)
        atk._trigger = Trigger(pattern.clone(), mask)
        atk._fixed = True
        return atk

    @staticmethod
    def bottom_row_mask(pixels: int = 9, image_shape: Sequence[int] = (3, 32, 32)) -> Tensor:
        """(C, H, W) mask of the last ``pixels`` pixels of the bottom row (the released
        l0-inv trigger's layout)."""
        c, h, w = as_shape(image_shape)
        mask = torch.zeros(c, h, w)
        mask[:, h - 1, w - min(pixels, w):] = 1
        return mask

    def prepare(self, model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None) -> "L0Inv":
        if self._fixed:
            return self
        return super().prepare(model, x, y)

    def _generate(self, model: nn.Module, x: Tensor, gen: torch.Generator) -> Trigger:
        n, c, h, w = x.shape
        dev = x.device
        mask_logit = (0.01 * torch.randn(1, h, w, generator=gen)).to(dev).requires_grad_()
        pat_logit = torch.randn(c, h, w, generator=gen).to(dev).requires_grad_()
        opt = torch.optim.Adam([mask_logit, pat_logit], lr=self.lr)
        for idx in batches(n, self.batch_size, self.steps, gen):
            xb = x[idx.to(dev)]
            m, p = torch.sigmoid(mask_logit), torch.sigmoid(pat_logit)
            loss = F.cross_entropy(model(xb * (1 - m) + m * p), self._targets(len(xb), dev)) + self.reg * m.sum()
            self._step(opt, loss, [mask_logit, pat_logit])

        keep = torch.topk(mask_logit.detach().flatten(), min(self.pixels, h * w)).indices
        hard = torch.zeros(h * w, device=dev)
        hard[keep] = 1
        hard = hard.view(1, h, w)
        pat_logit = pat_logit.detach().clone().requires_grad_()
        opt = torch.optim.Adam([pat_logit], lr=self.lr)
        for idx in batches(n, self.batch_size, self.steps, gen):
            xb = x[idx.to(dev)]
            p = torch.sigmoid(pat_logit)
            loss = F.cross_entropy(model(xb * (1 - hard) + hard * p), self._targets(len(xb), dev))
            self._step(opt, loss, [pat_logit])
        mask = hard.expand(c, h, w)
        return Trigger(mask * torch.sigmoid(pat_logit.detach()), mask)

    @property
    def mask(self) -> Tensor:
        """The (C, H, W) 0/1 mask of replaced pixels."""
        return self.trigger.mask


@register_attack
class L2Inv(GeneratedAttack):
    __doc__ = """l2-inv: a dense, faint additive trigger, after Li et al. (2020), "Invisible
    backdoor attacks on deep neural networks via steganography and regularization"
    (the I-BAU paper's "l2 inv", target 0, l2 norm about 3.2 on 32x32 images).

    Generated against a model in ``prepare(model, x, y)``: ``steps`` Adam steps on
    ``CE(f(clip(x + t, 0, 1)), target) + reg * ||t||_2^2``, keeping ``t`` inside the l2
    ball of radius ``norm``; the result is then rescaled to l2 norm exactly ``norm``.
    Applied as ``clip(x + t, 0, 1)``.

    Args:
        target: class the triggered images are sent to (paper: 0).
        norm: l2 norm of the final pattern over all C*H*W values (3.2).
        steps: Adam steps (300).
        lr: Adam learning rate (0.01).
        reg: weight of the squared-l2 penalty (1e-3).
""" + GENERATED_ARGS_DOC + """
    Example:
        >>> atk = L2Inv().prepare(model, x_clean, y_clean)
        >>> atk.pattern.norm()   # 3.2
    """

    name = "l2_inv"

    def __init__(self, *, target: int = 0, norm: float = 3.2, steps: int = 300, lr: float = 0.01,
                 reg: float = 1e-3, seed: int = 0, batch_size: int = 128,
                 image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, steps=steps, lr=lr, seed=seed, batch_size=batch_size,
                         image_shape=image_shape)
        self.norm = float(check_number("norm", norm, low=0, low_open=True))
        self.reg = float(check_number("reg", reg, low=0))

    def _generate(self, model: nn.Module, x: Tensor, gen: torch.Generator) -> Trigger:
        n, c, h, w = x.shape
        dev = x.device
        init = torch.randn(c, h, w, generator=gen)
        init = init * (0.01 * self.norm / init.norm())
        t = init.clone().to(dev).requires_grad_()
        opt = torch.optim.Adam([t], lr=self.lr)
        for idx in batches(n, self.batch_size, self.steps, gen):
            xb = x[idx.to(dev)]
            loss = F.cross_entropy(model((xb + t).clamp(0, 1)), self._targets(len(xb), dev)) + self.reg * t.pow(2).sum()
            self._step(opt, loss, [t])
            with torch.no_grad():
                t.mul_(torch.clamp(self.norm / t.norm().clamp_min(1e-12), max=1.0))
        t = t.detach()
        if t.norm() < 1e-8:
            t = init.to(dev)
        t = t.double()
        return Trigger((t * (self.norm / t.norm())).float())

    @property
    def pattern(self) -> Tensor:
        """The (C, H, W) additive pattern."""
        return self.trigger.pattern
