import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from ibau.cli import main
from ibau.models import SmallVGG


@pytest.mark.slow  # the whole demo: trains a model, runs I-BAU, writes plots
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quiet", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "attack success rate" in text
    report = json.loads((out / "report.json").read_text())
    before, after = report["demo"]["test_before"], report["demo"]["test_after"]
    assert before["asr"] > 0.8 and before["acc"] > 0.9  # the backdoor is real
    assert after["asr"] < 0.2  # and I-BAU removes it
    assert after["acc"] > 0.85
    assert 1 <= report["kept_round"] <= report["rounds"]
    # auto mode keeps the last round within the accuracy limit, and says so when it rolls back
    assert (report["kept_round"] < report["rounds"]) == ("kept the weights" in report["stop_reason"])
    for name in ("poisoned.safetensors", "sanitised.safetensors"):
        SmallVGG(10, in_channels=1, image_size=8).load_state_dict(load_file(out / name), strict=True)
    assert (out / "report" / "report.md").is_file() and (out / "report" / "samples.png").is_file()
    # an existing output folder is not replaced without --force
    assert main(["demo", "--quiet", "--out-dir", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow  # two whole demos
def test_demo_is_bit_identical_per_seed(tmp_path, capsys):
    """`ibau demo --seed 3` twice in one process, the global RNG moved in between: the same
    weights, bit for bit, and the same report numbers (timings aside)."""
    import torch

    def numbers(obj):
        if isinstance(obj, dict):
            return {k: numbers(v) for k, v in obj.items() if "seconds" not in k and k not in ("elapsed", "created")}
        if isinstance(obj, list):
            return [numbers(v) for v in obj]
        return obj

    runs = []
    for name in ("a", "b"):
        torch.rand(int(torch.randint(1, 1000, (1,))))  # the demo must not depend on the caller's RNG
        out = tmp_path / name
        assert main(["demo", "--quiet", "--seed", "3", "--out-dir", str(out)]) == 0
        runs.append(out)
    capsys.readouterr()
    for name in ("poisoned.safetensors", "sanitised.safetensors"):
        a, b = load_file(runs[0] / name), load_file(runs[1] / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ra, rb = (json.loads((r / "report.json").read_text()) for r in runs)
    assert numbers(ra) == numbers(rb)


def test_module_entry_point_and_version():
    res = subprocess.run([sys.executable, "-m", "ibau", "--version"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.startswith("ibau ")
