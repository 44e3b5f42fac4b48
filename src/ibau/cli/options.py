"""What the command modules share: the command registry, a parser that reports errors as
one line, and the option groups (model, data, outputs, run, I-BAU settings) whose
defaults are read from the library's signatures."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..jobs.commands import defaults_of
from ..registry import Registry

__all__ = ["COMMANDS", "Command", "command", "CommandLineError", "build_parser", "model_options", "data_options",
           "run_options", "defaults_of", "ibau_options", "ibau_settings", "model_source", "data_source", "parse_key_values",
           "finish", "log_of", "IBAU_OPTIONS"]


class CommandLineError(Exception):
    """An option the parser cannot read (printed as one line, exit status 2)."""


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: name -> Command; ``ibau NAME --help`` lists its options
COMMANDS: Registry[Command] = Registry("command")


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> exit status`` as the command ``name``."""

    def deco(run: Callable[[argparse.Namespace], int]):
        COMMANDS.register(name)(Command(name, help, add_arguments, run))
        return run

    return deco


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (one line from :func:`ibau.cli.main`) instead of
    a usage block and ``ibau unlearn: error:``."""

    def error(self, message: str):  # noqa: D401
        raise CommandLineError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="ibau", description="Implicit Backdoor Adversarial Unlearning (I-BAU).")
    parser.add_argument("--version", action="version", version=f"ibau {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, cmd in COMMANDS.items():
        cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def _number(kind: type) -> Callable[[str], Any]:
    """A parser type that reads ``kind`` and leaves the range checks to the library
    (which names the parameter), but refuses text that is not a number at all."""

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


INT, FLOAT = _number(int), _number(float)


def _yes_no(text: str) -> bool:
    """An on/off option's value: yes/no (also true/false, on/off, 1/0)."""
    word = text.strip().lower()
    if word in ("yes", "true", "on", "1"):
        return True
    if word in ("no", "false", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def optional_float(text: str) -> float | None:
    if text.strip().lower() in ("none", "best-effort"):
        return None
    return FLOAT(text)


def model_options(p, *, weights_required: bool = True, model_required: bool = True) -> None:
    """--arch | --model-def, --num-classes, --weights, --normalize."""
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group(required=model_required)
    src.add_argument("--arch", help="a model of the registry (ibau.models.available())")
    src.add_argument("--model-def", metavar="PATH.py:FACTORY",
                     help="your architecture: FACTORY() (or FACTORY(num_classes=N)) returns an nn.Module")
    g.add_argument("--num-classes", type=INT, help="classes of the model (default for --arch: from the data)")
    g.add_argument("--weights", type=Path, required=weights_required,
                   help=".safetensors, or a PyTorch state dict file (opened with weights_only=True only)")
    g.add_argument("--normalize", metavar="MEAN,MEAN,MEAN/STD,STD,STD",
                   help="the model expects (x - mean) / std; perturbations and triggers stay in [0, 1] pixel space")


def data_options(p, *, split: str | None = "test", holdout: float | None = 0.1, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required,
                   help="a .npz (x, y), a folder of class sub-folders, or a dataset name (cifar10, gtsrb) with --data-dir")
    g.add_argument("--data-dir", type=Path, help="where the files of a named dataset are")
    g.add_argument("--split", default=split, choices=("train", "test"),
                   help=f"split of a named dataset (default: {split or 'the method`s'})")
    if holdout is not None:
        g.add_argument("--holdout", type=FLOAT, default=holdout,
                       help=f"fraction (or count, if >= 1) held out to measure accuracy (default: {holdout})")


def run_options(p, *, seed_help: str = "seed of every random draw (default: 0)") -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=INT, default=0, help=seed_help)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: a GPU if there is one)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


# IBAU settings exposed as options (the rest are set by the command itself).
IBAU_OPTIONS = ("norm_bound", "batch_size", "outer_lr", "outer_optimizer", "outer_target", "inner_lr", "inner_reg",
                "inner_optimizer", "inner_projection", "fp_step", "hypergrad_iters", "hypergrad_solver",
                "perturb_fraction", "recovery_passes", "recovery_min_steps", "fp_batch", "precision", "inner_precision",
                "reversed_fraction", "recovery_target", "amplify_steps", "recovery_smoothing", "recovery_schedule",
                "recovery_average", "relative_lr", "flagged_mass",
                "excess_share",
                "stamp_classes", "stop_unmoved", "guard_drop", "guard_retries",
                "freeze_batchnorm")


def ibau_options(p) -> None:
    """One option per I-BAU setting, its default shown from :class:`ibau.IBAU`'s signature."""
    from ..defenses.ibau import (FLAGGED_MASS, INNER_PROJECTIONS, OPTIMIZERS, OUTER_TARGETS, RECOVERY_SCHEDULES,
                                 RECOVERY_TARGETS, STAMP_CLASSES, IBAU)
    from ..hypergrad import SOLVERS
    from ..precision import PRECISIONS

    g = p.add_argument_group("I-BAU settings (defaults: the default recipe's; --recipe paper: the paper's; "
                             "see help(ibau.IBAU))")
    params = inspect.signature(IBAU.__init__).parameters
    choices = {"outer_optimizer": sorted(OPTIMIZERS), "inner_optimizer": sorted(OPTIMIZERS),
               "hypergrad_solver": sorted(SOLVERS), "outer_target": list(OUTER_TARGETS),
               "inner_projection": list(INNER_PROJECTIONS), "precision": list(PRECISIONS),
               "inner_precision": list(PRECISIONS), "recovery_target": list(RECOVERY_TARGETS),
               "flagged_mass": list(FLAGGED_MASS), "stamp_classes": list(STAMP_CLASSES),
               "recovery_schedule": list(RECOVERY_SCHEDULES)}
    for name in IBAU_OPTIONS:
        default = params[name].default
        if name == "norm_bound":
            kind, shown = optional_float, "10 for 3x32x32 images, scaled to other sizes as 10*sqrt(C*H*W/3072)"
        elif name == "guard_drop":
            kind, shown = optional_float, "none: no guard" if default is None else f"{default}: {100 * default:g} points"
        elif name == "relative_lr":
            kind, shown = optional_float, "none: --outer-lr for every tensor"
        elif name == "inner_precision":
            kind, shown = str, "as --precision"
        elif isinstance(default, bool):
            kind, shown = _yes_no, "yes" if default else "no"
        elif name == "fp_batch":
            kind, shown = INT, f"{default} images of the first batch" if default else "the whole first batch"
        else:
            kind = str if name in choices else (INT if isinstance(default, int) else FLOAT)
            shown = default
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS, choices=choices.get(name),
                       metavar=None if name in choices else "yes|no" if isinstance(default, bool) else name.upper(),
                       help=f"(default: {shown})")


def ibau_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in IBAU_OPTIONS if hasattr(args, k)}


def model_source(args: argparse.Namespace):
    from ..jobs import ModelSource

    return ModelSource(arch=args.arch, model_def=args.model_def, num_classes=args.num_classes,
                       weights=args.weights, normalize=getattr(args, "normalize", None))


def data_source(args: argparse.Namespace, split: str | None = None, spec: str | None = None):
    from ..jobs import DataSource

    return DataSource(spec=args.data if spec is None else spec, data_dir=args.data_dir,
                      split=split or args.split or "test")


def parse_key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` items; values read as Python literals where they are, else strings."""
    import ast

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CommandLineError(f"{flag} must be KEY=VALUE, got {item!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            parsed = value
        out[key.strip().replace("-", "_")] = parsed
    return out


def finish(args: argparse.Namespace, written) -> int:
    """Print a job's lines and the files it wrote; return the job's exit status (0 unless
    the job says otherwise, e.g. ``ibau scan``'s 1 for a backdoor found)."""
    for line in written.lines:
        print(line)
    for what, path in written.files.items():
        print(f"{what}: {path}")
    return written.status


def log_of(args: argparse.Namespace) -> list[Path]:
    """The list :func:`ibau.cli.main` keeps of the files a job has written (a fresh one when
    called without it), shown if the run is interrupted or fails."""
    return getattr(args, "_written", [])
