"""Input-aware dynamic backdoor (IAB): a generator network makes one trigger per image."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.poison import TensorSet
from ._common import as_shape, constructor_config, model_device, shape_of
from ..errors import InputError, check_int, check_number
from .base import Attack, register_attack

__all__ = ["InputAware", "InputAwareSet", "TriggerGenerator"]

_EPS = 1e-7
_SHARPNESS = 20.0  # slope of the mask's soft threshold (near-binary masks)


class TriggerGenerator(nn.Module):
    """A small convolutional encoder-decoder, ``(N, C, H, W) -> (N, out, H, W)`` raw outputs.

    Every "conv" below is a 3x3 convolution, GroupNorm (``gcd(4, channels)`` groups)
    and ReLU. Encoder: conv(``width``), conv(``width``), 2x2 max-pool, conv(``2 width``),
    conv(``2 width``), 2x2 max-pool, conv(``2 width``); decoder: nearest upsampling,
    conv(``2 width``), nearest upsampling, conv(``width``), then a plain 3x3 output
    convolution. Any image size works: inputs are padded (replicate) to a multiple of 4
    and the output is cropped back. ~40k parameters at ``width=16`` (CPU-sized).

    The original IAB generators have the same encoder-decoder shape with more channels
    and BatchNorm. GroupNorm (our choice) keeps the normalisation that makes the
    generators train stably at the original learning rate (without it, they collapse
    to one constant output) while making each trigger depend on its own image only,
    not on the batch, and leaving no running statistics: the weights are the whole state.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 16):
        super().__init__()
        w = int(width)

        def conv(a: int, b: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(math.gcd(4, b), b), nn.ReLU()]

        self.net = nn.Sequential(
            *conv(in_channels, w), *conv(w, w), nn.MaxPool2d(2),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv(2 * w, 2 * w),
            nn.Upsample(scale_factor=2, mode="nearest"), *conv(2 * w, 2 * w),
            nn.Upsample(scale_factor=2, mode="nearest"), *conv(2 * w, w),
            nn.Conv2d(w, out_channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.net(x)[..., :h, :w]


def _distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample root-mean-square distance."""
    return (a - b).pow(2).flatten(1).mean(1).add(_EPS).sqrt()


class InputAwareSet(TensorSet):
    """The training set of an IAB attack (from :meth:`InputAware.poisoned_set`).

    IAB poisons on the fly: in every training batch of
    :meth:`InputAware.train_poisoned`, a fresh ``poison_ratio`` share of the images get
    their own trigger and the target label and ``cross_ratio`` get another image's
    trigger and keep their label. ``mask`` marks ``round(poison_ratio * N)`` seeded
    samples, only so that the poisoned count reported is the expected number poisoned
    per epoch. ``batch(idx)`` (used by a plain :func:`ibau.train.train`) gives those
    marked samples the current generator's trigger and the target label: a static
    snapshot; ``train_poisoned`` reads the clean ``x``/``y`` instead.
    """

    def __init__(self, x: Tensor, y: Tensor, attack: "InputAware", poisoned: Tensor):
        super().__init__(x, y)
        self.attack = attack
        self.mask = torch.zeros(len(self.y), dtype=torch.bool)
        self.mask[poisoned] = True

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        xb, yb = self.x[idx].clone(), self.y[idx].clone()
        m = self.mask[idx]
        if m.any():
            xb[m] = self.attack.apply(xb[m])
            yb[m] = self.attack.target_of(yb[m])
        return xb, yb


@register_attack
class InputAware(Attack):
    """Input-aware dynamic backdoor (IAB; Nguyen & Tran, NeurIPS 2020, "Input-aware
    dynamic backdoor attack"), as in the I-BAU paper's case study (Appendix A.5.3:
    CIFAR-10, target 0, poisoned and cross ratios 0.1).

    Two generators map each image ``x`` to its own trigger: a pattern ``g(x)`` (C
    channels, ``(tanh + 1) / 2`` in [0, 1]) and a mask ``m(x)`` (one channel, a steep
    soft threshold of a sigmoid, so near-binary). The triggered image is
    ``(1 - m(x)) x + m(x) g(x)``, clamped to [0, 1]. Both generators are
    :class:`TriggerGenerator` networks initialised from ``seed``.

    The trigger is learnt together with the classifier, so this attack overrides
    :meth:`train_poisoned` (what :func:`ibau.poisoning.poison_and_train` calls):

    1. ``mask_epochs`` epochs train the mask generator alone on
       ``lambda_norm * mean(relu(density(m(x)) - mask_density)) + lambda_div * div``
       (``density`` = the mask's mean over pixels; ``div`` = the diversity loss
       ``||x1 - x2|| / ||m(x1) - m(x2)||`` over pairs of different images), as the
       original does before the main training; the mask generator is frozen after.
    2. ``config.epochs`` epochs train the classifier (Adam, ``config.lr``, like
       :func:`ibau.train.train`) and the pattern generator jointly. In each batch of
       ``b`` images, the first ``int(poison_ratio * b)`` get their own trigger and the
       label ``target``; the next ``int(cross_ratio * b)`` get the trigger generated
       from *other* images (cross-trigger mode) and keep their labels, which teaches the
       model that a trigger works only on the image it was made for; the rest stay
       clean. Loss: ``CE + lambda_div * ||x1 - x2|| / ||g(x1) - g(x2)||``.

    Both generators use Adam with ``generator_lr`` and betas (0.5, 0.9) (the original
    release's generator optimiser; it trains the classifier with SGD instead).
    Everything is seeded: generator initialisation from ``seed``, batch order from
    ``config.seed``.

    Args:
        target: class the triggered images are sent to (all-to-one; I-BAU paper: 0).
        poison_ratio: share of each batch with its own trigger (original and I-BAU: 0.1).
        cross_ratio: share of each batch in cross-trigger mode (original and I-BAU: 0.1).
        lambda_div: weight of the diversity loss (original: 1.0).
        lambda_norm: weight of the mask-density loss (original: 100).
        mask_density: target mean of the mask (original: 0.032).
        mask_epochs: epochs of mask-generator training before the joint training
            (original: 25).
        generator_lr: Adam learning rate of both generators (original: 1e-2).
        width: channels of the generators' first layer (our choice: 16, CPU-sized).
        seed: seed of the generators' initialisation (0).
        image_shape: (C, H, W) of the images (3, 32, 32); only C matters (any size
            works). ``prepare(x=...)`` rebuilds the (untrained) generators for images
            with another number of channels.

    ``poisoned_set`` returns the clean set with ``round(poison_ratio * N)`` samples
    marked (the ``ratio`` argument is ignored: the batch shares above decide); the
    triggers are applied on the fly during ``train_poisoned``. ``apply`` runs the
    generators in eval mode under ``torch.no_grad`` on the device of its input.
    ``state_dict`` holds the generators' weights (``pattern.*``, ``mask.*``), so a
    manifest reproduces the same triggers.

    Example:
        >>> atk = InputAware(image_shape=(3, 32, 32))
        >>> record = poison_and_train(model, x, y, atk, config=TrainConfig(epochs=50))
        >>> xt = atk(x_test)            # a different trigger for every image
    """

    name = "input_aware"
    needs_model = False

    def __init__(self, *, target: int = 0, poison_ratio: float = 0.1, cross_ratio: float = 0.1,
                 lambda_div: float = 1.0, lambda_norm: float = 100.0, mask_density: float = 0.032,
                 mask_epochs: int = 25, generator_lr: float = 1e-2, width: int = 16, seed: int = 0,
                 image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, seed=seed)
        self.poison_ratio = float(check_number("poison_ratio", poison_ratio, low=0, high=1))
        self.cross_ratio = float(check_number("cross_ratio", cross_ratio, low=0, high=1))
        if self.poison_ratio + self.cross_ratio > 1:
            raise InputError(f"poison_ratio and cross_ratio must have a sum <= 1, "
                             f"got {poison_ratio} and {cross_ratio}")
        check_number("mask_density", mask_density, low=0, low_open=True, high=1)
        check_int("mask_epochs", mask_epochs, low=0)
        check_int("width", width, low=1)
        check_number("generator_lr", generator_lr, low=0, low_open=True)
        check_number("lambda_div", lambda_div, low=0)
        check_number("lambda_norm", lambda_norm, low=0)
        self.lambda_div, self.lambda_norm = float(lambda_div), float(lambda_norm)
        self.mask_density, self.mask_epochs = float(mask_density), int(mask_epochs)
        self.generator_lr, self.width = float(generator_lr), int(width)
        self.image_shape = as_shape(image_shape)
        self._build(self.image_shape[0])

    # -- the generators -----------------------------------------------------------
    def _build(self, channels: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.pattern_net = TriggerGenerator(channels, channels, self.width)
            self.mask_net = TriggerGenerator(channels, 1, self.width)
        self.image_shape = (int(channels), *self.image_shape[1:])

    def _to(self, device: torch.device) -> None:
        self.pattern_net.to(device)
        self.mask_net.to(device)

    def pattern(self, x: Tensor) -> Tensor:
        """``g(x)``: the pattern for each image, (N, C, H, W) in [0, 1] (with grad)."""
        return (torch.tanh(self.pattern_net(x)) + 1) / 2

    def mask(self, x: Tensor) -> Tensor:
        """``m(x)``: the mask for each image, (N, 1, H, W) in [0, 1] (with grad)."""
        soft = torch.sigmoid(self.mask_net(x))
        return (torch.tanh(_SHARPNESS * (soft - 0.5)) + 1) / 2

    @staticmethod
    def _blend(x: Tensor, pattern: Tensor, mask: Tensor) -> Tensor:
        return ((1 - mask) * x + mask * pattern).clamp(0, 1)

    def _check(self, x: Tensor) -> Tensor:
        shape_of(x)
        if x.shape[-3] != self.image_shape[0]:
            raise ValueError(f"{self.name}: the generators take {self.image_shape[0]}-channel images, got "
                             f"{x.shape[-3]} channels; call prepare(x=...) or pass image_shape")
        return x.unsqueeze(0) if x.dim() == 3 else x

    def apply(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        """Triggered copies of ``x``: each image with the trigger generated from itself,
        or, given ``source`` (same shape), from the matching image of ``source``
        (cross-trigger mode). Eval mode, no grad, on ``x``'s device."""
        batch = self._check(x)
        src = batch if source is None else self._check(source)
        if src.shape != batch.shape:
            raise ValueError(f"source shape {tuple(source.shape)} does not match {tuple(x.shape)}")
        nets = (self.pattern_net, self.mask_net)
        modes = [n.training for n in nets]
        self._to(batch.device)
        try:
            for n in nets:
                n.eval()
            with torch.no_grad():
                xf, sf = batch.float(), src.float()
                out = self._blend(xf, self.pattern(sf), self.mask(sf)).to(x.dtype)
        finally:
            for n, mode in zip(nets, modes):
                n.train(mode)
        return out[0] if x.dim() == 3 else out

    def prepare(self, model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None) -> "InputAware":
        """Rebuilds the (untrained) generators if ``x`` has another number of channels;
        otherwise nothing to do (the trigger is trained in :meth:`train_poisoned`)."""
        if x is not None and shape_of(x)[0] != self.image_shape[0]:
            self._build(shape_of(x)[0])
        if x is not None:
            self.image_shape = shape_of(x)
        return self

    # -- poisoning and training ------------------------------------------------------
    def poisoned_set(self, x: Tensor, y: Tensor, ratio: float, *, seed: int = 0) -> InputAwareSet:
        """The clean set, with ``round(poison_ratio * N)`` seeded samples marked as the
        per-epoch poisoned count (``ratio`` is ignored; see :class:`InputAwareSet`)."""
        self._check(x)
        n = round(self.poison_ratio * len(x))
        chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))[:n]
        return InputAwareSet(x, y, self, chosen)

    def _split(self, b: int) -> tuple[int, int]:
        return int(self.poison_ratio * b), int(self.cross_ratio * b)

    def _diversity(self, x1: Tensor, x2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
        return (_distance(x1, x2) / (_distance(t1, t2) + _EPS)).mean()

    def _mask_step(self, x1: Tensor, x2: Tensor, opt: torch.optim.Optimizer) -> float:
        m1, m2 = self.mask(x1), self.mask(x2)
        norm = F.relu(m1.flatten(1).mean(1) - self.mask_density).mean()
        loss = self.lambda_norm * norm + self.lambda_div * self._diversity(x1, x2, m1, m2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    def training_batch(self, xb: Tensor, yb: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One joint-training batch (with grad through the pattern generator).

        ``xb, yb``: a batch of clean images and labels; ``x2``: as many other images
        (the trigger sources of the cross-trigger samples). Returns ``(inputs, labels,
        diversity)``: the first ``int(poison_ratio * b)`` inputs carry their own trigger
        and the label ``target``, the next ``int(cross_ratio * b)`` carry the trigger of
        the matching ``x2`` image and keep their labels, the rest are clean; ``diversity``
        is ``||x1 - x2|| / ||g(x1) - g(x2)||`` over the first group (0 if it is empty).
        """
        if len(x2) != len(xb):
            raise ValueError(f"x2 must hold as many images as xb ({len(xb)}), got {len(x2)}")
        nb, nc = self._split(len(xb))
        with torch.no_grad():
            masks = self.mask(torch.cat([xb[:nb], x2[nb:nb + nc]]))
        pats = self.pattern(torch.cat([xb[:nb], x2[:nb + nc]]))
        own, other = pats[:nb], pats[nb:]
        bd = self._blend(xb[:nb], own, masks[:nb])
        cross = self._blend(xb[nb:nb + nc], other[nb:], masks[nb:])
        inputs = torch.cat([bd, cross, xb[nb + nc:]])
        labels = torch.cat([torch.full_like(yb[:nb], self.target), yb[nb:]])
        div = self._diversity(xb[:nb], x2[:nb], own, other[:nb]) if nb > 0 else xb.new_zeros(())
        return inputs, labels, div

    def _joint_step(self, model: nn.Module, xb: Tensor, yb: Tensor, x2: Tensor,
                    opts: tuple[torch.optim.Optimizer, torch.optim.Optimizer]) -> float:
        inputs, labels, div = self.training_batch(xb, yb, x2)
        loss = F.cross_entropy(model(inputs), labels) + self.lambda_div * div
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
        return float(loss.detach())

    def train_poisoned(self, model: nn.Module, data, config, *, checkpoint: str | os.PathLike | None = None,
                       progress: bool = True) -> nn.Module:
        """Train the mask generator (``mask_epochs``), then the classifier and the pattern
        generator jointly (``config.epochs``), on the clean images of ``data`` (an
        :class:`InputAwareSet`, any set with ``x``/``y`` tensors, or an ``(x, y)`` pair).

        With ``checkpoint``, every state (model, generators, optimisers, shuffling, RNG)
        is saved after each epoch and a run started again resumes after the last
        finished epoch; the file is deleted at the end, as in :func:`ibau.train.train`.
        """
        from tqdm.auto import tqdm

        if isinstance(data, tuple):
            data = TensorSet(*data)
        x_all, y_all = data.x, torch.as_tensor(data.y).long()
        self._check(x_all)
        device = model_device(model)
        self._to(device)
        opt_model = torch.optim.Adam(model.parameters(), lr=config.lr)
        opt_pattern = torch.optim.Adam(self.pattern_net.parameters(), lr=self.generator_lr, betas=(0.5, 0.9))
        opt_mask = torch.optim.Adam(self.mask_net.parameters(), lr=self.generator_lr, betas=(0.5, 0.9))
        g = torch.Generator().manual_seed(config.seed)
        total, start = self.mask_epochs + config.epochs, 0
        ckpt = Path(checkpoint) if checkpoint is not None else None
        settings = {"train": config.as_dict(), "attack": self.config()}
        if ckpt is not None and ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            if state.get("settings") != settings:
                raise ValueError(f"checkpoint {ckpt} was written with other settings: {state.get('settings')}")
            model.load_state_dict(state["model"])
            self.load_state_dict(state["generators"])
            self._to(device)
            for opt, key in ((opt_model, "opt_model"), (opt_pattern, "opt_pattern"), (opt_mask, "opt_mask")):
                opt.load_state_dict(state[key])
            g.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            start = int(state["epoch"])
        else:
            torch.manual_seed(config.seed)  # dropout etc., as ibau.train.train does
        n, bs = len(y_all), config.batch_size
        bar = tqdm(range(start, total), desc=f"training ({self.name})", disable=not progress, unit="epoch",
                   leave=False, initial=start, total=total)
        for epoch in bar:
            perm, perm2 = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
            mask_phase = epoch < self.mask_epochs
            self.mask_net.train(mask_phase)
            self.mask_net.requires_grad_(mask_phase)
            self.pattern_net.train(not mask_phase)
            model.train(not mask_phase)
            running = 0.0
            for i in range(0, n, bs):
                idx, idx2 = perm[i:i + bs], perm2[i:i + bs]
                xb, x2 = x_all[idx].to(device).float(), x_all[idx2].to(device).float()
                if mask_phase:
                    loss = self._mask_step(xb, x2, opt_mask)
                else:
                    loss = self._joint_step(model, xb, y_all[idx].to(device), x2, (opt_model, opt_pattern))
                running += loss * len(idx)
            bar.set_postfix(phase="mask" if mask_phase else "joint", loss=f"{running / n:.3f}")
            if ckpt is not None:
                from ..io import atomic_write

                state = {"model": model.state_dict(), "generators": self.state_dict(),
                         "opt_model": opt_model.state_dict(), "opt_pattern": opt_pattern.state_dict(),
                         "opt_mask": opt_mask.state_dict(), "generator": g.get_state(),
                         "torch_rng": torch.get_rng_state(), "epoch": epoch + 1, "settings": settings}
                atomic_write(ckpt, lambda tmp: torch.save(state, tmp), force=True)
        self.mask_net.requires_grad_(True)
        for m in (model, self.pattern_net, self.mask_net):
            m.eval()
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()
        return model

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """The generators' weights, ``pattern.*`` and ``mask.*`` (CPU float32)."""
        state = {}
        for prefix, net in (("pattern.", self.pattern_net), ("mask.", self.mask_net)):
            for k, v in net.state_dict().items():
                state[prefix + k] = v.detach().cpu().float().clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> "InputAware":
        first = state.get("pattern.net.0.weight")
        if first is None:
            raise ValueError("not an input_aware state: 'pattern.net.0.weight' is missing")
        channels, width = int(first.shape[1]), int(first.shape[0])
        if width != self.width:
            raise ValueError(f"the state's generators have width {width}, this attack {self.width}")
        if channels != self.image_shape[0]:
            self._build(channels)
        device = next(self.pattern_net.parameters()).device
        for prefix, net in (("pattern.", self.pattern_net), ("mask.", self.mask_net)):
            sub = {k[len(prefix):]: torch.as_tensor(v) for k, v in state.items() if k.startswith(prefix)}
            net.load_state_dict(sub, strict=True)
            net.to(device)
        return self

    def config(self) -> dict[str, Any]:
        return constructor_config(self)
