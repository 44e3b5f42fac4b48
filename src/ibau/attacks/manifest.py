"""Attack manifests: everything needed to re-apply exactly the same trigger later.

``save_manifest(attack, "model.attack.json")`` writes the JSON manifest (attack name,
settings, target(s), the trigger file's name and SHA-256) and the trigger tensors as
``model.attack.trigger.safetensors`` beside it; ``load_manifest`` rebuilds the attack
through the registry, loads the tensors and checks the hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .base import Attack, create_attack
from ..errors import InputError

__all__ = ["save_manifest", "load_manifest", "ManifestError"]


class ManifestError(InputError):
    """A manifest that is missing, malformed or does not match its trigger file."""


def _describe(attack: Attack) -> dict[str, Any]:
    parts = getattr(attack, "attacks", None)
    if parts is not None:  # several (trigger, target) pairs
        return {"attack": attack.name, "parts": [_describe(a) for a in parts]}
    return {"attack": attack.name, "config": attack.config(), "target": getattr(attack, "target", None)}


def _build(desc: dict[str, Any]) -> Attack:
    if "parts" in desc:
        from .multi import MultiTrigger

        subs = [_build(d) for d in desc["parts"]]
        return MultiTrigger([(a, a.target) for a in subs])
    config = dict(desc.get("config", {}))
    return create_attack(desc["attack"], **config)


def _trigger_path(path: Path) -> Path:
    name = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    return path.with_name(name + ".trigger.safetensors")


def save_manifest(attack: Attack, path: str | os.PathLike, *, extra: dict[str, Any] | None = None,
                  force: bool = False) -> Path:
    from safetensors.torch import save_file

    from ..io import atomic_write, write_json

    path = Path(path)
    tpath = _trigger_path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in attack.state_dict().items()}
    if state:
        atomic_write(tpath, lambda tmp: save_file(state, tmp), force=force)
    manifest = {**_describe(attack), "trigger_file": tpath.name if state else None,
                "trigger_sha256": hashlib.sha256(tpath.read_bytes()).hexdigest() if state else None,
                **(extra or {})}
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    return write_json(manifest, path)


def load_manifest(path: str | os.PathLike) -> tuple[Attack, dict[str, Any]]:
    """The attack described by a manifest (trigger loaded and verified), and the manifest."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        manifest = json.loads(path.read_text())
        attack = _build(manifest)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path} is not a valid attack manifest: {exc}") from None
    if manifest.get("trigger_file"):
        tpath = path.with_name(manifest["trigger_file"])
        if not tpath.is_file():
            raise ManifestError(f"trigger file {tpath} named by {path} is missing")
        digest = hashlib.sha256(tpath.read_bytes()).hexdigest()
        if digest != manifest.get("trigger_sha256"):
            raise ManifestError(f"{tpath} does not match the hash in {path}: the trigger was changed")
        attack.load_state_dict(load_file(tpath))
    return attack, manifest
