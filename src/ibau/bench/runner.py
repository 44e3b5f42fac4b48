"""Run cells, write each result at once, resume after an interruption.

Every finished cell is one JSON file ``RESULTS/EXPERIMENT/LABEL-KEY.json`` written
atomically (config, code version, seed, metrics per point, seconds, peak memory). A
cell whose file exists is skipped, so a run that was killed and started again only
computes what is missing. A cell that fails writes ``LABEL-KEY.error.json`` instead
(tried again on the next run) and the grid goes on.

With ``workers >= 1`` every cell runs in a fresh child process (so its peak memory is
its own and a crash cannot take the grid down); ``workers = 0`` runs in this process
(tests, debugging).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..defenses import DEFENSES
from .spec import Cell, substitute

#: the order of ``order="defense"``: no defense, then the registered defenses by ``cost_order``
#: (I-BAU first, the slow trigger searches last)
DEFENSE_ORDER = ["none", *sorted(DEFENSES, key=lambda name: DEFENSES[name].cost_order)]

__all__ = ["DEFENSE_ORDER", "GridSummary", "stale_files", "cell_path", "finished", "run_cell", "run_grid"]


@dataclass
class GridSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def cell_path(results: Path, cell: Cell) -> Path:
    return Path(results) / cell.experiment / cell.filename


def finished(results: Path, cell: Cell) -> bool:
    """Whether the cell's result file exists and is a complete result for this key."""
    path = cell_path(results, cell)
    if not path.exists():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return data.get("key") == cell.key and data.get("status") == "ok"


def stale_files(experiments, results: str | os.PathLike) -> list[Path]:
    """Result files (finished or failed) of these experiments whose key is no cell of any
    of their profiles: left over from settings that have since changed."""
    from .spec import expand

    out = []
    for exp in experiments:
        keys = {c.key for prof in exp.profiles for c in expand(exp, prof)}
        folder = Path(results) / exp.name
        for f in sorted(folder.glob("*.json")) if folder.exists() else []:
            stem = f.name[: -len(".error.json")] if f.name.endswith(".error.json") else f.name[: -len(".json")]
            if stem.rsplit("-", 1)[-1] not in keys:
                out.append(f)
    return out


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # pragma: no cover
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if os.uname().sysname != "Darwin" else kb / 2**20


def compute_cell(cell_dict: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Run one cell and return its record (nothing is written: a Ray worker on another
    machine runs this; the driver writes the file)."""
    import torch

    from .. import __version__
    from ..utils import environment
    from .tasks import TASKS, Env

    if env.get("threads"):
        torch.set_num_threads(int(env["threads"]))
    cell = Cell(cell_dict["experiment"], cell_dict["params"], key=cell_dict["key"], label=cell_dict["label"])
    variables = {"data": str(env.get("data_dir") or ""), "cache": str(env["cache"])}
    params = substitute(cell.params, variables)
    record: dict[str, Any] = {**cell.as_dict(), "ibau_version": __version__, "git": env.get("git"),
                              "source_sha256": env.get("source_sha256"),
                              "environment": environment(), "device": env.get("device", "cpu"),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    t0 = time.perf_counter()
    if torch.cuda.is_available() and str(env.get("device", "")).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        result = TASKS[params.get("task", "defend")](params, Env(env))
    except Exception as exc:  # the grid goes on; the error is recorded and retried next run
        record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                      wall_seconds=time.perf_counter() - t0)
        return record
    record.update(status="ok", result=result, wall_seconds=time.perf_counter() - t0,
                  peak_rss_mb=_peak_rss_mb(), peak_rss_scope="process" if env.get("in_process") else "cell")
    if torch.cuda.is_available() and str(env.get("device", "")).startswith("cuda"):
        record["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def write_record(results: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write a cell's record (``.error.json`` for a failure) atomically; a short status back."""
    from ..io import write_json

    cell = Cell(record["experiment"], record["params"], key=record["key"], label=record["label"])
    path = cell_path(Path(results), cell)
    err = path.with_name(cell.error_filename)
    if record["status"] != "ok":
        write_json(record, err, force=True)
        return {"key": cell.key, "label": cell.label, "status": "error", "error": record["error"]}
    write_json(record, path, force=True)
    if err.exists():
        err.unlink()
    return {"key": cell.key, "label": cell.label, "status": "ok", "wall_seconds": record["wall_seconds"]}


def run_cell(cell_dict: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Run one cell and write its file; returns a short status. (Top-level so that a
    child process can run it.)"""
    return write_record(Path(env["results"]), compute_cell(cell_dict, env))


def _git_version() -> str | None:
    import subprocess

    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """The first 16 hex digits of a SHA-256 over the ``ibau`` package's Python files (relative path
    and content, in path order): the code version of a cell where ``git describe`` has no answer
    (an installed package, a copy of ``src``), and a check on a "-dirty" one."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_grid(cells: list[Cell], *, results: str | os.PathLike, cache: str | os.PathLike,
             data_dir: str | os.PathLike | None = None, workers: int = 1, device: str = "cpu",
             threads: int | None = None, progress: bool = True, printer=print, limit: int | None = None,
             order: str = "file", ray: str | None = None) -> GridSummary:
    """Run every cell that has no result file yet.

    Args:
        cells: from :func:`ibau.bench.spec.expand` (duplicates are run once).
        results: folder of the per-cell JSON files.
        cache: folder of trained poisoned models (reused across cells and runs).
        data_dir: the datasets' folder (``${data}`` in experiment files).
        workers: parallel child processes (0: run in this process).
        threads: torch threads per cell (default: the CPU count divided by workers).
        limit: run at most this many cells (then stop; the rest on a later run).
        printer: where the count of cells to run and each failed cell are said (``None``: quiet,
            only the failures, on stderr).
        order: ``"file"`` (as expanded) or ``"defense"`` (every cell of the cheap methods
            first, in :data:`DEFENSE_ORDER`; the order does not change any result).
        ray: dispatch the cells to a Ray cluster: its address (``"auto"``, ``"ray://host:10001"``)
            or ``"local"`` for a Ray instance started here with ``workers`` CPUs. Each
            cell asks Ray for ``threads`` CPUs; the workers must see the data and cache
            folders at the same paths; this process writes the result files, so the
            resume is the same as the local runner's.
    """
    from tqdm.auto import tqdm

    results, cache = Path(results), Path(cache)
    if order == "defense":  # cheap, central methods first: a run cut short has them everywhere
        rank = {d: i for i, d in enumerate(DEFENSE_ORDER)}
        cells = sorted(cells, key=lambda c: rank.get(c.params.get("defense"), len(rank)))
    summary = GridSummary()
    t0 = time.perf_counter()
    unique: dict[str, Cell] = {}
    for c in cells:
        unique.setdefault(f"{c.experiment}/{c.key}", c)
    todo = [c for c in unique.values() if not finished(results, c)]
    summary.skipped = len(unique) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    if printer:
        printer(f"{len(unique)} cells: {summary.skipped} finished already, {len(todo)} to run")
    if not todo:
        return summary
    ncpu = os.cpu_count() or 1
    env = {"results": str(results.resolve()), "cache": str(cache.resolve()),
           "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
           "device": device, "threads": threads or max(1, ncpu // max(1, workers)), "git": _git_version(),
           "source_sha256": source_digest(), "progress": False, "in_process": workers == 0}
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress)

    def note(status: dict[str, Any]) -> None:
        if status["status"] == "ok":
            summary.done += 1
        else:
            summary.failed += 1  # said even when quiet (printer None): on stderr
            (printer or _to_stderr)(f"cell {status['label']} failed: {status['error']}")
        bar.set_postfix_str(status["label"][:40])
        bar.update()

    if ray is not None:
        _run_on_ray(todo, env, ray, workers, note, results)
    elif workers == 0:
        for c in todo:
            note(run_cell(c.as_dict(), env))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **fresh) as pool:
            pending = {pool.submit(run_cell, c.as_dict(), env): c for c in todo}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    c = pending.pop(fut)
                    try:
                        note(fut.result())
                    except Exception as exc:  # the child died (killed, out of memory)
                        note({"label": c.label, "status": "error", "error": f"worker died: {exc!r}"})
    bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _run_on_ray(todo: list[Cell], env: dict[str, Any], address: str, workers: int, note, results: Path) -> None:
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray: pip install 'ibau[ray]'") from None
    started = not ray.is_initialized()
    if started:
        if address == "local":
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=int(env["threads"]), max_retries=0)(compute_cell)
        env = {**env, "in_process": False}
        pending = {task.remote(c.as_dict(), env): c for c in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                c = pending.pop(ref)
                try:
                    note(write_record(results, ray.get(ref)))
                except Exception as exc:  # the worker died
                    note({"label": c.label, "status": "error", "error": f"Ray task failed: {exc!r}"})
    finally:
        if started:
            ray.shutdown()
