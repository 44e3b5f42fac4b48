"""``ibau defend``: any registered defense through the command line, on real digits."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from ibau import testing
from ibau.cli import main
from ibau.defenses import DEFENSES
from ibau.models import SmallVGG

MODEL_DEF = """
from ibau.models import SmallVGG

def digits_vgg(num_classes=10):
    return SmallVGG(num_classes=num_classes, in_channels=1, image_size=8)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("defend")
    d = testing.digits_backdoor("one_target")
    save_file({k: v.contiguous() for k, v in d["model"].state_dict().items()}, root / "w.safetensors")
    np.savez(root / "clean.npz", x=(d["x_clean"][:, 0] * 255).round().byte().numpy(), y=d["y_clean"].numpy())
    (root / "model_def.py").write_text(MODEL_DEF)
    return root, d


def _args(root, tmp_path, *extra, method="neural_cleanse"):
    return ["defend", "--method", method, "--model-def", f"{root / 'model_def.py'}:digits_vgg",
            "--weights", str(root / "w.safetensors"), "--data", str(root / "clean.npz"),
            "--out", str(tmp_path / "o.safetensors"), "--report", str(tmp_path / "r.json"), "--holdout", "50",
            "--quiet", *extra]


def test_list_shows_every_method_and_its_settings(capsys):
    assert main(["defend", "--list"]) == 0
    out = capsys.readouterr().out
    for name in DEFENSES:
        assert f"\n{name}  (" in "\n" + out
    assert "init_cost = 0.001" in out and "norm_bound = 10.0" in out


def test_neural_cleanse_through_the_command_line(files, tmp_path, capsys):
    root, d = files
    before = (root / "w.safetensors").read_bytes()
    code = main(_args(root, tmp_path, "--param", "epochs=15", "--param", "epoch_images=400"))
    assert code == 0
    assert (root / "w.safetensors").read_bytes() == before
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "neural_cleanse" and report["config"]["epochs"] == 15
    assert 0 in report["extras"]["scan"]["flagged"] and len(report["extras"]["scan"]["anomaly_index"]) == 10
    assert report["holdout_size"] == 50 and report["data_size"] == 350
    assert [h["point"] for h in report["history"]][:2] == ["before", "scan"]
    arrays = np.load(tmp_path / "r.npz")
    assert arrays["triggers.mask_0"].shape == (1, 8, 8) and "triggers.pattern_9" in arrays
    net = SmallVGG(10, in_channels=1, image_size=8)
    net.load_state_dict(load_file(tmp_path / "o.safetensors"), strict=True)
    assert testing.digits_metrics(net.eval(), d)["asr"] < 0.2
    out = capsys.readouterr().out
    assert "anomaly index per class" in out and "flagged:" in out


@pytest.mark.parametrize("extra,message", [
    (("--param", "nope=1"), "has no setting nope"),
    (("--param", "epochs"), "--param must be KEY=VALUE"),
    (("--param", "cost_multiplier=0.5"), "cost_multiplier must be > 1"),
    (("--normalize", "0.5/0.5", "--method", "dp"), "dp does not take normalize"),
])
def test_bad_parameters_exit_2_and_write_nothing(files, tmp_path, capsys, extra, message):
    root, _ = files
    assert main(_args(root, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "r.json").exists()


def test_missing_inputs_and_unknown_method(files, tmp_path, capsys):
    root, _ = files
    assert main(["defend", "--method", "nope", "--arch", "small_vgg", "--weights", "w", "--data", "d",
                 "--out", str(tmp_path / "o.safetensors"), "--report", str(tmp_path / "r.json")]) == 2
    assert "unknown defense 'nope'" in capsys.readouterr().err
    assert main(["defend", "--method", "neural_cleanse"]) == 2
    assert "missing --data, --out, --report, --arch or --model-def" in capsys.readouterr().err
    args = _args(root, tmp_path)
    i = args.index("--weights")
    del args[i:i + 2]
    assert main(args) == 2
    assert "weights are required for neural_cleanse" in capsys.readouterr().err
