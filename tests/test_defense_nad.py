import copy

import pytest
import torch

from ibau import testing
from ibau.defenses.nad import NAD, attention_loss, attention_map, default_layers
from ibau.models import PreActResNet18

# 8x8 digits: the CIFAR pipeline's pad-4 crop moves half the image and flips change digits,
# and the authors' lr 0.1 wrecks this tiny model; the tests use a milder recipe.
SMALL = {"lr": 0.01, "augment": False, "progress": False}


def test_attention_map_and_loss():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 6, 5, 3, generator=g)
    a = attention_map(f)
    assert a.shape == (4, 15) and (a >= 0).all()
    assert torch.allclose(a.norm(dim=1), torch.ones(4))
    expected = f.pow(2).mean(1).flatten(1)
    assert torch.allclose(a, expected / expected.norm(dim=1, keepdim=True))
    assert torch.allclose(attention_map(3 * f), a, atol=1e-6)  # scale-free
    other = torch.randn(4, 6, 5, 3, generator=g)
    for distance in ("mse", "l2"):
        assert attention_loss(f, f, distance=distance) == 0
        assert attention_loss(f, other, distance=distance) > 0
    d = attention_map(f) - attention_map(other)
    assert torch.allclose(attention_loss(f, other), d.pow(2).mean())
    assert torch.allclose(attention_loss(f, other, distance="l2"), d.norm(dim=1).mean())
    # channels may differ (teacher and student of other widths): only the map matters
    assert attention_loss(f, torch.cat([f, f], 1)) < 1e-12
    with pytest.raises(ValueError):
        attention_loss(f, f, distance="kl")


def test_default_layers_are_block_outputs():
    d = testing.digits_backdoor("one_target")
    assert default_layers(d["model"], d["x_clean"], 3) == ["features.5", "features.13", "features.21"]
    assert default_layers(PreActResNet18(10), torch.rand(2, 3, 32, 32), 3) == [
        "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]


def test_end_to_end_removes_the_backdoor():
    d = testing.digits_backdoor("one_target")
    model = d["model"]
    original = copy.deepcopy(model)
    before = testing.digits_metrics(model, d)
    rng = torch.get_rng_state()
    r = NAD(teacher_epochs=3, student_epochs=3, **SMALL).fit(model, d["x_clean"], d["y_clean"],
                                                             evaluate=lambda m: testing.digits_metrics(m, d))
    assert torch.equal(torch.get_rng_state(), rng)
    # the student (the model passed in) is returned, trainable, in eval mode
    assert r.model is model and not model.training
    assert all(p.requires_grad for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    after = testing.digits_metrics(model, d)
    assert before["asr"] > 0.95 and after["asr"] < 0.5  # measured: 0.99 -> 0.27
    assert after["acc"] > 0.85  # measured: 0.98 -> 0.94
    assert [h["point"] for h in r.history] == ["before", "teacher"] + [f"student epoch {e}" for e in (1, 2, 3)]
    elapsed = [h["elapsed"] for h in r.history]
    assert all(a < b for a, b in zip(elapsed, elapsed[1:]))
    assert r.history[1]["asr"] == pytest.approx(before["asr"])  # the student is untouched by the teacher phase
    assert r.extras["layers"] == ["features.5", "features.13", "features.21"]
    assert len(r.extras["teacher_losses"]) == 3 and r.extras["teacher_loss"] == r.extras["teacher_losses"][-1]
    assert len(r.extras["at_losses"]) == 3 and all(len(a) == 3 and min(a) > 0 for a in r.extras["at_losses"])
    assert [h["lr"] for h in r.history[2:]] == pytest.approx([0.01, 0.01, 0.001])


def test_stop_when():
    d = testing.digits_backdoor("one_target")
    r = NAD(teacher_epochs=1, student_epochs=2, **SMALL).fit(
        d["model"], d["x_clean"], d["y_clean"], evaluate=lambda m: {}, stop_when=lambda rec: rec["point"] == "teacher")
    assert [h["point"] for h in r.history] == ["before", "teacher"] and "teacher" in r.stop_reason


def test_bad_settings():
    d = testing.digits_backdoor("one_target")
    with pytest.raises(ValueError, match="betas"):
        NAD(betas=(1.0, 2.0))
    with pytest.raises(ValueError, match="betas"):
        NAD(layers=["features.5"])
    with pytest.raises(ValueError, match="not modules"):
        NAD(layers=["nope"], betas=(1.0,), **SMALL).fit(d["model"], d["x_clean"], d["y_clean"])
    for bad in ({"distance": "kl"}, {"batch_size": 0}, {"lr": 0.0}, {"crop_pad": -1}):
        with pytest.raises(ValueError):
            NAD(**bad)
