"""Safe loading of model weights and atomic writing of outputs.

Models come from people the user may not trust. PyTorch files are pickles, so they
are only ever opened with ``torch.load(..., weights_only=True)``, which refuses any
object that would need arbitrary code to rebuild; ``.safetensors`` files hold raw
tensors only. Outputs are written to a temporary file in the target folder and
renamed into place, so a crash never leaves a half-written file, and an existing
file is only replaced when asked.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from .errors import InputError

__all__ = ["WeightsError", "load_state_dict", "load_weights", "save_weights", "atomic_write", "atomic_directory",
           "check_replaceable_folder", "OUTPUT_MARKER", "write_json"]

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "net", "model", "weights")


class WeightsError(InputError):
    """A weights file that cannot be used safely or does not fit the model."""


def _unwrap(obj: Any) -> dict[str, Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        raise WeightsError("the file holds no state dict (a mapping of names to tensors, "
                           f"possibly under one of the keys {', '.join(_WRAPPER_KEYS)})")
    if not (isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, Tensor)
                                                      for k, v in obj.items())):
        raise WeightsError("the file holds no state dict (a mapping of names to tensors, "
                           f"possibly under one of the keys {', '.join(_WRAPPER_KEYS)})")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset",
                          "_codecs.encode", "numpy.")


def _pickle_globals(path: Path) -> list[str]:
    """Names of the callables a pickle (or a torch zip's data.pkl) would import, read
    with ``pickletools`` -- which parses opcodes and executes nothing."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                data = zf.read(name) if name else b""
        else:
            data = path.read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
        return found
    except Exception:  # not a parsable pickle: nothing is known to be called
        return []


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch file, on the CPU.

    Accepts a bare state dict or one wrapped in ``{'net': ...}``, ``{'state_dict': ...}``
    and similar, with or without DataParallel's ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path), device="cpu"))
        except WeightsError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"cannot read {path} as safetensors: {exc}") from None
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol is noise for a refusal
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        code = [g for g in _pickle_globals(path) if not g.startswith(_SAFE_GLOBAL_PREFIXES)]
        if code:
            raise WeightsError(
                f"refusing to load {path}: unpickling it would call {', '.join(sorted(set(code))[:3])}, which "
                "could run anything. Re-save it as a plain state dict or as .safetensors") from None
        detail = str(exc).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        raise WeightsError(f"cannot read {path} as a PyTorch weights file "
                           f"({detail[0] if detail else 'corrupt pickle'})") from None
    except Exception as exc:  # any other failure of the restricted unpickler is a refusal too
        first = str(exc).strip().splitlines()
        raise WeightsError(f"cannot read {path} as a PyTorch weights file: {type(exc).__name__}"
                           + (f": {first[0][:300]}" if first else "")) from None
    return _unwrap(obj)


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights into ``model`` with ``strict=True``; mismatches raise ``WeightsError``
    listing the missing, unexpected and wrongly shaped keys. Rejects NaN/inf values."""
    sd = load_state_dict(path)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"{path} has NaN or infinite values in: {', '.join(bad[:5])}")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        if shapes:
            parts.append("shape mismatch (file vs model): " + ", ".join(shapes[:8]))
        raise WeightsError(f"{path} does not fit the model ({'; '.join(parts)})")
    model.load_state_dict(sd, strict=True)
    return model


def _umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Temporary files are created 0600 (folders 0700); give the result the mode a plain
    ``open``/``mkdir`` would have given it under the user's umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, force: bool = False) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    Refuses to replace an existing ``path`` unless ``force``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


#: written into every folder ibau builds; only such folders (or empty ones) are replaced with ``force``
OUTPUT_MARKER = ".ibau-output"


def check_replaceable_folder(path: str | os.PathLike, *, force: bool) -> None:
    """Refuse to replace ``path`` unless it is absent, or ``force`` and it is an empty folder
    or one that ibau wrote (it holds :data:`OUTPUT_MARKER`). A folder that holds the
    working directory, the home folder or the file system root is never replaced."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it")
    if not path.is_dir() or path.is_symlink():
        raise InputError(f"{path} exists and is not a folder; give a folder path")
    real = Path(os.path.realpath(path))
    for keep in (Path.cwd(), Path.home(), Path(real.anchor)):
        keep = Path(os.path.realpath(keep))
        if real == keep or real in keep.parents:
            raise InputError(f"{path} holds {keep}; refusing to replace it: give a new folder")
    if any(path.iterdir()) and not (path / OUTPUT_MARKER).is_file():
        raise InputError(f"{path} is a folder ibau did not write (no {OUTPUT_MARKER} in it); refusing to replace "
                         "it even with --force: give a new or empty folder")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it onto ``path`` at the end.

    Yields the temporary folder; on an exception it is removed and ``path`` is left as
    it was. Refuses to replace an existing ``path`` unless ``force`` and
    :func:`check_replaceable_folder` allows it (the folder marks itself as ibau's).
    """
    path = Path(path)
    check_replaceable_folder(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _apply_umask(tmp, folder=True)
        yield tmp
        (tmp / OUTPUT_MARKER).write_text("written by ibau; may be replaced by ibau with --force\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_weights(model_or_state: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, *,
                 force: bool = False, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict as ``.safetensors`` atomically."""
    from safetensors.torch import save_file

    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=dict(metadata or {})), force=force)


def _strict_json(obj: Any) -> Any:
    """Non-finite floats (an epsilon of ``inf``, say) as the strings "inf", "-inf", "nan":
    the files stay strict JSON that every reader accepts."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def write_json(obj: Any, path: str | os.PathLike, *, force: bool = True) -> Path:
    """Write ``obj`` as indented, strict JSON atomically (replaces by default: results files)."""
    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(_strict_json(obj), f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")

    return atomic_write(path, _write, force=force)
