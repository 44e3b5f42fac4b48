from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError


class Trigger:
    """An input-space trigger ``x -> clip(x * (1 - mask) + pattern, 0, 1)``.

    One form covers the additive triggers of the paper (``mask = 0``: l2-inv, Trojan
    SQ/WM, pre-scaled blend), pasted patches (``mask = 1`` on the patch: BadNets), the
    l0-inv trigger (a few replaced pixels) and blending (``mask = alpha`` everywhere,
    ``pattern = alpha * image``).

    Args:
        pattern: (C, H, W) float tensor, added after masking.
        mask: (C, H, W) or (1, H, W) float tensor in [0, 1]; ``None`` means purely additive.
    """

    def __init__(self, pattern: Tensor, mask: Tensor | None = None):
        try:
            pattern = torch.as_tensor(pattern, dtype=torch.float32)
            mask = None if mask is None else torch.as_tensor(mask, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"pattern and mask must be numeric tensors ({e})") from None
        if pattern.dim() != 3 or pattern.numel() == 0:
            raise InputError(f"pattern must be (C, H, W), got shape {tuple(pattern.shape)}")
        if not bool(torch.isfinite(pattern).all()):
            raise InputError("pattern holds NaN or inf values")
        if mask is not None:
            if mask.dim() != 3 or mask.shape[-2:] != pattern.shape[-2:] or mask.shape[0] not in (1, pattern.shape[0]):
                raise InputError(f"mask shape {tuple(mask.shape)} does not fit pattern {tuple(pattern.shape)}")
            if not bool(torch.isfinite(mask).all()) or mask.min() < 0 or mask.max() > 1:
                raise InputError("mask values must be finite and lie in [0, 1]")
        self.pattern = pattern
        self.mask = mask

    # -- constructors -------------------------------------------------------------
    @classmethod
    def additive(cls, pattern: Tensor) -> "Trigger":
        return cls(pattern)

    @classmethod
    def patch(cls, mask: Tensor, values: Tensor) -> "Trigger":
        """Replace the pixels where ``mask`` is 1 by ``values``."""
        mask = torch.as_tensor(mask, dtype=torch.float32)
        return cls(mask * torch.as_tensor(values, dtype=torch.float32), mask)

    @classmethod
    def blend(cls, image: Tensor, alpha: float) -> "Trigger":
        """``(1 - alpha) * x + alpha * image`` (the Blend attack)."""
        image = torch.as_tensor(image, dtype=torch.float32)
        return cls(alpha * image, torch.full_like(image, float(alpha)))

    @classmethod
    def from_image(cls, path: str | Path, *, scale: float = 1 / 255, mask: Tensor | str | Path | None = None) -> "Trigger":
        """Load an additive pattern from an image file (HWC, values multiplied by ``scale``).

        ``mask`` may be a tensor or a ``.npy`` file holding a (C, H, W) array.
        """
        from PIL import Image

        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.float32) * scale
        except Exception as e:  # any failure while decoding an untrusted file
            raise InputError(f"cannot read trigger image {path} ({type(e).__name__}): give a PNG/JPEG/BMP image") from None
        pattern = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        if isinstance(mask, (str, Path)):
            try:
                m = np.load(mask, allow_pickle=False)
                if not isinstance(m, np.ndarray) or not (np.issubdtype(m.dtype, np.number) or m.dtype == np.bool_):
                    raise ValueError("not a numeric array")
                mask = torch.from_numpy(m.astype(np.float32))
            except Exception as e:  # any failure while decoding an untrusted file
                raise InputError(f"cannot read trigger mask {mask} ({type(e).__name__}): save a (C, H, W) "
                                 "float array in [0, 1] with np.save") from None
        return cls(pattern, mask)

    # -- use ----------------------------------------------------------------------
    def apply(self, x: Tensor) -> Tensor:
        p = self.pattern.to(x.device, x.dtype)
        if self.mask is not None:
            x = x * (1 - self.mask.to(x.device, x.dtype))
        return (x + p).clamp_(0, 1)

    __call__ = apply

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pattern.shape)

    def sha256(self) -> str:
        h = hashlib.sha256(self.pattern.numpy().tobytes())
        if self.mask is not None:
            h.update(self.mask.numpy().tobytes())
        return h.hexdigest()


def badnets_square(channels: int = 3, size: int = 32, patch: int = 4, margin: int = 1) -> Trigger:
    """BadNets (Gu et al., 2017) as the paper uses it: a ``patch x patch`` white square
    in the bottom-right corner, ``margin`` pixels from the border (rows/cols 27-30 of a
    32x32 image)."""
    mask = torch.zeros(1, size, size)
    lo, hi = size - margin - patch, size - margin
    mask[:, lo:hi, lo:hi] = 1
    return Trigger.patch(mask.expand(channels, size, size).clone(), torch.ones(channels, size, size))
