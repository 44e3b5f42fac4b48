"""Where a cell's poisoned model and its attack come from.

A model entry of an experiment file either names weights (the authors' released
checkpoints, or models another script made)::

    arch = "small_vgg"
    weights = "${data}/ibau-checkpoints/trojan_wm_2_02_ckpt.pth"
    attack = { image = "${data}/triggers/ibau_trojan_wm.png", target = 2 }

or says how to train it, and the runner trains it once and caches it by content (the
hash of the architecture, the attack, the poisoning and the training recipe)::

    arch = "resnet18"
    arch_args = { width = 0.25 }
    train = { attack = { image = "...", target = 2 }, ratio = 0.2, size = 3000, epochs = 5 }

Attack specs: ``{ name = "blend", target = 1, ... }`` (the registry, with its keyword
arguments; triggers that are optimised against a model are prepared against a clean
model trained with the same recipe), ``{ image = PATH, mask = PATH, target = T }`` (a
user's additive trigger image; ``mask`` a ``.npy`` of replaced pixels), ``{ manifest =
PATH }`` (an attack saved by ``ibau poison``), ``{ multi = [spec, ...] }`` (several
triggers, each with its own target), ``{ all_to_all = spec }`` (that trigger, y -> y+1).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..attacks import Trigger
from ..attacks._common import TriggerAttack
from ..attacks.base import Attack, create_attack
from .spec import SpecError, canonical

__all__ = ["ImageTrigger", "build_attack", "build_model", "model_cache_key"]


class ImageTrigger(TriggerAttack):
    """A fixed trigger read from an image file: ``clip(x * (1 - mask) + pattern)``
    (additive when there is no mask), sending every triggered image to ``target``."""

    name = "image_trigger"

    def __init__(self, *, image: str, target: int, mask: str | None = None, seed: int = 0):
        pattern = Trigger.from_image(image, mask=mask)
        super().__init__(target=target, seed=seed, image_shape=tuple(pattern.pattern.shape))
        self.image, self.mask = str(image), mask
        self._trigger = pattern


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def describe_attack(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with every file replaced by its content hash (for cache keys)."""
    out = {}
    for k, v in spec.items():
        if k in ("image", "mask", "manifest") and isinstance(v, str):
            out[k] = _file_digest(v)
        elif isinstance(v, dict):
            out[k] = describe_attack(v)
        elif isinstance(v, list):
            out[k] = [describe_attack(s) if isinstance(s, dict) else s for s in v]
        else:
            out[k] = v
    return out


def build_attack(spec: dict[str, Any], *, x: Tensor, num_classes: int, model_for: Any = None,
                 y: Tensor | None = None) -> Attack:
    """An attack ready to apply to images shaped like ``x``.

    ``model_for()`` returns the model that model-dependent triggers are optimised
    against (called only when needed). Attacks that pick images by label in ``prepare``
    (``needs_labels``: the hidden trigger's clean-label poisons) get ``y``, the labels of
    ``x``.
    """
    spec = dict(spec)
    if "manifest" in spec:
        from ..attacks.manifest import load_manifest

        return load_manifest(spec["manifest"])[0]
    if "multi" in spec:
        from ..attacks.multi import MultiTrigger

        parts = [build_attack(s, x=x, num_classes=num_classes, model_for=model_for, y=y) for s in spec["multi"]]
        return MultiTrigger([(a, a.target) for a in parts], seed=spec.get("seed", 0))
    if "all_to_all" in spec:
        from ..attacks.all_to_all import AllToAll

        inner = build_attack(spec["all_to_all"], x=x, num_classes=num_classes, model_for=model_for, y=y)
        return AllToAll(num_classes=num_classes, trigger=inner, image_shape=tuple(x.shape[1:]))
    if "image" in spec:
        return ImageTrigger(image=spec["image"], mask=spec.get("mask"), target=int(spec["target"]),
                            seed=spec.get("seed", 0))
    if "name" not in spec:
        raise SpecError(f"attack spec needs one of name, image, manifest, multi, all_to_all: {spec}")
    name = spec.pop("name")
    if name == "all_to_all":
        spec.setdefault("num_classes", num_classes)
    if "image_shape" not in spec:
        import inspect

        from ..attacks.base import ATTACKS

        if name in ATTACKS and "image_shape" in inspect.signature(ATTACKS[name].__init__).parameters:
            spec["image_shape"] = list(x.shape[1:])
    attack = create_attack(name, **spec)
    if getattr(attack, "needs_model", False):
        if model_for is None:
            raise SpecError(f"attack {name} optimises its trigger against a model; give the model a 'train' recipe")
        if getattr(attack, "needs_labels", False):
            if y is None:
                raise SpecError(f"attack {name} picks its images by label; it can only be built for a 'train' recipe")
            return attack.prepare(model_for(), x, y)
        return attack.prepare(model_for(), x)
    return attack.prepare(None, x)


def build_model(entry: dict[str, Any], num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from ..models import create

    args = dict(entry.get("arch_args", {}))
    arch = entry.get("arch", "small_vgg")
    if arch == "small_vgg":
        args.setdefault("in_channels", in_channels)
        args.setdefault("image_size", image_size)
    else:
        args.setdefault("in_channels", in_channels)
    return create(arch, num_classes=num_classes, **args)


def model_cache_key(entry: dict[str, Any], dataset: str) -> str:
    """Content hash of a trained model's recipe (architecture, attack, poisoning, training)."""
    recipe = {"dataset": dataset, "arch": entry.get("arch", "small_vgg"), "arch_args": entry.get("arch_args", {}),
              "train": {**entry["train"], "attack": describe_attack(entry["train"]["attack"])}}
    return hashlib.sha256(canonical(recipe).encode()).hexdigest()[:16]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock (POSIX ``flock``; a no-op where unavailable) so that two worker
    processes needing the same model train it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def trained_model(entry: dict[str, Any], dataset: str, data_dir: str | None, cache: Path, device: torch.device,
                  num_classes: int, seed_default: int = 0, progress: bool = False) -> tuple[nn.Module, Attack, dict]:
    """Train (or load from the cache) the poisoned model an entry describes; ``attack = { clean = true }``
    trains a clean model of the recipe, returned with ``None`` for the attack."""
    from ..io import load_weights, save_weights, write_json
    from ..poisoning import subset
    from . import data as bdata

    recipe = entry["train"]
    key = model_cache_key(entry, dataset)
    folder = cache / "bench-models"
    wpath, info_path = folder / f"{key}.safetensors", folder / f"{key}.json"
    tr = bdata.load(dataset, data_dir, "train")
    seed = int(recipe.get("seed", seed_default))
    x, y = subset(tr["x"], tr["y"], recipe.get("size"), seed)
    shape = tuple(x.shape[1:])

    def fresh() -> nn.Module:
        torch.manual_seed(seed)
        return build_model(entry, num_classes, shape[0], shape[-1]).to(device)

    def clean_model() -> nn.Module:
        # model-dependent triggers are optimised against a clean model of the same recipe
        clean_entry = {**entry, "train": {**recipe, "attack": {"clean": True}}}
        ckey = model_cache_key(clean_entry, dataset)
        cpath = folder / f"{ckey}.safetensors"
        with file_lock(folder / f"{ckey}.lock"):
            m = fresh()
            if cpath.exists():
                return load_weights(m, cpath).eval()
            from ..train import train

            train(m, (x, y), _config(recipe, seed), progress=progress, desc="training (clean reference)")
            save_weights(m, cpath, force=True)
            return m.eval()

    if recipe["attack"].get("clean"):  # a clean model of the recipe (e.g. for the scan's zoo): no attack
        return clean_model(), None, {"cache_key": model_cache_key({**entry, "train": {**recipe, "attack": {"clean": True}}},
                                                                  dataset), "clean": True}
    manifest = folder / f"{key}.attack.json"
    with file_lock(folder / f"{key}.lock"):
        model = fresh()
        if wpath.exists():
            if manifest.exists():  # a generated trigger: reuse it, do not optimise it again
                from ..attacks.manifest import load_manifest

                attack = load_manifest(manifest)[0]
            else:
                attack = build_attack(recipe["attack"], x=x, num_classes=num_classes)
            return load_weights(model, wpath).eval(), attack, {"cache_key": key, "cached": True}
        attack = build_attack(recipe["attack"], x=x, num_classes=num_classes, model_for=clean_model, y=y)
        if getattr(attack, "needs_model", False):
            from ..attacks.manifest import save_manifest

            save_manifest(attack, manifest, force=True)
        from ..poisoning import poison_and_train

        ckpt = folder / f"{key}.ckpt"
        record = poison_and_train(model, x, y, attack, ratio=float(recipe.get("ratio", 0.2)), config=_config(recipe, seed),
                                  seed=seed, checkpoint=ckpt, progress=progress)
        save_weights(model, wpath, force=True)
        write_json({"recipe": entry, "dataset": dataset, **record}, info_path, force=True)
        return model.eval(), attack, {"cache_key": key, "cached": False, "train_record": record}


def _config(recipe: dict[str, Any], seed: int):
    from ..train import TrainConfig

    return TrainConfig(epochs=int(recipe.get("epochs", 50)), batch_size=int(recipe.get("batch_size", 128)),
                       lr=float(recipe.get("lr", 1e-3)), seed=seed)


def load_model(entry: dict[str, Any], dataset: str, data_dir: str | None, cache: Path, device: torch.device,
               num_classes: int, x_like: Tensor, progress: bool = False) -> tuple[nn.Module, Attack, dict]:
    """The poisoned model and attack of a cell's model entry (weights file or recipe)."""
    from ..io import load_weights

    if "train" in entry:
        return trained_model(entry, dataset, data_dir, cache, device, num_classes, progress=progress)
    if "weights" not in entry:
        raise SpecError(f"model {entry.get('name')!r} needs 'weights' or 'train'")
    wpath = Path(entry["weights"])
    if not wpath.exists():
        hint = entry.get("requires", "")
        raise FileNotFoundError(f"weights not found: {wpath}" + (f" ({hint})" if hint else ""))
    model = build_model(entry, num_classes, x_like.shape[1], x_like.shape[-1])
    load_weights(model, wpath)
    attack = build_attack(entry["attack"], x=x_like, num_classes=num_classes)
    return model.to(device).eval(), attack, {"weights": str(wpath), "weights_sha256": _file_digest(str(wpath))}

