"""Shared plumbing for the attack classes: shape handling, the trigger-holding base
class, model-mode bookkeeping and feature probes. Not part of the public API."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError, check_int, check_number
from ..metrics import model_device  # noqa: F401  (re-exported for the attack modules)
from .base import Attack, check_target
from .trigger import Trigger

NOT_PREPARED = "call prepare(model, x) first (or load_state_dict) to generate the {} trigger"


def prepared(value: Any, name: str) -> Any:
    """``value`` (something ``prepare`` fills in); RuntimeError saying to call ``prepare``
    on the attack called ``name`` while it is still None."""
    if value is None:
        raise RuntimeError(NOT_PREPARED.format(name))
    return value


def as_shape(image_shape: Sequence[int], name: str = "image_shape") -> tuple[int, int, int]:
    """``(C, H, W)`` of positive ints; :class:`InputError` naming ``name`` otherwise."""
    try:
        items = list(image_shape)
    except TypeError:
        raise InputError(f"{name} must be (C, H, W), got {image_shape!r}") from None
    if len(items) != 3:
        raise InputError(f"{name} must be (C, H, W), got {image_shape!r}")
    shape = tuple(int(check_int(f"{name}[{i}]", v, low=1)) for i, v in enumerate(items))
    return shape  # type: ignore[return-value]


def shape_of(x: Tensor) -> tuple[int, int, int]:
    if not isinstance(x, Tensor):
        raise InputError(f"images must be a torch tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise InputError(f"images must be (C, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    return as_shape(x.shape[-3:])


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own mode afterwards.

    Parameters are never handed to an optimiser; gradients are taken with
    ``torch.autograd.grad`` with respect to the trigger only, so ``.grad`` fields of
    the model stay untouched.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def clean_pool(x: Tensor, y: Tensor | None, target: int) -> Tensor:
    """Batched clean images to optimise on; images of the target class are left out
    when labels are given (they say nothing about moving *to* the target)."""
    if x is None:
        raise ValueError("this attack is generated from clean images: call prepare(model, x)")
    x = x.detach().float()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if y is not None:
        keep = torch.as_tensor(y).reshape(-1).to(x.device) != target
        if keep.any():
            x = x[keep]
    return x


def batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[Tensor]:
    """``steps`` index batches: the whole set when it fits in one batch, else successive
    slices of seeded permutations (deterministic per generator)."""
    if n <= batch_size:
        every = torch.arange(n)
        for _ in range(steps):
            yield every
        return
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def resize(img: Tensor, hw: tuple[int, int]) -> Tensor:
    """Bilinear resize of a (C, H, W) image (no-op when the size already fits)."""
    if tuple(img.shape[-2:]) == tuple(hw):
        return img
    return F.interpolate(img.unsqueeze(0), size=hw, mode="bilinear", align_corners=False).squeeze(0)


def fit_channels(img: Tensor, channels: int) -> Tensor:
    if img.shape[0] == channels:
        return img
    if img.shape[0] == 1:
        return img.expand(channels, *img.shape[1:]).clone()
    if channels == 1:
        return img.mean(0, keepdim=True)
    raise ValueError(f"cannot map a {img.shape[0]}-channel image onto {channels} channels")


def constructor_config(obj: object) -> dict[str, Any]:
    """The constructor's keyword arguments that ``obj`` keeps as plain attributes, so that
    ``type(obj)(**config)`` (or ``create_attack(name, **config)``) rebuilds it; tuples
    become lists (JSON-friendly)."""
    out: dict[str, Any] = {}
    for pname, param in inspect.signature(type(obj).__init__).parameters.items():
        if pname == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or not hasattr(obj, pname):
            continue
        value = getattr(obj, pname)
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, (bool, int, float, str)) or (
                isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value)):
            out[pname] = value
    return out


class TriggerAttack(Attack):
    """An attack whose trigger is one :class:`Trigger` (``clip(x * (1 - mask) + pattern)``).

    Subclasses fill ``self._trigger`` (in ``__init__`` for fixed triggers, in
    ``prepare`` for generated ones). ``state_dict`` holds ``pattern`` and, where the
    trigger replaces pixels, ``mask``; both CPU float32.
    """

    def __init__(self, *, target: int, seed: int = 0, image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, seed=seed)
        self.image_shape = as_shape(image_shape)
        self._trigger: Trigger | None = None

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (plain data): ``create_attack(name, **config)``
        plus ``load_state_dict`` restores the attack."""
        return constructor_config(self)

    @property
    def trigger(self) -> Trigger:
        return prepared(self._trigger, self.name)

    @property
    def ready(self) -> bool:
        return self._trigger is not None

    def _check(self, x: Tensor) -> None:
        trig = self.trigger
        if tuple(x.shape[-3:]) != tuple(trig.shape):
            raise ValueError(
                f"{self.name}: trigger is for images {tuple(trig.shape)}, got {tuple(x.shape[-3:])}; "
                "call prepare(x=...) with images of this size or pass image_shape")

    def apply(self, x: Tensor) -> Tensor:
        shape_of(x)
        self._check(x)
        return self.trigger.apply(x)

    def state_dict(self) -> dict[str, Tensor]:
        trig = self.trigger
        state = {"pattern": trig.pattern.detach().cpu().float().clone()}
        if trig.mask is not None:
            state["mask"] = trig.mask.detach().cpu().float().clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> "TriggerAttack":
        pattern = torch.as_tensor(state["pattern"]).detach().cpu().float().clone()
        mask = state.get("mask")
        if mask is not None:
            mask = torch.as_tensor(mask).detach().cpu().float().clone()
        self._trigger = Trigger(pattern, mask)
        self.image_shape = as_shape(pattern.shape)
        return self


class FeatureProbe:
    """Captures one tensor inside a model during a forward pass.

    ``layer=None``: the input of the model's last ``nn.Linear`` (penultimate features,
    flattened). Otherwise the output of the submodule called ``layer``.
    """

    def __init__(self, model: nn.Module, layer: str | None = None):
        self.model = model
        self.layer = layer
        modules = dict(model.named_modules())
        if layer is None:
            linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError("the model has no nn.Linear; pass layer= (a submodule name)")
            self.name, self.module = linears[-1]
        else:
            if layer not in modules:
                raise ValueError(f"no submodule named {layer!r}; known: {', '.join(n for n in modules if n)}")
            self.name, self.module = layer, modules[layer]
        self.value: Tensor | None = None

    def _pre(self, _m: nn.Module, inputs: tuple) -> None:
        self.value = inputs[0].flatten(1)

    def _post(self, _m: nn.Module, _inputs: tuple, output: Tensor) -> None:
        self.value = output

    def __call__(self, x: Tensor) -> Tensor:
        """Runs the model on ``x`` and returns the probed tensor (N, units[, ...])."""
        if self.layer is None:
            handle = self.module.register_forward_pre_hook(self._pre)
        else:
            handle = self.module.register_forward_hook(self._post)
        try:
            self.model(x)
        finally:
            handle.remove()
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(f"layer {self.name!r} was not called in the forward pass")
        return value

    def units(self, value: Tensor) -> Tensor:
        """Per-unit activation (N, units): channels are averaged over space."""
        return value.flatten(2).mean(2) if value.dim() > 2 else value

    def outgoing_weight(self, n_units: int) -> Tensor:
        """Total absolute weight from each unit into the next layer (TrojanNN's rule)."""
        if self.layer is None:
            return self.module.weight.detach().abs().sum(0)
        seen = False
        for name, m in self.model.named_modules():
            if name == self.name:
                seen = True
                continue
            if not seen or name.startswith(self.name + "."):
                continue
            w = getattr(m, "weight", None)
            if isinstance(m, nn.Linear):
                if m.in_features == n_units:
                    return w.detach().abs().sum(0)
                if m.in_features % n_units == 0:  # a flattened (units, H, W) map
                    return w.detach().abs().reshape(w.shape[0], n_units, -1).sum((0, 2))
            if isinstance(m, nn.modules.conv._ConvNd) and m.in_channels == n_units and m.groups == 1:
                return w.detach().abs().transpose(0, 1).reshape(n_units, -1).sum(1)
        raise ValueError(f"found no Linear/Conv layer after {self.name!r} taking its {n_units} units as input")


#: The end of a :class:`GeneratedAttack` subclass's docstring Args (the keywords every
#: such constructor passes on to ``GeneratedAttack.__init__``) and its image contract.
GENERATED_ARGS_DOC = """        seed: seed of the initialisation and batch order (0).
        batch_size: clean images per step (128).
        image_shape: (C, H, W) before ``prepare``; the trigger takes the size of ``x``.

    Images: float (N, C, H, W) or (C, H, W) in [0, 1]; output of the same shape in [0, 1].
"""


class GeneratedAttack(TriggerAttack):
    """A trigger optimised against a model in :meth:`prepare` (deterministic per ``seed``).

    ``prepare(model, x, y)`` puts the model in eval mode (restoring each submodule's
    mode afterwards), never changes its parameters, and optimises on minibatches of
    ``batch_size`` clean images ``x`` (those labelled ``target`` left out when ``y`` is
    given) drawn in a seeded order. The trigger takes the size of ``x``.
    """

    needs_model = True

    def __init__(self, *, target: int, steps: int, lr: float, seed: int = 0, batch_size: int = 128,
                 image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__(target=target, seed=seed, image_shape=image_shape)
        self.steps = int(check_int("steps", steps, low=0))
        self.lr = float(check_number("lr", lr, low=0, low_open=True))
        self.batch_size = int(check_int("batch_size", batch_size, low=1))

    def prepare(self, model: nn.Module | None = None, x: Tensor | None = None, y: Tensor | None = None) -> "GeneratedAttack":
        if model is None:
            raise ValueError(f"{self.name} is optimised against a model: call prepare(model, x)")
        pool = clean_pool(x, y, self.target).to(model_device(model))
        shape = shape_of(pool)
        with frozen_eval(model):
            with torch.no_grad():
                classes = int(model(pool[:1]).shape[-1])
            check_target(self.target, classes)
            trigger = self._generate(model, pool, seeded(self.seed))
        self._trigger = Trigger(trigger.pattern.detach().cpu().float().contiguous(),
                                None if trigger.mask is None else trigger.mask.detach().cpu().float().contiguous())
        self.image_shape = shape
        return self

    def _generate(self, model: nn.Module, x: Tensor, gen: torch.Generator) -> Trigger:  # pragma: no cover
        raise NotImplementedError

    def _targets(self, n: int, device: torch.device) -> Tensor:
        return torch.full((n,), self.target, dtype=torch.long, device=device)

    @staticmethod
    def _step(opt: torch.optim.Optimizer, loss: Tensor, params: list[Tensor]) -> None:
        """One optimiser step on ``params`` only (model ``.grad`` fields untouched)."""
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
