"""Fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018), as run in the I-BAU paper's Appendix A.4.2.

Also holds two helpers NAD shares: :func:`conv_sites` (where each convolution's output
is normalised and activated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import InputError, check_choice, check_int, check_number
from ..metrics import clean_accuracy, model_device
from ..optim import OPTIMIZERS
from ._common import fine_tune
from .base import Defense, Run

__all__ = ["FinePruning", "ConvSite", "conv_sites"]

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Hardswish, nn.PReLU, nn.Softplus, nn.Tanh, nn.Sigmoid)


@dataclass
class ConvSite:
    """A convolution, the BatchNorm2d applied directly to its output and the activation
    module applied directly to that (``None`` where there is none), found by tensor identity
    during one forward pass; ``size`` is the output's spatial size."""

    conv: str
    bn: str | None
    act: str | None
    size: tuple[int, ...]

    @property
    def output(self) -> str:
        """The module whose output is the convolution's activated (or normalised) output."""
        return self.act or self.bn or self.conv


@torch.no_grad()
def conv_sites(model: nn.Module, x: Tensor) -> list[ConvSite]:
    """The Conv2d modules that run on ``x`` (a few images), in module order, with their sites."""
    calls: list[tuple[str, nn.Module, Any, Tensor]] = []
    count: dict[str, int] = {}

    def hook(name):
        def fn(mod, inp, out):
            count[name] = count.get(name, 0) + 1
            calls.append((name, mod, inp[0] if inp else None, out))
        return fn

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    was = model.training
    try:
        model.eval()
        model(x.to(model_device(model)))
    finally:
        model.train(was)
        for h in handles:
            h.remove()

    def consumer(t: Tensor, kind) -> tuple[str, Tensor] | None:
        for n, m, i, o in calls:
            if i is t and isinstance(m, kind) and count[n] == 1:
                return n, o
        return None

    sites = []
    for name, mod, _, out in calls:
        if not isinstance(mod, nn.Conv2d) or any(s.conv == name for s in sites):
            continue
        bn = consumer(out, nn.BatchNorm2d) if count[name] == 1 else None
        act = consumer(bn[1] if bn else out, ACTIVATIONS) if count[name] == 1 else None
        sites.append(ConvSite(name, bn and bn[0], act and act[0], tuple(out.shape[2:])))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(sites, key=lambda s: order[s.conv])


class FinePruning(Defense):
    """Fine-pruning (Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on
    Deep Neural Networks", RAID 2018), in the I-BAU paper's setting (Appendix A.4.2).

    1. The clean set is split (seeded) into ``prune_images`` for pruning and the rest
       for fine-tuning (the paper: 1,000 and 4,000 of 5,000).
    2. The mean activation of each output channel of the last convolution is measured on
       the pruning images, after the BatchNorm and activation modules that directly follow
       it (found by :func:`conv_sites`; the raw convolution output where there are none).
    3. Channels are pruned ``prune_step`` at a time in increasing order of mean activation
       until the accuracy on the pruning images falls below the bound: with
       ``drop_mode="relative"`` (default) ``(1 - acc_drop) * acc0``, with ``"absolute"``
       ``acc0 - acc_drop``, ``acc0`` the accuracy before pruning. The step that crosses
       the bound is undone: the kept model is the last one within the bound (the paper:
       "supervising the ACC to drop to a certain percentage, i.e., 20%"). At least one
       channel is always kept.
    4. The pruned model is fine-tuned on the other images (``_common.fine_tune``).

    A channel is pruned by zeroing its slice of the convolution's weight and bias and of
    the following BatchNorm's weight, bias and running mean, so its output after the
    BatchNorm is exactly 0 and the state dict still loads into the original architecture.
    Gradient hooks zero those slices' gradients while fine-tuning, so (with Adam or SGD,
    weight decay included) they stay exactly 0.

    Not specified by the I-BAU paper, chosen here: fine-tuning by SGD (lr 0.01, momentum
    0.9, weight decay 5e-4, batch 128) for 10 epochs without augmentation. Liu et al. prune
    to a fixed accuracy drop too, but on a separate validation set and with the original
    training recipe for fine-tuning.

    Args:
        prune_images: images used for pruning: a count (``int``) or a fraction in (0, 1).
        acc_drop: allowed drop of the pruning-image accuracy (0.2 = 20%).
        drop_mode: ``"relative"`` or ``"absolute"`` (see 3.).
        prune_step: channels pruned per step (``int``) or a fraction of the channels.
        layer: name of the Conv2d to prune; ``None``: the last Conv2d in module order.
        epochs, lr, batch_size, optimizer, momentum, weight_decay, augment: fine-tuning.
        seed: seeds the split, the shuffling, the augmentation and dropout.
        progress: show progress bars.
    """

    name = "fine_pruning"
    display_name = "Fine-pruning"
    short_name = "FP"
    cost_order = 3
    min_images = 2

    def __init__(self, *, prune_images: int | float = 1000, acc_drop: float = 0.2, drop_mode: str = "relative",
                 prune_step: int | float = 1, layer: str | None = None, epochs: int = 10, lr: float = 0.01,
                 batch_size: int = 128, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
                 augment: bool = False, seed: int = 0, progress: bool = True):
        self.prune_images = _count_or_fraction("prune_images", prune_images)
        self.acc_drop = check_number("acc_drop", acc_drop, low=0, high=1)
        self.drop_mode = check_choice("drop_mode", drop_mode, ("relative", "absolute"))
        self.prune_step = _count_or_fraction("prune_step", prune_step)
        self.layer = layer
        self.epochs = check_int("epochs", epochs, low=0)
        self.lr = check_number("lr", lr, low=0, low_open=True)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
        self.momentum = check_number("momentum", momentum, low=0, high=1, high_open=True)
        self.weight_decay = check_number("weight_decay", weight_decay, low=0)
        self.augment, self.seed, self.progress = augment, check_int("seed", seed), progress

    def _site(self, model: nn.Module, x: Tensor) -> ConvSite:
        sites = conv_sites(model, x[:2])
        if self.layer is None:
            if not sites:
                raise InputError("the model has no Conv2d layer to prune")
            return sites[-1]
        for s in sites:
            if s.conv == self.layer:
                return s
        raise InputError(f"layer {self.layer!r} is not a Conv2d that runs in the forward pass; "
                         f"convolutions: {[s.conv for s in sites]}")

    def _prepare(self, run: Run) -> _Plan:
        """The seeded split, the layer to prune and a backup of its channels."""
        n = len(run.x)
        k = round(self.prune_images * n) if isinstance(self.prune_images, float) else int(self.prune_images)
        if not 1 <= k < n:
            raise InputError(f"prune_images={self.prune_images} leaves no images for pruning or fine-tuning "
                             f"out of {n}")
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=g)
        site = self._site(run.model, run.x)
        mods = dict(run.model.named_modules())
        conv, bn = mods[site.conv], mods[site.bn] if site.bn else None
        slices = [t for t in (conv.weight, conv.bias) if t is not None]
        if bn is not None:
            slices += [t for t in (bn.weight, bn.bias, bn.running_mean) if t is not None]
        run.extras.update(layer=site.conv, activation_site=site.output, channels=conv.out_channels,
                          prune_indices=perm[:k].clone())
        return _Plan(perm[:k], perm[k:], site, conv.out_channels, slices, g)

    def _fit(self, run: Run, plan: _Plan) -> None:
        model, extras = run.model, run.extras
        xp, yp, xt, yt = run.x[plan.prune], run.y[plan.prune], run.x[plan.tune], run.y[plan.tune]
        channels, slices = plan.channels, plan.slices
        backup = [t.detach().clone() for t in slices]
        step = max(1, round(self.prune_step * channels)) if isinstance(self.prune_step, float) else self.prune_step
        model.eval()
        total = torch.zeros(channels, dtype=torch.float64)

        def record(mod, inp, out):
            total.add_(out.detach().double().sum((0, 2, 3)).cpu())

        h = dict(model.named_modules())[plan.site.output].register_forward_hook(record)
        try:
            acc0 = clean_accuracy(model, xp, yp)
        finally:
            h.remove()
        means = (total / (len(xp) * math.prod(plan.site.size))).float()
        order = torch.argsort(means, stable=True)
        bound = acc0 * (1 - self.acc_drop) if self.drop_mode == "relative" else acc0 - self.acc_drop
        pruned, acc, path = self._prune(model, xp, yp, slices, backup, order, step, bound, acc0)
        keep = torch.ones(channels)
        keep[order[:pruned]] = 0
        extras.update(pruned_channels=sorted(order[:pruned].tolist()), order=order.tolist(),
                      mean_activation=means, prune_path=path, prune_acc_before=acc0, prune_bound=bound,
                      prune_acc=acc)
        run.reason = f"pruned {pruned} of {channels} channels of {plan.site.conv}, fine-tuned {self.epochs} epochs"
        run.point("pruned", pruned=pruned, prune_acc=acc)

        handles = []
        for t in (t for t in slices if t.requires_grad):  # not running_mean
            shape = (-1,) + (1,) * (t.dim() - 1)
            m = keep.to(t.device, t.dtype).view(shape)
            handles.append(t.register_hook(lambda grad, m=m: grad * m))
        try:
            # dropout draws from a seeded private copy of the global RNG (inside fine_tune)
            extras["losses"] = fine_tune(
                model, xt, yt, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, generator=plan.generator,
                point=run.point, optimizer=self.optimizer, momentum=self.momentum,
                weight_decay=self.weight_decay, use_augment=self.augment, progress=self.progress)
        finally:
            for hd in handles:
                hd.remove()

    @torch.no_grad()
    def _prune(self, model: nn.Module, xp: Tensor, yp: Tensor, slices: list[Tensor], backup: list[Tensor],
               order: Tensor, step: int, bound: float, acc0: float) -> tuple[int, float, list[tuple[int, float]]]:
        """Zero channels ``step`` at a time in ``order`` while the accuracy stays within
        ``bound``; the step that crosses it is undone. Returns (pruned, accuracy, path)."""
        from tqdm.auto import tqdm

        channels = len(order)
        path, pruned, acc = [(0, acc0)], 0, acc0
        bar = tqdm(total=channels - 1, desc="fine-pruning", disable=not self.progress, leave=False, unit="ch")
        while pruned < channels - 1:
            nxt = min(pruned + step, channels - 1)
            for t in slices:
                t[order[pruned:nxt].to(t.device)] = 0
            a = clean_accuracy(model, xp, yp)
            path.append((nxt, a))
            if a < bound:  # undo the step that crossed the bound
                for t, b in zip(slices, backup):
                    idx = order[pruned:nxt].to(t.device)
                    t[idx] = b[idx]
                break
            pruned, acc = nxt, a
            bar.update(nxt - bar.n)
        bar.close()
        return pruned, acc, path


class _Plan(NamedTuple):
    """Fine-pruning's preparation: the split, the layer, its prunable tensors."""

    prune: Tensor  # indices of the pruning images
    tune: Tensor  # indices of the fine-tuning images
    site: ConvSite
    channels: int
    slices: list[Tensor]  # the conv's (and its BatchNorm's) per-channel tensors
    generator: torch.Generator  # seeded; continues into the fine-tuning


def _count_or_fraction(name: str, value: int | float) -> int | float:
    """A count >= 1 (``int``) or a fraction in (0, 1) (``float``)."""
    if isinstance(value, float):
        return check_number(name, value, low=0, low_open=True, high=1, high_open=True)
    return check_int(name, value, low=1)
