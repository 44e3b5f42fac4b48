"""The grid on a local Ray instance (2 CPUs): same results as the local runner, resumes after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ibau.bench import expand, load_experiment, load_results, run_grid

ray = pytest.importorskip("ray")

from test_bench import tiny  # noqa: E402

TIMING = {"elapsed", "seconds", "seconds_inner", "seconds_outer", "wall_seconds"}


def _numbers(result: dict) -> dict:
    """A cell's result without timings and the model source's bookkeeping."""
    out = {k: v for k, v in result.items() if k not in TIMING | {"source"}}
    out["history"] = [{k: v for k, v in h.items() if k not in TIMING} for h in result["history"]]
    return out


def test_ray_grid_gives_the_local_runners_results(tmp_path):
    exp = load_experiment(tiny(tmp_path, seeds=(0, 1)))
    cells = expand(exp, "cpu")
    cache = tmp_path / "cache"
    local = run_grid(cells, results=tmp_path / "local", cache=cache, workers=0, threads=1, progress=False, printer=None)
    assert local.done == 4
    remote = run_grid(cells, results=tmp_path / "ray", cache=cache, workers=2, threads=1, ray="local",
                      progress=False, printer=None)
    assert (remote.done, remote.failed) == (4, 0)
    a = {r["key"]: r for r in load_results(tmp_path / "local", "tiny")}
    b = {r["key"]: r for r in load_results(tmp_path / "ray", "tiny")}
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert _numbers(a[key]["result"]) == _numbers(b[key]["result"])
        assert a[key]["params"] == b[key]["params"]


def test_killed_ray_grid_resumes(tmp_path):
    config = tiny(tmp_path, seeds=(0, 1, 2))
    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "ibau", "bench", "run", str(config), "--results", str(res), "--cache",
           str(tmp_path / "cache"), "--ray", "local", "--workers", "2", "--threads", "1", "--order", "file", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and len(list((res / "tiny").glob("*-????????????.json"))) < 2:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = {p.name: p.read_bytes() for p in (res / "tiny").glob("*.json")}
    assert 2 <= len(done_before) < 6
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{6 - len(done_before)} cells run, {len(done_before)} already finished, 0 failed" in out.stdout
    files = {p.name: p.read_bytes() for p in (res / "tiny").glob("*.json")}
    assert len(files) == 6 and all(files[n] == b for n, b in done_before.items())
