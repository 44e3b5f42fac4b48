"""``ibau bench``: run the experiment grid of the paper's tables and figures (resumable), or report it."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import INT, CommandLineError, command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["run", "list", "report", "prune"],
                   help="run: compute the missing cells; list: show the cells and which are done; "
                        "report: write the reproduction report from the JSON results; prune: delete result files "
                        "of these experiments that no profile of the files produces any more (stale settings)")
    p.add_argument("configs", nargs="+", type=Path, help="experiment files (TOML), e.g. benchmarks/configs/*.toml")
    p.add_argument("--profile", default="cpu", help="which profile of each file (default: cpu)")
    p.add_argument("--results", type=Path, default=Path("bench-results"), help="folder of per-cell JSON results")
    p.add_argument("--cache", type=Path, default=Path("bench-cache"), help="folder of trained poisoned models")
    p.add_argument("--data-dir", type=Path, help="datasets and released models (${data} in the files)")
    p.add_argument("--workers", type=INT, default=1,
                   help="parallel processes (0: run in this process); with --ray local: the local Ray instance's CPUs")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run the cells on a Ray cluster: its address (auto, ray://host:10001) or 'local' for a Ray "
                        "instance started here with --workers CPUs; needs pip install 'ibau[ray]'")
    p.add_argument("--threads", type=INT, help="torch threads per cell (default: CPUs / workers)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", nargs="*", help="run only these experiments (names)")
    p.add_argument("--defenses", nargs="*", help="run only the cells of these defenses")
    p.add_argument("--limit", type=INT, help="run at most this many cells, then stop")
    p.add_argument("--order", choices=["defense", "file"], default="defense",
                   help="defense: no-defense and I-BAU cells of every file first, slow baselines last (default)")
    p.add_argument("--out", type=Path, help="report: the markdown file (figures beside it)")
    p.add_argument("--quiet", action="store_true")


@command("bench", "reproduce the paper's tables and figures: run an experiment grid with resume, or report it",
         add_arguments)
def run(args: argparse.Namespace) -> int:
    from ..bench import SpecError, expand, finished, is_common_file, load_experiment, run_grid

    if args.workers < 0:
        raise CommandLineError("--workers must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise CommandLineError("--threads must be >= 1")
    if args.limit is not None and args.limit < 0:
        raise CommandLineError("--limit must be >= 0")
    from ..jobs.inputs import resolve_device

    resolve_device(args.device)

    try:
        exps = [load_experiment(c) for c in args.configs if not is_common_file(c)]
        if args.only:
            exps = [e for e in exps if e.name in set(args.only)]
        cells = [c for e in exps for c in expand(e, args.profile)]
        if args.defenses:
            cells = [c for c in cells if c.params.get("defense") in set(args.defenses)]
    except (SpecError, KeyError) as exc:
        raise CommandLineError(str(exc).strip("'\"")) from None
    except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong kind in a file
        raise CommandLineError(f"malformed experiment file: {type(exc).__name__}: {exc}") from None
    if args.action == "list":
        for c in cells:
            print(f"{'done' if finished(args.results, c) else 'todo'}  {c.experiment}/{c.label}  {c.key}")
        return 0
    if args.action == "prune":
        from ..bench.runner import stale_files

        for path in stale_files(exps, args.results):
            path.unlink()
            print(f"removed {path}")
        return 0
    if args.action == "report":
        from ..bench.report import write_report

        from ..jobs import Outputs

        out = args.out or args.results / "REPRODUCTION.md"
        plan = Outputs(force=True)  # a report is regenerated in place; the experiment files never are
        plan.add_inputs(args.configs, "experiment file")
        plan.add(out, "report")
        plan.check()
        write_report(exps, args.results, out, profile=args.profile)
        print(f"wrote {out}")
        return 0
    summary = run_grid(cells, results=args.results, cache=args.cache, data_dir=args.data_dir, workers=args.workers,
                       device=args.device, threads=args.threads, progress=not args.quiet, limit=args.limit,
                       order=args.order, ray=args.ray, printer=None if args.quiet else print)
    print(f"{summary.done} cells run, {summary.skipped} already finished, {summary.failed} failed "
          f"({summary.seconds:.0f} s)")
    return 1 if summary.failed else 0
