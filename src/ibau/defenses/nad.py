"""Neural Attention Distillation (Li et al., ICLR 2021), as run in the I-BAU paper's Appendix A.4.2."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError, check_choice, check_int, check_number
from ..metrics import model_device
from ..optim import make_optimizer
from ._common import Point, batches_of, private_rng
from ._common import augment as random_crop_flip
from .base import Defense, Run
from .fine_pruning import conv_sites

__all__ = ["NAD", "attention_map", "attention_loss", "default_layers"]


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """NAD's attention map of features ``f`` (N, C, H, W): the mean over channels of
    ``|f|^p``, flattened to (N, H*W) and l2-normalised per image."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(fs: Tensor, ft: Tensor, p: float = 2.0, distance: str = "mse") -> Tensor:
    """Distance between the attention maps of student features ``fs`` and teacher
    features ``ft``: ``"mse"`` (the authors' code: mean squared difference over images and
    positions) or ``"l2"`` (the paper's equation: l2 norm of the difference, mean over images)."""
    d = attention_map(fs, p) - attention_map(ft, p)
    if distance == "mse":
        return d.pow(2).mean()
    if distance == "l2":
        return d.norm(dim=1).mean()
    raise InputError(f"unknown distance {distance!r}; choose 'mse' or 'l2'")


def default_layers(model: nn.Module, x: Tensor, num_layers: int) -> list[str]:
    """Modules whose outputs NAD distils by default: the activated output (see
    :func:`ibau.defenses.fine_pruning.conv_sites`) of the last convolution of each of the
    last ``num_layers`` resolution stages (runs of convolutions with the same output size)
    -- for SmallVGG the three block outputs, as NAD's three WRN groups; with fewer stages,
    the last ``num_layers`` convolutions."""
    sites = conv_sites(model, x[:2])
    stage_ends = [s for i, s in enumerate(sites) if i + 1 == len(sites) or sites[i + 1].size != s.size]
    chosen = stage_ends if len(stage_ends) >= num_layers else sites
    if len(chosen) < num_layers:
        raise InputError(f"the model has {len(sites)} convolutions; num_layers={num_layers} is too many")
    return [s.output for s in chosen[-num_layers:]]


class NAD(Defense):
    """Neural Attention Distillation (Li et al., "Neural Attention Distillation: Erasing
    Backdoor Triggers from Deep Neural Networks", ICLR 2021), in the I-BAU paper's setting
    (Appendix A.4.2: 20 teacher and 20 student epochs, the authors' preprocessing).

    1. Teacher: a copy of the backdoored model fine-tuned on the clean set with
       cross-entropy for ``teacher_epochs`` (the authors' README: "5~10 epochs"; their
       code obtains it with the student recipe and all betas 0, as here).
    2. Student: the backdoored model itself, trained for ``student_epochs`` on
       ``CE + sum_l beta_l * AT(a_l(student), a_l(teacher))`` with the teacher frozen in
       eval mode, where ``a(F)`` is :func:`attention_map` (p = 2) at each layer.

    Both phases use the authors' code recipe: SGD with Nesterov momentum 0.9, weight
    decay 1e-4, batch 64, lr 0.1 divided by 10 from epoch 3 on (``lr_milestones=(2,)``),
    random crop (pad 4) + horizontal flip. The AT distance is the authors' code's mean
    squared error between normalised maps, for which the betas (the paper's 500, 1000,
    1000 for WRN groups 1-3) were set; ``distance="l2"`` is the paper's equation.
    Layers default to :func:`default_layers` (post-activation block outputs).

    Args:
        teacher_epochs, student_epochs: epochs of the two phases.
        betas: weight of the attention loss at each layer (low to high).
        layers: module names whose outputs are distilled; ``None``: :func:`default_layers`.
        num_layers: layers chosen when ``layers`` is ``None``; must equal ``len(betas)``.
        p: power of the attention map.
        distance: ``"mse"`` (authors' code) or ``"l2"`` (paper).
        lr, lr_milestones, lr_gamma, momentum, weight_decay, nesterov, batch_size: SGD.
        augment: random crop + flip on every batch (teacher and student alike).
        crop_pad, flip: the augmentation's zero padding before the random crop and
            whether it flips (the authors' CIFAR pipeline: 4 and ``True``; on small or
            non-symmetric images such as 8x8 digits, use less padding and no flip).
        seed: seeds shuffling, augmentation and dropout.
        progress: show progress bars.
    """

    name = "nad"
    display_name = "NAD"
    short_name = "NAD"
    cost_order = 5

    def __init__(self, *, teacher_epochs: int = 20, student_epochs: int = 20,
                 betas: Sequence[float] = (500.0, 1000.0, 1000.0), layers: Sequence[str] | None = None,
                 num_layers: int = 3, p: float = 2.0, distance: str = "mse", lr: float = 0.1,
                 lr_milestones: Sequence[int] = (2,), lr_gamma: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 1e-4, nesterov: bool = True, batch_size: int = 64, augment: bool = True,
                 crop_pad: int = 4, flip: bool = True, seed: int = 0, progress: bool = True):
        self.teacher_epochs = check_int("teacher_epochs", teacher_epochs, low=0)
        self.student_epochs = check_int("student_epochs", student_epochs, low=0)
        self.betas = [float(check_number("betas", b, low=0)) for b in betas]
        self.layers = list(layers) if layers is not None else None
        self.num_layers = check_int("num_layers", num_layers, low=1)
        n_layers = len(self.layers) if self.layers is not None else self.num_layers
        if len(self.betas) != n_layers:
            raise InputError(f"betas: {len(self.betas)} betas for {n_layers} layers (one beta per distilled layer)")
        self.p = check_number("p", p, low=0, low_open=True)
        self.distance = check_choice("distance", distance, ("mse", "l2"))
        self.lr = check_number("lr", lr, low=0, low_open=True)
        self.lr_milestones = [check_int("lr_milestones", m, low=0) for m in lr_milestones]
        self.lr_gamma = check_number("lr_gamma", lr_gamma, low=0, low_open=True)
        self.momentum = check_number("momentum", momentum, low=0, high=1, high_open=True)
        self.weight_decay = check_number("weight_decay", weight_decay, low=0)
        self.nesterov = nesterov
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.augment = augment
        self.crop_pad = check_int("crop_pad", crop_pad, low=0)
        self.flip = flip
        self.seed, self.progress = check_int("seed", seed), progress

    def _train(self, model: nn.Module, x: Tensor, y: Tensor, epochs: int, g: torch.Generator, point: Point | None,
               teacher: nn.Module | None = None, layers: Sequence[str] = ()) -> list[dict[str, Any]]:
        """SGD epochs on CE (+ attention distillation from ``teacher``); one point per epoch."""
        from tqdm.auto import tqdm

        device = model_device(model)
        opt = make_optimizer("sgd", model.parameters(), lr=self.lr, momentum=self.momentum,
                             weight_decay=self.weight_decay, nesterov=self.nesterov)
        feats: dict[str, dict[str, Tensor]] = {"s": {}, "t": {}}
        handles = []
        if teacher is not None:
            for key, net in (("s", model), ("t", teacher)):
                mods = dict(net.named_modules())
                for name in layers:
                    handles.append(mods[name].register_forward_hook(
                        lambda m, i, o, key=key, name=name: feats[key].__setitem__(name, o)))
        role = "student" if teacher is not None else "teacher"
        records = []
        try:
            for epoch in tqdm(range(epochs), desc=f"NAD {role}", disable=not self.progress, leave=False):
                lr = self.lr * self.lr_gamma ** sum(epoch >= m for m in self.lr_milestones)
                for group in opt.param_groups:
                    group["lr"] = lr
                model.train()
                sums = torch.zeros(2 + len(layers), dtype=torch.float64)
                for idx in batches_of(len(x), self.batch_size, g):
                    xb, yb = x[idx].to(device), y[idx].to(device)
                    if self.augment:
                        xb = random_crop_flip(xb, g, pad=self.crop_pad, flip=self.flip)
                    ce = F.cross_entropy(model(xb), yb)
                    at = []
                    if teacher is not None:
                        with torch.no_grad():
                            teacher(xb)
                        at = [attention_loss(feats["s"][n], feats["t"][n], self.p, self.distance) for n in layers]
                    loss = ce + sum(b * a for b, a in zip(self.betas, at))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    vals = [float(loss.detach()), float(ce.detach())] + [float(a.detach()) for a in at]
                    sums += torch.tensor(vals, dtype=torch.float64) * len(idx)
                means = (sums / len(x)).tolist()
                rec = {"loss": means[0], "ce_loss": means[1], "at_losses": means[2:], "lr": lr}
                records.append(rec)
                model.eval()
                if point is not None:
                    point(f"student epoch {epoch + 1}", loss=rec["loss"], ce_loss=rec["ce_loss"],
                                at_loss=sum(b * a for b, a in zip(self.betas, rec["at_losses"])), lr=lr)
        finally:
            for h in handles:
                h.remove()
            feats.clear()
        model.eval()
        return records

    def _prepare(self, run: Run) -> list[str]:
        """The distilled layers (checked against the model's modules)."""
        layers = self.layers if self.layers is not None else default_layers(run.model, run.x, self.num_layers)
        names = dict(run.model.named_modules())
        missing = [n for n in layers if n not in names]
        if missing:
            raise InputError(f"layers {missing} are not modules of the model")
        return layers

    def _fit(self, run: Run, layers: list[str]) -> None:
        model, x, y, extras = run.model, run.x, run.y, run.extras
        g = torch.Generator().manual_seed(self.seed)
        extras.update(layers=list(layers), betas=list(self.betas))
        run.reason = f"completed {self.teacher_epochs} teacher and {self.student_epochs} student epochs"
        with private_rng(self.seed, model_device(model)):
            teacher = copy.deepcopy(model)
            t_rec = self._train(teacher, x, y, self.teacher_epochs, g, None)
            teacher.eval().requires_grad_(False)
            extras["teacher_losses"] = [r["loss"] for r in t_rec]
            extras["teacher_loss"] = t_rec[-1]["loss"] if t_rec else None
            run.point("teacher", teacher_loss=extras["teacher_loss"])
            s_rec = self._train(model, x, y, self.student_epochs, g, run.point, teacher, layers)
            extras["student_losses"] = [r["loss"] for r in s_rec]
            extras["at_losses"] = [r["at_losses"] for r in s_rec]
