"""Neural Cleanse and TABOR on planted backdoors (real digits, SmallVGG)."""

import pytest
import torch

from ibau import testing
from ibau.defenses import TABOR, NeuralCleanse

FAST = dict(epochs=15, epoch_images=400, progress=False)


@pytest.fixture(scope="module")
def nc_run():
    d = testing.digits_backdoor("one_target")
    before = testing.digits_metrics(d["model"], d)
    res = NeuralCleanse(**FAST).fit(d["model"], d["x_clean"], d["y_clean"],
                                    evaluate=lambda m: testing.digits_metrics(m, d))
    return d, before, res


def test_nc_flags_the_planted_target_and_unlearns_it(nc_run):
    d, before, res = nc_run
    scan = res.extras["scan"]
    index = torch.tensor(scan["anomaly_index"])
    assert 0 in scan["flagged"]
    assert index[0] > 2
    # the reversed mask of the planted class is the smallest, near the 2x2 patch's 4 pixels
    assert int(torch.tensor(scan["scores"]).argmin()) == 0 and scan["scores"][0] < 8
    assert res.extras["triggers"]["mask_0"].shape == (1, 8, 8)
    after = testing.digits_metrics(res.model, d)
    assert before["asr"] > 0.9 and after["asr"] < 0.1
    assert after["acc"] > before["acc"] - 0.05
    assert [h["point"] for h in res.history] == ["before", "scan", "unlearn epoch 1"]
    assert res.history[1]["asr"] == before["asr"]  # the scan does not touch the model
    assert 0 < res.history[1]["elapsed"] < res.history[2]["elapsed"] == res.seconds


def test_nc_nothing_flagged_leaves_the_model_unchanged():
    d = testing.digits_backdoor("one_target")
    state = {k: v.clone() for k, v in d["model"].state_dict().items()}
    # class 0 (the planted target) left out of the scan: the other classes look alike
    res = NeuralCleanse(**dict(FAST, epochs=3), classes=[1, 2, 3, 4]).fit(d["model"], d["x_clean"], d["y_clean"])
    if not res.extras["scan"]["flagged"]:
        assert res.stop_reason.startswith("no class flagged")
        assert all(torch.equal(v, d["model"].state_dict()[k]) for k, v in state.items())
    else:  # a false alarm is allowed, but then the unlearning must have run
        assert res.history[-1]["point"] == "unlearn epoch 1"


@pytest.mark.slow  # 42 s: the fast tier's longest test (issue 15's check of it, 309 s on a slowed machine)
def test_tabor_flags_the_planted_target():
    one = testing.digits_backdoor("one_target")
    res = TABOR(**FAST).fit(one["model"], one["x_clean"], one["y_clean"])
    scan = res.extras["scan"]
    # The planted target stands out by far: measured anomaly index 8.8-13.4, every other
    # class at most 3.0. A digit with a naturally small trigger (8 or 9 on this model) sits
    # near the threshold of 2 (measured 1.8-3.0, over search budgets, scan seeds and the
    # float rounding of 1 or 2 threads; closer to converged searches put it higher), so
    # whether it is flagged as well is not pinned here: only the planted class must stand out.
    assert 0 in scan["flagged"]
    assert scan["anomaly_index"][0] > 2 * max(scan["anomaly_index"][1:])
    assert int(torch.tensor(scan["scores"]).argmin()) == 0
    assert testing.digits_metrics(res.model, one)["asr"] < 0.1


@pytest.mark.slow  # the fast tier's longest test when it ran with the one above (63 s for both)
def test_tabor_finds_nothing_on_all_to_all():
    # the paper (Table 1): on all-to-all TABOR detects no trigger -- every class is a target
    a2a = testing.digits_backdoor("all_to_all")
    scan = TABOR(**FAST).scan(a2a["model"], a2a["x_clean"], a2a["y_clean"])
    assert scan.flagged == []


def test_bad_settings():
    with pytest.raises(ValueError):
        NeuralCleanse(cost_multiplier=1.0)
    with pytest.raises(ValueError):
        TABOR(block_cost=-1)
    with pytest.raises(ValueError, match="3 classes"):
        d = testing.digits_backdoor("one_target")
        NeuralCleanse(**FAST, classes=[0, 1]).scan(d["model"], d["x_clean"], d["y_clean"])
