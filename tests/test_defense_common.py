"""The shared machinery of the defenses: the trace (clock, points, stop), the outlier
test, seeded augmentation and trigger stamping."""

import time

import pytest
import torch
from torch import nn

from ibau.defenses import DEFENSES, create
from ibau.defenses._common import augment, mad_anomaly_index, stamp_fraction
from ibau.defenses.base import Trace, check_images, time_to_effect


def test_trace_clock_excludes_evaluation_and_stops():
    model = nn.Linear(2, 2)

    rates = iter([0.9, 0.5, 0.1])  # before, step 0, step 1

    def slow_eval(m):
        time.sleep(0.2)
        return {"asr": next(rates)}

    trace = Trace(slow_eval, stop_when=lambda rec: rec["asr"] < 0.2 and "effective")
    model.train()
    with trace.run(model):
        for i in range(5):
            time.sleep(0.05)
            trace.point(model, f"step {i}")
    assert model.training  # mode restored
    assert [h["point"] for h in trace.history] == ["before", "step 0", "step 1"]
    assert trace.stop_reason == "effective"
    # two evaluated points + before = 0.6 s of evaluation, none of it on the clock
    assert 0.09 < trace.history[-1]["elapsed"] < 0.3
    assert trace.history[1]["elapsed"] < trace.history[2]["elapsed"]
    res = trace.result(model)
    assert res.seconds == trace.history[-1]["elapsed"] and res.stop_reason == "effective"
    assert time_to_effect(res.history) == trace.history[2]["elapsed"]
    assert time_to_effect(res.history[:2]) is None


def test_time_to_effect_with_an_accuracy_limit_skips_points_that_wrecked_the_model():
    history = [{"point": "before", "elapsed": 0.0, "acc": 0.9, "asr": 1.0},
               {"point": "e1", "elapsed": 1.0, "acc": 0.5, "asr": 0.0},   # ASR down by wrecking the model
               {"point": "e2", "elapsed": 2.0, "acc": 0.82, "asr": 0.1}]  # 8 points lost: effective
    assert time_to_effect(history) == 1.0
    assert time_to_effect(history, max_drop=0.1) == 2.0
    assert time_to_effect(history, max_drop=0.05) is None


def test_mad_anomaly_index_flags_the_outlier():
    v = torch.tensor([20.0, 21.0, 19.0, 22.0, 20.5, 4.0])
    idx = mad_anomaly_index(v)
    assert idx.argmax() == 5 and idx[5] > 2
    assert (idx[:5] < 2).all()
    # median of an even count is the mean of the middle two (numpy's convention, as NC)
    assert mad_anomaly_index(torch.tensor([1.0, 2.0, 3.0, 4.0]))[0] == pytest.approx(1.5 / (1.4826 * 1.0))


def test_augment_is_a_seeded_crop_and_flip():
    x = torch.rand(64, 3, 8, 8)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    # without padding and flipping it is the identity; flipping only mirrors
    assert torch.equal(augment(x, torch.Generator(), pad=0, flip=False), x)
    f = augment(x, torch.Generator().manual_seed(0), pad=0)
    assert all(torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(-1)) for i in range(64))
    # a crop shifts by at most `pad` pixels: every output row is a (zero-padded) shifted input row
    c = augment(x, torch.Generator().manual_seed(3), pad=2, flip=False)
    assert (c == 0).any() and c.abs().sum() > 0


def test_stamp_fraction_stamps_the_requested_share():
    x = torch.zeros(50, 1, 4, 4)
    out = stamp_fraction(x, [lambda t: t + 1], 0.2, torch.Generator().manual_seed(0))
    assert int((out.flatten(1).sum(1) > 0).sum()) == 10
    assert torch.equal(x, torch.zeros_like(x))  # input untouched


def test_check_images_messages():
    with pytest.raises(ValueError, match="empty"):
        check_images(torch.rand(0, 3, 4, 4), torch.zeros(0))
    with pytest.raises(ValueError, match="integer labels"):
        check_images(torch.rand(2, 3, 4, 4), torch.tensor([0.5, 1.0]))
    x, y = check_images(torch.rand(2, 3, 4, 4), torch.tensor([0.0, 1.0]))
    assert y.dtype == torch.long


def test_registry_lists_every_method_with_defaults():
    for name, cls in DEFENSES.items():
        d = create(name, progress=False)
        assert isinstance(d, cls) and d.name == name
        cfg = d.config()
        assert cfg["seed"] == 0 and "progress" in cfg
    with pytest.raises(KeyError, match="unknown defense"):
        create("nope")
