"""DP-SGD training as a backdoor defense (Du et al. 2019; I-BAU paper, Appendix A.4.2)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

pytest.importorskip("opacus")

from ibau import testing  # noqa: E402
from ibau.defenses.dp import DPSGD, dp_compatible  # noqa: E402
from ibau.demo import TARGET, digits_trigger, load_digits_tensors  # noqa: E402
from ibau.models import SmallVGG  # noqa: E402


# Per-sample gradients of these tiny models are dominated by threading overhead
# (2 threads ran 5-10x slower on a shared 2-core machine).
pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _poisoned(n_poison: int):
    """Planted-style split of the real 8x8 digits: 1,100 training images of which
    ``n_poison`` (non-target) carry the 2x2 patch relabelled to class 0; the last 297
    digits are the test split."""
    x, y = load_digits_tensors()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1100], perm[1500:]
    trig = digits_trigger()
    xt, yt = x[tr].clone(), y[tr].clone()
    cand = torch.nonzero(yt != TARGET).flatten()
    cand = cand[torch.randperm(len(cand), generator=g)[:n_poison]]
    xt[cand], yt[cand] = trig(xt[cand]), TARGET
    d = {"x_test": x[te], "y_test": y[te], "trigger": trig, "target_of": testing.digits_target_of("one_target")}
    return xt, yt, d


def tiny() -> nn.Module:
    """A 1.4k-parameter CNN (with a BatchNorm, which DP-SGD must replace)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(128, 10))


def _state(m: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_settings_are_validated():
    assert DPSGD.name == "dp" and DPSGD.data_role == "training"
    d = DPSGD()
    assert (d.noise_multiplier, d.max_grad_norm, d.epochs, d.batch_size, d.delta) == (50.0, 1.0, 50, 128, 1e-5)
    assert d.config()["reinitialize"] is True
    for bad in (dict(noise_multiplier=-0.1), dict(noise_multiplier=math.nan), dict(max_grad_norm=0.0),
                dict(max_grad_norm=-1.0), dict(epochs=-1), dict(batch_size=0), dict(lr=0.0),
                dict(momentum=1.0), dict(delta=0.0), dict(delta=1.0), dict(accountant="moments")):
        with pytest.raises(ValueError):
            DPSGD(**bad)
    x, y, _ = _poisoned(22)
    with pytest.raises(ValueError):
        DPSGD(progress=False).fit(tiny(), x[:, 0], y)  # not NCHW


def test_epsilon_reported_and_decreasing_in_noise():
    x, y, _ = _poisoned(22)
    eps = {}
    for sigma in (0.0, 0.8, 2.0, 50.0):
        r = DPSGD(noise_multiplier=sigma, epochs=2, progress=False).fit(tiny(), x, y)
        points = [h for h in r.history if h["point"] != "before"]
        assert [h["epoch"] for h in points] == [1, 2]
        assert points[-1]["epsilon"] == r.extras["epsilon"]
        assert r.extras["delta"] == 1e-5 and r.extras["steps"] == 2 * math.ceil(1100 / 128)
        if sigma > 0:
            assert 0 < points[0]["epsilon"] < points[1]["epsilon"] < math.inf  # epsilon grows with steps
        eps[sigma] = r.extras["epsilon"]
    assert eps[0.0] == math.inf
    assert eps[0.8] > eps[2.0] > eps[50.0] > 0
    assert eps[50.0] < 0.2  # measured 0.106 (RDP at sigma 50 is dominated by its largest order)


def _clipped_mean_gradient(model: nn.Module, x, y, clip: float) -> torch.Tensor:
    """DP-SGD's noiseless update direction, by hand: the mean over the batch of each
    sample's gradient (flattened over all parameters) scaled to l2 norm <= clip."""
    params = list(model.parameters())
    rows = []
    for xi, yi in zip(x, y):
        loss = nn.functional.cross_entropy(model(xi[None]), yi[None])
        g = torch.cat([t.flatten() for t in torch.autograd.grad(loss, params)])
        rows.append(g * (clip / (g.norm() + 1e-6)).clamp(max=1.0))  # Opacus's flat clipping factor
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("clip", [1e-2, 1e6])
def test_one_step_is_the_clipped_mean_of_per_sample_gradients(clip):
    """No noise, plain SGD, one full batch: the update is exactly -lr * mean_i clip(g_i)."""
    x, y, _ = _poisoned(22)
    x, y = x[:64], y[:64]
    common = dict(noise_multiplier=0.0, lr=1.0, momentum=0.0, batch_size=64, poisson_sampling=False, seed=5,
                  progress=False)
    start = DPSGD(epochs=0, **common).fit(tiny(), x, y).model
    r = DPSGD(epochs=1, max_grad_norm=clip, **common).fit(tiny(), x, y)
    assert r.extras["optimizer"] == "DPOptimizer" and r.extras["steps"] == 1
    moved = _flat(r.model) - _flat(start)
    expected = -_clipped_mean_gradient(start, x, y, clip)
    assert torch.allclose(moved, expected, atol=1e-6, rtol=1e-4)
    if clip < 1:
        assert moved.norm() <= clip * (1 + 1e-5)
    else:  # nothing clipped: the plain mean gradient, far longer than the clipped one
        assert moved.norm() > 100 * 1e-2


def test_accuracy_cost_of_noise():
    """DP costs accuracy (the I-BAU paper's DP column): at sigma 0.5 the model learns the
    task, at the paper's CIFAR-10 sigma 50 it stays at chance."""
    x, y, d = _poisoned(22)
    low = DPSGD(noise_multiplier=0.5, epochs=8, progress=False).fit(tiny(), x, y)
    high = DPSGD(noise_multiplier=50.0, epochs=8, progress=False).fit(tiny(), x, y)
    acc_low, acc_high = testing.digits_metrics(low.model, d)["acc"], testing.digits_metrics(high.model, d)["acc"]
    # measured: 0.91 (epsilon 32.7) vs 0.15 (epsilon 0.11); 10 classes, chance 0.10
    assert acc_low > 0.75
    assert acc_high < 0.3


def test_suppresses_a_backdoor_from_few_poisons():
    """Du et al.'s finding: bounding each sample's influence (clip + noise) keeps a
    backdoor planted by few samples (2% here) from being learned, which the same SGD
    without clipping learns."""
    x, y, d = _poisoned(22)
    plain = DPSGD(noise_multiplier=0.0, max_grad_norm=1e6, epochs=10, progress=False).fit(tiny(), x, y)
    dp = DPSGD(noise_multiplier=1.0, epochs=10, progress=False).fit(tiny(), x, y)
    m_plain, m_dp = testing.digits_metrics(plain.model, d), testing.digits_metrics(dp.model, d)
    # measured (seed 0): plain ACC 0.97 / ASR 0.73; DP ACC 0.92 / ASR 0.02 at epsilon 8.4
    assert m_plain["acc"] > 0.9 and m_plain["asr"] > 0.45
    assert m_dp["acc"] > 0.8 and m_dp["asr"] < 0.15
    assert 0 < dp.extras["epsilon"] < 20


def test_new_module_without_batchnorm_and_input_untouched():
    pb = testing.digits_backdoor("one_target")
    model = pb["model"]
    before = _state(model)
    out_before = model(pb["x_clean"][:8])
    x, y, _ = _poisoned(220)
    calls = []

    def stop(record):
        calls.append(record["point"])
        return "enough" if record["epoch"] == 1 else False

    r = DPSGD(noise_multiplier=1.0, epochs=3, batch_size=64, progress=False).fit(
        model, x[:256], y[:256], evaluate=lambda m: testing.digits_metrics(m, pb), stop_when=stop)
    # the input model: same weights, same BatchNorms, no hooks or Opacus attributes
    assert r.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") or p.grad is not None for p in model.parameters())
    assert torch.allclose(model(pb["x_clean"][:8]), out_before)
    # the result: BatchNorm replaced by GroupNorm, clean of Opacus's hooks, in eval mode
    net = r.model
    assert not net.training
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in net.modules()) == 6
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())
    assert not any(hasattr(p, "grad_sample") or p.grad is not None for p in net.parameters())
    assert r.extras["architecture_changed"] and len(r.extras["replaced_modules"]) == 6
    assert r.extras["replaced_modules"][0]["name"] == "features.1"
    assert r.extras["not_reinitialized"] == []
    # the trace: "before" is the planted (backdoored) input, one point per epoch, stop_when honoured
    assert [h["point"] for h in r.history] == ["before", "epoch 1"] and calls == ["epoch 1"]
    assert r.history[0]["asr"] > 0.9 and "epsilon" in r.history[1] and "acc" in r.history[1]
    assert r.stop_reason == "enough" and r.extras["epsilon"] == r.history[1]["epsilon"]
    # the saved weights load strictly into the rebuilt architecture
    rebuilt = dp_compatible(SmallVGG(10, in_channels=1, image_size=8))
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    xb = pb["x_test"][:16]
    assert torch.equal(rebuilt.eval()(xb), net(xb))


def test_dp_compatible_and_reinitialize_false():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(144, 2))
    fixed = dp_compatible(m)
    assert isinstance(m[1], nn.BatchNorm2d)  # the input is untouched
    assert isinstance(fixed[1], nn.GroupNorm) and not fixed[1].affine and fixed[1].num_groups == 4
    assert fixed[0].weight is not m[0].weight and torch.equal(fixed[0].weight, m[0].weight)
    # reinitialize=False, no epochs: the given weights are kept (BatchNorm's become GroupNorm's)
    x, y, _ = _poisoned(22)
    net = tiny()
    r = DPSGD(epochs=0, reinitialize=False, progress=False).fit(net, x, y)
    assert torch.equal(r.model[0].weight, net[0].weight) and torch.equal(r.model[5].weight, net[5].weight)
    r2 = DPSGD(epochs=0, progress=False).fit(net, x, y)
    assert not torch.equal(r2.model[0].weight, net[0].weight)
    assert r2.extras["epsilon"] == 0.0 and r2.extras["steps"] == 0


class _OwnParameterWithDropout(nn.Module):
    """Holds a parameter itself (no per-sample rule in Opacus) and uses dropout in its forward."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 1, 8, 8))
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.drop(x * self.scale).flatten(1))


def test_dropout_in_a_module_with_its_own_parameters_is_an_input_error():
    """Opacus re-runs such a module under vmap to get per-sample gradients, which cannot reproduce the
    dropout draw: a clear InputError naming the module, not vmap's RuntimeError."""
    from ibau.errors import InputError

    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with pytest.raises(InputError, match="DP-SGD cannot train this model.*the model itself.*dropout"):
        DPSGD(epochs=1, batch_size=16, progress=False, seed=0).fit(_OwnParameterWithDropout(), x, y)
    # without the dropout the same model trains
    net = _OwnParameterWithDropout()
    net.drop = nn.Identity()
    out = DPSGD(epochs=1, batch_size=16, progress=False, seed=0).fit(net, x, y)
    assert all(torch.isfinite(p).all() for p in out.model.parameters())


class _InstanceNormInplace(nn.Module):
    """InstanceNorm with running statistics and nn.ReLU(inplace=True): both made trainable by the fix."""

    def __init__(self, functional_inplace=False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 10)
        self.functional_inplace = functional_inplace

    def forward(self, x):
        h = self.norm(self.conv(x))
        h = torch.relu_(h) if self.functional_inplace else self.act(h)
        return self.fc(h.mean((2, 3)))


def test_instance_norm_with_running_stats_and_inplace_activations_are_fixed():
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    model = _InstanceNormInplace()
    fixed = dp_compatible(model)
    assert not fixed.norm.track_running_stats and fixed.norm.running_mean is None
    assert fixed.act.inplace is False and model.act.inplace is True and model.norm.track_running_stats
    torch.testing.assert_close(fixed.norm.weight, model.norm.weight)
    out = DPSGD(epochs=1, batch_size=16, progress=False, seed=0).fit(model, x, y)
    assert all(torch.isfinite(p).all() for p in out.model.parameters())
    assert any(r["name"] == "norm" for r in out.extras["replaced_modules"])


def test_an_inplace_operation_in_forward_is_an_input_error():
    from ibau.errors import InputError

    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with pytest.raises(InputError, match="overwrites a layer's output in place"):
        DPSGD(epochs=1, batch_size=16, progress=False, seed=0).fit(_InstanceNormInplace(functional_inplace=True), x, y)
