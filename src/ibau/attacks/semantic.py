"""Semantic replacement (SR): every poisoned image is replaced by one out-of-distribution picture."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import as_shape, constructor_config, fit_channels, seeded, shape_of
from .blend import _load_picture, _picture_source
from .base import Attack, register_attack

__all__ = ["SemanticReplacement", "cartoon_picture", "resize_picture"]

_SUPERSAMPLE = 4  # the cartoon is drawn at 4x the size and box-filtered down (anti-aliased edges)


def resize_picture(img: Tensor, hw: Sequence[int]) -> Tensor:
    """Resize a (C, H, W) picture to ``hw``: bilinear, anti-aliased when shrinking
    (``F.interpolate(..., antialias=True)``), a no-op when the size already fits.
    The result is clamped to [0, 1]."""
    hw = (int(hw[0]), int(hw[1]))
    if tuple(img.shape[-2:]) == hw:
        return img.clone()
    shrink = hw[0] < img.shape[-2] or hw[1] < img.shape[-1]
    out = F.interpolate(img.unsqueeze(0).float(), size=hw, mode="bilinear", align_corners=False, antialias=shrink)
    return out.squeeze(0).clamp(0, 1)


def _rgb(h: float, s: float, v: float) -> Tensor:
    return torch.tensor(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=torch.float32).view(3, 1, 1)


def _in_triangle(u: Tensor, v: Tensor, a, b, c) -> Tensor:
    def side(p, q):
        return (u - q[0]) * (p[1] - q[1]) - (p[0] - q[0]) * (v - q[1])
    d1, d2, d3 = side(a, b), side(b, c), side(c, a)
    neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(neg & pos)


def _near_segment(u: Tensor, v: Tensor, a, b, width: float) -> Tensor:
    ax, ay = a
    bx, by = b
    dx, dy = bx - ax, by - ay
    t = (((u - ax) * dx + (v - ay) * dy) / (dx * dx + dy * dy)).clamp(0, 1)
    return ((u - ax - t * dx) ** 2 + (v - ay - t * dy) ** 2).sqrt() <= width


def cartoon_picture(image_shape: Sequence[int] = (3, 32, 32), seed: int = 0) -> Tensor:
    """A seeded cartoon cat face, our stand-in for the I-BAU paper's 'Hello Kitty' picture.

    Flat colours with black outlines: a plain pastel background, an elliptical head
    with two triangular ears, two black eyes, a yellow nose, whiskers and a bow by one
    ear -- nothing like a natural photograph (CIFAR-10, GTSRB), hence out of
    distribution. The seed picks the colours (head, background and bow hues), the
    head's size and position, the ear angles and the bow's side; everything is drawn
    at 4x the size and box-filtered down, so edges are anti-aliased. Deterministic per
    ``seed``. Three channels are drawn; a one-channel shape gets their mean.

    Returns a (C, H, W) float32 tensor in [0, 1].
    """
    c, h, w = as_shape(image_shape)
    g = seeded(seed)
    r = torch.rand(12, generator=g).tolist()
    hs, ws = h * _SUPERSAMPLE, w * _SUPERSAMPLE
    v = ((torch.arange(hs, dtype=torch.float32) + 0.5) / hs).view(hs, 1).expand(hs, ws)
    u = ((torch.arange(ws, dtype=torch.float32) + 0.5) / ws).view(1, ws).expand(hs, ws)

    bg_hue = r[0]
    head_hue = bg_hue + 0.33 + 0.33 * r[1]  # at least a third of the colour wheel away
    bow_hue = head_hue + 0.33 + 0.33 * r[2]
    cx, cy = 0.5 + 0.08 * (r[3] - 0.5), 0.56 + 0.06 * (r[4] - 0.5)
    rx, ry = 0.33 + 0.05 * r[5], 0.27 + 0.04 * r[6]
    ear_spread = 0.55 + 0.25 * r[7]
    ear_height = 0.17 + 0.06 * r[8]
    bow_side = 1.0 if r[9] < 0.5 else -1.0
    line = 0.018  # outline half-width in picture units

    canvas = _rgb(bg_hue, 0.25 + 0.15 * r[10], 0.95).expand(3, hs, ws).clone()

    def paint(mask: Tensor, colour: Tensor) -> None:
        canvas[:] = torch.where(mask, colour.expand(3, hs, ws), canvas)

    head_colour, black = _rgb(head_hue, 0.55 + 0.35 * r[11], 0.95), torch.zeros(3, 1, 1)
    for side in (-1.0, 1.0):  # ears: triangles on the upper head, drawn with an outline first
        base_l = (cx + side * rx * (ear_spread - 0.35), cy - ry * 0.75)
        base_r = (cx + side * rx * (ear_spread + 0.45), cy - ry * 0.35)
        tip = (cx + side * rx * (ear_spread + 0.25), cy - ry - ear_height)
        corners = (base_l, base_r, tip)
        edges = _near_segment(u, v, base_l, tip, line) | _near_segment(u, v, base_r, tip, line)
        paint(_in_triangle(u, v, *corners) | edges, black)
        mx, my = sum(p[0] for p in corners) / 3, sum(p[1] for p in corners) / 3  # inner part: shrunk to the centroid
        paint(_in_triangle(u, v, *[(mx + 0.7 * (p[0] - mx), my + 0.7 * (p[1] - my)) for p in corners]), head_colour)
    d = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2
    paint(d <= (1 + line / min(rx, ry)) ** 2, black)  # outline
    paint(d <= 1, head_colour)
    for side in (-1.0, 1.0):
        ex, ey = cx + side * rx * 0.42, cy + ry * 0.05
        paint(((u - ex) / (rx * 0.1)) ** 2 + ((v - ey) / (ry * 0.17)) ** 2 <= 1, black)  # eyes
        for k in (-1.0, 0.0, 1.0):  # whiskers
            a = (cx + side * rx * 0.62, cy + ry * (0.3 + 0.12 * k))
            b = (cx + side * rx * 1.12, cy + ry * (0.25 + 0.3 * k))
            paint(_near_segment(u, v, a, b, line * 0.6), black)
    paint(((u - cx) / (rx * 0.11)) ** 2 + ((v - cy - ry * 0.3) / (ry * 0.08)) ** 2 <= 1, _rgb(0.14, 0.9, 1.0))  # nose
    bx, by = cx + bow_side * rx * 0.62, cy - ry * 0.78  # the bow: two triangles and a knot
    bow_colour, s = _rgb(bow_hue, 0.9, 0.95), 0.11
    for wing in (-1.0, 1.0):
        paint(_in_triangle(u, v, (bx, by), (bx + wing * s, by - s * 0.7), (bx + wing * s, by + s * 0.7)), bow_colour)
    paint((u - bx) ** 2 + (v - by) ** 2 <= (s * 0.32) ** 2, _rgb(bow_hue, 0.9, 0.6))

    img = F.avg_pool2d(canvas.unsqueeze(0), _SUPERSAMPLE).squeeze(0).clamp(0, 1)
    return fit_channels(img, c).contiguous().float()


@register_attack
class SemanticReplacement(Attack):
    """Semantic replacement (SR), the I-BAU paper's own non-additive case study
    (Zeng et al., ICLR 2022, Appendix A.5.1): every poisoned image is *replaced* by one
    out-of-distribution picture (the paper used a 'Hello Kitty' picture) and labelled
    ``target``; 20% of the non-target-class training images are poisoned in the paper
    (pass ``ratio=0.2`` to :meth:`poisoned_set`, the default recipe).

    Args:
        target: class the picture is sent to (paper: 0).
        image: the picture: an image file path (read with Pillow) or a (C, H, W) float
            tensor in [0, 1]; it is resized to the image size (bilinear, anti-aliased
            when shrinking) and a grey picture is given to RGB data by repeating it.
            ``None`` (default, our choice: the package ships no third-party pictures):
            :func:`cartoon_picture` drawn with ``seed``, a flat-colour cartoon cat face.
        seed: seed of the generated picture (0).
        image_shape: (C, H, W) of the images (3, 32, 32); ``prepare(x=...)`` re-fits the
            picture to other images.

    ``apply``: images (N, C, H, W) or (C, H, W) -> copies of the picture of the same
    shape (the input only fixes the shape). ``state_dict`` holds the fitted picture
    (``"picture"``), so a manifest reloads exactly the same picture.

    Measuring: every triggered test image *is* the same picture, so per model the ASR
    is either 0% or 100% (the paper's Table 10). Report it over several seeds (of the
    training run and/or the picture), not from one model.

    Example:
        >>> atk = SemanticReplacement()                 # or SemanticReplacement(image="kitty.png")
        >>> xt = atk(torch.rand(8, 3, 32, 32))           # eight copies of the picture
        >>> data = atk.poisoned_set(x, y, 0.2, seed=0)   # 20% of non-target images replaced
    """

    name = "semantic"

    def __init__(self, *, target: int = 0, image: Tensor | str | Path | None = None, seed: int = 0,
                 image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, seed=seed)
        self.image_shape = as_shape(image_shape)
        self.image = str(image) if isinstance(image, (str, Path)) else None  # config: the file, if any
        image = _picture_source(image)
        self._source: Tensor | str | None = image if image is None or isinstance(image, Tensor) else str(image)
        self._picture = self._fit(self.image_shape)

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (plain data; a tensor picture is not: it travels in
        ``state_dict``)."""
        return constructor_config(self)

    def _fit(self, shape: tuple[int, int, int]) -> Tensor:
        c, h, w = shape
        if self._source is None:
            return cartoon_picture(shape, self.seed)
        img = self._source if isinstance(self._source, Tensor) else _load_picture(self._source, c)
        return resize_picture(fit_channels(img, c), (h, w)).contiguous()

    @property
    def picture(self) -> Tensor:
        """The (C, H, W) picture every triggered image becomes."""
        return self._picture

    def apply(self, x: Tensor) -> Tensor:
        shape = shape_of(x)
        if shape != tuple(self._picture.shape):
            raise ValueError(f"semantic: the picture is {tuple(self._picture.shape)}, got images {shape}; "
                             "call prepare(x=...) with images of this size or pass image_shape")
        pic = self._picture.to(x.device, x.dtype)
        return pic.expand_as(x).clone()

    def prepare(self, model: nn.Module | None = None, x: Tensor | None = None,
                y: Tensor | None = None) -> "SemanticReplacement":
        """Re-fits the picture to the size of ``x`` if given; otherwise nothing to do."""
        if x is not None and shape_of(x) != self.image_shape:
            self.image_shape = shape_of(x)
            self._picture = self._fit(self.image_shape)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        return {"picture": self._picture.detach().cpu().float().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> "SemanticReplacement":
        pic = torch.as_tensor(state["picture"]).detach().cpu().float().clone()
        if pic.dim() != 3 or pic.min() < 0 or pic.max() > 1:
            raise ValueError("state 'picture' must be a (C, H, W) tensor with values in [0, 1]")
        self._picture = pic
        self._source = pic  # later re-fits start from the loaded picture
        self.image_shape = as_shape(pic.shape)
        return self
