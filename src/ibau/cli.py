"""Command line: argument parsing only; every command calls the library.

Commands register themselves in ``COMMANDS`` (name -> (help, add_arguments, run)).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def deco(fn):
        COMMANDS[name] = (help, add_arguments, fn)
        return fn

    return deco


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of data, poisoning and I-BAU (default: 0)")
    p.add_argument("--rounds", type=int, default=3, help="I-BAU rounds (default: 3)")
    p.add_argument("--report", type=Path, help="write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("demo", "poison a tiny model on generated data, then remove the backdoor with I-BAU (no download)",
         _demo_args)
def demo(args: argparse.Namespace) -> int:
    from . import IBAU
    from .data import synthetic
    from .io import write_json
    from .metrics import backdoor_metrics
    from .utils import environment

    t0 = time.perf_counter()
    model = synthetic.poisoned_model(args.seed)
    x_eval, y_eval = synthetic.make_data(600, 10_000 + args.seed)
    x_clean, y_clean = synthetic.make_data(800, 20_000 + args.seed)

    def evaluate(m):
        return backdoor_metrics(m, x_eval, y_eval, synthetic.trigger(), synthetic.TARGET)

    defense = IBAU(rounds=args.rounds, batch_size=50, outer_lr=1e-2, seed=args.seed, progress=not args.quiet)
    result = defense.fit(model, x_clean, y_clean, evaluate=evaluate)
    before, after = result.history[0], result.history[-1]
    print(f"poisoned model : clean accuracy {100 * before['acc']:.1f}%, attack success rate {100 * before['asr']:.1f}%")
    print(f"after I-BAU    : clean accuracy {100 * after['acc']:.1f}%, attack success rate {100 * after['asr']:.1f}% "
          f"({len(result.history) - 1} rounds, {result.seconds:.1f} s)")
    if args.report:
        write_json({"command": "demo", "config": defense.config(), "seed": args.seed, "history": result.history,
                    "seconds_total": time.perf_counter() - t0, "environment": environment()}, args.report)
        print(f"report: {args.report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ibau", description="Implicit Backdoor Adversarial Unlearning (I-BAU).")
    parser.add_argument("--version", action="version", version=f"ibau {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
