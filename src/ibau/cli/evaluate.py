"""``ibau evaluate``: clean accuracy, attack success rate and robust accuracy under an attack."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import command, data_source, log_of, model_options, model_source


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_options(p)
    p.add_argument("--manifest", type=Path, required=True, help="the attack manifest written by ibau poison")
    p.add_argument("--data", required=True, help="test data: .npz, image folder, or cifar10 / gtsrb")
    p.add_argument("--data-dir", type=Path, help="where the files of a named dataset are")
    p.add_argument("--split", default="test", choices=("train", "test"), help="(default: test)")
    p.add_argument("--json", type=Path, help="write the metrics here (default: print them)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file (never an input)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


@command("evaluate", "clean accuracy, attack success rate and robust accuracy of a model under an attack",
         add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..jobs.commands import evaluate_job

    written = evaluate_job(model_source(args), data_source(args), manifest=args.manifest, json_out=args.json,
                           force=args.force, device=args.device, log=log_of(args))
    if args.json is None:
        print(json.dumps(written.report, indent=2))
    for line in written.lines:
        print(line)
    return 0
