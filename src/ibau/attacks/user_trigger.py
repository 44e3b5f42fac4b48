"""A trigger the user already knows: a picture (and a mask) from files, stamped in one of
three documented ways, to measure the attack success rate of one's own backdoor.

:class:`ImageTrigger` is an :class:`~ibau.attacks.Attack` (``apply`` + ``target_of``), so
everything that measures a manifest's attack measures it too
(:func:`ibau.poisoning.evaluate_attack`, ``ibau evaluate --trigger-image``). It is not in
the :data:`~ibau.attacks.ATTACKS` registry: it is built from files, not from settings, and
poisons nothing on its own.

The three modes, for images ``x`` and the trigger picture ``t``, both in [0, 1]:

* ``"mask"``: ``x' = (1 - m) * x + m * t`` with the mask ``m`` in [0, 1] (a grayscale
  image divided by 255: 255 pastes the trigger, 0 keeps the image, values between mix).
* ``"blend"``: ``x' = (1 - alpha) * x + alpha * t`` with ``0 < alpha <= 1``.
* ``"additive"``: ``x' = clamp(x + d, 0, 1)``, where the perturbation ``d`` is stored as
  an 8-bit image with **128 meaning 0**: ``d = (v - 128) / 127`` for a pixel value ``v``
  (255 -> +1, 128 -> 0, 1 -> -1, 0 -> -1.008, which the clamp makes the same as -1), a
  step of 1/127 per grey level. For finer perturbations give a ``.npy`` float array of
  ``d`` itself (values in [-1, 1]). Save perturbation images as PNG: JPEG's compression
  changes the values.

Files (read with Pillow, or ``np.load(allow_pickle=False)`` for ``.npy``): the picture
and the mask must have the images' height and width exactly (nothing is resized). A
grayscale picture (Pillow modes ``1``, ``L``, ``LA``) is replicated over the images'
channels; an RGB picture needs 3-channel images; an alpha channel (``RGBA``, ``LA``) is
dropped, never used as a mask; palette images (``P``) are read as RGB. The mask must be
grayscale (an RGB file whose three channels are equal counts as grayscale). A ``.npy``
picture or mask is ``(H, W)`` or ``(C, H, W)`` with ``C`` 1 or the images' channel count,
values in [0, 1] (picture, mask) or [-1, 1] (additive perturbation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, check_choice, check_int, check_number
from ._common import as_shape, shape_of
from .base import Attack, check_target
from .trigger import Trigger

__all__ = ["ImageTrigger", "TRIGGER_MODES", "check_trigger_settings", "read_picture", "ADDITIVE_ZERO",
           "ADDITIVE_SCALE"]

#: the ways a trigger picture is stamped onto images
TRIGGER_MODES = ("mask", "blend", "additive")
#: an 8-bit additive perturbation image: ``d = (v - ADDITIVE_ZERO) / ADDITIVE_SCALE``
ADDITIVE_ZERO = 128
ADDITIVE_SCALE = 127
#: Pillow modes read as one channel / as three (alpha dropped in both)
_GRAY_MODES = {"1": "L", "L": "L", "LA": "L"}
_COLOUR_MODES = {"RGB": "RGB", "RGBA": "RGB", "P": "RGB"}


def check_trigger_settings(mode: str, *, alpha: float | None = None, mask: Any = None) -> None:
    """The settings of an :class:`ImageTrigger` without reading any file: ``mode`` one of
    :data:`TRIGGER_MODES`; ``mask`` given for ``"mask"`` only; ``alpha`` in (0, 1] given
    for ``"blend"`` only. :class:`InputError` otherwise."""
    check_choice("mode", mode, TRIGGER_MODES)
    if mode == "mask" and mask is None:
        raise InputError("mode 'mask' needs a mask (a grayscale image or a .npy array in [0, 1])")
    if mode != "mask" and mask is not None:
        raise InputError(f"a mask is only used with mode 'mask', not with mode {mode!r}")
    if mode == "blend":
        if alpha is None:
            raise InputError("mode 'blend' needs alpha, the weight of the trigger picture in (0, 1]")
        check_number("alpha", alpha, low=0, low_open=True, high=1)
    elif alpha is not None:
        raise InputError(f"alpha is only used with mode 'blend', not with mode {mode!r}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _expected_hw(image_shape: tuple[int, int, int] | None) -> tuple[int, int] | None:
    return None if image_shape is None else (image_shape[1], image_shape[2])


def _size_error(what: str, path: Path, hw: tuple[int, int], expected: tuple[int, int]) -> InputError:
    return InputError(f"the {what} {path} is {hw[0]}x{hw[1]} (HxW) but the images are {expected[0]}x{expected[1]}: "
                      "give a file of exactly the images' size (nothing is resized)")


def _read_npy(path: Path, what: str, expected: tuple[int, int] | None) -> np.ndarray:
    """A (C, H, W) float32 array from a ``.npy`` file (its header checked before the data is read)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # any failure while decoding an untrusted file
        raise InputError(f"cannot read the {what} {path} ({type(e).__name__}): save a (C, H, W) or (H, W) "
                         "float array with np.save") from None
    if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) \
            or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"the {what} {path} must hold a real-valued numeric array")
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise InputError(f"the {what} {path} must be a (C, H, W) or (H, W) array, got shape {arr.shape}")
    hw = tuple(int(v) for v in arr.shape[-2:])
    if expected is not None and hw != expected:
        raise _size_error(what, path, hw, expected)
    out = np.array(arr, dtype=np.float32)
    return out[None] if out.ndim == 2 else out


def _read_image(path: Path, what: str, expected: tuple[int, int] | None, *, gray_only: bool) -> np.ndarray:
    """A (C, H, W) uint8-valued float32 array (C = 1 or 3) from an image file; the size is
    checked on the header, before the pixels are decoded."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            if expected is not None and (h, w) != expected:
                raise _size_error(what, path, (h, w), expected)
            mode = img.mode
            if mode not in _GRAY_MODES and mode not in _COLOUR_MODES:
                raise InputError(f"the {what} {path} is a {mode!r} image: give an 8-bit grayscale or RGB(A) image "
                                 "(or a .npy float array)")
            img.load()
            arr = np.asarray(img.convert(_GRAY_MODES.get(mode) or _COLOUR_MODES[mode]), dtype=np.float32)
    except InputError:
        raise
    except Exception as e:  # any failure while decoding an untrusted file
        raise InputError(f"cannot read the {what} {path} ({type(e).__name__}): give a PNG or JPEG image "
                         "(or a .npy float array)") from None
    arr = arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))
    if gray_only and arr.shape[0] == 3:
        if not (np.array_equal(arr[0], arr[1]) and np.array_equal(arr[0], arr[2])):
            raise InputError(f"the {what} {path} must be grayscale (one value per pixel, 255 = trigger, "
                             "0 = image), but its colour channels differ")
        arr = arr[:1]
    return arr


def read_picture(source: Tensor | np.ndarray | str | Path, what: str, *, kind: str = "picture",
                 image_shape: Sequence[int] | None = None) -> tuple[Tensor, dict[str, Any]]:
    """A (C, H, W) float32 tensor and a description (``file``, ``sha256``) from ``source``.

    ``kind``: ``"picture"`` (image file / 255, values in [0, 1]), ``"mask"`` (the same,
    grayscale files only) or ``"perturbation"`` (image file as ``(v - 128) / 127``, values
    in [-1, 1]). ``.npy`` files and tensors/arrays are taken as they are (checked to lie in
    the kind's range). With ``image_shape`` the height and width are checked before the
    file's pixels are read.
    """
    check_choice("kind", kind, ("picture", "mask", "perturbation"))
    expected = _expected_hw(None if image_shape is None else as_shape(image_shape))
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{what} file not found: {path}")
        if path.suffix.lower() == ".npy":
            arr, from_image = _read_npy(path, what, expected), False
        else:
            arr, from_image = _read_image(path, what, expected, gray_only=kind == "mask"), True
        if from_image:
            arr = (arr - ADDITIVE_ZERO) / ADDITIVE_SCALE if kind == "perturbation" else arr / 255.0
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        info = {"file": str(path), "sha256": _sha256(path), "format": "npy" if not from_image else "image"}
    else:
        try:
            t = torch.as_tensor(source).detach().cpu().to(torch.float32).clone()
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"{what} must be a file path or a numeric (C, H, W) tensor ({e})") from None
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3 or t.numel() == 0:
            raise InputError(f"{what} must be a (C, H, W) or (H, W) tensor, got shape {tuple(t.shape)}")
        if expected is not None and tuple(t.shape[-2:]) != expected:
            raise InputError(f"{what} is {t.shape[-2]}x{t.shape[-1]} (HxW) but the images are "
                             f"{expected[0]}x{expected[1]}")
        info = {"file": None, "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest(), "format": "tensor"}
    low = -1.0 if kind == "perturbation" else 0.0
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what} holds NaN or inf values")
    if kind != "perturbation" or info["format"] != "image":  # an 8-bit perturbation reaches -128/127 by design
        if t.min() < low or t.max() > 1:
            raise InputError(f"{what} values must lie in [{low:g}, 1], got [{float(t.min()):g}, {float(t.max()):g}]")
    return t, info


class ImageTrigger(Attack):
    """A known trigger: a picture from a file (or a tensor) stamped onto images in one of
    the module's three documented modes, all images sent to ``target``.

    Args:
        image: the trigger picture: an image file (PNG/JPEG/BMP..., read with Pillow), a
            ``.npy`` array, or a (C, H, W) / (H, W) tensor. Values in [0, 1] (an image file
            is divided by 255), except in mode ``"additive"``, where it is the perturbation
            ``d`` in [-1, 1] (an 8-bit image file as ``d = (v - 128) / 127``).
        target: the class triggered images are sent to; checked against the class count
            where it is known (``num_classes``, or :func:`ibau.data.poison.check_attack_targets`).
        mode: ``"mask"`` (``(1 - m) x + m t``), ``"blend"`` (``(1 - alpha) x + alpha t``)
            or ``"additive"`` (``clamp(x + d, 0, 1)``).
        mask: mode ``"mask"`` only: a grayscale image file (/255), a ``.npy`` array or a
            tensor in [0, 1], (H, W), (1, H, W) or (C, H, W).
        alpha: mode ``"blend"`` only: the picture's weight, ``0 < alpha <= 1``.
        image_shape: (C, H, W) of the images to stamp, if known: the files' sizes are then
            checked before their pixels are read, and the channels at once. Otherwise
            ``apply`` checks each batch.
        num_classes: the model's class count, if known: ``target`` must lie below it.

    The picture and mask must have the images' height and width (nothing is resized); a
    1-channel picture or mask is used for every channel; a 3-channel picture needs
    3-channel images. See the module docstring for how each file format is read.

    Attributes: ``picture`` (the (C, H, W) picture as read, or ``d`` in mode
    ``"additive"``), ``mask`` (mode ``"mask"``, else ``None``), ``trigger`` (the
    :class:`~ibau.attacks.Trigger` doing the stamping).

    ``apply``: images (N, C, H, W) or (C, H, W) in [0, 1] -> stamped copies, same shape,
    in [0, 1]. ``describe()`` is the trigger as plain data (files, SHA-256, mode, alpha,
    target) for reports.

    Example:
        >>> trig = ImageTrigger("patch.png", mask="patch_mask.png", target=0)
        >>> trig = ImageTrigger("kitty.png", mode="blend", alpha=0.2, target=1)
        >>> trig = ImageTrigger("noise.png", mode="additive", target=3)   # 128 = no change
        >>> from ibau.poisoning import evaluate_attack
        >>> evaluate_attack(model, trig, x_test, y_test)["asr"]
    """

    name = "image_trigger"

    def __init__(self, image: Tensor | np.ndarray | str | Path, *, target: int, mode: str = "mask",
                 mask: Tensor | np.ndarray | str | Path | None = None, alpha: float | None = None,
                 image_shape: Sequence[int] | None = None, num_classes: int | None = None):
        super().__init__(target=target, seed=0)
        check_trigger_settings(mode, alpha=alpha, mask=mask)
        if num_classes is not None:
            check_int("num_classes", num_classes, low=1)
            check_target(self.target, num_classes)
        self.mode = mode
        self.alpha = None if alpha is None else float(alpha)
        self.image_shape = None if image_shape is None else as_shape(image_shape)
        kind = "perturbation" if mode == "additive" else "picture"
        what = "additive perturbation" if mode == "additive" else "trigger image"
        picture, self._image_info = read_picture(image, what, kind=kind, image_shape=self.image_shape)
        m, self._mask_info = None, None
        if mode == "mask":
            m, self._mask_info = read_picture(mask, "trigger mask", kind="mask", image_shape=self.image_shape)
            if tuple(m.shape[-2:]) != tuple(picture.shape[-2:]):
                raise InputError(f"the trigger mask is {m.shape[-2]}x{m.shape[-1]} (HxW) but the trigger image is "
                                 f"{picture.shape[-2]}x{picture.shape[-1]}: they must have the same size")
            if m.shape[0] not in (1, picture.shape[0]) and picture.shape[0] != 1:
                raise InputError(f"the trigger mask has {m.shape[0]} channels, the trigger image {picture.shape[0]}")
        self.picture = picture
        self.mask = m
        if mode == "mask":
            self._trigger = Trigger(m * picture, m)  # clip(x (1 - m) + m t) = (1 - m) x + m t
        elif mode == "blend":
            self._trigger = Trigger.blend(picture, self.alpha)
        else:
            self._trigger = Trigger.additive(picture)
        if self.image_shape is not None:
            self._fits(self.image_shape)

    @property
    def trigger(self) -> Trigger:
        """The :class:`~ibau.attacks.Trigger` doing the stamping (``clip(x (1 - mask) + pattern, 0, 1)``)."""
        return self._trigger

    @property
    def channels(self) -> int:
        """Channels of the trigger (1: used for every channel of the images)."""
        c = self._trigger.pattern.shape[0]
        return c if self._trigger.mask is None else max(c, self._trigger.mask.shape[0])

    def _fits(self, shape: tuple[int, int, int]) -> None:
        c, h, w = shape
        th, tw = self._trigger.pattern.shape[-2:]
        if (th, tw) != (h, w):
            raise InputError(f"the trigger is {th}x{tw} (HxW) but the images are {h}x{w}: give files of exactly "
                             "the images' size (nothing is resized)")
        if self.channels not in (1, c):
            raise InputError(f"the trigger has {self.channels} channels but the images have {c}: give a "
                             f"{'grayscale' if c == 1 else f'{c}-channel'} trigger"
                             + (" (an RGB trigger cannot be stamped on grayscale images)" if c == 1 else ""))

    def apply(self, x: Tensor) -> Tensor:
        self._fits(shape_of(x))
        return self._trigger.apply(x)

    def describe(self) -> dict[str, Any]:
        """The trigger as plain data: its file (``None`` for a tensor) and SHA-256, the
        mask's, mode, alpha, target and channels x height x width."""
        out: dict[str, Any] = {"mode": self.mode, "target": self.target, "file": self._image_info["file"],
                               "sha256": self._image_info["sha256"], "format": self._image_info["format"]}
        if self.mode == "blend":
            out["alpha"] = self.alpha
        if self.mode == "mask":
            out["mask_file"] = self._mask_info["file"]
            out["mask_sha256"] = self._mask_info["sha256"]
        if self.mode == "additive" and self._image_info["format"] == "image":
            out["additive_encoding"] = f"d = (v - {ADDITIVE_ZERO}) / {ADDITIVE_SCALE}"
        out["shape"] = [self.channels, *self._trigger.pattern.shape[-2:]]
        return out

    def config(self) -> dict[str, Any]:
        return self.describe()

    def state_dict(self) -> dict[str, Tensor]:
        state = {"pattern": self._trigger.pattern.clone()}
        if self._trigger.mask is not None:
            state["mask"] = self._trigger.mask.clone()
        return state
