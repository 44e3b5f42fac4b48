"""``ibau unlearn``: remove a backdoor with I-BAU using a small clean dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (FLOAT, INT, command, data_options, data_source, defaults_of, finish, ibau_options,
                      ibau_settings, log_of, model_options, model_source, optional_float, run_options)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..jobs.commands import unlearn_job

    defaults = defaults_of(unlearn_job)
    model_options(p)
    data_options(p, holdout=defaults["holdout"])
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, required=True, help="sanitised weights (.safetensors)")
    o.add_argument("--report", type=Path, required=True, help="JSON report")
    o.add_argument("--report-dir", type=Path, help="also write a markdown report with plots here")
    o.add_argument("--force", action="store_true", help="replace existing outputs (never an input)")
    r = p.add_argument_group("rounds")
    r.add_argument("--recipe", default=defaults["recipe"], choices=("default", "paper"),
                   help="default: the measured default recipe (see README); paper: Algorithm 1 with the authors' "
                        f"settings (default: {defaults['recipe']})")
    r.add_argument("--rounds", default=defaults["rounds"],
                   help="I-BAU rounds, or 'auto': until the scan finds no backdoor (not when the recovery stamped the "
                        "scan's own reversed trigger: the rescan is blind then), the accuracy limit or --max-rounds "
                        "(default: the recipe's, 2 for default and 5 for paper)")
    r.add_argument("--max-rounds", type=INT, default=defaults["max_rounds"],
                   help="most rounds for --rounds auto (default: the recipe's, 2 for default and 5 for paper)")
    r.add_argument("--max-accuracy-drop", type=FLOAT, default=defaults["max_accuracy_drop"],
                   help="--rounds auto stops after, and never keeps, a round that lost more held-out accuracy than "
                        f"this fraction when an earlier one did not (default: {defaults['max_accuracy_drop']})")
    r.add_argument("--threshold", type=FLOAT, default=defaults["threshold"],
                   help=f"with --no-scan, --rounds auto stops below this universal-perturbation success rate "
                        f"(default: {defaults['threshold']})")
    r.add_argument("--robustness-bound", type=optional_float,
                   help="l2 bound of the universal-perturbation search (default: the I-BAU bound)")
    sc = p.add_argument_group("backdoor scan (ibau scan, before and after; --rounds auto stops when it finds none)")
    sc.add_argument("--scan", action=argparse.BooleanOptionalAction, default=defaults["scan"],
                    help="scan the model before and after unlearning (default: on); the recovery passes stamp the "
                         "triggers the scan before reverse-engineered (--reversed-fraction), none with --no-scan")
    sc.add_argument("--scan-steps", type=INT, default=argparse.SUPPRESS,
                    help="optimisation steps of each scan (default: ibau.scanning.MaskScan's)")
    sc.add_argument("--scan-prior-correction", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                    help="search with the model's class prior taken out of its logits (default: off)")
    run_options(p, seed_help="seed of the split, I-BAU, the robustness search and the scan (default: 0)")
    ibau_options(p)


def _scan_settings(args: argparse.Namespace) -> dict | None:
    """The MaskScan settings given on the command line (None: its defaults)."""
    given = {k: getattr(args, f"scan_{k}") for k in ("steps", "prior_correction") if hasattr(args, f"scan_{k}")}
    return given or None


@command("unlearn", "remove a backdoor from a model with I-BAU, using a small clean dataset", add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..jobs.commands import unlearn_job

    written = unlearn_job(model_source(args), data_source(args), out=args.out, report=args.report,
                          report_dir=args.report_dir, force=args.force, holdout=args.holdout, rounds=args.rounds,
                          max_rounds=args.max_rounds, threshold=args.threshold,
                          max_accuracy_drop=args.max_accuracy_drop, recipe=args.recipe,
                          robustness_bound=args.robustness_bound, scan=args.scan,
                          scan_settings=_scan_settings(args),
                          seed=args.seed, device=args.device,
                          progress=not args.quiet, ibau_settings=ibau_settings(args), log=log_of(args))
    return finish(args, written)
