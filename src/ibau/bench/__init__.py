"""Reproduce the paper's evaluation: experiments declared as data, expanded into cells,
run with resume, reported from the JSON results.

    >>> from ibau.bench import load_experiment, expand, run_grid
    >>> exp = load_experiment("benchmarks/configs/table1.toml")
    >>> run_grid(expand(exp, "cpu"), results="benchmarks/results/grid", cache="benchmarks/cache",
    ...          data_dir="../shared/data", workers=2)

The command line: ``ibau bench run|list|report CONFIG... --profile cpu`` (``ibau bench --help``).
"""

from .runner import GridSummary, cell_path, finished, run_cell, run_grid
from .spec import Cell, Experiment, SpecError, expand, is_common_file, load_experiment

__all__ = ["Cell", "Experiment", "SpecError", "GridSummary", "is_common_file", "expand", "load_experiment", "run_grid", "run_cell",
           "cell_path", "finished", "load_results"]


def load_results(results, experiment: str | None = None) -> list[dict]:
    """Every finished cell record under ``results`` (optionally of one experiment)."""
    import json
    from pathlib import Path

    root = Path(results)
    folders = [root / experiment] if experiment else sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []
    out = []
    for folder in folders:
        for f in sorted(folder.glob("*.json")):
            if f.name.endswith(".error.json"):
                continue
            rec = json.loads(f.read_text())
            if rec.get("status") == "ok":
                out.append(rec)
    return out
