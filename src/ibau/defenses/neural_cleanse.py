"""Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineer a minimal mask+pattern
trigger per class, flag outliers by the MAD anomaly index of the mask norms, unlearn."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import check_int, check_number
from ..metrics import model_device
from ._synthesis import ReversedTrigger, TriggerSynthesis

__all__ = ["NeuralCleanse", "MaskTrigger"]


class MaskTrigger:
    """``x -> (1 - mask) * x + mask * pattern`` with a (1, H, W) mask and a (C, H, W) pattern in [0, 1]."""

    def __init__(self, mask: Tensor, pattern: Tensor):
        self.mask = mask.detach()
        self.pattern = pattern.detach()

    def __call__(self, x: Tensor) -> Tensor:
        m = self.mask.to(x.device, x.dtype)
        return (1 - m) * x + m * self.pattern.to(x.device, x.dtype)


def _atanh_init(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Uniform random values in (0, 1), mapped through the inverse of ``(tanh + 1) / 2``."""
    u = torch.rand(shape, generator=generator) * 0.98 + 0.01
    return torch.atanh(2 * u - 1)


class NeuralCleanse(TriggerSynthesis):
    """Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor
    Attacks in Neural Networks", IEEE S&P 2019), as the I-BAU paper ran it (Appendix A.4.2):
    the defender's clean images only, MAD anomaly index over the reversed masks' l1
    norms, every class with index > 2 (on the small side) flagged and unlearned.

    For each class ``t``: minimise ``CE(f((1-m) x + m p), t) + cost * ||m||_1`` over a mask
    ``m`` (1 x H x W) and a pattern ``p`` (C x H x W), both parameterised as
    ``(tanh(.) + 1) / 2``, with Adam (lr 0.1, betas 0.5/0.9). ``cost`` starts at
    ``init_cost`` and adapts: multiplied by ``cost_multiplier`` after ``patience``
    epochs in a row with attack success >= ``success_threshold``, divided by
    ``cost_multiplier ** 1.5`` after ``patience`` epochs below it. The smallest mask that
    reached the success threshold is kept; the search stops early once the best norm
    has not improved by 1% for ``early_stop_patience`` epochs. Unlearning fine-tunes on
    the clean set with 20% of every batch stamped with a flagged trigger, true labels kept.

    Defaults follow the authors' code (init cost 1e-3, lr 0.1, batch 32, 1,000 images an
    epoch, patience 5, threshold 0.99, multiplier 1.5) except:

    * ``epochs=30`` instead of a budget of 1,000 with early stopping: on CIFAR-10 the
      search settles within a few tens of epochs, and 1,000 is out of reach on a CPU.
    * Early stopping waits ``early_stop_patience=10`` epochs (authors: 25 = 5 x patience)
      for the same reason.
    * Unlearning uses one epoch of Adam at 1e-3 over the clean set (the original paper:
      one epoch of SGD over 10% of the training data), the same optimiser and step size
      as I-BAU's outer step, so that the two compare like for like.

    Args:
        init_cost: starting weight of the mask's l1 norm.
        lr: Adam learning rate of the mask/pattern search.
        batch_size: images per search step.
        epoch_images: images drawn (seeded) per search epoch.
        epochs: most search epochs per class.
        patience: epochs before the cost moves.
        cost_multiplier: cost up factor (down factor: its 1.5th power).
        success_threshold: attack success that counts as a working trigger.
        early_stop_patience: epochs without 1% improvement before the search stops.
        **kwargs: the family's settings (:class:`ibau.defenses._synthesis.TriggerSynthesis`):
            ``threshold=2``, ``unlearn_fraction=0.2``, ``unlearn_epochs=1``, ``unlearn_lr=1e-3``,
            ``unlearn_batch_size=100``, ``classes``, ``normalize``, ``seed``, ``progress``.

    Example::

        >>> nc = NeuralCleanse(seed=0)
        >>> scan = nc.scan(model, x_clean, y_clean)     # detection only
        >>> scan.flagged, scan.anomaly_index
        >>> result = nc.fit(model, x_clean, y_clean)    # detection + unlearning
    """

    name = "neural_cleanse"
    display_name = "Neural Cleanse"
    short_name = "NC"
    cost_order = 7

    def __init__(self, *, init_cost: float = 1e-3, lr: float = 0.1, batch_size: int = 32, epoch_images: int = 1000,
                 epochs: int = 30, patience: int = 5, cost_multiplier: float = 1.5, success_threshold: float = 0.99,
                 early_stop_patience: int = 10, **kwargs: Any):
        super().__init__(**kwargs)
        self.init_cost = check_number("init_cost", init_cost, low=0)
        self.lr = check_number("lr", lr, low=0, low_open=True)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.epoch_images = check_int("epoch_images", epoch_images, low=1)
        self.epochs = check_int("epochs", epochs, low=1)
        self.patience = check_int("patience", patience, low=1)
        self.cost_multiplier = check_number("cost_multiplier", cost_multiplier, low=1, low_open=True)
        self.success_threshold = check_number("success_threshold", success_threshold, low=0, low_open=True, high=1)
        self.early_stop_patience = check_int("early_stop_patience", early_stop_patience, low=0)

    # hooks for TABOR -------------------------------------------------------------
    def regularizer(self, net: nn.Module, mask: Tensor, pattern: Tensor, xb: Tensor, yb: Tensor,
                    target: int) -> Tensor:
        """Extra terms of the objective (none for Neural Cleanse)."""
        return mask.new_zeros(())

    def score(self, net: nn.Module, mask: Tensor, pattern: Tensor, x: Tensor, y: Tensor, target: int) -> float:
        """What the outlier test compares: the mask's l1 norm."""
        return float(mask.sum())

    # search ----------------------------------------------------------------------
    def reverse(self, net: nn.Module, target: int, x: Tensor, y: Tensor, generator: torch.Generator) -> ReversedTrigger:
        device = model_device(net)
        _, c, h, w = x.shape
        m_raw = _atanh_init((1, h, w), generator).to(device).requires_grad_(True)
        p_raw = _atanh_init((c, h, w), generator).to(device).requires_grad_(True)
        opt = torch.optim.Adam([m_raw, p_raw], lr=self.lr, betas=(0.5, 0.9))
        cost = self.init_cost
        up = down = stale = 0
        best_norm, best = math.inf, None
        early_ref = math.inf
        epochs_run = 0
        steps = max(1, math.ceil(min(self.epoch_images, len(x)) / self.batch_size))
        for epoch in range(self.epochs):
            epochs_run += 1
            hits = seen = 0
            norm_sum = 0.0
            for _ in range(steps):
                idx = torch.randint(0, len(x), (min(self.batch_size, len(x)),), generator=generator)
                xb, yb = x[idx].to(device), y[idx].to(device)
                mask = (torch.tanh(m_raw) + 1) / 2
                pattern = (torch.tanh(p_raw) + 1) / 2
                xa = (1 - mask) * xb + mask * pattern
                logits = net(xa)
                tgt = torch.full_like(yb, target)
                l1 = mask.sum()
                loss = F.cross_entropy(logits, tgt) + cost * l1 + self.regularizer(net, mask, pattern, xb, yb, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                hits += int((logits.argmax(1) == tgt).sum())
                seen += len(yb)
                norm_sum += float(l1.detach())
            success = hits / seen
            with torch.no_grad():
                mask = (torch.tanh(m_raw) + 1) / 2
                pattern = (torch.tanh(p_raw) + 1) / 2
                norm = float(mask.sum())
            if success >= self.success_threshold and norm < best_norm:
                best_norm, best = norm, (mask.clone(), pattern.clone())
            # early stop once a working trigger exists and stops shrinking
            if best is not None:
                if best_norm >= 0.99 * early_ref:
                    stale += 1
                else:
                    stale = 0
                early_ref = min(early_ref, best_norm)
                if stale >= self.early_stop_patience:
                    break
            if success >= self.success_threshold:
                up, down = up + 1, 0
            else:
                up, down = 0, down + 1
            if up >= self.patience:
                up, cost = 0, cost * self.cost_multiplier if cost > 0 else self.init_cost
            elif down >= self.patience:
                down, cost = 0, cost / self.cost_multiplier ** 1.5
        found = best is not None
        if best is None:  # never reached the threshold: keep the last state, flagged as unsuccessful
            with torch.no_grad():
                best = ((torch.tanh(m_raw) + 1) / 2, (torch.tanh(p_raw) + 1) / 2)
        mask, pattern = (t.detach().cpu() for t in best)
        stamp = MaskTrigger(mask, pattern)
        with torch.no_grad():
            pick = torch.randperm(len(x), generator=generator)[:500]
            sample, sample_y = x[pick].to(device), y[pick].to(device)
            rate = float((net(stamp(sample)).argmax(1) == target).float().mean())
        with torch.no_grad():
            score = self.score(net, mask.to(device), pattern.to(device), sample, sample_y, target)
        return ReversedTrigger(target=target, score=score, stamp=stamp, success=rate,
                               tensors={"mask": mask, "pattern": pattern},
                               info={"mask_l1": float(mask.sum()), "epochs": epochs_run, "reached_threshold": found,
                                     "final_cost": cost})
