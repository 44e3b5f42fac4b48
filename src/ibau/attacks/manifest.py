"""Attack manifests: everything needed to re-apply exactly the same trigger later.

``save_manifest(attack, "model.attack.json")`` writes the JSON manifest (attack name,
settings, target(s), the trigger file's name and SHA-256) and the trigger tensors as
``model.attack.trigger.safetensors`` beside it; ``load_manifest`` rebuilds the attack
through the registry, loads the tensors and checks the hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .base import Attack, create_attack

__all__ = ["save_manifest", "load_manifest", "trigger_path", "ManifestError"]


class ManifestError(InputError):
    """A manifest that is missing, malformed or does not match its trigger file."""


def _describe(attack: Attack) -> dict[str, Any]:
    parts = getattr(attack, "attacks", None)
    if parts is not None:  # several (trigger, target) pairs
        return {"attack": attack.name, "parts": [_describe(a) for a in parts]}
    return {"attack": attack.name, "config": attack.config(), "target": getattr(attack, "target", None)}


#: refuse manifests larger than this (a manifest is a few kilobytes of settings)
MAX_MANIFEST_BYTES = 1 << 20
#: refuse trigger files larger than this
MAX_TRIGGER_BYTES = 256 << 20
#: the deepest nesting of JSON objects/lists a manifest may have
MAX_DEPTH = 16
#: the most (trigger, target) parts a multi-trigger manifest may list
MAX_PARTS = 64
_SCALARS = (str, int, float, bool, type(None))


def _depth(obj: Any) -> int:
    """Nesting depth of JSON data (iterative, so hostile input cannot exhaust the stack)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _check_desc(desc: Any, where: str) -> None:
    """The schema of one attack description: ``{"attack": NAME, "config": {...},
    "target": T}`` or ``{"attack": NAME, "parts": [desc, ...]}``."""
    from .base import ATTACKS

    if not isinstance(desc, dict):
        raise ManifestError(f"{where} must be a JSON object, got {type(desc).__name__}")
    name = desc.get("attack")
    if not isinstance(name, str):
        raise ManifestError(f"{where} needs an 'attack' name (a string)")
    if name not in ATTACKS:
        raise ManifestError(f"{where}: unknown attack {name!r}; known: {', '.join(ATTACKS.names())}")
    if "parts" in desc:
        parts = desc["parts"]
        if not isinstance(parts, list) or not 1 <= len(parts) <= MAX_PARTS:
            raise ManifestError(f"{where}: 'parts' must be a list of 1..{MAX_PARTS} attack descriptions")
        for i, part in enumerate(parts):
            _check_desc(part, f"{where} part {i}")
        return
    config = desc.get("config", {})
    if not isinstance(config, dict):
        raise ManifestError(f"{where}: 'config' must be a JSON object of settings")
    for k, v in config.items():
        if not (isinstance(v, _SCALARS) or (isinstance(v, list) and all(isinstance(e, _SCALARS) for e in v))):
            raise ManifestError(f"{where}: setting {k!r} must be a number, string or list of those")
        if isinstance(v, float) and not math.isfinite(v):
            raise ManifestError(f"{where}: setting {k!r} must be finite, got {v}")
    target = desc.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 0):
        raise ManifestError(f"{where}: 'target' must be a non-negative class id, got {target!r}")
    if target is not None and config.get("target", target) != target:
        raise ManifestError(f"{where}: 'target' {target} disagrees with the setting target {config['target']}")
    shape = config.get("image_shape")
    if shape is not None:
        if not (isinstance(shape, list) and len(shape) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)):
            raise ManifestError(f"{where}: image_shape must be [C, H, W] of positive ints, got {shape!r}")
        for key in ("patch", "patch_size"):
            p = config.get(key)
            if isinstance(p, (int, float)) and not isinstance(p, bool) and p > min(shape[1:]):
                raise ManifestError(f"{where}: {key} {p} is larger than the {shape[1]}x{shape[2]} images")


def _build(desc: dict[str, Any]) -> Attack:
    if "parts" in desc:
        from .multi import MultiTrigger

        subs = [_build(d) for d in desc["parts"]]
        return MultiTrigger([(a, a.target) for a in subs])
    config = dict(desc.get("config", {}))
    return create_attack(desc["attack"], **config)


def _contained(folder: Path, name: Any, what: str) -> Path:
    """``folder/name`` for a plain relative file name that stays inside ``folder`` once
    resolved (symlinks included); :class:`ManifestError` otherwise."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ManifestError(f"{what} must be a file name, got {name!r}")
    rel = Path(name)
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise ManifestError(f"{what} {name!r} must be a file next to the manifest (no absolute path, no '..')")
    base = folder.resolve()
    target = (folder / rel).resolve()
    if target != base and base not in target.parents:
        raise ManifestError(f"{what} {name!r} leads outside the manifest's folder {base} (to {target})")
    return target


def _read_trigger(tpath: Path, expected_sha: Any, where: Path) -> dict[str, Any]:
    """The trigger tensors: size-limited, hash-checked, a valid safetensors file of finite
    float tensors."""
    from safetensors.torch import load as load_bytes

    if not tpath.is_file():
        raise ManifestError(f"trigger file {tpath} named by {where} is missing")
    size = tpath.stat().st_size
    if size > MAX_TRIGGER_BYTES:
        raise ManifestError(f"trigger file {tpath} is {size} bytes, more than the {MAX_TRIGGER_BYTES} allowed")
    raw = tpath.read_bytes()
    if not isinstance(expected_sha, str) or hashlib.sha256(raw).hexdigest() != expected_sha:
        raise ManifestError(f"{tpath} does not match the hash in {where}: the trigger was changed")
    try:
        state = load_bytes(raw)
    except Exception as e:  # any failure while decoding an untrusted file
        raise ManifestError(f"trigger file {tpath} is not a valid safetensors file ({type(e).__name__})") from None
    for k, v in state.items():
        if not v.is_floating_point():
            raise ManifestError(f"trigger tensor {k!r} in {tpath} must be floating point, got {v.dtype}")
        if not bool(torch.isfinite(v).all()):
            raise ManifestError(f"trigger tensor {k!r} in {tpath} holds NaN or inf values")
    return state


def _shapes(attack: Attack) -> list[tuple[int, ...]]:
    parts = getattr(attack, "attacks", None)
    if parts is not None:
        return [s for a in parts for s in _shapes(a)]
    shape = getattr(attack, "image_shape", None)
    return [tuple(int(v) for v in shape)] if shape is not None else []


def trigger_path(path: Path) -> Path:
    name = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    return path.with_name(name + ".trigger.safetensors")


def save_manifest(attack: Attack, path: str | os.PathLike, *, extra: dict[str, Any] | None = None,
                  force: bool = False) -> Path:
    from safetensors.torch import save_file

    from ..io import atomic_write, write_json

    path = Path(path)
    if path.exists() and not force:  # before anything is written
        raise FileExistsError(f"{path} exists; pass force=True to overwrite it")
    tpath = trigger_path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in attack.state_dict().items()}
    if state:
        atomic_write(tpath, lambda tmp: save_file(state, tmp), force=force)
    manifest = {**_describe(attack), "trigger_file": tpath.name if state else None,
                "trigger_sha256": hashlib.sha256(tpath.read_bytes()).hexdigest() if state else None,
                **(extra or {})}
    return write_json(manifest, path, force=force)


def load_manifest(path: str | os.PathLike, *, num_classes: int | None = None,
                  image_shape: tuple[int, int, int] | None = None) -> tuple[Attack, dict[str, Any]]:
    """The attack described by a manifest (trigger loaded and verified), and the manifest.

    A manifest is untrusted input: it is refused (:class:`ManifestError`) when it is
    larger than :data:`MAX_MANIFEST_BYTES`, not a JSON object, nested deeper than
    :data:`MAX_DEPTH`, names an unknown attack or settings the attack refuses, names a
    trigger file that is absolute or resolves outside the manifest's folder (symlinks
    included), whose hash differs or that is not a safetensors file of finite float
    tensors of the attack's shape, when a target is not below ``num_classes`` (when
    given), or when its images are not ``image_shape`` (when given).
    """
    from ..data.poison import check_attack_targets

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} is {size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ManifestError(f"{path} is not a valid attack manifest (not JSON: {type(exc).__name__})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a valid attack manifest: a JSON object is needed, got "
                            f"{type(manifest).__name__}")
    if _depth(manifest) > MAX_DEPTH:
        raise ManifestError(f"{path} is nested deeper than {MAX_DEPTH} levels: not an attack manifest")
    _check_desc(manifest, str(path))
    try:
        attack = _build(manifest)
    except ManifestError:
        raise
    except (InputError, KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path} is not a valid attack manifest: {exc}") from None
    tname = manifest.get("trigger_file")
    if tname is not None:
        tpath = _contained(path.parent, tname, "trigger_file")
        state = _read_trigger(tpath, manifest.get("trigger_sha256"), path)
        before = _shapes(attack)
        try:
            attack.load_state_dict(state)
        except Exception as exc:  # a state that does not fit the attack
            raise ManifestError(f"trigger file {tpath} does not fit the {manifest['attack']} attack of {path}: "
                                f"{type(exc).__name__}: {exc}") from None
        if _shapes(attack) != before:
            raise ManifestError(f"the trigger in {tpath} is for images {_shapes(attack)}, but {path} says "
                                f"{before}: the trigger does not match its manifest")
    try:
        attack.state_dict()
    except RuntimeError:
        raise ManifestError(f"{path} names no trigger file, but the {manifest['attack']} attack needs its "
                            "generated trigger") from None
    if image_shape is not None and any(s != tuple(image_shape) for s in _shapes(attack)):
        raise ManifestError(f"the manifest's attack is for images {_shapes(attack)[0]}, the data's are "
                            f"{tuple(image_shape)}")
    if num_classes is not None:
        try:
            check_attack_targets(attack, num_classes)
        except InputError as exc:
            raise ManifestError(f"{path}: {exc}") from None
    return attack, manifest
