"""Trojan (TrojanNN) triggers: a masked additive pattern that excites chosen neurons."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._common import GENERATED_ARGS_DOC, FeatureProbe, GeneratedAttack, as_shape, batches, frozen_eval, model_device
from ..errors import InputError, check_int, check_number
from .base import register_attack
from .trigger import Trigger

__all__ = ["TrojanSquare", "TrojanWatermark", "square_mask", "watermark_mask"]

_REF = 32  # the paper's geometry is given for 32x32 images


def _scaled(v: float, size: int) -> int:
    return int(v * size / _REF + 0.5)


def square_mask(image_shape: Sequence[int] = (3, 32, 32), size: int = 9, corner: Sequence[int] = (21, 21)) -> Tensor:
    """(1, H, W) 0/1 mask of a ``size x size`` square with top-left ``corner`` (row, col),
    both given for 32x32 images and scaled proportionally (rounded) to H and W, then
    shifted inside the image if needed."""
    _, h, w = as_shape(image_shape)
    sh, sw = max(1, min(h, _scaled(size, h))), max(1, min(w, _scaled(size, w)))
    r0, c0 = min(_scaled(corner[0], h), h - sh), min(_scaled(corner[1], w), w - sw)
    mask = torch.zeros(1, h, w)
    mask[:, r0:r0 + sh, c0:c0 + sw] = 1
    return mask


def watermark_mask(image_shape: Sequence[int] = (3, 32, 32)) -> Tensor:
    """(1, H, W) 0/1 mask of the package's own watermark: a centred ring (radii 0.72-0.90
    of the half image size) with a cross (bars 1/8 of the half size wide) inside it —
    316 of the 1,024 pixel positions at 32x32, drawn at the same relative geometry for
    other sizes (pixel centres are tested against the shape)."""
    _, h, w = as_shape(image_shape)
    yy = ((torch.arange(h) + 0.5) / h * 2 - 1).view(h, 1)
    xx = ((torch.arange(w) + 0.5) / w * 2 - 1).view(1, w)
    r = (xx ** 2 + yy ** 2).sqrt()
    ring = (r >= 0.72) & (r <= 0.90)
    cross = ((xx.abs() <= 0.0625) | (yy.abs() <= 0.0625)) & (r < 0.72)
    return (ring | cross).float().unsqueeze(0)


class _Trojan(GeneratedAttack):
    """Shared TrojanNN generation; subclasses define the mask (``_region``)."""

    def __init__(self, *, target: int, norm: float, layer: str | None, neurons: int, steps: int, lr: float,
                 seed: int, batch_size: int, image_shape: Sequence[int]):
        super().__init__(target=target, steps=steps, lr=lr, seed=seed, batch_size=batch_size,
                         image_shape=image_shape)
        self.norm = float(check_number("norm", norm, low=0, low_open=True))
        self.neurons = int(check_int("neurons", neurons, low=1))
        if layer is not None and not isinstance(layer, str):
            raise InputError(f"layer must be a submodule name or None, got {layer!r}")
        self.layer = layer
        self.selected: list[int] | None = None  # chosen unit indices, set by prepare

    def _region(self, shape: tuple[int, int, int]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def region(self) -> Tensor:
        """(1, H, W) 0/1 mask where the trigger may be non-zero (current image size)."""
        return self._region(self.image_shape)

    def select_neurons(self, model: nn.Module, x: Tensor) -> tuple[FeatureProbe, Tensor]:
        """TrojanNN's rule: the ``neurons`` units of the probed layer with the largest
        total absolute weight into the next layer. Returns the probe and the indices."""
        probe = FeatureProbe(model, self.layer)
        with torch.no_grad():
            n_units = probe.units(probe(x[:1])).shape[1]
        weight = probe.outgoing_weight(n_units)
        if weight.numel() != n_units:
            raise ValueError(f"layer {probe.name!r}: {n_units} units but {weight.numel()} outgoing weight sums")
        k = min(self.neurons, n_units)
        return probe, torch.topk(weight, k).indices.sort().values

    def activation(self, model: nn.Module, x: Tensor) -> Tensor:
        """Mean activation of the selected units on each image of ``x`` (N,), model in eval mode."""
        x = x if x.dim() == 4 else x.unsqueeze(0)
        x = x.to(model_device(model))
        with frozen_eval(model), torch.no_grad():
            probe, idx = self.select_neurons(model, x)
            return probe.units(probe(x))[:, idx.to(x.device)].mean(1)

    def _generate(self, model: nn.Module, x: Tensor, gen: torch.Generator) -> Trigger:
        n, c, h, w = x.shape
        dev = x.device
        probe, idx = self.select_neurons(model, x)
        self.selected = idx.tolist()
        idx = idx.to(dev)
        region = self._region((c, h, w)).to(dev)
        init = torch.rand(c, h, w, generator=gen).to(dev)
        v = init.clone().requires_grad_()
        opt = torch.optim.Adam([v], lr=self.lr)

        def scaled(v: Tensor) -> Tensor:  # the trigger is optimised at its final l2 norm
            t = v * region
            return t * (self.norm / t.norm().clamp_min(1e-12))

        for bidx in batches(n, self.batch_size, self.steps, gen):
            xb = x[bidx.to(dev)]
            act = probe.units(probe((xb + scaled(v)).clamp(0, 1)))[:, idx]
            self._step(opt, -act.mean(), [v])
            with torch.no_grad():
                v.clamp_(-1, 1)
        t = v.detach() * region
        if t.norm() < 1e-8:
            t = init * region
        t = t.double()
        return Trigger((t * (self.norm / t.norm())).float())

    @property
    def pattern(self) -> Tensor:
        """The (C, H, W) additive pattern (zero outside the mask, l2 norm ``norm``)."""
        return self.trigger.pattern


_DOC_COMMON = """
    Generated against a model in ``prepare(model, x, y)`` (Liu et al. 2018, "Trojaning
    attack on neural networks"): the probed layer is ``layer`` (a submodule name; its
    output, channels averaged over space) or by default the input of the model's last
    ``nn.Linear`` (penultimate features, captured with a forward pre-hook). The
    ``neurons`` units with the largest total absolute weight into the next layer are
    selected (stored in ``selected``); then ``steps`` Adam steps (learning rate ``lr``)
    of gradient ascent on their mean activation over clean minibatches change the
    pattern values inside the fixed mask only (values kept in [-1, 1], the triggered
    input clipped to [0, 1], the pattern held at l2 norm ``norm`` throughout). The
    final additive pattern is zero outside the mask and has l2 norm exactly ``norm``
    (8.7 matches the released triggers on 32x32 images). Applied as
    ``clip(x + t, 0, 1)`` to float images (N, C, H, W) or (C, H, W) in [0, 1].
"""

# The Args lines both Trojan variants share (the constructor keywords of ``_Trojan``).
_DOC_ARGS = """        norm: l2 norm of the pattern (8.7).
        layer: submodule to probe (None: the input of the last nn.Linear).
        neurons: number of units to excite (1).
        steps: Adam steps (200).
        lr: Adam learning rate (0.1).
""" + GENERATED_ARGS_DOC


@register_attack
class TrojanSquare(_Trojan):
    __doc__ = """Trojan SQ: an additive coloured square (I-BAU paper: target 2, 9x9 square at
    rows/cols 21-29 of a 32x32 image, l2 norm about 8.7).
    """ + _DOC_COMMON + """
    Args:
        target: class the triggered images are sent to (paper: 2).
        size: side of the square at 32x32 (9); scaled for other image sizes.
        corner: (row, col) of its top-left pixel at 32x32 ((21, 21)); scaled likewise.
""" + _DOC_ARGS + """
    Example:
        >>> atk = TrojanSquare().prepare(model, x_clean, y_clean)
        >>> (atk.pattern * (1 - atk.region)).abs().max()   # 0
    """

    name = "trojan_sq"

    def __init__(self, *, target: int = 2, size: int = 9, corner: Sequence[int] = (21, 21), norm: float = 8.7,
                 layer: str | None = None, neurons: int = 1, steps: int = 200, lr: float = 0.1, seed: int = 0,
                 batch_size: int = 128, image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, norm=norm, layer=layer, neurons=neurons, steps=steps, lr=lr, seed=seed,
                         batch_size=batch_size, image_shape=image_shape)
        self.size = int(check_int("size", size, low=1))
        if isinstance(corner, (str, bytes)) or not hasattr(corner, "__len__") or len(corner) != 2:
            raise InputError(f"corner must be a (row, column) pair, got {corner!r}")
        self.corner = (int(check_int("corner[0]", corner[0], low=0)), int(check_int("corner[1]", corner[1], low=0)))
        if max(self.corner) + self.size > 32:  # given for 32x32 images (scaled to others)
            raise InputError(f"size: a {self.size}px square at corner {self.corner} does not fit 32x32 images "
                             "(the geometry is given for 32x32 and scaled to other sizes)")

    def _region(self, shape: tuple[int, int, int]) -> Tensor:
        return square_mask(shape, self.size, self.corner)


@register_attack
class TrojanWatermark(_Trojan):
    __doc__ = """Trojan WM: an additive watermark-shaped pattern (I-BAU paper: target 2, l2 norm
    about 8.7). The mask is :func:`watermark_mask` — a ring with a cross inside, 316 of
    1,024 pixel positions at 32x32 — drawn by the package (not the authors' shape).
    """ + _DOC_COMMON + """
    Args:
        target: class the triggered images are sent to (paper: 2).
""" + _DOC_ARGS + """
    Example:
        >>> atk = TrojanWatermark().prepare(model, x_clean, y_clean)
        >>> x_poison = atk(x)
    """

    name = "trojan_wm"

    def __init__(self, *, target: int = 2, norm: float = 8.7, layer: str | None = None, neurons: int = 1,
                 steps: int = 200, lr: float = 0.1, seed: int = 0, batch_size: int = 128,
                 image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, norm=norm, layer=layer, neurons=neurons, steps=steps, lr=lr, seed=seed,
                         batch_size=batch_size, image_shape=image_shape)

    def _region(self, shape: tuple[int, int, int]) -> Tensor:
        return watermark_mask(shape)
