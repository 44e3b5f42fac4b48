"""Every registered defense is deterministic per seed: two runs with the same seed give
bit-identical weights, history numbers and outputs, whatever the global RNG holds (and
leave it as it was); another seed gives other weights. Small settings on the generated
task of :mod:`ibau.testing`."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from ibau import testing
from ibau.defenses import DEFENSES
from ibau.metrics import backdoor_metrics

# Small settings per defense. The trigger-synthesis defenses get a near-zero threshold so
# that some class is flagged and the unlearning (which draws random batches) is covered.
SMALL = {
    "ibau": dict(rounds=1, batch_size=50),
    "neural_cleanse": dict(epochs=2, epoch_images=64, threshold=1e-3),
    "tabor": dict(epochs=2, epoch_images=64, threshold=1e-3),
    "deepinspect": dict(steps=20, batch_size=32, eval_images=50, eval_samples=1, threshold=1e-3),
    "fine_pruning": dict(prune_images=100, epochs=1, batch_size=50),
    "nad": dict(teacher_epochs=1, student_epochs=1, lr=0.01, batch_size=50, num_layers=2, betas=(500.0, 1000.0),
                crop_pad=1),
    "dp": dict(noise_multiplier=1.0, epochs=1, batch_size=50),
    "naive_uap": dict(rounds=1, batch_size=50),
}
TIMING = ("seconds", "elapsed", "time")


def test_every_registered_defense_is_covered():
    assert set(SMALL) == set(DEFENSES)


def _numbers(obj, where="result"):
    """``obj`` with timings dropped and tensors kept, for exact comparison."""
    if isinstance(obj, dict):
        return {k: _numbers(v, f"{where}.{k}") for k, v in obj.items()
                if not any(t in str(k) for t in TIMING)}
    if isinstance(obj, (list, tuple)):
        return [_numbers(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.detach().cpu())
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return f"<{type(obj).__name__}>"  # not compared (callables, modules)


def _assert_same(a, b, where="result"):
    if isinstance(a, tuple) and a and a[0] == "tensor":
        assert isinstance(b, tuple) and b[0] == "tensor", where
        assert a[1].shape == b[1].shape and torch.equal(a[1], b[1]), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _run(name: str, seed: int, data: dict):
    model = testing.poisoned_model()
    torch.rand(int(torch.randint(1, 100, (1,))))  # move the global RNG: the defense must not depend on it
    defense = DEFENSES[name](seed=seed, progress=False, **SMALL[name])
    rng = torch.get_rng_state()
    res = defense.fit(model, data["x"], data["y"], evaluate=data["evaluate"])
    assert torch.equal(torch.get_rng_state(), rng), "the caller's global RNG must be left as it was"
    weights = {k: v.detach().clone() for k, v in res.model.state_dict().items()}
    return weights, _numbers(res.history), _numbers(res.extras), res.stop_reason


@pytest.fixture(scope="module")
def data():
    x, y = testing.make_data(200, 5)
    x_eval, y_eval = testing.make_data(200, 6)
    trig = testing.trigger()
    return {"x": x, "y": y,
            "evaluate": lambda m: backdoor_metrics(m, x_eval, y_eval, trig, testing.TARGET)}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_deterministic_per_seed(name, data, one_thread):
    if name == "dp" and importlib.util.find_spec("opacus") is None:
        pytest.skip("DP-SGD needs opacus (pip install 'ibau[dp]')")
    w1, h1, e1, r1 = _run(name, 3, data)
    w2, h2, e2, r2 = _run(name, 3, data)
    before = testing.poisoned_model().state_dict()
    assert any(k not in before or not torch.equal(v, before[k]) for k, v in w1.items()), \
        "the defense changed nothing: the comparison would not cover its training"
    assert len(h1) >= 2 and all(isinstance(h.get("acc"), float) for h in h1)  # evaluated at every point
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    _assert_same(h1, h2, "history")
    _assert_same(e1, e2, "extras")
    assert r1 == r2
    w3, *_ = _run(name, 4, data)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1), "another seed gave the same weights"
