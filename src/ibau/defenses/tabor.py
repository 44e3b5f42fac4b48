"""TABOR (Guo et al., 2019): Neural Cleanse's search with regularisers against the false
triggers it tends to find, and a trigger-quality score for the outlier test."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import check_number
from .neural_cleanse import NeuralCleanse

__all__ = ["TABOR", "total_variation"]


def total_variation(t: Tensor) -> Tensor:
    """Anisotropic total variation (sum of absolute neighbour differences) of (..., H, W)."""
    return (t[..., 1:, :] - t[..., :-1, :]).abs().sum() + (t[..., :, 1:] - t[..., :, :-1]).abs().sum()


class TABOR(NeuralCleanse):
    """TABOR (Guo, Wang, Xing, Du & Song, "TABOR: A Highly Accurate Approach to Inspecting
    and Restoring Trojan Backdoors in AI Systems", arXiv 1908.01763, 2019), as the I-BAU
    paper ran it (Appendix A.4.2): the 5,000 clean images only, MAD over TABOR's trigger
    score, classes with index > 2 flagged and unlearned (same flow as Neural Cleanse).

    The search minimises Neural Cleanse's objective plus TABOR's regularisers:

    * R1, overly large triggers: ``mask_cost * ||m||_1`` is Neural Cleanse's adaptive
      term; TABOR adds ``pattern_cost * ||(1 - m) * p||_1`` (pattern outside the mask).
    * R2, scattered triggers: ``smooth_cost * TV(m) + pattern_smooth_cost * TV((1 - m) * p)``.
    * R3, blocking the key object: ``block_cost * CE(f((1 - m) * x), y)`` -- removing
      the trigger's area must not change the true label.
    * R4, overlaying the object: ``overlay_cost * CE(f(m * p), t)`` -- the trigger alone
      must already read as the target.

    Outlier test score (our reading of TABOR's trigger-quality metric, which combines the
    same properties): ``log ||m||_1 + log(1 + TV(m)) - log(keep)`` where ``keep`` is the
    share of clean images still classified as their label with the trigger's area
    removed. Smaller is more suspicious, as for Neural Cleanse.

    The regulariser weights are not given in the I-BAU paper; ours are fixed, not tuned
    on evaluation data: the defaults below keep every extra term an order of magnitude
    below the cross-entropy at the start of the search. Other defaults as
    :class:`~ibau.defenses.neural_cleanse.NeuralCleanse`.

    Args:
        pattern_cost, smooth_cost, pattern_smooth_cost, block_cost, overlay_cost: the
            regulariser weights above.
        **kwargs: every setting of :class:`~ibau.defenses.neural_cleanse.NeuralCleanse`.
    """

    name = "tabor"
    display_name = "TABOR"
    short_name = "TABOR"
    cost_order = 8

    def __init__(self, *, pattern_cost: float = 1e-4, smooth_cost: float = 1e-3, pattern_smooth_cost: float = 1e-4,
                 block_cost: float = 1e-2, overlay_cost: float = 1e-2, **kwargs: Any):
        super().__init__(**kwargs)
        self.pattern_cost = check_number("pattern_cost", pattern_cost, low=0)
        self.smooth_cost = check_number("smooth_cost", smooth_cost, low=0)
        self.pattern_smooth_cost = check_number("pattern_smooth_cost", pattern_smooth_cost, low=0)
        self.block_cost = check_number("block_cost", block_cost, low=0)
        self.overlay_cost = check_number("overlay_cost", overlay_cost, low=0)

    def regularizer(self, net: nn.Module, mask: Tensor, pattern: Tensor, xb: Tensor, yb: Tensor,
                    target: int) -> Tensor:
        outside = (1 - mask) * pattern
        r = self.pattern_cost * outside.abs().sum()
        r = r + self.smooth_cost * total_variation(mask) + self.pattern_smooth_cost * total_variation(outside)
        if self.block_cost > 0:
            r = r + self.block_cost * F.cross_entropy(net((1 - mask) * xb), yb)
        if self.overlay_cost > 0:
            alone = (mask * pattern).unsqueeze(0)
            r = r + self.overlay_cost * F.cross_entropy(net(alone), torch.tensor([target], device=xb.device))
        return r

    def score(self, net: nn.Module, mask: Tensor, pattern: Tensor, x: Tensor, y: Tensor, target: int) -> float:
        keep = float((net((1 - mask) * x).argmax(1) == y).float().mean())
        return math.log(float(mask.sum()) + 1e-8) + math.log1p(float(total_variation(mask))) - math.log(keep + 1e-3)
