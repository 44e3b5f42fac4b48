"""Blend: mix every image with one fixed picture, ``(1 - alpha) x + alpha t``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import TriggerAttack, as_shape, fit_channels, resize, seeded, shape_of
from ..errors import InputError, check_number
from .base import register_attack
from .trigger import Trigger

__all__ = ["Blend", "procedural_pattern"]


def procedural_pattern(image_shape: Sequence[int] = (3, 32, 32), seed: int = 0, *,
                       grid: int = 4, stripes: int = 3) -> Tensor:
    """A seeded colourful picture to blend in when no image is given.

    Half smooth colour noise (a ``grid x grid`` uniform-noise image per channel,
    upsampled bilinearly), half ``stripes`` sine gratings with random orientation,
    frequency (1.5-4 periods per image side) and phase, different per channel; the sum
    is min-max scaled to [0, 1] per channel. Returns a (C, H, W) float32 tensor.
    """
    c, h, w = as_shape(image_shape)
    gen = seeded(seed)
    noise = torch.rand(1, c, grid, grid, generator=gen)
    noise = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=True)[0]
    yy = torch.linspace(0, 1, h).view(h, 1)
    xx = torch.linspace(0, 1, w).view(1, w)
    waves = torch.zeros(c, h, w)
    for ch in range(c):
        for _ in range(stripes):
            angle, freq, phase = (torch.rand(3, generator=gen) * torch.tensor([math.pi, 2.5, 2 * math.pi])).tolist()
            freq += 1.5
            waves[ch] += torch.sin(2 * math.pi * freq * (math.cos(angle) * xx + math.sin(angle) * yy) + phase)
    waves = (waves / (2 * stripes) + 0.5)
    img = 0.5 * noise + 0.5 * waves
    lo = img.flatten(1).min(1).values.view(c, 1, 1)
    hi = img.flatten(1).max(1).values.view(c, 1, 1)
    return ((img - lo) / (hi - lo).clamp_min(1e-12)).float()


def _load_picture(path: str | Path, channels: int) -> Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # unreadable or hostile file
        raise InputError(f"image: cannot read the picture {path} ({type(exc).__name__}): give a PNG or JPEG "
                         "file") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _picture_source(image: Tensor | str | Path | None) -> Tensor | str | Path | None:
    """The checked ``image`` argument of the picture attacks (Blend, SemanticReplacement):
    a (C, H, W) tensor in [0, 1] comes back as a detached CPU float32 copy, the path of an
    existing file or ``None`` unchanged; anything else raises :class:`InputError`."""
    if isinstance(image, Tensor):
        image = image.detach().cpu().float()
        if image.dim() != 3 or image.numel() == 0 or not bool(torch.isfinite(image).all()) \
                or image.min() < 0 or image.max() > 1:
            raise InputError("image must be a (C, H, W) tensor with values in [0, 1]")
    elif isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise InputError(f"image: picture file not found: {image}")
    elif image is not None:
        raise InputError(f"image must be a file path, a (C, H, W) tensor or None, got {type(image).__name__}")
    return image


@register_attack
class Blend(TriggerAttack):
    """Blend (Chen et al., 2017, "Targeted backdoor attacks on deep learning systems
    using data poisoning"), with the I-BAU paper's setting ``0.8 x + 0.2 t`` (Appendix
    A.4.1; the paper blends a Hello Kitty picture).

    Args:
        target: class the triggered images are sent to (paper: 1).
        alpha: blend weight of the picture (0.2).
        image: the picture: a (C, H, W) float tensor in [0, 1] or an image file path
            (read with Pillow). It is resized bilinearly to the image size. ``None``
            (default): :func:`procedural_pattern` drawn with ``seed`` — the package ships
            no third-party pictures.
        seed: seed of the procedural pattern (0).
        image_shape: (C, H, W) of the images (3, 32, 32); ``prepare(x=...)`` re-fits
            the picture to other images.

    ``apply``: images (N, C, H, W) or (C, H, W) in [0, 1] -> ``(1 - alpha) x + alpha t``,
    same shape, in [0, 1].

    Example:
        >>> atk = Blend(image="kitty.png")            # or Blend(seed=3)
        >>> xt = atk(torch.rand(8, 3, 32, 32))
    """

    name = "blend"

    def __init__(self, *, target: int = 1, alpha: float = 0.2, image: Tensor | str | Path | None = None,
                 seed: int = 0, image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, seed=seed, image_shape=image_shape)
        self.alpha = float(check_number("alpha", alpha, low=0.0, high=1.0))
        self.image = str(image) if isinstance(image, (str, Path)) else None  # config: the file, if any
        self._source = _picture_source(image)
        self._build(self.image_shape)

    def _picture(self, shape: tuple[int, int, int]) -> Tensor:
        c, h, w = shape
        if self._source is None:
            return procedural_pattern(shape, self.seed)
        img = self._source if isinstance(self._source, Tensor) else _load_picture(self._source, c)
        return resize(fit_channels(img, c), (h, w)).clamp(0, 1)

    def _build(self, shape: tuple[int, int, int]) -> None:
        self.image_shape = as_shape(shape)
        self._trigger = Trigger.blend(self._picture(self.image_shape), self.alpha)

    @property
    def picture(self) -> Tensor:
        """The (C, H, W) picture being blended in."""
        trig = self.trigger
        return trig.pattern / self.alpha if self.alpha > 0 else torch.zeros_like(trig.pattern)

    def prepare(self, model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None) -> "Blend":
        """Re-fits the picture to the size of ``x`` if given; otherwise nothing to do."""
        if x is not None and shape_of(x) != self.image_shape:
            self._build(shape_of(x))
        return self
