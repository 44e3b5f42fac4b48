"""The library on a GPU: run where CUDA is present, skipped elsewhere (CI has no GPU)."""

import math

import pytest
import torch

import ibau
from ibau import IBAU
from ibau import testing as toy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_ibau_round_runs_on_the_gpu_like_on_the_cpu():
    from ibau.metrics import clean_accuracy

    x, y = toy.make_data(200, 3)
    xt, yt = toy.make_data(200, 4)
    acc = {}
    for device in ("cpu", "cuda"):
        model = toy.poisoned_model().to(device)
        res = IBAU(rounds=1, batch_size=50, seed=0, progress=False).fit(model, x.to(device), y.to(device))
        assert all(p.device.type == device for p in model.parameters())
        assert all(torch.isfinite(p).all() for p in model.parameters())
        h = res.history[-1]
        assert math.isfinite(h["outer_loss"]) and h["delta_norm"] <= 10.0 + 1e-3
        acc[device] = clean_accuracy(model, xt.to(device), yt.to(device))
    # the same seeded algorithm with other kernels: not bit-identical, but the same outcome
    assert abs(acc["cpu"] - acc["cuda"]) < 0.1


def test_scan_runs_on_the_gpu():
    pytest.importorskip("sklearn")
    d = toy.digits_backdoor("one_target")
    model = d["model"].cuda()
    res = ibau.scan(model, d["x_clean"].cuda(), d["y_clean"].cuda(), seed=0, steps=150, progress=False)
    assert res.backdoored and res.target_classes == [d["target"]]
    assert all(p.device.type == "cuda" for p in model.parameters())
