"""The jobs layer: same seed, same result for every command; weights before the report."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from ibau import testing
from ibau.cli import main

NET = textwrap.dedent("""
    from ibau.testing import TinyNet

    def build(num_classes=4):
        return TinyNet(num_classes)
""")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    (root / "net.py").write_text(NET)
    x, y = testing.make_data(240, seed=0)
    np.savez(root / "data.npz", x=x.numpy(), y=y.numpy())
    save_file({k: v.contiguous() for k, v in testing.poisoned_state().items()}, root / "w.safetensors")
    return root


def _poison(task, out, seed):
    return main(["poison", "--model-def", f"{task}/net.py:build", "--data", f"{task}/data.npz", "--attack", "badnets",
                 "--attack-option", "patch=2", "--target", "0", "--epochs", "2", "--batch-size", "32",
                 "--seed", str(seed), "--out", str(out), "--quiet", "--device", "cpu"])


def test_poison_same_seed_same_model(task, tmp_path, capsys):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert _poison(task, tmp_path / name / "p.safetensors", seed) == 0
    capsys.readouterr()
    a, b, c = (load_file(tmp_path / n / "p.safetensors") for n in "abc")
    assert all((a[k] == b[k]).all() for k in a), "same seed gave different weights"
    assert any((a[k] != c[k]).any() for k in a), "another seed gave the same weights"
    ma, mb = (json.loads((tmp_path / n / "p.metrics.json").read_text()) for n in "ab")
    assert ma == mb


def _unlearn(task, out, seed, *extra):
    return main(["unlearn", "--model-def", f"{task}/net.py:build", "--weights", f"{task}/w.safetensors",
                 "--data", f"{task}/data.npz", "--out", str(out / "s.safetensors"), "--report", str(out / "r.json"),
                 "--rounds", "1", "--batch-size", "50", "--seed", str(seed), "--quiet", "--device", "cpu",
                 "--scan-steps", "30", *extra])


def _numbers(report: dict) -> dict:
    keep = ("clean_accuracy_before", "clean_accuracy_after", "robustness_before", "robustness_after", "rounds",
            "kept_round", "stop_reason")
    hist = [{k: v for k, v in h.items() if not k.startswith(("seconds", "elapsed"))} for h in report["history"]]
    return {**{k: report[k] for k in keep}, "history": hist}


def test_unlearn_same_seed_same_result(task, tmp_path, capsys):
    for name in ("a", "b"):
        assert _unlearn(task, tmp_path / name, 0) == 0
    capsys.readouterr()
    a, b = (load_file(tmp_path / n / "s.safetensors") for n in "ab")
    assert all((a[k] == b[k]).all() for k in a)
    ra, rb = (json.loads((tmp_path / n / "r.json").read_text()) for n in "ab")
    assert _numbers(ra) == _numbers(rb)
    orig = load_file(task / "w.safetensors")
    assert any((a[k] != orig[k]).any() for k in a), "unlearning changed nothing"


def test_defend_same_seed_same_result(task, tmp_path, capsys):
    def run(name):
        return main(["defend", "--method", "fine_pruning", "--param", "epochs=1", "--param", "prune_images=60", "--model-def",
                     f"{task}/net.py:build", "--weights", f"{task}/w.safetensors", "--data", f"{task}/data.npz",
                     "--out", str(tmp_path / name / "d.safetensors"), "--report", str(tmp_path / name / "d.json"),
                     "--quiet", "--device", "cpu"])

    assert run("a") == 0 and run("b") == 0
    capsys.readouterr()
    a, b = (load_file(tmp_path / n / "d.safetensors") for n in "ab")
    assert all((a[k] == b[k]).all() for k in a)


def test_weights_are_written_before_the_report(task, tmp_path, capsys, monkeypatch):
    """A failure while writing the report (a disk that fills up) leaves the weights and no
    report naming missing weights; the error is one line saying what was written."""
    import ibau.io

    real = ibau.io.write_json

    def full_disk(obj, path, **kw):
        if str(path).endswith("r.json"):
            raise OSError(28, "No space left on device", str(path))
        return real(obj, path, **kw)

    monkeypatch.setattr(ibau.io, "write_json", full_disk)
    assert _unlearn(task, tmp_path, 0) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ibau: error:") and "s.safetensors" in err[0]
    assert (tmp_path / "s.safetensors").exists() and not (tmp_path / "r.json").exists()
