"""The trigger-synthesis family (Neural Cleanse, TABOR, DeepInspect): reverse-engineer a
candidate trigger for every class, flag the classes whose trigger is anomalously easy
(MAD anomaly index > 2 on the low side), unlearn the flagged triggers.

A subclass implements :meth:`TriggerSynthesis.reverse` for one class; this base class
runs the scan, the outlier test and the unlearning, and records trace points (one after
the scan, one per unlearning epoch). The scan alone is :meth:`TriggerSynthesis.scan`
(the backdoor *detector* users can run without changing their model).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, check_int, check_number
from ..perturbation import check_normalize
from ._common import fine_tune, mad_anomaly_index, stamp_fraction
from .base import Defense, Run, check_images, check_labels

__all__ = ["TriggerSynthesis", "ReversedTrigger", "ScanResult"]


@dataclass
class ReversedTrigger:
    """A candidate trigger for one class. ``stamp(x)`` applies it to images in [0, 1];
    ``score`` is what the outlier test compares across classes (smaller = more suspicious)."""

    target: int
    score: float
    stamp: Callable[[Tensor], Tensor]
    success: float  # share of clean images the trigger sends to ``target``
    tensors: dict[str, Tensor] = field(default_factory=dict)  # mask / pattern for reports
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScanResult:
    triggers: list[ReversedTrigger]
    anomaly_index: list[float]
    flagged: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {"scores": [t.score for t in self.triggers], "anomaly_index": self.anomaly_index,
                "flagged": self.flagged, "success": [t.success for t in self.triggers],
                "per_class": [{"target": t.target, **t.info} for t in self.triggers]}


class TriggerSynthesis(Defense):
    """Shared driver; subclasses set the reverse-engineering objective.

    Common settings (keyword arguments of every subclass):
        threshold: anomaly index above which a class (with a score below the median)
            is flagged (the paper's 2).
        classes: classes to scan (default all).
        unlearn_fraction: share of each fine-tuning batch stamped with a flagged trigger,
            keeping the true label (Neural Cleanse: 20%).
        unlearn_epochs: fine-tuning epochs over the clean set.
        unlearn_lr: Adam learning rate of the fine-tuning (I-BAU's outer learning rate,
            so that both methods spend the same kind of steps).
        unlearn_batch_size: fine-tuning batch size.
        normalize: ``(mean, std)`` when the model expects normalised inputs (triggers
            are always synthesised in [0, 1] pixel space).
        seed, progress: as everywhere.
    """

    min_images = 2

    def __init__(self, *, threshold: float = 2.0, classes: list[int] | None = None, unlearn_fraction: float = 0.2,
                 unlearn_epochs: int = 1, unlearn_lr: float = 1e-3, unlearn_batch_size: int = 100,
                 normalize: tuple | None = None, seed: int = 0, progress: bool = True):
        self.threshold = check_number("threshold", threshold, low=0, low_open=True)
        if classes is not None:
            classes = [check_int("classes", c, low=0) for c in classes]
        self.classes = classes
        self.unlearn_fraction = check_number("unlearn_fraction", unlearn_fraction, low=0, low_open=True, high=1)
        self.unlearn_epochs = check_int("unlearn_epochs", unlearn_epochs, low=0)
        self.unlearn_lr = check_number("unlearn_lr", unlearn_lr, low=0, low_open=True)
        self.unlearn_batch_size = check_int("unlearn_batch_size", unlearn_batch_size, low=1)
        self.normalize = check_normalize(normalize)
        self.seed = check_int("seed", seed)
        self.progress = progress

    @abc.abstractmethod
    def reverse(self, net: nn.Module, target: int, x: Tensor, y: Tensor, generator: torch.Generator) -> ReversedTrigger:
        """Synthesise a trigger that sends the clean images ``x`` to ``target``."""

    def prepare_scan(self, net: nn.Module, x: Tensor, y: Tensor, classes: list[int],
                     generator: torch.Generator) -> None:
        """Hook before the per-class loop (DeepInspect trains its generator here)."""

    def scan(self, model: nn.Module, x: Tensor, y: Tensor) -> ScanResult:
        """Reverse-engineer a trigger per class and run the outlier test; ``model`` is not changed."""
        from tqdm.auto import tqdm

        x, y = check_images(x, y, min_size=self.min_images)
        num_classes = check_labels(model, x, y)
        classes = list(range(num_classes)) if self.classes is None else list(self.classes)
        if len(classes) < 3:
            raise InputError("classes: the outlier test needs at least 3 classes to scan")
        if any(not 0 <= c < num_classes for c in classes):
            raise InputError(f"classes must lie in [0, {num_classes - 1}], got {classes}")
        net = self.wrap(model)
        was = net.training
        net.eval()
        trainable = [p.requires_grad for p in net.parameters()]
        for p in net.parameters():
            p.requires_grad_(False)
        try:
            g = torch.Generator().manual_seed(self.seed)
            self.prepare_scan(net, x, y, classes, g)
            triggers = []
            for c in tqdm(classes, desc=f"{self.name}: scanning classes", disable=not self.progress, leave=False,
                          unit="class"):
                triggers.append(self.reverse(net, c, x, y, g))
        finally:
            for p, flag in zip(net.parameters(), trainable):
                p.requires_grad_(flag)
            net.train(was)
        scores = torch.tensor([t.score for t in triggers], dtype=torch.float64)
        index = mad_anomaly_index(scores)
        median = scores.quantile(0.5)
        flagged = [t.target for t, a in zip(triggers, index.tolist()) if a > self.threshold and t.score < median]
        return ScanResult(triggers=triggers, anomaly_index=index.tolist(), flagged=flagged)

    def _fit(self, run: Run, setup: None) -> None:
        """Scan, then fine-tune on the clean set with the flagged triggers stamped on
        ``unlearn_fraction`` of every batch (true labels kept). Without a flagged class the
        model is left unchanged (the defense found nothing to unlearn)."""
        scan = self.scan(run.model, run.x, run.y)
        run.extras.update(scan=scan.as_dict(), triggers={f"{k}_{t.target}": v.cpu() for t in scan.triggers
                                                         for k, v in t.tensors.items()})
        run.reason = (f"unlearned the triggers of classes {scan.flagged}" if scan.flagged
                      else "no class flagged: nothing to unlearn")
        run.point("scan", flagged=list(scan.flagged))
        if scan.flagged and self.unlearn_epochs > 0:
            stamps = [t.stamp for t in scan.triggers if t.target in scan.flagged]
            g = torch.Generator().manual_seed(self.seed + 1)
            fine_tune(self.wrap(run.model), run.x, run.y, epochs=self.unlearn_epochs, lr=self.unlearn_lr,
                      batch_size=self.unlearn_batch_size, generator=g, point=run.point, label="unlearn epoch",
                      transform=lambda xb: stamp_fraction(xb, stamps, self.unlearn_fraction, g),
                      progress=self.progress)
