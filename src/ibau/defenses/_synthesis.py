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

from ..metrics import model_device
from ..models.normalize import Normalized
from ._common import fine_tune, mad_anomaly_index, stamp_fraction
from .base import Defense, DefenseResult, Evaluate, StopWhen, Trace, check_images

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

    def __init__(self, *, threshold: float = 2.0, classes: list[int] | None = None, unlearn_fraction: float = 0.2,
                 unlearn_epochs: int = 1, unlearn_lr: float = 1e-3, unlearn_batch_size: int = 100,
                 normalize: tuple | None = None, seed: int = 0, progress: bool = True):
        if threshold <= 0:
            raise ValueError("threshold must be > 0")
        if not 0 < unlearn_fraction <= 1:
            raise ValueError("unlearn_fraction must be in (0, 1]")
        if unlearn_epochs < 0 or unlearn_batch_size < 1:
            raise ValueError("unlearn_epochs must be >= 0 and unlearn_batch_size >= 1")
        self.threshold = threshold
        self.classes = classes
        self.unlearn_fraction = unlearn_fraction
        self.unlearn_epochs = unlearn_epochs
        self.unlearn_lr = unlearn_lr
        self.unlearn_batch_size = unlearn_batch_size
        self.normalize = normalize
        self.seed = seed
        self.progress = progress

    def wrap(self, model: nn.Module) -> nn.Module:
        return Normalized(model, *self.normalize) if self.normalize is not None else model

    @abc.abstractmethod
    def reverse(self, net: nn.Module, target: int, x: Tensor, y: Tensor, generator: torch.Generator) -> ReversedTrigger:
        """Synthesise a trigger that sends the clean images ``x`` to ``target``."""

    def prepare(self, net: nn.Module, x: Tensor, y: Tensor, classes: list[int], generator: torch.Generator) -> None:
        """Hook before the per-class loop (DeepInspect trains its generator here)."""

    def scan(self, model: nn.Module, x: Tensor, y: Tensor) -> ScanResult:
        """Reverse-engineer a trigger per class and run the outlier test; ``model`` is not changed."""
        from tqdm.auto import tqdm

        x, y = check_images(x, y, min_size=2)
        net = self.wrap(model)
        was = net.training
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        try:
            with torch.no_grad():
                num_classes = int(net(x[:1].to(model_device(model))).shape[1])
            classes = list(range(num_classes)) if self.classes is None else [int(c) for c in self.classes]
            if len(classes) < 3:
                raise ValueError("the outlier test needs at least 3 classes to scan")
            if any(not 0 <= c < num_classes for c in classes):
                raise ValueError(f"classes must lie in [0, {num_classes - 1}]")
            g = torch.Generator().manual_seed(self.seed)
            self.prepare(net, x, y, classes, g)
            triggers = []
            for c in tqdm(classes, desc=f"{self.name}: scanning classes", disable=not self.progress, leave=False,
                          unit="class"):
                triggers.append(self.reverse(net, c, x, y, g))
        finally:
            for p in net.parameters():
                p.requires_grad_(True)
            net.train(was)
        scores = torch.tensor([t.score for t in triggers], dtype=torch.float64)
        index = mad_anomaly_index(scores)
        median = scores.quantile(0.5)
        flagged = [t.target for t, a in zip(triggers, index.tolist()) if a > self.threshold and t.score < median]
        return ScanResult(triggers=triggers, anomaly_index=index.tolist(), flagged=flagged)

    def fit(self, model: nn.Module, x: Tensor, y: Tensor, *, evaluate: Evaluate | None = None,
            stop_when: StopWhen | None = None) -> DefenseResult:
        """Scan, then fine-tune on the clean set with the flagged triggers stamped on
        ``unlearn_fraction`` of every batch (true labels kept). Without a flagged class the
        model is left unchanged (the defense found nothing to unlearn)."""
        x, y = check_images(x, y, min_size=2)
        trace = Trace(evaluate, stop_when)
        with trace.run(model):
            scan = self.scan(model, x, y)
            trace.point(model, "scan", flagged=list(scan.flagged))
            if scan.flagged and self.unlearn_epochs > 0:
                stamps = [t.stamp for t in scan.triggers if t.target in scan.flagged]
                g = torch.Generator().manual_seed(self.seed + 1)
                net = self.wrap(model)
                fine_tune(net, x, y, epochs=self.unlearn_epochs, lr=self.unlearn_lr,
                          batch_size=self.unlearn_batch_size, generator=g, trace=_Relay(trace, model),
                          label="unlearn epoch", transform=lambda xb: stamp_fraction(xb, stamps, self.unlearn_fraction, g),
                          progress=self.progress)
        # (the scan itself never stops the run: ``scan`` is always set here)
        reason = (f"unlearned the triggers of classes {scan.flagged}" if scan.flagged
                  else "no class flagged: nothing to unlearn")
        extras = {"scan": scan.as_dict(),
                  "triggers": {f"{k}_{t.target}": v.cpu() for t in scan.triggers for k, v in t.tensors.items()}}
        return trace.result(model, extras, default_reason=reason)


class _Relay:
    """Points recorded while fine-tuning the wrapped view are reported on the user's model."""

    def __init__(self, trace: Trace, model: nn.Module):
        self.trace, self.model = trace, model

    def point(self, _net: nn.Module, label: str, **numbers: Any):
        return self.trace.point(self.model, label, **numbers)
