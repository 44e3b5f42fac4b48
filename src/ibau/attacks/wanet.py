"""WaNet: a fixed, small, smooth warping field as the trigger, with noise-mode training samples."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.poison import PoisonedSet
from ._common import as_shape, constructor_config, seeded, shape_of
from ..errors import InputError, check_int, check_number
from .base import Attack, register_attack

__all__ = ["WaNet", "WaNetSet", "identity_grid"]


def identity_grid(h: int, w: int) -> Tensor:
    """The (1, H, W, 2) sampling grid of ``F.grid_sample(align_corners=True)`` that returns
    the image unchanged: ``[..., 0]`` is x (columns), ``[..., 1]`` is y (rows), in [-1, 1]."""
    ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx, yy), -1).unsqueeze(0)


@register_attack
class WaNet(Attack):
    """WaNet (Nguyen & Tran, ICLR 2021, "WaNet - Imperceptible warping-based backdoor
    attack"), the I-BAU paper's Appendix A.5.2 case (CIFAR-10, all-to-one, Table 11).

    The trigger is a fixed warping field. A ``k x k x 2`` control grid of uniform values
    in [-1, 1] (drawn with ``seed``) is divided by its mean absolute value, upsampled
    bicubically to H x W (the *noise grid*), scaled by ``s / H`` (rows; ``s / W`` for
    columns -- the same for square images) so the displacement stays around a pixel,
    added to the identity grid, multiplied by ``grid_rescale`` and clamped to [-1, 1];
    ``apply`` resamples the images through it with
    ``F.grid_sample(mode="bilinear", align_corners=True)``.

    Args:
        target: class the warped images are sent to (all-to-one; WaNet's and the I-BAU
            paper's setting: 0).
        k: control grid size (WaNet, CIFAR-10: 4).
        s: warping strength (WaNet: 0.5). ``s = 0`` gives the identity.
        grid_rescale: factor on the warped grid (WaNet: 1).
        cross_ratio: noise-mode samples per poisoned sample (WaNet's code: 2, i.e.
            rho_n = 0.2 for rho_a = 0.1).
        seed: seed of the control grid (0).
        image_shape: (C, H, W) of the images (3, 32, 32); ``prepare(x=...)`` re-fits the
            field (the same control grid, upsampled to the new size).

    Measured displacement (``(grid - identity) * (H - 1) / 2`` pixels) with the
    defaults at 32x32: the largest per-axis shift is 0.42-0.62 px over seeds 0-49 (mean
    shift 0.28 px); a smooth, orientation-preserving map (Jacobian determinant >= 0.34
    everywhere). The pixel shift hardly depends on the image size (about
    ``s * |noise| / 2``), and noise mode adds up to ``(W - 1) / (2 W)`` px.

    Training set (:meth:`poisoned_set`): WaNet poisons rho_a = 10% of the data -- pass
    ``ratio=0.1`` for WaNet's setting (the I-BAU paper's attacks use 0.2). ``ratio`` of
    the images, drawn from those whose label changes, are warped and relabelled
    (``mask``); ``cross_ratio`` times as many *other* images (any class) are in "noise
    mode": warped through the field plus a fresh random perturbation, uniform in
    [-1/H, 1/H] per grid point, and keep their labels (``noise_mask``), which teaches
    the model to react only to the exact field. Warping is applied per batch. (WaNet's
    code instead warps the first rho_a share of every shuffled batch, of any class; our
    fixed, seeded selection follows this package's convention and ``ibau.data.poison``.)

    ``state_dict``: ``control_grid`` (1, 2, k, k), ``noise_grid`` and ``identity_grid``
    (1, H, W, 2), as WaNet saves them.

    Example:
        >>> atk = WaNet()                                   # k=4, s=0.5, target 0
        >>> xt = atk(torch.rand(8, 3, 32, 32))               # slightly warped copies
        >>> data = atk.poisoned_set(x, y, 0.1, seed=0)       # 10% warped -> 0, 20% noise mode
    """

    name = "wanet"

    def __init__(self, *, target: int = 0, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0,
                 cross_ratio: float = 2.0, seed: int = 0, image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, seed=seed)
        check_int("k (control grid size)", k, low=2)
        check_number("s (warping strength)", s, low=0)
        check_number("grid_rescale", grid_rescale, low=0, low_open=True)
        check_number("cross_ratio", cross_ratio, low=0)
        self.k, self.s, self.grid_rescale, self.cross_ratio = int(k), float(s), float(grid_rescale), float(cross_ratio)
        self.image_shape = as_shape(image_shape)
        ins = torch.rand(1, 2, self.k, self.k, generator=seeded(self.seed)) * 2 - 1
        self._control = (ins / ins.abs().mean()).float()
        self._fit(self.image_shape)

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (plain data)."""
        return constructor_config(self)

    # -- the field ---------------------------------------------------------------
    def _fit(self, shape: tuple[int, int, int]) -> None:
        _, h, w = shape
        noise = F.interpolate(self._control, size=(h, w), mode="bicubic", align_corners=True)
        self._set(noise.permute(0, 2, 3, 1).contiguous(), identity_grid(h, w), shape)

    def _set(self, noise: Tensor, ident: Tensor, shape: tuple[int, int, int]) -> None:
        self._noise, self._identity = noise.float(), ident.float()
        self.image_shape = as_shape(shape)
        h, w = self.image_shape[1:]
        self._scale = torch.tensor([1.0 / w, 1.0 / h])  # x: columns, y: rows
        self._grid = ((self._identity + self.s * self._noise * self._scale) * self.grid_rescale).clamp(-1, 1)

    @property
    def grid(self) -> Tensor:
        """The (1, H, W, 2) sampling grid of the trigger."""
        return self._grid

    def flow(self) -> Tensor:
        """The displacement of the trigger in pixels, (H, W, 2) as (dx, dy)."""
        h, w = self.image_shape[1:]
        return (self._grid - self._identity)[0] * torch.tensor([(w - 1) / 2, (h - 1) / 2])

    def _check(self, x: Tensor) -> tuple[Tensor, bool]:
        shape_of(x)
        if tuple(x.shape[-2:]) != tuple(self._grid.shape[1:3]):
            raise ValueError(f"wanet: the warping field is {tuple(self._grid.shape[1:3])}, got images "
                             f"{tuple(x.shape[-2:])}; call prepare(x=...) with images of this size or pass image_shape")
        return (x.unsqueeze(0), True) if x.dim() == 3 else (x, False)

    def _warp(self, x: Tensor, grid: Tensor) -> Tensor:
        grid = grid.to(x.device, x.dtype).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True).clamp_(0, 1)

    def apply(self, x: Tensor) -> Tensor:
        xb, single = self._check(x)
        out = self._warp(xb, self._grid)
        return out[0] if single else out

    def apply_noise(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """WaNet's noise mode: warp through the field plus, per image, a random grid
        perturbation uniform in [-1/H, 1/H] (rows; 1/W for columns), drawn from
        ``generator``; the result is clamped to [-1, 1]."""
        xb, single = self._check(x)
        h, w = self.image_shape[1:]
        extra = (torch.rand(len(xb), h, w, 2, generator=generator) * 2 - 1) * self._scale
        grid = (self._grid + extra).clamp(-1, 1)
        out = F.grid_sample(xb, grid.to(xb.device, xb.dtype), mode="bilinear", padding_mode="zeros",
                            align_corners=True).clamp_(0, 1)
        return out[0] if single else out

    def prepare(self, model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None) -> "WaNet":
        """Re-fits the field to the size of ``x`` if given (the same control grid)."""
        if x is not None and shape_of(x)[1:] != self.image_shape[1:]:
            self._fit(shape_of(x))
        elif x is not None:
            self.image_shape = shape_of(x)
        return self

    # -- the training set ----------------------------------------------------------
    def poisoned_set(self, x: Tensor, y: Tensor, ratio: float, *, seed: int = 0) -> "WaNetSet":
        """``ratio`` of ``(x, y)`` warped and relabelled, ``cross_ratio`` times as many
        others in noise mode (see the class docstring). WaNet's setting: ``ratio=0.1``."""
        from ..data.poison import check_ratio

        check_ratio(ratio)
        y = torch.as_tensor(y).long()
        if len(x) != len(y):
            raise InputError(f"{len(x)} images but {len(y)} labels")
        self._check(x[:1] if x.dim() == 4 else x)
        candidates = torch.nonzero(self.target_of(y) != y).flatten()
        n = round(ratio * len(y))
        if n > len(candidates):
            raise ValueError(f"cannot poison {n} samples: only {len(candidates)} have a label the attack changes")
        g = seeded(seed)
        chosen = candidates[torch.randperm(len(candidates), generator=g)[:n]]  # as ibau.data.poison.poison
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[chosen] = False
        others = torch.nonzero(rest).flatten()
        n_noise = round(self.cross_ratio * n)
        if n_noise > len(others):
            raise ValueError(f"cannot put {n_noise} samples (cross_ratio {self.cross_ratio} x {n}) in noise mode: "
                             f"only {len(others)} samples are not poisoned")
        noise = others[torch.randperm(len(others), generator=g)[:n_noise]]
        return WaNetSet(x, y, self, chosen, noise, seed=seed)

    # -- state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {"control_grid": self._control.detach().cpu().float().clone(),
                "noise_grid": self._noise.detach().cpu().float().clone(),
                "identity_grid": self._identity.detach().cpu().float().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> "WaNet":
        control = torch.as_tensor(state["control_grid"]).detach().cpu().float().clone()
        noise = torch.as_tensor(state["noise_grid"]).detach().cpu().float().clone()
        ident = torch.as_tensor(state["identity_grid"]).detach().cpu().float().clone()
        if control.dim() != 4 or control.shape[:2] != (1, 2) or control.shape[2] != control.shape[3]:
            raise ValueError(f"control_grid must be (1, 2, k, k), got {tuple(control.shape)}")
        if noise.dim() != 4 or noise.shape[0] != 1 or noise.shape[3] != 2 or noise.shape != ident.shape:
            raise ValueError(f"noise_grid and identity_grid must both be (1, H, W, 2), got "
                             f"{tuple(noise.shape)} and {tuple(ident.shape)}")
        self._control, self.k = control, int(control.shape[-1])
        self._set(noise, ident, (self.image_shape[0], int(noise.shape[1]), int(noise.shape[2])))
        return self


class WaNetSet(PoisonedSet):
    """A view of ``(x, y)`` for WaNet training: ``mask`` marks the warped-and-relabelled
    samples, ``noise_mask`` the noise-mode samples (warped with a random extra
    perturbation, label kept). Both are applied per batch.

    The noise of a batch is drawn from a generator seeded by ``seed`` and the batch's
    indices, so ``batch(idx)`` is a pure function: the same indices give the same
    images (an interrupted :func:`ibau.train.train` resumes to the same weights), while
    each epoch's reshuffled batches get fresh noise, as in WaNet.
    """

    def __init__(self, x: Tensor, y: Tensor, attack: WaNet, poisoned: Tensor, noise: Tensor, *, seed: int = 0):
        super().__init__(x, y, attack.apply, attack.target_of, poisoned)
        self.attack, self.seed = attack, int(seed)
        self.noise_mask = torch.zeros(len(self.y), dtype=torch.bool)
        self.noise_mask[noise] = True
        if (self.noise_mask & self.mask).any():
            raise ValueError("a sample cannot be both poisoned and in noise mode")

    @property
    def noise_indices(self) -> Tensor:
        return torch.nonzero(self.noise_mask).flatten()

    def _generator(self, idx: Tensor) -> torch.Generator:
        h = hashlib.blake2b(idx.numpy().astype("<i8").tobytes(), digest_size=8, key=str(self.seed).encode())
        return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(idx).long().reshape(-1).cpu()
        xb, yb = super().batch(idx)
        n = self.noise_mask[idx]
        if n.any():
            xb[n] = self.attack.apply_noise(xb[n], self._generator(idx))
        return xb, yb
