"""Experiments declared as data: a TOML file per paper table or figure, expanded into cells.

A file looks like this (``benchmarks/configs/*.toml`` hold the paper's)::

    [experiment]
    name = "table1"                  # unique; results go to RESULTS/table1/
    title = "Table 1: CIFAR-10, one trigger"
    layout = "defense_table"         # how the report renders it (ibau.bench.report)
    common = "common.toml"           # optional: [models.*] and [settings.PROFILE.DEFENSE] shared by files
    evidence_for = ["effective"]     # which of the paper's headline claims its cells test (the report's verdicts)

    [models.badnets]                 # a poisoned model the cells defend
    arch = "small_vgg"
    weights = "${data}/ibau-checkpoints/badnets_8_02_ckpt.pth"
    attack = { name = "badnets", target = 8 }

    [models.blend]                   # ... or one the runner trains (cached by content)
    arch = "small_vgg"
    train = { attack = { name = "blend", target = 1 }, ratio = 0.2, size = 5000, epochs = 6 }

    [profiles.cpu]                   # one block per profile: the grid's axes
    about = "why these sizes"
    dataset = "cifar10"
    models = ["badnets", "blend"]
    defenses = ["ibau", "nad"]
    seeds = [0]
    clean_size = 5000
    stop_asr = 0.2                   # stop a defense at its first point with ASR < 20%
    stop_max_drop = 0.1              # ... and clean accuracy down by at most 10 points (optional)
    settings.ibau = { rounds = 3 }   # per-defense keyword arguments
    axes = { "settings.ibau.norm_bound" = [0.5, 5, 10] }   # more axes: any cell key
    zip_axes = false                 # true: axes advance together instead of their product

    [paper]                          # the paper's numbers, for the report
    "badnets/ibau" = [83.35, 12.30]

Every cell is a plain dict (dataset, protocol, model, defense, settings, seed, ...).
Its key is a hash of that dict, so a finished cell is recognised by its file name and a
changed setting is a new cell.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from ..errors import InputError, check_choice

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Experiment", "Cell", "SpecError", "is_common_file", "load_experiment", "expand", "cell_key", "canonical"]

#: cell keys a profile may set (everything else in a profile is an error)
PROFILE_KEYS = {
    "about", "dataset", "models", "defenses", "seeds", "clean_size", "eval_size", "split_seed", "stop_asr",
    "settings", "axes", "zip_axes", "measures", "task", "dp_train_size", "eval_batch", "derive_from", "tsne_images",
    "clean_from", "stop_max_drop",
}

#: where a cell's clean set comes from: the test split (the paper's protocol), or training images that the
#: model (trained by the runner from a seeded subset of the training split) never saw: lossless and unseen
CLEAN_SOURCES = ("test", "train_unseen")

#: the longest cell label a result file's name keeps (:attr:`Cell.filename`): with "-", the 12-character key, ".json"
#: and the atomic write's temporary "." and ".XXXXXXXX.tmp" (32 characters in all), 255: what most file systems allow
MAX_LABEL = 223


class SpecError(InputError):
    """An experiment file that cannot be expanded (unknown key, model, profile...)."""


def canonical(obj: Any) -> str:
    """Stable JSON text (sorted keys, no spaces) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cell_key(params: dict[str, Any]) -> str:
    """The hash of what a cell computes: its ``params``, and for a defense whose settings name its
    ``"default"`` recipe, that recipe's settings as the code defines them now - a new default makes
    new cells (and the old results stale, see ``ibau bench prune``) instead of passing for finished."""
    settings = params.get("settings") or {}
    if settings.get("recipe") == "default" and params.get("defense"):
        from ..jobs.runner import defense_class

        recipes = getattr(defense_class(params["defense"]), "recipes", {})
        if "default" in recipes:
            params = {**params, "default_recipe": dict(recipes["default"])}
    return hashlib.sha256(canonical(params).encode()).hexdigest()[:12]


@dataclass
class Cell:
    """One unit of work: ``params`` fully describe it; ``key`` is their hash."""

    experiment: str
    params: dict[str, Any]
    key: str = ""
    label: str = ""

    def __post_init__(self) -> None:
        self.key = self.key or cell_key(self.params)
        if not self.label:
            p = self.params
            parts = [p.get("model", {}).get("name", "model"), p.get("defense", "none")]
            parts += [f"{k.split('.')[-1]}={v}" for k, v in sorted(p.get("axes", {}).items())]
            parts.append(f"s{p.get('seed', 0)}")
            self.label = "-".join(re.sub(r"[^A-Za-z0-9_.=]+", "_", str(s)) for s in parts)

    @property
    def filename(self) -> str:
        """``LABEL-KEY.json``; a label too long for a file name (most file systems allow 255 bytes, and
        the atomic write adds a temporary suffix) is cut to :data:`MAX_LABEL` characters: the key
        still tells the cells apart."""
        return f"{self.label[:MAX_LABEL]}-{self.key}.json"

    @property
    def error_filename(self) -> str:
        """``LABEL-KEY.error.json``, the record of a failed cell: its label cut as many characters
        shorter than :attr:`filename`'s as ".error.json" is longer than ".json", so that it fits too."""
        return f"{self.label[:MAX_LABEL - len('.error.json') + len('.json')]}-{self.key}.error.json"

    def as_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "key": self.key, "label": self.label, "params": self.params}


@dataclass
class Experiment:
    """A parsed experiment file."""

    name: str
    title: str
    layout: str
    path: Path | None
    meta: dict[str, Any]
    models: dict[str, dict[str, Any]]
    profiles: dict[str, dict[str, Any]]
    paper: dict[str, Any] = field(default_factory=dict)

    def profile(self, name: str) -> dict[str, Any]:
        try:
            return self.profiles[name]
        except KeyError:
            raise SpecError(f"{self.name}: no profile {name!r}; it has {', '.join(sorted(self.profiles))}") from None


#: experiment files larger than this are refused (they are a few KiB)
MAX_SPEC_BYTES = 1 << 20


def read_toml(path: str | Path, what: str = "experiment file") -> dict[str, Any]:
    """A TOML file as a dict; any problem (missing, too large, not UTF-8, malformed,
    nested deeper than the parser can follow) is a :class:`SpecError`."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{what} {path} is larger than {MAX_SPEC_BYTES} bytes")
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except SpecError:
        raise
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError, ValueError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise SpecError(f"cannot read {what} {path}: {detail}") from None


def is_common_file(path: str | Path) -> bool:
    """A file of shared ``[models]`` / ``[settings]`` only (no ``[experiment]``): skipped
    when a glob such as ``configs/*.toml`` picks it up with the experiment files."""
    try:
        raw = read_toml(path)
    except SpecError:
        return False
    return "experiment" not in raw and bool(set(raw) & {"models", "settings"}) and not set(raw) - {"models", "settings"}


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    raw = read_toml(path)
    try:
        return parse_experiment(raw, path)
    except SpecError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a value of the wrong kind somewhere
        raise SpecError(f"{path}: malformed experiment file ({type(exc).__name__}: {exc})") from None


def parse_experiment(raw: dict[str, Any], path: Path | None = None) -> Experiment:
    where = str(path) if path else "experiment"
    meta = raw.get("experiment")
    if not isinstance(meta, dict) or "name" not in meta:
        raise SpecError(f"{where}: needs an [experiment] table with a name")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", meta["name"]):
        raise SpecError(f"{where}: experiment name {meta['name']!r} must be letters, digits, _ or -")
    profiles = raw.get("profiles", {})
    if not profiles:
        raise SpecError(f"{where}: needs at least one [profiles.NAME] table")
    for pname, prof in profiles.items():
        unknown = sorted(set(prof) - PROFILE_KEYS)
        if unknown:
            raise SpecError(f"{where}: profile {pname!r} has unknown keys {unknown}; allowed: {sorted(PROFILE_KEYS)}")
    models: dict[str, Any] = {}
    shared_settings: dict[str, Any] = {}
    common = meta.get("common", [])
    for shared in [common] if isinstance(common, str) else common:
        # [models.*] and per-profile default settings ([settings.PROFILE.DEFENSE]) shared by several files
        shared_path = (path.parent if path else Path(".")) / shared
        doc = read_toml(shared_path, what=f"common file of {where}")
        models.update(doc.get("models", {}))
        for pname, per in doc.get("settings", {}).items():
            for d, kw in per.items():
                shared_settings.setdefault(pname, {}).setdefault(d, {}).update(kw)
    models.update(raw.get("models", {}))
    for pname, prof in profiles.items():
        merged = copy.deepcopy(shared_settings.get(pname, {}))
        for d, kw in prof.get("settings", {}).items():
            merged.setdefault(d, {}).update(kw)
        prof["settings"] = merged
    return Experiment(name=meta["name"], title=meta.get("title", meta["name"]), layout=meta.get("layout", "defense_table"),
                      path=path, meta=meta, models=models, profiles=profiles, paper=raw.get("paper", {}))


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def substitute(obj: Any, variables: dict[str, str]) -> Any:
    """``${data}`` / ``${cache}`` in strings, recursively."""
    if isinstance(obj, str):
        try:
            return string.Template(obj).substitute(variables)
        except KeyError as exc:
            raise SpecError(f"unknown variable ${{{exc.args[0]}}} in {obj!r}; known: {sorted(variables)}") from None
    if isinstance(obj, dict):
        return {k: substitute(v, variables) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, variables) for v in obj]
    return obj


def expand(exp: Experiment, profile: str) -> list[Cell]:
    """The cells of one profile: models x defenses x seeds x every axis value.

    Paths keep their ``${data}``/``${cache}`` placeholders here (so a cell's key does
    not depend on where the data lives); the runner substitutes them.
    """
    prof = copy.deepcopy(exp.profile(profile))
    if prof.get("derive_from"):
        return []  # a view over other experiments' cells (e.g. Table 6)
    models = prof.get("models", list(exp.models))
    for m in models:
        if m not in exp.models:
            raise SpecError(f"{exp.name}/{profile}: model {m!r} is not defined; defined: {sorted(exp.models)}")
    defenses = prof.get("defenses", ["ibau"])
    seeds = prof.get("seeds", [0])
    settings = prof.get("settings", {})
    axes = prof.get("axes", {})
    axis_names = sorted(axes)
    base = {
        "task": prof.get("task", "defend"),
        "dataset": prof.get("dataset", "cifar10"),
        "protocol": {"clean_size": prof.get("clean_size", 5000), "eval_size": prof.get("eval_size"),
                     "split_seed": prof.get("split_seed", 0), "eval_batch": prof.get("eval_batch", 500)},
        "stop_asr": prof.get("stop_asr"),
        "measures": sorted(prof.get("measures", [])),
    }
    for optional in ("dp_train_size", "tsne_images", "stop_max_drop"):
        if optional in prof:
            base[optional] = prof[optional]
    if "clean_from" in prof:  # only when given: the cells of older files keep their keys
        base["protocol"]["clean_from"] = check_choice("clean_from", prof["clean_from"], CLEAN_SOURCES)
    if prof.get("zip_axes"):
        lengths = {len(axes[a]) for a in axis_names}
        if len(lengths) > 1:
            raise SpecError(f"{exp.name}/{profile}: zip_axes needs axes of equal length, got {sorted(lengths)}")
        combos = list(zip(*(axes[a] for a in axis_names)))
    else:
        combos = list(itertools.product(*(axes[a] for a in axis_names)))
    cells = []
    # defense-major: a grid cut short holds every model for the first defenses
    for d, m, s in itertools.product(defenses, models, seeds):
        for values in combos:
            params = copy.deepcopy(base)
            params["model"] = {"name": m, **copy.deepcopy(exp.models[m])}
            params["defense"] = d
            params["settings"] = copy.deepcopy(settings.get(d, {})) if d != "none" else {}
            params["seed"] = s
            params["axes"] = dict(zip(axis_names, values))
            for a, v in zip(axis_names, values):
                if a.startswith("settings."):
                    head, _, rest = a.partition(".")[2].partition(".")
                    if head != d:
                        continue
                    _set_dotted(params["settings"], rest, v)
                else:
                    _set_dotted(params, a, v)
            cells.append(Cell(exp.name, params))
    return cells
