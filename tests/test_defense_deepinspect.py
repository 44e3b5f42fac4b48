"""DeepInspect on the planted digits backdoors (ibau.testing.digits_backdoor), with a small generator
budget (400 steps of 50 images instead of 1,000 of 100)."""

import math

import pytest
import torch

from ibau import testing
from ibau.defenses.deepinspect import DeepInspect, GeneratedTrigger, TriggerGenerator

FAST = dict(steps=400, batch_size=50, eval_samples=2, eval_images=200, progress=False)


@pytest.fixture(scope="module")
def one_target_fit():
    d = testing.digits_backdoor("one_target")
    before = testing.digits_metrics(d["model"], d)
    res = DeepInspect(seed=0, **FAST).fit(d["model"], d["x_clean"], d["y_clean"])
    return d, before, res


def test_flags_the_planted_class_and_unlearns_it(one_target_fit):
    d, before, res = one_target_fit
    after = testing.digits_metrics(d["model"], d)
    scan = res.extras["scan"]
    assert before["asr"] > 0.9
    assert len(scan["anomaly_index"]) == 10 and all(math.isfinite(a) for a in scan["anomaly_index"])
    # the planted class's trigger is the cheapest to generate, by a wide margin
    assert min(range(10), key=lambda c: scan["scores"][c]) == d["target"]
    assert d["target"] in scan["flagged"]
    assert scan["anomaly_index"][d["target"]] > 2
    assert scan["success"][d["target"]] > 0.9
    assert {"generation_loss", "ce", "magnitude", "l1"} <= set(scan["per_class"][0])
    # the generated trigger of class 0 sits where the planted 2x2 patch is (rows/cols 5-6)
    pattern = res.extras["triggers"]["pattern_0"]
    assert pattern.shape == (1, 8, 8) and pattern.abs().max() <= 1.0
    top = pattern.flatten().topk(4).indices
    assert sum(int(i) // 8 in (5, 6) and int(i) % 8 in (5, 6) for i in top) >= 3
    assert after["asr"] < 0.2
    assert after["acc"] > before["acc"] - 0.05
    assert not d["model"].training
    assert [h["point"] for h in res.history] == ["scan", "unlearn epoch 1"]


def test_generated_trigger_is_seeded_and_clamped():
    g = torch.Generator().manual_seed(0)
    net = TriggerGenerator(8, 10, (1, 8, 8), 16, 1.0, g)
    x = torch.rand(5, 1, 8, 8)
    s1, s2 = GeneratedTrigger(net, 3, seed=7), GeneratedTrigger(net, 3, seed=7)
    out = s1(x)
    assert torch.equal(out, s2(x))
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert not torch.equal(s1(x), out)  # fresh z per call


def test_all_to_all_scan_runs():
    """The paper: the trigger-synthesis family fails on all-to-all backdoors (no single
    target class stands out); we only check the scan is well formed."""
    d = testing.digits_backdoor("all_to_all")
    scan = DeepInspect(seed=0, **dict(FAST, steps=100)).scan(d["model"], d["x_clean"], d["y_clean"])
    assert len(scan.anomaly_index) == 10 and all(math.isfinite(a) for a in scan.anomaly_index)
    assert all(math.isfinite(t.score) for t in scan.triggers)


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(lr=0.0), dict(max_value=1.5), dict(magnitude_cost=-1.0),
                                    dict(gan_cost=-0.1), dict(z_dim=2.5), dict(eval_samples=0), dict(threshold=0)])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        DeepInspect(**kwargs)


def test_config_and_name():
    di = DeepInspect()
    cfg = di.config()
    assert di.name == "deepinspect"
    assert cfg["steps"] == 1000 and cfg["magnitude_cost"] == 10.0 and cfg["threshold"] == 2.0
    assert not any(k.startswith("_") for k in cfg)
