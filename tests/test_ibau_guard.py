"""Issue 13: the accuracy guard (``IBAU(guard_drop=..., guard_retries=...)``): a round that costs
more than ``guard_drop`` of the clean set's accuracy is undone and run again with a smaller step."""

import pytest
import torch

from ibau import IBAU, InputError, testing as toy
from ibau.defenses.ibau import GUARD_BACKOFF

_data, _vgg = toy.noise_data, toy.seeded_vgg


def _ibau(**settings) -> IBAU:
    settings = {"rounds": 1, "batch_size": 20, "norm_bound": 2.0, "seed": 1, "progress": False, "precision": "fp32",
                "fp_batch": None, "reversed_fraction": 0.0, **settings}
    return IBAU(**settings)


def _rounds(res) -> list[dict]:
    return [h for h in res.history if h.get("round")]


def test_a_guard_that_does_not_fire_changes_nothing_and_records_the_accuracy():
    x, y = _data()
    plain, guarded = _vgg(), _vgg()
    _ibau(rounds=2, guard_drop=None).fit(plain, x, y)
    res = _ibau(rounds=2, guard_drop=1.0).fit(guarded, x, y)  # no round can lose more than everything
    assert all(torch.equal(plain.state_dict()[k], guarded.state_dict()[k]) for k in plain.state_dict())
    for h in _rounds(res):
        assert h["guard_retries"] == 0 and h["outer_lr"] == 1e-3 and "guard_exceeded" not in h
    with torch.no_grad():  # the recorded accuracy is the model's on the clean set's labels
        assert _rounds(res)[-1]["clean_accuracy"] == pytest.approx(float((guarded(x).argmax(1) == y).float().mean()))


def test_the_guard_measures_the_first_batches_holding_guard_images(monkeypatch):
    import ibau.defenses.ibau as module

    monkeypatch.setattr(module, "GUARD_IMAGES", 30)  # batches of 20: the first two, 40 images
    x, y = _data()
    model = _vgg()
    res = _ibau(guard_drop=1.0).fit(model, x, y)
    with torch.no_grad():
        first = float((model(x[:40]).argmax(1) == y[:40]).float().mean())
        before = float((_vgg()(x[:40]).argmax(1) == y[:40]).float().mean())
    assert _rounds(res)[0]["clean_accuracy"] == pytest.approx(first)
    assert _rounds(res)[0]["clean_accuracy_before"] == pytest.approx(before)


def _scripted(monkeypatch, drops):
    """Record each run of a round (its starting weights, optimiser state and step size) and make
    the clean-set accuracy after it ``before - drops[i]``."""
    calls, original, measure = [], IBAU.unlearn_round, IBAU.clean_accuracy

    def unlearn_round(self, r, setup, extras):
        calls.append({"round": r, "weights": [p.detach().clone() for p in setup.params],
                      "draws": setup.generator.get_state(),
                      "state": len(setup.optimizer.state), "lr": setup.optimizer.param_groups[0]["lr"]})
        return original(self, r, setup, extras)

    def clean_accuracy(self, setup, predictions=None):
        if setup.clean_accuracy is None:  # the accuracy before round 1, measured
            return measure(self, setup, predictions)
        return setup.clean_accuracy - drops[len(calls) - 1]

    monkeypatch.setattr(IBAU, "unlearn_round", unlearn_round)
    monkeypatch.setattr(IBAU, "clean_accuracy", clean_accuracy)
    return calls


def test_a_round_that_costs_too_much_is_undone_and_run_again_with_a_smaller_step(monkeypatch):
    x, y = _data()
    calls = _scripted(monkeypatch, [0.5, 0.02, 0.03])  # round 1 loses 50 points, its re-run 2; round 2: 3
    res = _ibau(rounds=2, guard_drop=0.05, outer_lr=3e-3).fit(_vgg(), x, y)
    assert [c["round"] for c in calls] == [1, 1, 2]
    first, rerun, second = calls
    # the re-run starts from the weights and the (empty) optimiser state the round started from
    assert all(torch.equal(a, b) for a, b in zip(first["weights"], rerun["weights"]))
    assert torch.equal(first["draws"], rerun["draws"])  # the same perturbed and stamped images
    assert not torch.equal(rerun["draws"], second["draws"])
    assert first["state"] == rerun["state"] == 0 and second["state"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(rerun["weights"], second["weights"]))
    assert (first["lr"], rerun["lr"], second["lr"]) == (3e-3, 3e-3 / GUARD_BACKOFF, 3e-3 / GUARD_BACKOFF)
    r1, r2 = _rounds(res)
    assert (r1["guard_retries"], r2["guard_retries"]) == (1, 0)
    assert r1["outer_lr"] == r2["outer_lr"] == 3e-3 / GUARD_BACKOFF
    assert "guard_exceeded" not in r1 and "guard_exceeded" not in r2
    before = r1["clean_accuracy_before"]
    assert r1["guard_accuracies"] == pytest.approx([before - 0.5, before - 0.02]) and "guard_accuracies" not in r2


def test_the_guard_stops_retrying_after_guard_retries_and_says_so(monkeypatch):
    x, y = _data()
    calls = _scripted(monkeypatch, [0.5, 0.4, 0.3, 0.2])
    res = _ibau(guard_drop=0.05, guard_retries=2).fit(_vgg(), x, y)
    assert len(calls) == 3  # the round and two re-runs
    (r1,) = _rounds(res)
    assert r1["guard_retries"] == 2 and r1["guard_exceeded"] is True
    assert r1["outer_lr"] == pytest.approx(1e-3 / GUARD_BACKOFF ** 2)
    calls.clear()
    res = _ibau(guard_drop=0.05, guard_retries=0).fit(_vgg(), x, y)
    assert len(calls) == 1 and _rounds(res)[0]["guard_exceeded"] is True


def test_the_guard_keeps_a_model_that_a_too_large_step_wrecks():
    """A step size that wrecks the toy's accuracy in one round (Adam at 0.05): the guard re-runs the
    round with smaller steps until it keeps the accuracy, where the unguarded run loses it."""
    x_clean, y_clean = toy.make_data(400, 7)

    def run(**settings):
        model = toy.poisoned_model()
        res = IBAU(rounds=1, batch_size=50, outer_lr=0.05, precision="fp32", seed=0, progress=False,
                   reversed_fraction=0.0, **settings).fit(model, x_clean, y_clean)
        with torch.no_grad():
            return float((model(x_clean).argmax(1) == y_clean).float().mean()), _rounds(res)[0]

    model = toy.poisoned_model()
    with torch.no_grad():
        before = float((model(x_clean).argmax(1) == y_clean).float().mean())
    wrecked, _ = run(guard_drop=None)
    kept, record = run(guard_drop=0.05, guard_retries=4)
    assert before - wrecked > 0.05  # the premise: this step size costs more than the guard allows
    assert record["guard_retries"] >= 1 and "guard_exceeded" not in record
    assert before - kept <= 0.05 and record["clean_accuracy"] == pytest.approx(kept)


@pytest.mark.parametrize("bad", [{"guard_drop": -0.1}, {"guard_drop": 1.5}, {"guard_drop": "5%"},
                                 {"guard_retries": -1}, {"guard_retries": 1.5}])
def test_guard_settings_are_checked(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        IBAU(**bad)


def test_unlearn_warns_when_the_guard_could_not_keep_the_accuracy(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from ibau.report import write_report_dir
    from ibau.unlearn import unlearn

    measure = IBAU.clean_accuracy
    monkeypatch.setattr(IBAU, "clean_accuracy", lambda self, setup, predictions=None: (
        measure(self, setup, predictions) if setup.clean_accuracy is None else setup.clean_accuracy - 0.5))
    d = toy.digits_backdoor("one_target")
    res = unlearn(d["model"], d["x_clean"], d["y_clean"], holdout=100, rounds=1, batch_size=25, robustness_passes=1,
                  scan=False, progress=False, precision="fp32", reversed_fraction=0.0, guard_drop=0.05,
                  guard_retries=1)
    (h,) = res.report["history"]
    assert h["guard_retries"] == 1 and h["guard_exceeded"]
    assert any("round 1 lost more than 5 points of clean-set accuracy after 1 re-run(s)" in w
               for w in res.report["warnings"])
    md = (write_report_dir(tmp_path / "r", res.report, res.artifacts) / "report.md").read_text()
    assert "Round 1 was run again 1 time(s) with a smaller outer step" in md and "5 points of clean-set" in md


def test_a_round_that_leaves_non_finite_weights_is_run_again(monkeypatch):
    original, runs = IBAU.unlearn_round, []

    def unlearn_round(self, r, setup, extras):
        out = original(self, r, setup, extras)
        runs.append(r)
        if len(runs) == 1:  # the first run diverges
            with torch.no_grad():
                setup.params[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(IBAU, "unlearn_round", unlearn_round)
    x, y = _data()
    model = _vgg()
    res = _ibau(guard_drop=1.0).fit(model, x, y)  # no accuracy is too low: only the weights decide
    assert runs == [1, 1] and _rounds(res)[0]["guard_retries"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


def test_the_guard_divides_every_parameter_groups_step_size_under_relative_lr(monkeypatch):
    x, y = _data()
    _scripted(monkeypatch, [0.5, 0.0])  # the round loses 50 points, its re-run nothing
    seen, original = [], IBAU.unlearn_round

    def unlearn_round(self, r, setup, extras):
        seen.append([g["lr"] for g in setup.optimizer.param_groups])
        return original(self, r, setup, extras)

    monkeypatch.setattr(IBAU, "unlearn_round", unlearn_round)
    _ibau(guard_drop=0.05, relative_lr=0.01, fold_bn=False).fit(_vgg(), x, y)
    assert len(seen) == 2 and len(seen[0]) > 2 and len(set(seen[0])) > 2  # one lr per weight tensor
    assert seen[1] == pytest.approx([lr / GUARD_BACKOFF for lr in seen[0]])
