"""``ibau defend``: any defense of the registry on a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (CommandLineError, command, data_options, data_source, defaults_of, finish, log_of,
                      model_options, model_source, parse_key_values, run_options)


def _help() -> str:
    from ..defenses import DEFENSES

    names = ", ".join(getattr(c, "display_name", n) for n, c in DEFENSES.items())
    return f"run any defense of the registry ({names}) on a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="a defense of the registry (see --list)")
    p.add_argument("--list", action="store_true", help="list the defenses and their settings, then exit")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a setting of the method (repeatable), e.g. --param epochs=10")
    model_options(p, weights_required=False, model_required=False)
    from ..jobs.commands import defend_job

    data_options(p, split=None, required=False, holdout=defaults_of(defend_job)["holdout"])
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="repaired weights (.safetensors)")
    o.add_argument("--report", type=Path, help="JSON report (tensors such as reversed triggers go to REPORT.npz)")
    o.add_argument("--force", action="store_true", help="replace existing outputs (never an input)")
    run_options(p)


def list_defenses() -> str:
    from ..defenses import DEFENSES
    from ..jobs.runner import settings_of

    lines = []
    for name, cls in DEFENSES.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"{name}  ({'training set' if cls.data_role == 'training' else 'clean set'})  {doc}")
        for key, default in settings_of(cls).items():
            lines.append(f"    {key} = {default!r}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..jobs.commands import defend_job
    from ..jobs.runner import defense_class

    if args.list:
        print(list_defenses())
        return 0
    missing = [flag for flag, val in (("--method", args.method), ("--data", args.data), ("--out", args.out),
                                      ("--report", args.report)) if val is None]
    if args.arch is None and args.model_def is None:
        missing.append("--arch or --model-def")
    if missing:
        raise CommandLineError(f"missing {', '.join(missing)} (see ibau defend --help; --list shows the methods)")
    cls = defense_class(args.method)
    params = parse_key_values(args.param, "--param")
    split = args.split or ("train" if cls.data_role == "training" else "test")
    written = defend_job(args.method, model_source(args), data_source(args, split=split), out=args.out,
                         report=args.report, force=args.force, holdout=args.holdout, seed=args.seed,
                         device=args.device, progress=not args.quiet, settings=params, log=log_of(args))
    return finish(args, written)


command("defend", _help(), add_arguments)(run)
