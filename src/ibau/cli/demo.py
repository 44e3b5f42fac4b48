"""``ibau demo``: poison a small model on scikit-learn's bundled digits, then remove the backdoor."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import INT, command, defaults_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..demo import run_demo

    defaults = defaults_of(run_demo)
    p.add_argument("--seed", type=INT, default=defaults["seed"],
                   help=f"seed of the split, poisoning, training and I-BAU (default: {defaults['seed']})")
    p.add_argument("--out-dir", type=Path, default=Path(defaults["out_dir"]),
                   help=f"where the report and models go (default: ./{defaults['out_dir']})")
    p.add_argument("--force", action="store_true", help="replace an existing --out-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("demo", "poison a small model on scikit-learn's bundled digits, then remove the backdoor (no download)",
         add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.out_dir, seed=args.seed, force=args.force, progress=not args.quiet)
    return 0
