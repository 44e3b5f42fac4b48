"""The grid on a local Ray instance (2 CPUs): same results as the local runner, resumes after a kill."""

from __future__ import annotations

import pytest

from ibau.bench import expand, load_experiment, load_results, run_grid

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow  # starts a local Ray instance

TIMING = {"elapsed", "seconds", "seconds_inner", "seconds_outer", "wall_seconds"}


def _numbers(result: dict) -> dict:
    """A cell's result without timings and the model source's bookkeeping."""
    out = {k: v for k, v in result.items() if k not in TIMING | {"source"}}
    out["history"] = [{k: v for k, v in h.items() if k not in TIMING} for h in result["history"]]
    return out


def test_ray_grid_gives_the_local_runners_results(tmp_path, tiny_grid):
    exp = load_experiment(tiny_grid(seeds=(0, 1)))
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


def test_killed_ray_grid_resumes(kill_and_resume):
    kill_and_resume(["--ray", "local", "--workers", "2"])
