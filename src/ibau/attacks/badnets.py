"""BadNets: a small white square pasted into the bottom-right corner."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import InputError, check_int, check_number
from ._common import TriggerAttack, as_shape, shape_of
from .base import register_attack
from .trigger import badnets_square

__all__ = ["BadNets"]


@register_attack
class BadNets(TriggerAttack):
    """BadNets (Gu et al., 2017, "BadNets: identifying vulnerabilities in the machine
    learning model supply chain"), as the I-BAU paper (Appendix A.4.1) uses it.

    A ``patch x patch`` white square replaces the pixels ``margin`` pixels from the
    bottom and right borders: rows/cols 27-30 of a 32x32 image with the defaults.

    Args:
        target: class the triggered images are sent to (paper: 8).
        patch: side of the square in pixels (4).
        margin: gap to the bottom/right border in pixels (1).
        image_shape: (C, H, W) of the images (3, 32, 32); ``prepare(x=...)`` resizes
            the trigger to other images.

    ``apply`` takes float images in [0, 1], (N, C, H, W) or (C, H, W), and returns a
    triggered copy of the same shape in [0, 1].

    Example:
        >>> atk = BadNets()
        >>> x = torch.rand(8, 3, 32, 32)
        >>> xt, yt = atk(x), atk.target_of(torch.zeros(8))   # yt == 8
    """

    name = "badnets"

    def __init__(self, *, target: int = 8, patch: int = 4, margin: int = 1,
                 image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, seed=0, image_shape=image_shape)
        self.patch = int(check_int("patch", patch, low=1))
        self.margin = int(check_int("margin", margin, low=0))
        self._build(self.image_shape)

    def _build(self, shape: tuple[int, int, int]) -> None:
        c, h, w = shape
        if h != w:
            raise InputError(f"image_shape: BadNets expects square images, got {h}x{w}")
        if self.patch + self.margin > h:
            raise InputError(f"patch: a {self.patch}px patch with margin {self.margin} does not fit {h}x{w} images")
        self.image_shape = as_shape(shape)
        self._trigger = badnets_square(c, h, self.patch, self.margin)

    def prepare(self, model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None) -> "BadNets":
        """Rebuilds the square for the size of ``x`` if given; otherwise nothing to do."""
        if x is not None and shape_of(x) != self.image_shape:
            self._build(shape_of(x))
        return self
