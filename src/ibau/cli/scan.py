"""``ibau scan``: is this model backdoored? A verdict from clean images alone.

Exit status like a virus scanner: 0 no backdoor found, 1 backdoor found, 2 bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import INT, FLOAT, command, optional_float, data_options, data_source, defaults_of, finish, log_of, model_options, \
    model_source, run_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..precision import PRECISIONS
    from ..scanning import MaskScan

    d = defaults_of(MaskScan)
    model_options(p)
    data_options(p, holdout=None)
    o = p.add_argument_group("output")
    o.add_argument("--report", type=Path, help="JSON report (verdict, score, target classes, per-class statistics)")
    o.add_argument("--report-dir", type=Path,
                   help="also write the reversed trigger(s) (tensors and PNGs) and a report.md here")
    o.add_argument("--force", action="store_true", help="replace existing outputs (never an input)")
    s = p.add_argument_group("scan settings (see help(ibau.scanning.MaskScan))")
    s.add_argument("--threshold", type=FLOAT, default=argparse.SUPPRESS,
                   help="the model is flagged when the largest kept mask norm exceeds the smallest by this factor "
                        f"(default: {d['threshold']:g})")
    s.add_argument("--steps", type=INT, default=argparse.SUPPRESS,
                   help=f"optimisation steps of the trigger search (default: {d['steps']})")
    s.add_argument("--precision", default=argparse.SUPPRESS, choices=PRECISIONS,
                   help="fp32, or bf16 autocast (2-3x faster where the CPU has AMX / AVX512-BF16, or on a GPU); "
                        f"auto: bf16 where the device computes it natively (default: {d['precision']})")
    s.add_argument("--max-over-prediction", type=optional_float, default=argparse.SUPPRESS,
                   help="a class the model answers at least this many times as often as it is labelled in the "
                        f"clean images is not flagged (its bias, not a backdoor); none: no such rule "
                        f"(default: {d['max_over_prediction']:g})")
    s.add_argument("--prior-correction", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="search with the model's class prior taken out of its logits (default: off; measured in "
                        "benchmarks/results/scan_zoo.md)")
    run_options(p, seed_help="seed of the trigger search (default: 0)")


@command("scan", "tell whether a model is backdoored, from clean images alone (exit status 0: no backdoor found, "
                 "1: backdoor found, 2: bad input)", add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..jobs.commands import scan_job

    settings = {k: getattr(args, k) for k in ("threshold", "steps", "precision", "max_over_prediction", "prior_correction")
                if hasattr(args, k)}
    written = scan_job(model_source(args), data_source(args), report=args.report, report_dir=args.report_dir,
                       force=args.force, seed=args.seed, device=args.device, progress=not args.quiet,
                       settings=settings, log=log_of(args))
    return finish(args, written)
