"""Backdoor detection without the trigger: :func:`scan` and :class:`MaskScan`.

A backdoored classifier has a shortcut to its target class: a small stamp -- a mask ``m``
and a pattern ``p``, ``x' = (1 - m) x + m p`` -- sends most images there, while reaching
any other class takes a much larger change. Neural Cleanse (Wang et al., IEEE S&P 2019)
reverse-engineers the smallest such stamp for every class and calls a class suspicious
when its mask's l1 norm is an outlier on the small side (MAD anomaly index). K-Arm
(Shen et al., ICML 2021) spends the search budget on the most suspicious classes instead
of all of them equally.

:class:`MaskScan` is that search made cheap enough for a CPU: every class's mask and
pattern are optimised *together*, one forward pass over the stamped copies of a batch for
all classes at once, with a per-class cost on the mask's norm adapted every few steps
(Neural Cleanse's rule), for a fixed number of steps. After ``explore_steps`` steps only
the ``keep`` classes with the smallest masks go on being optimised (K-Arm's idea); the
others keep the norm they reached. The verdict compares the classes that had the same,
longer search: ``score`` is the largest kept mask norm over the smallest, the model is
flagged when it exceeds ``threshold``, and the flagged classes (``target_classes``) are the
kept ones whose mask is at least ``threshold`` times smaller than the largest kept one. A class
the model answers on clean images at least ``max_over_prediction`` (2) times as often as it is
their label is never flagged nor the score's smallest mask: a biased model reaches such a class
with a small stamp for that reason alone, while a backdoor leaves clean predictions alone.
(Neural Cleanse's anomaly index over all classes would single out the classes searched
longer: measured on clean digits models, it flagged the three kept classes; it is reported
per class, computed on the norms every class reached with the same budget.)

What it can and cannot see is measured in ``benchmarks/results/scan_zoo.md``: patch,
sparse and watermark triggers give a mask far smaller than any natural class change;
all-to-all backdoors (every class has a small mask, so none stands out), full-image blends
and warping triggers are what mask-based scanners are known to miss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .defenses._common import mad_anomaly_index
from .defenses.neural_cleanse import MaskTrigger
from .defenses.base import _wrap, check_images, check_labels
from .errors import InputError, check_choice, check_int, check_number
from .metrics import model_device, near_chance_warning
from .models.fuse import fold_batchnorm
from .precision import PRECISIONS, arithmetic as _arithmetic, with_precision
from .perturbation import check_normalize

__all__ = ["scan", "MaskScan", "ScanResult", "SCANNERS", "verdict", "judge", "over_predicted"]


@dataclass
class ScanResult:
    """The verdict of a scan.

    ``backdoored``: whether the model is flagged; ``score`` (higher = more suspicious) and
    the ``threshold`` it was compared with; ``target_classes``: the suspected target(s),
    empty when none is found; ``per_class``: one dict per scanned class (mask norm, attack
    success of its reversed stamp, anomaly index, its shares of the model's answers and of the
    labels on the clean images, ``over_predicted``...); ``triggers``: class -> ``{"mask":
    (1, H, W), "pattern": (C, H, W)}`` for the suspected classes (all classes with
    ``keep_all_triggers``); ``seconds``; ``config``: the scanner's settings; ``clean_accuracy``:
    the model's accuracy on the clean images its class shares were measured on (``CLEAN_IMAGES``);
    ``warnings``: e.g. that the model does not recognise the clean images, when the verdict means
    nothing.
    """

    backdoored: bool
    score: float
    threshold: float
    target_classes: list[int]
    per_class: list[dict[str, Any]]
    seconds: float
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    triggers: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    clean_accuracy: float | None = None
    warnings: list[str] = field(default_factory=list)

    def flagged_triggers(self) -> dict[int, dict[str, Tensor]]:
        """The reversed triggers of the flagged classes (empty when none is flagged)."""
        return {k: t for k, t in self.triggers.items() if k in self.target_classes}

    def as_dict(self) -> dict[str, Any]:
        """Everything but the trigger tensors, as plain JSON-able data."""
        return {"backdoored": self.backdoored, "score": self.score, "threshold": self.threshold,
                "target_classes": list(self.target_classes), "per_class": self.per_class,
                "seconds": self.seconds, "method": self.method, "config": self.config,
                "clean_accuracy": self.clean_accuracy, "warnings": list(self.warnings)}

    def summary(self) -> str:
        """One line: verdict, suspected target class(es), score, seconds."""
        return (f"{verdict(self.backdoored, self.target_classes)} "
                f"(score {self.score:.2f}, threshold {self.threshold:g}, {self.seconds:.0f} s)")


#: clean images (at most) on which the model's accuracy and its predicted share of each class are measured
CLEAN_IMAGES = 500
#: an over-predicted class (``max_over_prediction``) also takes at least this share of the images beyond its
#: labels: a rare class (2 of 500 images labelled, 4 predicted) is not over-predicted by chance
OVER_PREDICTED_EXCESS = 0.05


def over_predicted_warning(k: int, predicted: float, labelled: float, ratio: float) -> str:
    """The warning for a class ``k`` whose stamp was small enough to flag but which the model
    over-predicts on clean images (``max_over_prediction``), so it is not flagged."""
    return (f"class {k} is reached with a stamp {ratio:.1f}x smaller than the largest of the classes searched longest, but it is the "
            f"model's answer for {predicted:.0%} of the clean images and the label of only {labelled:.0%}: a model "
            "that over-predicts a class reaches it with a small stamp for that reason alone, so it is not flagged "
            "(a backdoor leaves clean predictions alone); look at its reversed trigger (--report-dir) if the model's "
            "bias itself is suspicious")


def over_predicted(predicted: Sequence[float], labelled: Sequence[float], max_over_prediction: float | None) -> list[int]:
    """The classes the model answers at least ``max_over_prediction`` times as often as they are the label,
    and for at least :data:`OVER_PREDICTED_EXCESS` more of the images (shares of the clean images); none
    when ``max_over_prediction`` is ``None``."""
    if max_over_prediction is None:
        return []
    return [k for k, (p, q) in enumerate(zip(predicted, labelled))
            if p >= max_over_prediction * q and p - q >= OVER_PREDICTED_EXCESS]


def judge(norms: Sequence[float], kept: Sequence[int], threshold: float,
          over: Sequence[int] = ()) -> tuple[float, list[int], list[int]]:
    """:class:`MaskScan`'s verdict on the mask norms of the ``kept`` classes: ``(score, flagged classes,
    left-out classes)``. The yardstick is the largest kept mask; the score is it over the smallest kept
    mask of a class not in ``over``; a class not in ``over`` whose mask is at least ``threshold`` times
    smaller than the yardstick is flagged; one in ``over`` that would have been is left out."""
    ranked = sorted(kept, key=lambda k: norms[k])
    judged = [k for k in ranked if k not in over]
    yardstick = norms[ranked[-1]] if ranked else 0.0
    score = yardstick / max(norms[judged[0]], 1e-12) if len(ranked) > 1 and judged else 1.0
    small = [k for k in ranked if norms[k] * threshold <= yardstick]
    return score, [k for k in small if k not in over], [k for k in small if k in over]


class _Shifted(nn.Module):
    """``net(x) - offsets``: the model with its class prior taken out (``prior_correction``)."""

    def __init__(self, net: nn.Module, offsets: Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("offsets", offsets)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) - self.offsets.to(x.dtype if x.is_floating_point() else self.offsets.dtype)


def prior_offsets(net: nn.Module, x: Tensor, y: Tensor, num_classes: int, *, iters: int = 1000,
                  batch_size: int = 250) -> Tensor:
    """Per-class logit offsets ``b`` (mean 0) such that ``softmax(net(x) - b)`` averaged over ``x``
    gives each class its share of the labels ``y`` (fixed-point iteration ``b += log(mean p / share)``;
    classes absent from ``y`` count as 1/N of an image). float32 on the CPU."""
    device = model_device(net)
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    with torch.no_grad():
        logits = torch.cat([net(x[i:i + batch_size].to(device, dtype)).double().cpu()
                            for i in range(0, len(x), batch_size)])
    share = torch.bincount(y.cpu().long(), minlength=num_classes).double().clamp(min=1.0 / len(y)) / len(y)
    b = torch.zeros(num_classes, dtype=torch.float64)
    for _ in range(iters):
        step = torch.log(torch.softmax(logits - b, 1).mean(0) / share)
        b = b + step
        b = b - b.mean()
        if float(step.abs().max()) < 1e-6:
            break
    return b.float()


def class_list(classes: list[int]) -> str:
    """``k, j``: how reports list classes."""
    return ", ".join(map(str, classes))


def verdict(backdoored: bool, target_classes: list[int]) -> str:
    """``backdoor found -> class k[, j]`` or ``no backdoor found``: how every report words a scan."""
    return "backdoor found -> class " + class_list(target_classes) if backdoored else "no backdoor found"


def _unit(raw: Tensor) -> Tensor:
    """The search's parameterisation of masks and patterns: ``(tanh(raw) + 1) / 2`` in (0, 1)."""
    return (torch.tanh(raw) + 1) / 2


def _total_variation(mask: Tensor) -> Tensor:
    """Per mask (A, 1, H, W): the summed absolute differences of vertically and horizontally
    neighbouring values -- small for compact masks, large for scattered pixels."""
    return ((mask[..., 1:, :] - mask[..., :-1, :]).abs().flatten(1).sum(1)
            + (mask[..., :, 1:] - mask[..., :, :-1]).abs().flatten(1).sum(1))


class MaskScan:
    """Batched mask-and-pattern trigger search over all classes (Neural Cleanse's objective,
    K-Arm's budget allocation), with a MAD anomaly index on the masks' l1 norms.

    For every class ``k`` it minimises ``CE(f((1 - m_k) x + m_k p_k), k) + c_k ||m_k||_1``
    over the images of other classes, ``m_k`` (1 x H x W) and ``p_k`` (C x H x W) both
    parameterised as ``(tanh(.) + 1) / 2``, with Adam (lr 0.1, betas 0.5 / 0.9: Neural
    Cleanse's). Every ``patience`` steps the cost ``c_k`` is multiplied by
    ``cost_multiplier`` when the stamp sent at least ``success`` of the batch images to ``k``
    over those steps, and divided by ``cost_multiplier ** 1.5`` otherwise. A class's norm is
    the smallest mask norm seen at a check that reached ``success`` (or the last one, marked
    ``reached: false``).

    Differences from Neural Cleanse (whose detector it reproduces in spirit), each for speed:
    all classes share each forward pass; the budget is ``steps`` steps of ``batch_size``
    images per class (Neural Cleanse: up to 1,000 epochs of 1,000 images per class); the
    cost adapts every ``patience`` steps instead of every epoch; after ``explore_steps``
    only the ``keep`` smallest masks are optimised further (K-Arm).

    Args:
        steps: optimisation steps in all.
        explore_steps: steps during which every class is optimised (default: a third of ``steps``);
            fewer than ``steps``, so that the kept classes are compared after the same longer search.
        keep: classes optimised after ``explore_steps``.
        batch_size: clean images per step after ``explore_steps`` (each stamped once per kept class).
        explore_images: stamped images per step while every class is optimised: each class
            gets ``max(2, explore_images // classes)`` images (at most ``batch_size``).
        lr: Adam learning rate.
        init_cost: starting weight of the mask's l1 norm.
        cost_multiplier: cost up factor (down: its 1.5th power).
        patience: steps between cost updates (and between norm checks).
        success: share of images sent to the class for a stamp to count as working.
        threshold: the ratio (largest kept mask norm / smallest) above which the model is
            flagged; chosen on the zoo (``benchmarks/results/scan_zoo.md``).
        mask_tv: weight of the mask's total variation next to its l1 norm in the cost
            (``c_k * (||m_k||_1 + mask_tv * TV(m_k))``; TABOR's compactness idea): a compact
            mask instead of scattered pixels, closer to a patch trigger. Norms, score and
            verdict stay on the l1 norm. 0 (default): Neural Cleanse's objective. On the zoo
            (bf16), ``mask_tv=1`` flagged the same models (AUROC 0.975 against 0.958); as the
            source of I-BAU's stamps it did not beat the plain scan (``IBAU(reversed_scan=...)``).
        success_images: clean images (at most) on which each class's final stamp is tried after
            the search, for the per-class ``success`` rate of the report; 0 skips that measure
            (``success`` is then ``None``; the search, verdict and triggers are the same): what
            I-BAU's own scan for its stamps does, which reads only the flagged triggers.
        normalize: ``(mean, std)`` when the model expects normalised inputs.
        seed: seeds the batches and the starting masks.
        max_over_prediction: a class the model answers on the clean images at least this many times
            as often as it is their label, and for at least 5% more of them (``OVER_PREDICTED_EXCESS``:
            a rare class is not over-predicted by chance), is not flagged, and the score's smallest mask is that of
            another class (a warning says so when its stamp would have been flagged); it stays the
            yardstick when its mask is the largest kept one. ``None``: no such rule. On the zoo, the one
            clean model flagged without it (an under-trained PreAct ResNet answering class 9 for 24%
            of images labelled 9%, 2.7x) is not flagged with it, and every flagged backdoor target is
            predicted 0.7-1.4x its label share. A backdoor's target would be left out only where the
            model answers it for twice its share of clean images, i.e. where the backdoor already
            shows on clean data (measured on ``CLEAN_IMAGES`` = 500 of them).
        prior_correction: search on the model's logits minus per-class offsets that make its mean
            predicted probabilities on the clean images match their label shares (logit adjustment,
            Menon et al., ICLR 2021): a model biased towards a class (an under-trained one that answers
            it for a quarter of the images) reaches it with a small stamp for that reason alone, which
            looks like a backdoor; a backdoor is a response to the stamp, not a bias, and stays. The
            offsets are reported per class (``prior_offset``). Off by default, measured: on the zoo
            (bf16) it took the one clean model flagged off (1/8 -> 0/8) and raised the AUROC from
            0.958 to 0.967 (``benchmarks/results/scan_zoo.md``), but it also takes out the part of a
            backdoor's pull that shows on clean images: the scores of backdoored models whose target
            the model over-predicts fell (released BadNets 5.03 -> 3.95), and the test suite's
            4-class toy backdoor (target predicted 1.33x its label share) went unflagged (2.49 -> 1.82).
            The default verdict leaves strongly over-predicted classes out instead (``max_over_prediction``).
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (:mod:`ibau.precision`): the model's
            passes under bfloat16 autocast; ``"auto"`` (default) where the device computes
            bf16 natively. On the zoo, bf16 scans gave the same AUROC (0.958) in less than
            half the time (``benchmarks/results/scan_zoo.md``).
        progress: a progress bar on stderr.
    """

    name = "mask"

    def __init__(self, *, steps: int = 300, explore_steps: int | None = None, keep: int = 3, batch_size: int = 24,
                 explore_images: int = 240,
                 lr: float = 0.1, init_cost: float = 1e-3, cost_multiplier: float = 1.5, patience: int = 10,
                 success: float = 0.9, threshold: float = 2.0, mask_tv: float = 0.0, success_images: int = 500,
                 max_over_prediction: float | None = 2.0, prior_correction: bool = False,
                 normalize: tuple | None = None, seed: int = 0, precision: str = "auto", progress: bool = True):
        self.steps = check_int("steps", steps, low=3)
        explore_steps = steps // 3 if explore_steps is None else explore_steps
        self.explore_steps = check_int("explore_steps", explore_steps, low=1, high=self.steps - 1)
        self.keep = check_int("keep", keep, low=2)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.explore_images = check_int("explore_images", explore_images, low=1)
        self.lr = check_number("lr", lr, low=0, low_open=True)
        self.init_cost = check_number("init_cost", init_cost, low=0, low_open=True)
        self.cost_multiplier = check_number("cost_multiplier", cost_multiplier, low=1, low_open=True)
        self.patience = check_int("patience", patience, low=1)
        self.success = check_number("success", success, low=0, low_open=True, high=1)
        self.threshold = check_number("threshold", threshold, low=0, low_open=True)
        self.mask_tv = check_number("mask_tv", mask_tv, low=0)
        self.success_images = check_int("success_images", success_images, low=0)
        self.max_over_prediction = check_number("max_over_prediction", max_over_prediction, low=1, allow_none=True)
        if not isinstance(prior_correction, bool):
            raise InputError(f"prior_correction must be True or False, got {prior_correction!r}")
        self.prior_correction = prior_correction
        self.normalize = check_normalize(normalize)
        self.seed = check_int("seed", seed)
        self.precision = check_choice("precision", precision, PRECISIONS)
        self.progress = progress

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "steps": self.steps, "explore_steps": self.explore_steps, "keep": self.keep,
                "batch_size": self.batch_size, "explore_images": self.explore_images, "lr": self.lr, "init_cost": self.init_cost,
                "cost_multiplier": self.cost_multiplier, "patience": self.patience, "success": self.success,
                "threshold": self.threshold, "mask_tv": self.mask_tv, "success_images": self.success_images,
                "max_over_prediction": self.max_over_prediction, "prior_correction": self.prior_correction,
                "seed": self.seed, "precision": self.precision}

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> ScanResult:
        """Scan ``model`` with clean images ``x`` (N, C, H, W in [0, 1]) and labels ``y``;
        the model is not changed."""
        from tqdm.auto import tqdm

        x, y = check_images(x, y, min_size=2)
        num_classes = check_labels(model, x, y)
        if num_classes < 3:
            raise InputError("scan: the outlier test needs a model with at least 3 classes")
        t0 = time.perf_counter()
        base = _wrap(model, self.normalize)
        was = base.training
        base.eval()
        # only input gradients are needed: BatchNorm folded into the convolutions computes the same function faster
        device = model_device(base)
        net = with_precision(fold_batchnorm(base, channels_last=device.type == "cpu"), device, self.precision)
        flags = [p.requires_grad for p in base.parameters()]
        for p in base.parameters():
            p.requires_grad_(False)
        offsets, raw = None, net
        try:
            if self.prior_correction:
                offsets = prior_offsets(net, x, y, num_classes)
                net = _Shifted(net, offsets.to(device))
            norms, reached, rates, tensors, explored, kept, clean = self._search(net, x, y, num_classes, tqdm, raw)
        finally:
            for p, f in zip(base.parameters(), flags):
                p.requires_grad_(f)
            base.train(was)
        # the outlier test of Neural Cleanse, on the norms every class reached with the same budget
        index = mad_anomaly_index(torch.tensor(explored, dtype=torch.float64)).tolist()
        # the verdict compares the classes that had the same, longer search: the largest kept norm over the smallest
        # classes the model answers far more often than they are labelled are its bias, not a backdoor's target
        over = over_predicted(clean["predicted"], clean["labelled"], self.max_over_prediction)
        # the yardstick is still the largest kept mask (an over-predicted class among the kept ones is a natural
        # change too); only the candidates leave out the over-predicted classes
        score, targets, left_out = judge(norms, kept, self.threshold, over)
        ranked = sorted(kept, key=lambda k: norms[k])
        per_class = [{"class": k, "mask_l1": norms[k], "reached": reached[k], "success": rates[k],
                      "explore_l1": explored[k], "anomaly_index": index[k], "kept": k in kept,
                      "predicted_share": clean["predicted"][k], "label_share": clean["labelled"][k],
                      "over_predicted": k in over, "prior_offset": None if offsets is None else float(offsets[k])}
                     for k in range(num_classes)]
        suspects = targets or ranked[:1]
        warnings = [w for w in [near_chance_warning(clean["accuracy"], clean["labels"])] if w]
        warnings += [over_predicted_warning(k, clean["predicted"][k], clean["labelled"][k], norms[ranked[-1]] / norms[k])
                     for k in left_out]
        return ScanResult(backdoored=bool(targets), score=float(score), threshold=self.threshold,
                          target_classes=targets, per_class=per_class, seconds=time.perf_counter() - t0,
                          method=self.name, config={**self.config(), "arithmetic": _arithmetic(self.precision, device)},
                          triggers={k: tensors[k] for k in suspects}, clean_accuracy=clean["accuracy"],
                          warnings=warnings)

    def _search(self, net: nn.Module, x: Tensor, y: Tensor, num_classes: int, tqdm, raw: nn.Module):
        """The search on ``net``; the clean images' statistics (accuracy, predicted shares) on ``raw``,
        the model as given."""
        device = model_device(net)
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
        _, c, h, w = x.shape
        g = torch.Generator().manual_seed(self.seed)
        k_all = num_classes
        m_raw = (torch.rand((k_all, 1, h, w), generator=g) * 2 - 1).mul(0.5).to(device, dtype).requires_grad_(True)
        p_raw = (torch.rand((k_all, c, h, w), generator=g) * 2 - 1).mul(0.5).to(device, dtype).requires_grad_(True)
        opt = torch.optim.Adam([m_raw, p_raw], lr=self.lr, betas=(0.5, 0.9))
        cost = torch.full((k_all,), self.init_cost, dtype=torch.float64)
        best = [math.inf] * k_all
        best_state: list[tuple[Tensor, Tensor] | None] = [None] * k_all
        last = [math.inf] * k_all
        hits = torch.zeros(k_all, dtype=torch.float64)
        seen = torch.zeros(k_all, dtype=torch.float64)
        active = torch.arange(k_all)
        classes_t = torch.arange(k_all, device=device)
        bar = tqdm(range(self.steps), desc="scan: reversing triggers", disable=not self.progress, leave=False,
                   unit="step")
        for step in bar:
            if step == self.explore_steps:
                explored = [best[k] if best[k] < math.inf else last[k] for k in range(k_all)]
                if len(active) > self.keep:
                    order = sorted(active.tolist(), key=lambda k: (best[k], last[k]))
                    active = torch.tensor(sorted(order[: self.keep]))
            per_class = self.batch_size if step >= self.explore_steps else \
                min(self.batch_size, max(2, self.explore_images // k_all))
            idx = torch.randint(0, len(x), (min(per_class, len(x)),), generator=g)
            xb, yb = x[idx].to(device, dtype), y[idx].to(device)
            a = active.to(device)
            mask = _unit(m_raw[a])  # (A, 1, H, W)
            pattern = _unit(p_raw[a])  # (A, C, H, W)
            stamped = (1 - mask[:, None]) * xb[None] + (mask * pattern)[:, None]  # (A, B, C, H, W)
            logits = net(stamped.reshape(-1, c, h, w)).reshape(len(a), len(xb), -1)
            target = classes_t[a][:, None].expand(-1, len(xb))
            other = (yb[None, :] != target).to(dtype)  # images of the class itself do not count
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            ce = (ce.reshape(len(a), -1) * other).sum(1) / other.sum(1).clamp(min=1)
            l1 = mask.flatten(1).sum(1)
            size = l1 if self.mask_tv == 0 else l1 + self.mask_tv * _total_variation(mask)
            loss = (ce + cost[active].to(device, dtype) * size).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                hit = ((logits.argmax(-1) == target).to(dtype) * other).sum(1).double().cpu()
                hits[active] += hit
                seen[active] += other.sum(1).double().cpu()
                for j, k in enumerate(active.tolist()):
                    last[k] = float(l1[j])
            if (step + 1) % self.patience == 0:
                rate = hits / seen.clamp(min=1)
                for k in active.tolist():
                    ok = rate[k] >= self.success
                    if ok and last[k] < best[k]:
                        best[k] = last[k]
                        best_state[k] = (m_raw[k].detach().clone(), p_raw[k].detach().clone())
                    cost[k] = cost[k] * self.cost_multiplier if ok else cost[k] / self.cost_multiplier ** 1.5
                hits.zero_()
                seen.zero_()
        reached = [b < math.inf for b in best]
        norms = [best[k] if reached[k] else last[k] for k in range(k_all)]
        tensors, rates = {}, []
        perm = torch.randperm(len(x), generator=g)
        # the clean images' statistics always on the same images, whatever success_images is
        xc, yc = x[perm[:CLEAN_IMAGES]].to(device, dtype), y[perm[:CLEAN_IMAGES]].to(device)
        with torch.no_grad():
            pred = raw(xc).argmax(1)
        share = lambda v: (torch.bincount(v.cpu(), minlength=k_all).double() / len(v)).tolist()  # noqa: E731
        clean = {"accuracy": float((pred == yc).float().mean()), "labels": yc.cpu(), "predicted": share(pred),
                 "labelled": share(yc)}
        pick = perm[:self.success_images]
        xs, ys = x[pick].to(device, dtype), y[pick].to(device)
        for k in range(k_all):
            mr, pr = best_state[k] if best_state[k] is not None else (m_raw[k].detach(), p_raw[k].detach())
            stamp = MaskTrigger(_unit(mr), _unit(pr))
            tensors[k] = {"mask": stamp.mask.cpu(), "pattern": stamp.pattern.cpu()}
            if not self.success_images:
                rates.append(None)
                continue
            keep = ys != k
            with torch.no_grad():
                out = net(stamp(xs[keep])).argmax(1) if bool(keep.any()) else None
            rates.append(float((out == k).float().mean()) if out is not None else 0.0)
        return norms, reached, rates, tensors, explored, active.tolist(), clean


#: name -> scanner class (``scan(method=...)``)
SCANNERS: dict[str, type] = {"mask": MaskScan}


def scan(model: nn.Module, x: Tensor, y: Tensor, *, method: str = "mask", **settings: Any) -> ScanResult:
    """Tell whether ``model`` is backdoored from clean images ``x`` and labels ``y`` alone.

    ``method`` picks the scanner of :data:`SCANNERS` (default :class:`MaskScan`);
    ``settings`` are its keyword arguments (e.g. ``seed``, ``steps``, ``normalize``,
    ``progress``). The model is not changed.

    Example::

        >>> result = ibau.scan(model, x_clean, y_clean, seed=0)
        >>> result.backdoored, result.target_classes, result.score
    """
    cls = SCANNERS[check_choice("method", method, tuple(SCANNERS))]
    return cls(**settings).run(model, x, y)
