"""The one input pipeline of every job: data -> model (built after seeding) -> weights -> checks.

Every command (``unlearn``, ``defend``, ``scan``, ``evaluate``, ``poison``) and the grid's
tasks load their inputs through :func:`load_inputs`, so the order of the checks, the
seeding before a model is built, and the error messages are the same everywhere. Every
problem raises :class:`~ibau.errors.InputError` (or a subclass) before any work is done.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, check_int

__all__ = ["ModelSource", "DataSource", "Inputs", "resolve_device", "parse_normalize", "load_model_def",
           "build_model", "output_dim", "load_inputs", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed the global RNGs that model construction and training draw from (CPU and CUDA)."""
    check_int("seed", seed, low=0, high=2**63 - 1)
    torch.manual_seed(seed)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: a GPU when present, else the CPU. Unknown names, absent
    devices and the data-less ``meta`` device raise :class:`InputError`."""
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {name!r} (use cpu, cuda, cuda:1, or auto)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} asked for, but PyTorch sees no GPU here (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        return dev
    if dev.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return dev
    raise InputError(f"device {name!r} cannot run models here (use cpu, cuda, cuda:N or auto)")


def parse_normalize(value: str | tuple | list | None, channels: int | None = None
                    ) -> tuple[list[float], list[float]] | None:
    """``"m,m,m/s,s,s"`` or ``(mean, std)`` -> two lists of finite floats, stds positive,
    one value per image channel when ``channels`` is given."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            mean_s, std_s = value.split("/")
            mean = [float(v) for v in mean_s.split(",")]
            std = [float(v) for v in std_s.split(",")]
        except ValueError:
            raise InputError(f"normalize must look like MEAN,MEAN,MEAN/STD,STD,STD, got {value!r}") from None
    else:
        try:
            mean, std = ([float(v) for v in part] for part in value)
        except (TypeError, ValueError):
            raise InputError(f"normalize must be (mean, std), two sequences of numbers, got {value!r}") from None
    if not mean or len(mean) != len(std):
        raise InputError(f"normalize needs as many means as stds, got {len(mean)} and {len(std)}")
    if not all(math.isfinite(v) for v in mean + std) or any(s <= 0 for s in std):
        raise InputError("normalize needs finite means and positive, finite stds")
    if channels is not None and len(mean) not in (1, channels):
        raise InputError(f"normalize gives {len(mean)} values per statistic but the images have {channels} "
                         "channel(s): give one value per channel")
    return mean, std


def load_model_def(spec: str | os.PathLike, num_classes: int | None = None) -> nn.Module:
    """``path.py:factory`` -> the module ``factory()`` (or ``factory(num_classes=N)``) returns.

    This imports and runs the user's own Python file: it is code the user chose to run,
    unlike weights files, which are never executed.
    """
    path_s, sep, name = os.fspath(spec).rpartition(":")
    if not sep or not path_s or not name:
        raise InputError(f"model definition must be PATH.py:FACTORY, got {os.fspath(spec)!r}")
    path = Path(path_s)
    if not path.is_file():
        raise InputError(f"model definition file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location(f"ibau_user_model_{abs(hash(str(path.resolve())))}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise InputError(f"cannot import {path} as a Python module (it must end in .py)")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except BaseException as exc:  # SystemExit in a script is a refusal too
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise InputError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        found = ", ".join(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise InputError(f"{path} has no callable {name!r} (callables found: {found or 'none'})")
    try:
        model = factory(num_classes=num_classes) if num_classes is not None else factory()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise InputError(f"{path}:{name}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"{path}:{name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


@dataclass
class ModelSource:
    """Where the model comes from: a registry name (``arch``) or ``model_def``
    (``PATH.py:FACTORY``), the class count (default: from the labels, for ``arch``),
    the weights file (``None``: fresh weights), and ``normalize``."""

    arch: str | None = None
    model_def: str | None = None
    num_classes: int | None = None
    weights: Path | None = None
    normalize: Any = None

    def __post_init__(self) -> None:
        if (self.arch is None) == (self.model_def is None):
            raise InputError("give exactly one of arch (a registry name) and model_def (PATH.py:FACTORY)")
        check_int("num_classes", self.num_classes, low=2, high=1_000_000, allow_none=True)
        if self.weights is not None:
            self.weights = Path(self.weights)
            if not self.weights.is_file():
                raise InputError(f"weights file not found: {self.weights}")

    @property
    def label(self) -> str:
        return str(self.arch or self.model_def)

    def paths(self) -> list[Path]:
        """The files this source reads (inputs that no output may replace)."""
        out = [self.weights] if self.weights is not None else []
        if self.model_def is not None:
            out.append(Path(str(self.model_def).rpartition(":")[0]))
        return out


@dataclass
class DataSource:
    """A ``.npz`` file, an image folder, or a registered dataset name with ``data_dir``."""

    spec: str
    data_dir: Path | None = None
    split: str = "test"

    def paths(self) -> list[Path]:
        out = []
        p = Path(self.spec)
        if p.exists():
            out.append(p)
        if self.data_dir is not None:
            out.append(Path(self.data_dir))
        return out

    def load(self) -> tuple[Tensor, Tensor]:
        from ..data import load_dataset

        try:
            return load_dataset(self.spec, data_dir=self.data_dir, split=self.split)
        except InputError:
            raise
        except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, EOFError, RuntimeError) as exc:
            raise InputError(f"cannot read the data {self.spec!r}: {type(exc).__name__}: {exc}") from None


def build_model(source: ModelSource, labels_max: int | None, seed: int) -> nn.Module:
    """The model, built after seeding (same seed, same initial weights)."""
    from .. import models

    seed_everything(seed)
    if source.model_def is not None:
        return load_model_def(source.model_def, source.num_classes)
    num_classes = source.num_classes
    if num_classes is None:
        if labels_max is None:
            raise InputError("num_classes is needed (the data does not say it)")
        num_classes = max(2, labels_max + 1)
    try:
        return models.create(source.arch, num_classes=num_classes)
    except KeyError as exc:
        raise InputError(str(exc.args[0]) + " (or give your own architecture as PATH.py:FACTORY)") from None


def output_dim(model: nn.Module, x: Tensor) -> int:
    """Run two images through ``model`` to learn its class count; a model that cannot
    process the images is refused with the reason."""
    from ..metrics import model_device

    was = model.training
    try:
        with torch.no_grad():
            model.eval()
            out = model(x[:2].to(model_device(model)))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"the model cannot process the data's images of shape {tuple(x.shape[1:])}: "
                         f"{type(exc).__name__}: {first}") from None
    finally:
        model.train(was)
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InputError(f"the model returns {shape}; expected logits of shape (N, classes)")
    if not torch.isfinite(out).all():
        raise InputError("the model returns NaN or infinite logits on the data's images")
    return int(out.shape[1])


@dataclass
class Inputs:
    """What :func:`load_inputs` returns."""

    model: nn.Module
    x: Tensor
    y: Tensor
    num_classes: int
    device: torch.device
    normalize: tuple[list[float], list[float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def load_inputs(model_source: ModelSource, data: DataSource | tuple[Tensor, Tensor], *, device: Any = "auto",
                seed: int = 0, min_size: int = 3) -> Inputs:
    """Load data, build the model after seeding, load its weights, move it to ``device``,
    and check that the two fit (image shape, class count, labels, finite logits)."""
    from ..data import check_dataset
    from ..io import load_weights

    dev = resolve_device(device)
    x, y = data.load() if isinstance(data, DataSource) else data
    if len(x) == 0:
        raise InputError("the data holds no images")
    normalize = parse_normalize(model_source.normalize, channels=int(x.shape[1]) if x.dim() == 4 else None)
    model = build_model(model_source, int(y.max()) if y.numel() else None, seed)
    if model_source.weights is not None:
        load_weights(model, model_source.weights)
    model.to(dev)
    probe = model
    if normalize is not None:
        from ..models import Normalized

        probe = Normalized(model, *normalize).to(dev)
    classes = output_dim(probe, x)
    if model_source.num_classes is not None and classes != model_source.num_classes:
        raise InputError(f"the model returns {classes} logits but num_classes is {model_source.num_classes}")
    check_dataset(x, y, num_classes=classes, min_size=min_size)
    info = {"weights": str(model_source.weights) if model_source.weights else None,
            "data": data.spec if isinstance(data, DataSource) else "tensors",
            "model": model_source.label, "num_classes": classes}
    return Inputs(model=model, x=x, y=y, num_classes=classes, device=dev, normalize=normalize, info=info)
