import json
import subprocess
import sys

from ibau.cli import main


def test_demo_runs_and_reduces_the_attack(tmp_path, capsys):
    report = tmp_path / "demo.json"
    assert main(["demo", "--quiet", "--rounds", "2", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "attack success rate" in out
    data = json.loads(report.read_text())
    before, after = data["history"][0], data["history"][-1]
    assert before["asr"] > 0.9
    assert after["asr"] < before["asr"]
    assert data["environment"]["torch"]


def test_module_entry_point_and_version():
    res = subprocess.run([sys.executable, "-m", "ibau", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("ibau ")
