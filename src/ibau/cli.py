"""The ``ibau`` command: argument parsing only; every command calls the library.

Commands register in ``COMMANDS`` with ``@command(name, help, add_arguments)``. I-BAU's
settings become options generated from :class:`ibau.IBAU`'s signature, so defaults are
written once. Every bad input ends with a one-line ``ibau: error: ...`` and exit code 2,
and nothing is written before all inputs have been checked.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}

# IBAU settings exposed as options (the rest are set by the command itself).
IBAU_OPTIONS = ("norm_bound", "batch_size", "outer_lr", "outer_optimizer", "inner_lr", "inner_reg",
                "inner_optimizer", "fp_step", "hypergrad_iters", "hypergrad_solver", "perturb_fraction")


class UsageError(Exception):
    """A problem with the user's input; printed as one line, exit code 2."""


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def deco(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, fn)
        return fn

    return deco


# ----------------------------------------------------------------------------- helpers
def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "best-effort", "inf"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _add_ibau_options(p: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    from .defenses.ibau import IBAU, OPTIMIZERS
    from .hypergrad import SOLVERS

    g = p.add_argument_group("I-BAU settings (defaults: the paper's; see help(ibau.IBAU))")
    params = inspect.signature(IBAU.__init__).parameters
    choices = {"outer_optimizer": sorted(OPTIMIZERS), "inner_optimizer": sorted(OPTIMIZERS),
               "hypergrad_solver": sorted(SOLVERS)}
    for name in IBAU_OPTIONS:
        if name in skip:
            continue
        default = params[name].default
        kind = _optional_float if name == "norm_bound" else type(default)
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS, choices=choices.get(name),
                       metavar=None if name in choices else name.upper(),
                       help=f"(default: {default})")


def _ibau_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in IBAU_OPTIONS if hasattr(args, k)}


def _parse_normalize(text: str | None) -> tuple[list[float], list[float]] | None:
    if text is None:
        return None
    try:
        mean_s, std_s = text.split("/")
        mean = [float(v) for v in mean_s.split(",")]
        std = [float(v) for v in std_s.split(",")]
    except ValueError:
        raise UsageError(f"--normalize must look like MEAN,MEAN,MEAN/STD,STD,STD, got {text!r}") from None
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise UsageError("--normalize needs as many means as stds, and positive stds")
    return mean, std


def load_model_def(spec: str, num_classes: int | None):
    """``path.py:factory`` -> the model ``factory()`` (or ``factory(num_classes=N)``) returns."""
    import torch

    path_s, sep, name = spec.rpartition(":")
    if not sep or not path_s or not name:
        raise UsageError(f"--model-def must be PATH.py:FACTORY, got {spec!r}")
    path = Path(path_s)
    if not path.is_file():
        raise UsageError(f"model definition file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location(f"ibau_user_model_{abs(hash(path.resolve()))}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise UsageError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        found = ", ".join(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UsageError(f"{path} has no callable {name!r} (callables found: {found or 'none'})")
    try:
        model = factory(num_classes=num_classes) if num_classes is not None else factory()
    except Exception as exc:
        raise UsageError(f"{path}:{name}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{path}:{name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_model(args: argparse.Namespace, labels_max: int):
    from . import models

    if args.model_def:
        return load_model_def(args.model_def, args.num_classes)
    num_classes = args.num_classes if args.num_classes is not None else labels_max + 1
    try:
        return models.create(args.arch, num_classes=num_classes)
    except KeyError as exc:
        raise UsageError(exc.args[0] + " (or give your own with --model-def PATH.py:FACTORY)") from None


def _output_dim(model, x) -> int:
    import torch

    from .metrics import model_device

    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(x[:2].to(model_device(model)))
            model.train(was)
    except Exception as exc:
        raise UsageError(f"the model cannot process the data's images of shape {tuple(x.shape[1:])}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if out.dim() != 2:
        raise UsageError(f"the model returns shape {tuple(out.shape)}; expected logits of shape (N, classes)")
    return int(out.shape[1])


def _device(name: str | None):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but PyTorch sees no GPU here")
    return dev


def _check_new(path: Path | None, force: bool, what: str) -> None:
    if path is not None and path.exists() and not force:
        raise UsageError(f"{what} {path} exists; pass --force to overwrite it")


def _check_outputs(outputs: list[tuple[Path | None, str]], weights: Path | None, force: bool) -> None:
    """Each output is new (or ``force``), and none of them is the input weights file."""
    for path, what in outputs:
        _check_new(path, force, what)
        if weights is not None and path is not None and weights.exists() and path.exists() \
                and path.resolve() == weights.resolve():
            raise UsageError(f"{path} is the input weights file; the input is never overwritten")


# ----------------------------------------------------------------------------- unlearn
def _unlearn_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    _model_args(m, weights_required=True)
    m.add_argument("--normalize", metavar="MEAN,MEAN,MEAN/STD,STD,STD",
                   help="the model expects (x - mean) / std; the perturbation stays in [0, 1] pixel space")
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="a .npz (x, y), a folder of class sub-folders, or cifar10 / gtsrb")
    d.add_argument("--data-dir", type=Path, help="where the files of a named dataset are")
    d.add_argument("--split", default="test", choices=("train", "test"), help="split of a named dataset (default: test)")
    d.add_argument("--holdout", type=float, default=0.1,
                   help="fraction (or count, if >= 1) held out to measure accuracy and robustness (default: 0.1)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, required=True, help="sanitised weights (.safetensors)")
    o.add_argument("--report", type=Path, required=True, help="JSON report")
    o.add_argument("--report-dir", type=Path, help="also write a markdown report with plots here")
    o.add_argument("--force", action="store_true", help="overwrite existing outputs")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    r = p.add_argument_group("run")
    r.add_argument("--rounds", default="auto", help="I-BAU rounds, or 'auto' (default): until robust or no progress")
    r.add_argument("--max-rounds", type=int, default=10, help="most rounds for --rounds auto (default: 10)")
    r.add_argument("--threshold", type=float, default=0.2,
                   help="--rounds auto stops below this universal-perturbation success rate (default: 0.2)")
    r.add_argument("--robustness-bound", type=float,
                   help="l2 bound of the universal-perturbation search (default: the I-BAU bound)")
    r.add_argument("--seed", type=int, default=0, help="seed of the split, I-BAU and the robustness search")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: a GPU if there is one)")
    _add_ibau_options(p)


@command("unlearn", "remove a backdoor from a model with I-BAU, using a small clean dataset", _unlearn_args)
def unlearn_cmd(args: argparse.Namespace) -> int:
    from .data import check_dataset, load_dataset
    from .io import load_weights, save_weights, write_json
    from .report import require_matplotlib, summary, write_report_dir
    from .unlearn import unlearn

    if args.out.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors, got {args.out}")
    _check_outputs([(args.out, "output"), (args.report, "report"), (args.report_dir, "report folder")],
                   args.weights, args.force)
    if args.report_dir is not None:
        require_matplotlib()
    rounds: int | str = args.rounds
    if rounds != "auto":
        try:
            rounds = int(rounds)
            assert rounds >= 0
        except (ValueError, AssertionError):
            raise UsageError(f"--rounds must be 'auto' or a non-negative integer, got {args.rounds!r}") from None
    holdout = int(args.holdout) if args.holdout >= 1 else args.holdout
    normalize = _parse_normalize(args.normalize)
    device = _device(args.device)

    x, y = load_dataset(args.data, data_dir=args.data_dir, split=args.split)
    model = _build_model(args, int(y.max()))
    load_weights(model, args.weights)
    model.to(device)
    classes = _output_dim(model, x)
    check_dataset(x, y, num_classes=classes, min_size=3)
    n_hold = holdout if isinstance(holdout, int) else max(1, round(holdout * len(x)))
    batch = getattr(args, "batch_size", 100)
    if len(x) - n_hold < batch:
        raise UsageError(f"the clean set has {len(x) - n_hold} images after holding out {n_hold}, fewer than one "
                         f"batch ({batch}): give more data, or pass a smaller --batch-size / --holdout")

    kwargs = _ibau_kwargs(args)
    if normalize is not None:
        kwargs["normalize"] = normalize
    result = unlearn(model, x, y, holdout=holdout, rounds=rounds, max_rounds=args.max_rounds,
                     threshold=args.threshold, seed=args.seed, progress=not args.quiet,
                     robustness_bound=args.robustness_bound, **kwargs)
    report = result.report
    report["inputs"] = {"weights": str(args.weights), "data": str(args.data),
                        "model": args.arch or args.model_def, "num_classes": classes}
    if not is_main():  # torchrun: rank 0 writes
        return 0
    if args.report_dir is not None:
        write_report_dir(args.report_dir, report, {k: v.numpy() for k, v in result.artifacts.items()},
                         force=args.force)
    write_json(report, args.report, force=args.force)
    save_weights(model, args.out, force=args.force, metadata={"producer": "ibau unlearn"})
    print(summary(report))
    print(f"sanitised weights: {args.out}\nreport: {args.report}"
          + (f"\nmarkdown report: {args.report_dir / 'report.md'}" if args.report_dir else ""))
    return 0


# ----------------------------------------------------------------------------- defend
def _defend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="a defense of the registry (see --list)")
    p.add_argument("--list", action="store_true", help="list the defenses and their settings, then exit")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a setting of the method (repeatable), e.g. --param epochs=10")
    m = p.add_argument_group("model")
    _model_args(m, weights_required=False, required=False)
    m.add_argument("--weights", type=Path,
                   help=".safetensors or PyTorch state dict (weights_only=True); DP-SGD trains from scratch without")
    m.add_argument("--normalize", metavar="MEAN,MEAN,MEAN/STD,STD,STD",
                   help="the model expects (x - mean) / std (methods that synthesise in pixel space)")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="the clean set (the training set for dp): .npz, image folder, or cifar10 / gtsrb")
    d.add_argument("--data-dir", type=Path, help="where the files of a named dataset are")
    d.add_argument("--split", default=None, choices=("train", "test"),
                   help="split of a named dataset (default: test; train for dp)")
    d.add_argument("--holdout", type=float, default=0.1,
                   help="fraction (or count, if >= 1) held out to measure accuracy (default: 0.1)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="repaired weights (.safetensors)")
    o.add_argument("--report", type=Path, help="JSON report (tensors such as reversed triggers go to REPORT.npz)")
    o.add_argument("--force", action="store_true", help="overwrite existing outputs")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: a GPU if there is one)")


def _list_defenses() -> str:
    from .defend import settings_of
    from .defenses import DEFENSES

    lines = []
    for name, cls in DEFENSES.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"{name}  ({'training set' if cls.data_role == 'training' else 'clean set'})  {doc}")
        for key, default in settings_of(cls).items():
            lines.append(f"    {key} = {default!r}")
    return "\n".join(lines)


@command("defend", "run any defense of the registry (I-BAU, Neural Cleanse, TABOR, DeepInspect, Fine-pruning, NAD, "
         "DP-SGD, the naive UAP heuristic) on a model", _defend_args)
def defend_cmd(args: argparse.Namespace) -> int:
    from .defend import check_settings, defend
    from .defenses import DEFENSES
    from .io import atomic_write, load_weights, save_weights, write_json

    if args.list:
        print(_list_defenses())
        return 0
    missing = [flag for flag, val in (("--method", args.method), ("--data", args.data), ("--out", args.out),
                                      ("--report", args.report)) if val is None]
    if args.arch is None and args.model_def is None:
        missing.append("--arch or --model-def")
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (see ibau defend --help; --list shows the methods)")
    cls = DEFENSES.get(args.method)
    if cls is None:
        raise UsageError(f"unknown defense {args.method!r}; known: {', '.join(sorted(DEFENSES))}")
    if args.weights is None and cls.data_role != "training":
        raise UsageError(f"--weights is required for {args.method} (it repairs a trained model)")
    if args.out.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors, got {args.out}")
    artifacts_path = args.report.with_suffix(".npz")
    _check_outputs([(args.out, "output"), (args.report, "report"), (artifacts_path, "artifacts file")],
                   args.weights, args.force)
    params = _parse_options(args.param, flag="--param")
    try:  # before loading anything
        known = check_settings(cls, params)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    normalize = _parse_normalize(args.normalize)
    if normalize is not None:
        if "normalize" not in known:
            raise UsageError(f"{args.method} does not take --normalize")
        params["normalize"] = normalize
    holdout = int(args.holdout) if args.holdout >= 1 else args.holdout
    device = _device(args.device)
    split = args.split or ("train" if cls.data_role == "training" else "test")

    from .data import check_dataset, load_dataset

    x, y = load_dataset(args.data, data_dir=args.data_dir, split=split)
    model = _build_model(args, int(y.max()))
    if args.weights is not None:
        load_weights(model, args.weights)
    model.to(device)
    classes = _output_dim(model, x)
    check_dataset(x, y, num_classes=classes, min_size=3)
    try:
        result = defend(model, x, y, args.method, holdout=holdout, seed=args.seed, progress=not args.quiet, **params)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{args.method}: {exc}") from None
    report = result.report
    report["inputs"] = {"weights": str(args.weights) if args.weights else None, "data": str(args.data),
                        "model": args.arch or args.model_def, "num_classes": classes}
    if not is_main():  # torchrun: rank 0 writes
        return 0
    if result.artifacts:
        import numpy as np

        arrays = {k: v.numpy() for k, v in result.artifacts.items()}

        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        atomic_write(artifacts_path, write_npz, force=args.force)
        report["artifacts"] = {"file": artifacts_path.name, "arrays": sorted(arrays)}
    write_json(report, args.report, force=args.force)
    save_weights(result.model, args.out, force=args.force,
                 metadata={"producer": f"ibau defend --method {args.method}"})
    acc0, acc1 = report["clean_accuracy_before"], report["clean_accuracy_after"]
    print(f"{args.method}: held-out clean accuracy {100 * acc0:.2f}% -> {100 * acc1:.2f}% "
          f"({report['holdout_size']} images), {report['seconds_defense']:.1f} s; {report['stop_reason']}")
    scan = report["extras"].get("scan")
    if scan:
        idx = ", ".join(f"{c}:{a:.2f}" for c, a in enumerate(scan["anomaly_index"]))
        print(f"anomaly index per class: {idx}; flagged: {scan['flagged'] or 'none'}")
    for w in report["warnings"]:
        print(f"warning: {w}")
    print(f"weights: {args.out}\nreport: {args.report}" + (f"\nartifacts: {artifacts_path}" if result.artifacts else ""))
    return 0


# ----------------------------------------------------------------------------- poison / evaluate
def _parse_options(items: list[str] | None, flag: str = "--attack-option") -> dict[str, Any]:
    import ast

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} must be KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.replace("-", "_")] = value
    return out


def _model_args(p, *, weights_required: bool, required: bool = True) -> None:
    """--arch | --model-def, --num-classes and (optionally) --weights, on a parser or group."""
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--arch", help="a model of the registry (ibau.models.available())")
    src.add_argument("--model-def", metavar="PATH.py:FACTORY",
                     help="your architecture: FACTORY() (or FACTORY(num_classes=N)) returns an nn.Module")
    p.add_argument("--num-classes", type=int, help="classes of the model (default for --arch: from the data)")
    if weights_required:
        p.add_argument("--weights", type=Path, required=True,
                       help=".safetensors, or a PyTorch state dict file (opened with weights_only=True only)")


def _poison_args(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    defaults = TrainConfig()
    _model_args(p, weights_required=False)
    p.add_argument("--data", required=True, help="training data: .npz, image folder, or cifar10 / gtsrb")
    p.add_argument("--data-dir", type=Path, help="where the files of a named dataset are")
    p.add_argument("--split", default="train", choices=("train", "test"), help="(default: train)")
    p.add_argument("--subset", type=int, help="train on a seeded random subset of this many images")
    p.add_argument("--eval-data", help="data to measure ACC/ASR on (default: the test split of a named dataset)")
    p.add_argument("--attack", required=True, help="an attack of the registry (ibau.attacks.ATTACKS)")
    p.add_argument("--target", type=int, help="target class (default: the attack's paper setting)")
    p.add_argument("--attack-option", action="append", metavar="KEY=VALUE", help="other attack settings")
    p.add_argument("--ratio", type=float, default=0.2, help="poisoned share of the training set (default: 0.2)")
    p.add_argument("--trigger-weights", type=Path,
                   help="for triggers generated against a model: that model's weights (default: train a clean "
                        "model with the same recipe for --trigger-epochs)")
    p.add_argument("--trigger-epochs", type=int, default=10, help="(default: 10)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help=f"(default: {defaults.epochs})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"(default: {defaults.batch_size})")
    p.add_argument("--lr", type=float, default=defaults.lr, help=f"(default: {defaults.lr})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: a GPU if there is one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="poisoned weights (.safetensors); the manifest goes beside it")
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")


@command("poison", "train a poisoned model: data + model + attack -> weights, attack manifest, ACC/ASR", _poison_args)
def poison_cmd(args: argparse.Namespace) -> int:
    from .attacks import create_attack
    from .attacks.manifest import save_manifest
    from .data import check_dataset, load_dataset
    from .io import load_weights, save_weights, write_json
    from .poisoning import default_checkpoint, poison_and_train, subset
    from .train import TrainConfig, train

    if args.out.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors, got {args.out}")
    manifest_path = args.out.with_name(args.out.stem + ".attack.json")
    metrics_path = args.out.with_name(args.out.stem + ".metrics.json")
    for path in (args.out, manifest_path, metrics_path):
        _check_new(path, args.force, "output")
    options = _parse_options(args.attack_option)
    if args.target is not None:
        options["target"] = args.target
    from .attacks import ATTACKS

    cls = ATTACKS.get(args.attack)
    if cls is not None and "seed" in inspect.signature(cls.__init__).parameters:
        options.setdefault("seed", args.seed)
    try:
        attack = create_attack(args.attack, **options)
    except KeyError as exc:
        raise UsageError(exc.args[0]) from None
    except TypeError as exc:
        raise UsageError(f"bad option for attack {args.attack!r}: {exc}") from None
    x, y = load_dataset(args.data, data_dir=args.data_dir, split=args.split)
    x, y = subset(x, y, args.subset, args.seed)
    eval_spec = args.eval_data or (args.data if args.data in ("cifar10", "gtsrb") else None)
    eval_data = load_dataset(eval_spec, data_dir=args.data_dir, split="test") if eval_spec else None
    model = _build_model(args, int(y.max())).to(_device(args.device))
    check_dataset(x, y, num_classes=_output_dim(model, x))
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    if getattr(attack, "needs_model", False) or any(getattr(a, "needs_model", False)
                                                    for a in getattr(attack, "attacks", [])):
        ref = _build_model(args, int(y.max())).to(_device(args.device))
        if args.trigger_weights:
            load_weights(ref, args.trigger_weights)
        else:
            train(ref, (x, y), TrainConfig(args.trigger_epochs, args.batch_size, args.lr, args.seed + 1),
                  progress=not args.quiet, desc="clean model for the trigger")
        attack.prepare(ref.eval(), x, y)
    else:
        try:  # fits shape-dependent triggers (patch position, warping field, picture) to the data's images
            attack.prepare(None, x, y)
        except ValueError as exc:
            raise UsageError(f"attack {args.attack!r} cannot be used on these images: {exc}") from None
    record = poison_and_train(model, x, y, attack, ratio=args.ratio, config=config, seed=args.seed,
                              checkpoint=default_checkpoint(args.out), progress=not args.quiet, eval_data=eval_data)
    if not is_main():  # torchrun: rank 0 writes
        return 0
    save_weights(model, args.out, force=args.force, metadata={"producer": "ibau poison"})
    save_manifest(attack, manifest_path, extra={"weights": args.out.name, "data": str(args.data),
                                                "training": record}, force=args.force)
    write_json(record, metrics_path)
    m = record.get("metrics")
    line = f"poisoned {record['poisoned']} of {record['training_size']} training images with {attack.name}"
    if m:
        line += f"; ACC {100 * m['acc']:.2f}%, ASR {100 * m['asr']:.2f}%"
    print(line + f"\nweights: {args.out}\nmanifest: {manifest_path}")
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _model_args(p, weights_required=True)
    p.add_argument("--manifest", type=Path, required=True, help="the attack manifest written by ibau poison")
    p.add_argument("--data", required=True, help="test data: .npz, image folder, or cifar10 / gtsrb")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--json", type=Path, help="write the metrics here (default: print them)")
    p.add_argument("--device", default="auto")


@command("evaluate", "clean accuracy, attack success rate and robust accuracy of a model under an attack",
         _evaluate_args)
def evaluate_cmd(args: argparse.Namespace) -> int:
    import json

    from .attacks.manifest import ManifestError, load_manifest
    from .data import check_dataset, load_dataset
    from .io import load_weights, write_json
    from .poisoning import evaluate_attack

    try:
        attack, _ = load_manifest(args.manifest)
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    x, y = load_dataset(args.data, data_dir=args.data_dir, split=args.split)
    model = _build_model(args, int(y.max()))
    load_weights(model, args.weights)
    model.to(_device(args.device)).eval()
    check_dataset(x, y, num_classes=_output_dim(model, x))
    metrics = evaluate_attack(model, attack, x, y)
    result = {"weights": str(args.weights), "manifest": str(args.manifest), "data": str(args.data),
              "images": len(x), **metrics}
    if args.json:
        write_json(result, args.json)
    else:
        print(json.dumps(result, indent=2))
    print(f"ACC {100 * metrics['acc']:.2f}%  ASR {100 * metrics['asr']:.2f}%"
          + (f"  RA {100 * metrics['ra']:.2f}%" if "ra" in metrics else "") + f"  ({len(x)} images)")
    return 0


# ----------------------------------------------------------------------------- demo
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the split, poisoning, training and I-BAU (default: 0)")
    p.add_argument("--out-dir", type=Path, default=Path("ibau-demo"),
                   help="where the report and models go (default: ./ibau-demo)")
    p.add_argument("--force", action="store_true", help="replace an existing --out-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("demo", "poison a small model on scikit-learn's bundled digits, then remove the backdoor (no download)",
         _demo_args)
def demo_cmd(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out_dir, seed=args.seed, force=args.force, progress=not args.quiet)
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["run", "list", "report", "prune"],
                   help="run: compute the missing cells; list: show the cells and which are done; "
                        "report: write the reproduction report from the JSON results; prune: delete result files "
                        "of these experiments that no profile of the files produces any more (stale settings)")
    p.add_argument("configs", nargs="+", type=Path, help="experiment files (TOML), e.g. benchmarks/configs/*.toml")
    p.add_argument("--profile", default="cpu", help="which profile of each file (default: cpu)")
    p.add_argument("--results", type=Path, default=Path("bench-results"), help="folder of per-cell JSON results")
    p.add_argument("--cache", type=Path, default=Path("bench-cache"), help="folder of trained poisoned models")
    p.add_argument("--data-dir", type=Path, help="datasets and released models (${data} in the files)")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel processes (0: run in this process); with --ray local: the local Ray instance's CPUs")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run the cells on a Ray cluster: its address (auto, ray://host:10001) or 'local' for a Ray "
                        "instance started here with --workers CPUs; needs pip install 'ibau[ray]'")
    p.add_argument("--threads", type=int, help="torch threads per cell (default: CPUs / workers)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", nargs="*", help="run only these experiments (names)")
    p.add_argument("--defenses", nargs="*", help="run only the cells of these defenses")
    p.add_argument("--limit", type=int, help="run at most this many cells, then stop")
    p.add_argument("--order", choices=["defense", "file"], default="defense",
                   help="defense: no-defense and I-BAU cells of every file first, slow baselines last (default)")
    p.add_argument("--out", type=Path, help="report: the markdown file (figures beside it)")
    p.add_argument("--quiet", action="store_true")


@command("bench", "reproduce the paper's tables and figures: run an experiment grid with resume, or report it",
         _bench_args)
def bench_cmd(args: argparse.Namespace) -> int:
    from .bench import SpecError, expand, finished, is_common_file, load_experiment, run_grid

    try:
        exps = [load_experiment(c) for c in args.configs if not is_common_file(c)]
        if args.only:
            exps = [e for e in exps if e.name in set(args.only)]
        cells = [c for e in exps for c in expand(e, args.profile)]
        if args.defenses:
            cells = [c for c in cells if c.params.get("defense") in set(args.defenses)]
    except (SpecError, KeyError) as exc:
        raise UsageError(str(exc).strip("'\"")) from None
    if args.workers < 0:
        raise UsageError("--workers must be >= 0")
    if args.action == "list":
        for c in cells:
            print(f"{'done' if finished(args.results, c) else 'todo'}  {c.experiment}/{c.label}  {c.key}")
        return 0
    if args.action == "prune":
        from .bench.runner import stale_files

        for path in stale_files(exps, args.results):
            path.unlink()
            print(f"removed {path}")
        return 0
    if args.action == "report":
        from .bench.report import write_report

        out = args.out or args.results / "REPRODUCTION.md"
        write_report(exps, args.results, out, profile=args.profile)
        print(f"wrote {out}")
        return 0
    summary = run_grid(cells, results=args.results, cache=args.cache, data_dir=args.data_dir, workers=args.workers,
                       device=args.device, threads=args.threads, progress=not args.quiet, limit=args.limit,
                       order=args.order, ray=args.ray, printer=None if args.quiet else print)
    print(f"{summary.done} cells run, {summary.skipped} already finished, {summary.failed} failed "
          f"({summary.seconds:.0f} s)")
    return 1 if summary.failed else 0


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ibau", description="Implicit Backdoor Adversarial Unlearning (I-BAU).")
    parser.add_argument("--version", action="version", version=f"ibau {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def is_main() -> bool:
    from .distributed import is_main as main_rank

    return main_rank()


def _launch(args: argparse.Namespace) -> int:
    """Run a command as one rank of a torchrun job: join the process group (gloo on CPU,
    NCCL with one GPU per rank), keep ranks other than 0 quiet, leave the group after."""
    import contextlib
    import os

    from .distributed import init_from_env, shutdown

    requested = getattr(args, "device", None)
    comm, device = init_from_env(None if requested in (None, "auto") else _device(requested))
    if hasattr(args, "device"):
        args.device = str(device)
    try:
        if comm is not None and comm.rank != 0:
            if hasattr(args, "quiet"):
                args.quiet = True
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                return COMMANDS[args.command][2](args)
        return COMMANDS[args.command][2](args)
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .distributed import launched
    from .io import WeightsError

    args = build_parser().parse_args(argv)
    try:
        if launched():  # torchrun --nproc-per-node N -m ibau ...
            return _launch(args)
        return COMMANDS[args.command][2](args)
    except (UsageError, DataError, WeightsError, FileExistsError, ImportError) as exc:
        print(f"ibau: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ibau: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
