"""Shared fixtures of the test suite.

Test modules never import each other: helpers shared by several modules live here (as
fixtures) or in :mod:`ibau.testing` (tiny models and generated data, also for examples).

Tiers: ``python3 -m pytest -q`` runs the fast tier (``addopts`` deselects ``slow``);
``python3 -m pytest -q -m slow`` runs the end-to-end checks (demo, torchrun, Ray,
kill-and-resume, real data) that CI runs as a second step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("IBAU_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _threads():
    """Every test runs with one torch thread and torch's global generator seeded with 0: the same
    numbers whatever the machine's core count and whichever tests ran before (results of float
    reductions depend on the thread count; they also depend on the CPU's kernels, so tests keep
    margins that hold across CPUs), and no slowdown when the cores are shared (the tests' models are
    tiny; two spinning threads on a loaded 2-core machine ran 5-10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    # module-scoped fixtures are built before this runs: they seed themselves
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Kept for tests that say so explicitly: one torch thread (the default of every test)."""
    yield


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "ibau-checkpoints").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


# -- the experiment grid ------------------------------------------------------------------
TINY_GRID = """
[experiment]
name = "tiny"
title = "Tiny digits grid"
layout = "defense_table"
columns = ["none", "ibau"]
evidence_for = ["effective", "baselines_fail"]
rows = {{ patch = "Patch" }}

[models.patch]
arch = "small_vgg"
train = {{ attack = {{ name = "badnets", target = 0, patch = 2, margin = 1 }}, ratio = 0.2, size = 600, epochs = 3, batch_size = 64 }}

[profiles.cpu]
about = "tiny"
dataset = "digits"
models = ["patch"]
defenses = ["none", "ibau"]
seeds = {seeds}
clean_size = 200
stop_asr = 0.2
settings.ibau = {{ rounds = 1, batch_size = 50, norm_bound = 2.5 }}

[paper]
"Patch/none" = [99.0, 100.0]
"Patch/ibau" = [98.0, 5.0]
"""


@pytest.fixture
def tiny_grid(tmp_path: Path):
    """``tiny_grid(seeds=(0,))`` writes ``tmp_path/tiny.toml``: a digits experiment with one
    BadNets model, the defenses ``none`` and ``ibau`` and one cell per defense and seed."""

    def write(seeds=(0,)) -> Path:
        path = tmp_path / "tiny.toml"
        path.write_text(TINY_GRID.format(seeds=list(seeds)))
        return path

    return write


@pytest.fixture
def kill_and_resume(tmp_path: Path, tiny_grid):
    """``kill_and_resume(runner_args)``: run a 6-cell grid with ``ibau bench run ...
    RUNNER_ARGS``, SIGKILL its process group once two cells are finished, run it again:
    the grid completes and the files written before the kill are untouched (same bytes,
    same mtime)."""

    def run(runner_args: list[str]) -> None:
        config = tiny_grid(seeds=(0, 1, 2))
        res = tmp_path / "res"
        cmd = [sys.executable, "-m", "ibau", "bench", "run", str(config), "--results", str(res), "--cache",
               str(tmp_path / "cache"), "--threads", "1", "--order", "file", "--quiet", *runner_args]
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        deadline = time.time() + 300
        try:
            while time.time() < deadline and len(list((res / "tiny").glob("*-????????????.json"))) < 2:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        done_before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (res / "tiny").glob("*.json")}
        assert 2 <= len(done_before) < 6, "the grid must be cut mid-way"
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"{6 - len(done_before)} cells run, {len(done_before)} already finished, 0 failed" in out.stdout
        files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (res / "tiny").glob("*.json")}
        assert len(files) == 6
        assert all(files[name] == stamp for name, stamp in done_before.items())  # untouched

    return run
