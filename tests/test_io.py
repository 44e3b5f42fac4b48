import os
import pickle

import pytest
import torch

from ibau import testing as toy
from ibau.io import WeightsError, atomic_write, load_state_dict, load_weights, save_weights, write_json


def _state():
    return toy.TinyNet().state_dict()


@pytest.mark.parametrize("wrap", ["bare", "net", "state_dict", "module"])
def test_load_weight_formats(tmp_path, wrap):
    sd = _state()
    obj = {"bare": sd, "net": {"net": sd, "acc": 90.0, "epoch": 3}, "state_dict": {"state_dict": sd},
           "module": {"model": {f"module.{k}": v for k, v in sd.items()}}}[wrap]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    net = load_weights(toy.TinyNet(), path)
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k])


def test_safetensors_roundtrip_and_no_overwrite(tmp_path):
    net = toy.TinyNet()
    out = tmp_path / "m.safetensors"
    save_weights(net, out)
    loaded = load_state_dict(out)
    assert set(loaded) == set(net.state_dict())
    with pytest.raises(FileExistsError, match="--force"):
        save_weights(net, out)
    save_weights(net, out, force=True)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['IBAU_PWNED']}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("IBAU_PWNED", str(marker))
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"net": _state(), "payload": _Evil()}, f)
    with pytest.raises(WeightsError, match="refusing to load"):
        load_state_dict(path)
    assert not marker.exists()


def test_mismatch_and_nan_are_explained(tmp_path):
    sd = _state()
    sd.pop("classifier.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["features.0.weight"] = torch.zeros(2, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as exc:
        load_weights(toy.TinyNet(), path)
    msg = str(exc.value)
    assert "missing: classifier.bias" in msg and "unexpected: extra.weight" in msg and "features.0.weight" in msg
    sd = _state()
    sd["classifier.weight"][0, 0] = float("nan")
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="NaN"):
        load_weights(toy.TinyNet(), path)
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError):
        load_state_dict(tmp_path / "junk.pth")
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="no state dict"):
        load_state_dict(path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert os.listdir(tmp_path) == []
    write_json({"a": 1}, target)
    write_json({"a": 2}, target)  # results files are replaced
    assert target.read_text().strip().endswith("}")
