import copy

import pytest
import torch

from ibau import testing
from ibau.defenses.fine_pruning import FinePruning, conv_sites
from ibau.metrics import clean_accuracy
from ibau.models import SmallVGG

LAST = "features.19"  # SmallVGG's last conv; its BatchNorm is features.20, its ELU features.21


def _fit(d, **kw):
    kw = {"prune_images": 100, "progress": False, **kw}
    return FinePruning(**kw).fit(d["model"], d["x_clean"], d["y_clean"],
                                 evaluate=lambda m: testing.digits_metrics(m, d))


def _zero_channels(model, channels):
    mods = dict(model.named_modules())
    with torch.no_grad():
        for t in (mods[LAST].weight, mods[LAST].bias, mods["features.20"].weight, mods["features.20"].bias,
                  mods["features.20"].running_mean):
            t[channels] = 0


def test_conv_sites_follow_bn_and_activation():
    d = testing.digits_backdoor("one_target")
    sites = conv_sites(d["model"], d["x_clean"][:2])
    assert [s.conv for s in sites] == ["features.0", "features.3", "features.8", "features.11", "features.16", LAST]
    assert (sites[-1].bn, sites[-1].act, sites[-1].size) == ("features.20", "features.21", (2, 2))


def test_pruning_stops_exactly_where_the_accuracy_crosses_the_bound():
    d = testing.digits_backdoor("one_target")
    original = copy.deepcopy(d["model"])
    r = _fit(d, epochs=0)
    ex = r.extras
    idx = ex["prune_indices"]
    xp, yp = d["x_clean"][idx], d["y_clean"][idx]
    assert ex["layer"] == LAST and ex["activation_site"] == "features.21"
    # the ranking is by the mean post-activation output on the pruning images
    feats = []
    h = dict(original.named_modules())["features.21"].register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        original(xp)
    h.remove()
    assert torch.allclose(ex["mean_activation"], feats[0].mean((0, 2, 3)), atol=1e-5)
    order = torch.tensor(ex["order"])
    assert (ex["mean_activation"][order].diff() >= 0).all()
    pruned = len(ex["pruned_channels"])
    assert ex["pruned_channels"] == sorted(order[:pruned].tolist())
    assert 10 < pruned < 127  # measured: 101 of 128
    # relative bound: 80% of the accuracy before pruning
    assert ex["prune_acc_before"] == pytest.approx(clean_accuracy(original, xp, yp))
    assert ex["prune_bound"] == pytest.approx(0.8 * ex["prune_acc_before"])
    # the kept model satisfies the bound (measured independently on the returned model) ...
    assert clean_accuracy(r.model, xp, yp) == pytest.approx(ex["prune_acc"])
    assert ex["prune_acc"] >= ex["prune_bound"]
    assert all(a >= ex["prune_bound"] for _, a in ex["prune_path"][:-1])
    # ... and one more channel violates it
    assert ex["prune_path"][-1][0] == pruned + 1 and ex["prune_path"][-1][1] < ex["prune_bound"]
    one_more = copy.deepcopy(r.model)
    _zero_channels(one_more, order[:pruned + 1])
    assert clean_accuracy(one_more, xp, yp) < ex["prune_bound"]
    assert [h["point"] for h in r.history] == ["before", "pruned"]
    assert r.history[1]["pruned"] == pruned


def test_absolute_drop_mode_and_coarser_steps():
    d = testing.digits_backdoor("one_target")
    r = _fit(d, epochs=0, drop_mode="absolute", acc_drop=0.1, prune_step=8)
    ex = r.extras
    assert ex["prune_bound"] == pytest.approx(ex["prune_acc_before"] - 0.1)
    assert len(ex["pruned_channels"]) % 8 == 0
    assert ex["prune_path"][-1][1] < ex["prune_bound"] <= ex["prune_acc"]


def test_end_to_end_pruned_channels_stay_zero_and_state_loads():
    d = testing.digits_backdoor("one_target")
    before = testing.digits_metrics(d["model"], d)
    rng = torch.get_rng_state()
    r = _fit(d, epochs=3)
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's seeding is private
    assert r.model is d["model"] and not r.model.training
    after = testing.digits_metrics(r.model, d)
    assert after["asr"] < before["asr"] - 0.3  # measured: 0.99 -> 0.37
    assert after["acc"] > 0.9  # measured: 0.98 -> 0.98
    pruned = r.extras["pruned_channels"]
    mods = dict(r.model.named_modules())
    for t in (mods[LAST].weight, mods[LAST].bias, mods["features.20"].weight, mods["features.20"].bias):
        assert t[pruned].abs().max() == 0
        assert t[[c for c in range(128) if c not in pruned]].abs().max() > 0
    outs = []
    h = mods["features.20"].register_forward_hook(lambda m, i, o: outs.append(o))
    r.model(d["x_test"][:50])
    h.remove()
    assert outs[0][:, pruned].abs().max() == 0
    fresh = SmallVGG(10, in_channels=1, image_size=8)
    fresh.load_state_dict(r.model.state_dict(), strict=True)
    assert [h["point"] for h in r.history] == ["before", "pruned"] + [f"fine-tune epoch {e}" for e in (1, 2, 3)]
    elapsed = [h["elapsed"] for h in r.history]
    assert all(a < b for a, b in zip(elapsed, elapsed[1:]))
    assert len(r.extras["losses"]) == 3


def test_named_layer_and_bad_settings():
    d = testing.digits_backdoor("one_target")
    r = FinePruning(prune_images=0.25, epochs=0, layer="features.16", progress=False).fit(
        d["model"], d["x_clean"], d["y_clean"])
    assert r.extras["layer"] == "features.16" and r.extras["channels"] == 128
    assert len(r.extras["prune_indices"]) == 100
    with pytest.raises(ValueError, match="Conv2d"):
        FinePruning(prune_images=100, layer="features.20", progress=False).fit(d["model"], d["x_clean"], d["y_clean"])
    with pytest.raises(ValueError, match="prune_images"):
        FinePruning(prune_images=400, progress=False).fit(d["model"], d["x_clean"], d["y_clean"])
    for bad in ({"drop_mode": "percent"}, {"acc_drop": 1.5}, {"prune_images": 1.0}, {"prune_step": 0},
                {"optimizer": "rmsprop"}):
        with pytest.raises(ValueError):
            FinePruning(**bad)
