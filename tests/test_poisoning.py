import json

import pytest
import torch

from ibau import testing as toy
from ibau.attacks import create_attack
from ibau.attacks.manifest import ManifestError, load_manifest, save_manifest
from ibau.cli import main
from ibau.data.poison import ConcatSet, PoisonedSet, TensorSet, poison
from ibau.train import TrainConfig, train


class Patch:
    """A minimal attack: the toy trigger to a fixed target (or y + 1 for all-to-all)."""

    def __init__(self, target=0, all_to_all=False):
        self.target, self.all_to_all = target, all_to_all

    def apply(self, x):
        return toy.trigger()(x)

    def target_of(self, y):
        return (y + 1) % toy.K if self.all_to_all else torch.full_like(y, self.target)


def test_poison_counts_sources_and_labels():
    x, y = toy.make_data(500, 1)
    ds = poison(x, y, Patch(target=0), 0.2, seed=3)
    idx = ds.poisoned_indices
    assert len(idx) == 100  # 20% of the whole set
    assert (y[idx] != 0).all()  # drawn from non-target classes only
    xb, yb = ds.batch(idx)
    assert (yb == 0).all() and torch.equal(xb, toy.trigger()(x[idx]))
    clean = torch.nonzero(~ds.mask).flatten()
    xc, yc = ds.batch(clean)
    assert torch.equal(xc, x[clean]) and torch.equal(yc, y[clean])
    assert torch.equal(x, toy.make_data(500, 1)[0])  # the clean tensors are not modified
    assert torch.equal(poison(x, y, Patch(), 0.2, seed=3).mask, ds.mask)  # deterministic per seed
    assert not torch.equal(poison(x, y, Patch(), 0.2, seed=4).mask, ds.mask)
    a2a = poison(x, y, Patch(all_to_all=True), 0.2, seed=3)
    assert set(y[a2a.poisoned_indices].tolist()) == set(range(toy.K))  # all classes are sources
    _, ya = a2a.batch(a2a.poisoned_indices)
    assert torch.equal(ya, (y[a2a.poisoned_indices] + 1) % toy.K)
    with pytest.raises(ValueError):
        poison(x, y, Patch(), 0.9)


def test_concat_set_batches_across_parts():
    x, y = toy.make_data(20, 2)
    cs = ConcatSet([TensorSet(x, y), PoisonedSet(x, y, Patch().apply, Patch().target_of, torch.arange(20))])
    assert len(cs) == 40
    xb, yb = cs.batch(torch.tensor([25, 3, 39, 0]))
    assert torch.equal(xb[1], x[3]) and torch.equal(yb[0], torch.tensor(0))
    assert torch.equal(xb[0], toy.trigger()(x[5:6])[0])


def test_training_resumes_to_the_same_weights(tmp_path):
    x, y = toy.make_data(256, 5)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e-2, seed=1)
    init = toy.TinyNet().state_dict()

    def fresh():
        net = toy.TinyNet()
        net.load_state_dict(init)
        return net

    full = train(fresh(), (x, y), cfg, progress=False)
    ckpt = tmp_path / "run.ckpt"
    part = train(fresh(), (x, y), TrainConfig(epochs=3, batch_size=64, lr=1e-2, seed=1), progress=False,
                 checkpoint=ckpt)
    assert not ckpt.exists()  # removed after completion
    # interrupt after epoch 2: run 2 epochs with a checkpoint, keep it, resume for the third
    import ibau.train as tr

    class Stop(Exception):
        pass

    calls = {"n": 0}
    orig = tr.F.cross_entropy

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 1:  # first batch of epoch 3
            raise Stop
        return orig(*a, **k)

    tr.F.cross_entropy = flaky
    try:
        with pytest.raises(Stop):
            train(fresh(), (x, y), cfg, progress=False, checkpoint=ckpt)
    finally:
        tr.F.cross_entropy = orig
    assert ckpt.exists()
    resumed = train(fresh(), (x, y), cfg, progress=False, checkpoint=ckpt)
    for a, b, c in zip(full.state_dict().values(), resumed.state_dict().values(), part.state_dict().values()):
        assert torch.allclose(a, b) and torch.allclose(a, c)
    torch.save({"config": {"epochs": 99}}, ckpt)
    with pytest.raises(ValueError, match="another config"):
        train(fresh(), (x, y), cfg, progress=False, checkpoint=ckpt)


def test_manifest_round_trip_and_tamper_check(tmp_path):
    attack = create_attack("blend", target=3, seed=7, image_shape=(3, 8, 8))
    path = save_manifest(attack, tmp_path / "m.attack.json", extra={"note": "x"})
    loaded, manifest = load_manifest(path)
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(loaded.apply(x), attack.apply(x)) and loaded.target == 3
    assert manifest["note"] == "x" and len(manifest["trigger_sha256"]) == 64
    trig = tmp_path / manifest["trigger_file"]
    trig.write_bytes(trig.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ManifestError, match="hash"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "none.json")


def test_poison_and_evaluate_commands(tmp_path, capsys):
    import numpy as np

    x, y = toy.make_data(600, 11)
    np.savez(tmp_path / "train.npz", x=x.numpy(), y=y.numpy())
    xe, ye = toy.make_data(300, 12)
    np.savez(tmp_path / "test.npz", x=xe.numpy(), y=ye.numpy())
    (tmp_path / "net.py").write_text("from ibau.testing import TinyNet\n"
                                     "def make(num_classes=4):\n    return TinyNet(num_classes)\n")
    out = tmp_path / "poisoned.safetensors"
    code = main(["poison", "--model-def", f"{tmp_path / 'net.py'}:make", "--data", str(tmp_path / "train.npz"),
                 "--eval-data", str(tmp_path / "test.npz"), "--attack", "badnets", "--target", "0",
                 "--attack-option", "image_shape=(3,8,8)", "--attack-option", "patch=2",
                 "--epochs", "8", "--batch-size", "64", "--lr", "0.01", "--out", str(out), "--quiet"])
    assert code == 0
    metrics = json.loads((tmp_path / "poisoned.metrics.json").read_text())
    assert metrics["poisoned"] == 120 and metrics["metrics"]["asr"] > 0.9
    manifest = tmp_path / "poisoned.attack.json"
    assert json.loads(manifest.read_text())["attack"] == "badnets"
    capsys.readouterr()
    assert main(["evaluate", "--model-def", f"{tmp_path / 'net.py'}:make", "--weights", str(out),
                 "--manifest", str(manifest), "--data", str(tmp_path / "test.npz"),
                 "--json", str(tmp_path / "eval.json")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("ACC ") and "ASR" in line
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["asr"] == pytest.approx(metrics["metrics"]["asr"])
    assert main(["poison", "--model-def", f"{tmp_path / 'net.py'}:make", "--data", str(tmp_path / "train.npz"),
                 "--attack", "nope", "--out", str(tmp_path / "x.safetensors")]) == 2


@pytest.mark.parametrize("attack", ["semantic", "wanet", "badnets"])
def test_poison_command_fits_shape_dependent_attacks_to_the_data(tmp_path, capsys, attack):
    """Attacks built for 3x32x32 by default are fitted to the data's images (8x8 here) by
    the command, without an image_shape option; the manifest reproduces the trigger."""
    import numpy as np

    x, y = toy.make_data(400, 13)
    np.savez(tmp_path / "train.npz", x=x.numpy(), y=y.numpy())
    xe, ye = toy.make_data(200, 14)
    np.savez(tmp_path / "test.npz", x=xe.numpy(), y=ye.numpy())
    (tmp_path / "net.py").write_text("from ibau.testing import TinyNet\n"
                                     "def make(num_classes=4):\n    return TinyNet(num_classes)\n")
    out = tmp_path / "p.safetensors"
    args = ["poison", "--model-def", f"{tmp_path / 'net.py'}:make", "--data", str(tmp_path / "train.npz"),
            "--eval-data", str(tmp_path / "test.npz"), "--attack", attack, "--target", "0", "--epochs", "4",
            "--batch-size", "64", "--lr", "0.01", "--out", str(out), "--quiet"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "p.metrics.json").read_text())
    assert metrics["poisoned"] > 0 and 0 <= metrics["metrics"]["asr"] <= 1
    if attack == "semantic":  # one picture, learnt at once
        assert metrics["metrics"]["asr"] == 1.0
    assert main(["evaluate", "--model-def", f"{tmp_path / 'net.py'}:make", "--weights", str(out),
                 "--manifest", str(tmp_path / "p.attack.json"), "--data", str(tmp_path / "test.npz"),
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["asr"] == pytest.approx(metrics["metrics"]["asr"])
