"""``ibau.scan`` and ``ibau scan``: a verdict from clean images alone, on planted backdoors in
real digits (scikit-learn's bundled images) and on clean models of the same recipe."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ibau
from ibau import testing as toy
from ibau.cli import main
from ibau.errors import InputError
from ibau.scanning import MaskScan

pytest.importorskip("sklearn")

STEPS = 150  # measured on these models: scores 2.7-3.3 (backdoor) against 1.3-1.4 (clean) at 120 steps

MODEL_DEF = "from ibau.models import SmallVGG\n\ndef digits_vgg(num_classes=10):\n" \
            "    return SmallVGG(num_classes=num_classes, in_channels=1, image_size=8)\n"


@pytest.fixture(scope="module")
def scans():
    """Each digits model's scan, once (seed 0, half the default steps: the fast tier's budget)."""
    out = {}
    for kind in ("one_target", "clean"):
        d = toy.digits_backdoor(kind)
        out[kind] = (d, ibau.scan(d["model"], d["x_clean"], d["y_clean"], seed=0, steps=STEPS, progress=False))
    return out


def test_scan_names_the_target_of_a_planted_backdoor_and_passes_a_clean_model(scans):
    d, res = scans["one_target"]
    assert res.backdoored and res.target_classes == [d["target"]]
    assert res.score > res.threshold
    by_class = {r["class"]: r for r in res.per_class}
    # the target's reversed stamp is the smallest and works: most non-target images go to the target
    assert min(by_class, key=lambda k: by_class[k]["mask_l1"]) == d["target"]
    assert by_class[d["target"]]["success"] > 0.8
    trig = res.triggers[d["target"]]
    assert trig["mask"].shape == (1, 8, 8) and trig["pattern"].shape == (1, 8, 8)
    assert "backdoor found -> class 0" in res.summary()

    _, clean = scans["clean"]
    assert not clean.backdoored and clean.target_classes == [] and clean.score < clean.threshold
    assert clean.summary().startswith("no backdoor found")
    assert res.score > 1.5 * clean.score


def test_a_model_that_does_not_recognise_the_data_gets_a_warning(scans, files, tmp_path, capsys):
    """The trained digits models recognise their clean images (no warning); the same model fed images it
    was not trained on (inverted, as a wrong normalisation would) is near chance: the verdict comes with a
    warning in the result, the JSON report, report.md and on the terminal."""
    for kind in ("one_target", "clean"):
        _, res = scans[kind]
        assert res.clean_accuracy > 0.9 and res.warnings == []
        assert res.as_dict()["warnings"] == [] and res.as_dict()["clean_accuracy"] == res.clean_accuracy
    d = toy.digits_backdoor("clean")
    wrong = ibau.scan(d["model"], 1 - d["x_clean"], d["y_clean"], seed=0, steps=30, progress=False)
    assert wrong.clean_accuracy < 0.2
    assert len(wrong.warnings) == 1 and "does not recognise the data" in wrong.warnings[0]
    # the CLI prints it after the verdict and writes it to both reports
    data = np.load(files / "clean.npz")
    np.savez(tmp_path / "inverted.npz", x=255 - data["x"], y=data["y"])
    code = main(["scan", "--model-def", f"{files / 'model_def.py'}:digits_vgg", "--weights",
                 str(files / "clean.safetensors"), "--data", str(tmp_path / "inverted.npz"), "--quiet", "--steps", "30",
                 "--report", str(tmp_path / "r.json"), "--report-dir", str(tmp_path / "rep")])
    assert code in (0, 1)
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("warning: the model classifies only")
    assert "does not recognise" in json.loads((tmp_path / "r.json").read_text())["warnings"][0]
    assert "**Warning:** the model classifies only" in (tmp_path / "rep" / "report.md").read_text()


def test_defense_reports_warn_when_the_model_does_not_recognise_the_clean_set():
    """Every job's report (``base_report``) carries the same warning, measured on the held-out images."""
    from ibau.defend import defend

    d = toy.digits_backdoor("clean")
    ok = defend(copy.deepcopy(d["model"]), d["x_clean"], d["y_clean"], "naive_uap", seed=0, progress=False)
    assert not any("does not recognise" in w for w in ok.report["warnings"])
    bad = defend(copy.deepcopy(d["model"]), 1 - d["x_clean"], d["y_clean"], "naive_uap", seed=0, progress=False)
    assert bad.report["clean_accuracy_before"] < 0.2
    assert any("does not recognise" in w for w in bad.report["warnings"])


def test_scan_is_seeded_and_leaves_the_model_alone():
    d = toy.digits_backdoor("one_target")
    before = {k: v.clone() for k, v in d["model"].state_dict().items()}
    flags = [p.requires_grad for p in d["model"].parameters()]
    a = ibau.scan(d["model"], d["x_clean"], d["y_clean"], seed=3, steps=60, progress=False)
    b = ibau.scan(d["model"], d["x_clean"], d["y_clean"], seed=3, steps=60, progress=False)
    c = ibau.scan(d["model"], d["x_clean"], d["y_clean"], seed=4, steps=60, progress=False)
    strip = lambda r: {k: v for k, v in r.as_dict().items() if k != "seconds"}  # noqa: E731
    assert strip(a) == strip(b) and strip(a) != strip(c)
    assert all(torch.equal(v, before[k]) for k, v in d["model"].state_dict().items())
    assert [p.requires_grad for p in d["model"].parameters()] == flags and not d["model"].training
    assert sum(r["kept"] for r in a.per_class) == 3 and a.config["explore_steps"] == 20


def test_scan_without_success_rates_is_the_same_search():
    d = toy.digits_backdoor("one_target")
    a = ibau.scan(d["model"], d["x_clean"], d["y_clean"], seed=3, steps=60, progress=False)
    b = ibau.scan(d["model"], d["x_clean"], d["y_clean"], seed=3, steps=60, progress=False, success_images=0)
    assert (a.backdoored, a.score, a.target_classes) == (b.backdoored, b.score, b.target_classes)
    # everything but the stamps' success rates: the clean statistics are measured on the same images either way
    assert [{k: v for k, v in r.items() if k != "success"} for r in a.per_class] == \
        [{k: v for k, v in r.items() if k != "success"} for r in b.per_class]
    assert all(r["success"] is None for r in b.per_class) and b.clean_accuracy == a.clean_accuracy
    assert all(0 <= r["success"] <= 1 for r in a.per_class)
    assert sum(r["predicted_share"] for r in a.per_class) == pytest.approx(1)
    assert sum(r["label_share"] for r in a.per_class) == pytest.approx(1)
    assert all(torch.equal(a.triggers[k][t], b.triggers[k][t]) for k in a.triggers for t in ("mask", "pattern"))
    with pytest.raises(InputError, match="success_images"):
        MaskScan(success_images=-1)


def test_mask_tv_makes_the_reversed_mask_compact_and_still_names_the_target(scans):
    from ibau.scanning import _total_variation

    d, plain = scans["one_target"]
    tv = ibau.scan(d["model"], d["x_clean"], d["y_clean"], seed=0, steps=STEPS, progress=False, mask_tv=1.0)
    assert tv.backdoored and tv.target_classes == [d["target"]] and tv.config["mask_tv"] == 1.0
    assert plain.config["mask_tv"] == 0.0

    def spread(res):  # total variation per unit of mask: low for a compact blob, high for scattered pixels
        m = res.triggers[d["target"]]["mask"][None]
        return float(_total_variation(m)[0] / m.sum())

    assert spread(tv) < spread(plain), (spread(tv), spread(plain))
    # 0 is Neural Cleanse's objective: the same search, bit for bit, as leaving it out
    zero = ibau.scan(d["model"], d["x_clean"], d["y_clean"], seed=0, steps=STEPS, progress=False, mask_tv=0.0)
    assert zero.score == plain.score
    assert torch.equal(zero.triggers[d["target"]]["mask"], plain.triggers[d["target"]]["mask"])
    with pytest.raises(InputError, match="mask_tv"):
        MaskScan(mask_tv=-1)


def test_scan_refuses_what_it_cannot_judge():
    d = toy.digits_backdoor("clean")
    with pytest.raises(InputError, match="method"):
        ibau.scan(d["model"], d["x_clean"], d["y_clean"], method="oracle")
    with pytest.raises(InputError, match="explore_steps"):
        MaskScan(steps=10, explore_steps=10)
    with pytest.raises(InputError, match="keep"):
        MaskScan(keep=1)
    two = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with pytest.raises(InputError, match="at least 3 classes"):
        ibau.scan(two, d["x_clean"][:10], d["y_clean"][:10] % 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory, scans):
    root = tmp_path_factory.mktemp("scan")
    (root / "model_def.py").write_text(MODEL_DEF)
    for kind in ("one_target", "clean"):
        d, _ = scans[kind]
        save_file({k: v.contiguous() for k, v in d["model"].state_dict().items()}, str(root / f"{kind}.safetensors"))
    d, _ = scans["clean"]
    np.savez(root / "clean.npz", x=(d["x_clean"][:, 0] * 255).round().byte().numpy(), y=d["y_clean"].numpy())
    return root


def _scan(root, weights, *extra):
    return main(["scan", "--model-def", f"{root / 'model_def.py'}:digits_vgg", "--weights", str(weights),
                 "--data", str(root / "clean.npz"), "--quiet", "--steps", str(STEPS), *extra])


def test_cli_exit_status_is_1_for_a_backdoor_0_for_clean_2_for_bad_input(files, tmp_path, capsys):
    assert _scan(files, files / "one_target.safetensors", "--report", str(tmp_path / "r.json"),
                 "--report-dir", str(tmp_path / "rep")) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("backdoor found -> class 0 (score") and out[0].endswith(" s)")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["backdoored"] is True and rep["target_classes"] == [0] and rep["threshold"] == 2.0
    assert len(rep["per_class"]) == 10 and rep["config"]["method"] == "mask" and rep["versions"]["torch"]
    assert rep["seconds"] > 0
    for f in ("report.md", "report.json", "trigger_0.safetensors", "trigger_0_mask.png", "trigger_0_pattern.png",
              "trigger_0_stamp.png"):
        assert (tmp_path / "rep" / f).is_file(), f
    t = load_file(str(tmp_path / "rep" / "trigger_0.safetensors"))
    assert t["mask"].shape == (1, 8, 8) and float(t["mask"].max()) <= 1
    assert "Backdoor found" in (tmp_path / "rep" / "report.md").read_text()

    assert _scan(files, files / "clean.safetensors") == 0
    assert capsys.readouterr().out.startswith("no backdoor found")

    assert _scan(files, tmp_path / "missing.safetensors") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ibau: error:")
    assert _scan(files, files / "clean.safetensors", "--steps", "2") == 2
    assert "steps" in capsys.readouterr().err
    # a report must never replace an input
    assert _scan(files, files / "clean.safetensors", "--report", str(files / "clean.npz"), "--force") == 2
    assert "ibau: error:" in capsys.readouterr().err


def test_unlearn_scans_before_and_after_and_auto_rounds_stop_on_the_scan():
    from ibau.report import summary
    from ibau.unlearn import unlearn

    d = toy.digits_backdoor("one_target")
    backdoored = copy.deepcopy(d["model"])  # unlearn changes the model it is given
    # without the recovery's stamps, a clean rescan ends the rounds
    res = unlearn(d["model"], d["x_clean"], d["y_clean"], holdout=100, rounds="auto", max_rounds=3, batch_size=25,
                  robustness_passes=1, scan_settings={"steps": STEPS}, progress=False, reversed_fraction=0.0)
    rep = res.report
    assert rep["reversed_classes"] == []
    assert rep["scan_before"]["backdoored"] and rep["scan_before"]["target_classes"] == [d["target"]]
    assert rep["scan_before"]["score"] > rep["scan_before"]["threshold"]
    assert set(rep["scan_after"]) >= {"backdoored", "score", "threshold", "target_classes", "per_class"}
    assert all("scan_backdoored" in h for h in rep["history"])
    stopped_clean = [h["round"] for h in rep["history"] if not h["scan_backdoored"]]
    if rep["stop_reason"].startswith("scan: no backdoor found"):
        assert stopped_clean == [rep["rounds"]]  # it stops at the first round the scan calls clean
    else:  # otherwise the accuracy limit or max_rounds ended it, and no kept round was called clean
        assert not stopped_clean[:-1]
    line = summary(rep).splitlines()[0]
    assert line.startswith("scan (threshold 2): before: backdoor found -> class 0")
    assert "weak evidence" not in line
    assert rep["config"]["scan"]["steps"] == STEPS
    phases = rep["seconds_phases"]
    assert set(phases) == {"unlearning", "scan", "universal_perturbation_search"}
    assert all(v > 0 for v in phases.values()) and sum(phases.values()) <= rep["seconds"]
    # every scan's own clock is inside the scan phase: before, after, and one per round in auto mode
    assert phases["scan"] >= rep["scan_before"]["seconds"] + rep["scan_after"]["seconds"]
    assert f"total {rep['seconds']:.1f} s (I-BAU rounds" in summary(rep)
    # with them (the default recipe), the rescan is blind to what the stamps leave: it never ends the rounds
    res = unlearn(backdoored, d["x_clean"], d["y_clean"], holdout=100, rounds="auto", max_rounds=2, batch_size=25,
                  robustness_passes=1, scan_settings={"steps": STEPS}, progress=False)
    rep = res.report
    assert rep["reversed_classes"] == [d["target"]]
    assert set(rep["debiased_classes"]) <= set(rep["reversed_classes"])  # the over-predicted ones among them
    assert not rep["stop_reason"].startswith("scan:")
    # what ends it instead: max_rounds, the accuracy limit, or stop_unmoved (the stamps no longer move the model)
    unmoved = "stopped before round 2: the stamped trigger(s) no longer move the model"
    assert rep["stop_reason"].startswith(("reached max_rounds=2", "accuracy limit", unmoved))
    assert rep["stop_reason"].startswith(("accuracy limit", unmoved)) or [h["round"] for h in rep["history"]] == [1, 2]
    line = summary(rep).splitlines()[0]
    assert ("weak evidence: the recovery unlearned this scan's own reversed trigger" in line) == \
        (not rep["scan_after"]["backdoored"])
    # the run line says which class the recovery stamped, and that the stamp was amplified (the default's 50 steps)
    # and, where the teacher's probability of that class was moved, that too
    moved = (f"; its over-predicted probability moved to the labels: class {d['target']}"
             if rep["debiased_classes"] else "")
    assert f"reversed trigger (class {d['target']}; amplified, 50 steps a round{moved})" in summary(rep)


def test_zoo_benchmark_measures():
    """AUROC and the true-positive rate at a false-positive budget of benchmarks/scan_zoo.py."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scan_zoo.py"
    spec = importlib.util.spec_from_file_location("scan_zoo", path)
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    assert zoo._auroc([3, 4], [1, 2]) == 1.0 and zoo._auroc([1, 2], [3, 4]) == 0.0
    assert zoo._auroc([2, 3], [2, 1]) == pytest.approx(0.875)  # one tie counts half: (1 + .5 + 1 + 1) / 4
    neg = [1.0 + i / 100 for i in range(20)]  # 20 clean scores 1.00 .. 1.19
    # 5% of 20 = one false positive allowed: the threshold is the second highest clean score (1.18)
    assert zoo._tpr_at([1.185, 1.5, 0.5, 1.0], neg, 0.05) == 0.5
    assert zoo._tpr_at([2.0], [1.0], 0.05) == 1.0 and zoo._tpr_at([0.5], [1.0], 0.05) == 0.0


def _biased(model, k, shift):
    """``model`` answering class ``k`` more often: ``shift`` added to its last layer's bias for ``k``."""
    out = copy.deepcopy(model)
    last = [m for m in out.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[k] += shift
    return out


def test_a_class_bias_looks_like_a_backdoor_and_is_not_flagged(scans):
    """A clean model with a class-3 logit bias (it then answers 3 for ~27% of the images, labelled 11%)
    is flagged by the rule-free search; the default verdict (max_over_prediction=2) leaves the class out,
    with a warning; prior_correction (off by default) takes the bias out of the search itself. The
    planted backdoor is still flagged by the default scan."""
    d, _ = scans["clean"]
    biased = _biased(d["model"], 3, 8.0)
    plain = ibau.scan(biased, d["x_clean"], d["y_clean"], seed=0, steps=STEPS, progress=False,
                      max_over_prediction=None)
    assert plain.backdoored and plain.target_classes == [3] and plain.warnings == []
    row = plain.per_class[3]
    assert row["predicted_share"] >= 2 * row["label_share"] and row["over_predicted"] is False
    default = ibau.scan(biased, d["x_clean"], d["y_clean"], seed=0, steps=STEPS, progress=False)
    assert not default.backdoored and default.target_classes == [] and default.score < default.threshold
    assert default.per_class[3]["over_predicted"] and sum(r["over_predicted"] for r in default.per_class) == 1
    # the same search: only the verdict differs
    assert [r["mask_l1"] for r in default.per_class] == [r["mask_l1"] for r in plain.per_class]
    assert len(default.warnings) == 1 and default.warnings[0].startswith("class 3 is reached with a stamp")
    corrected = ibau.scan(biased, d["x_clean"], d["y_clean"], seed=0, steps=STEPS, progress=False,
                          prior_correction=True, max_over_prediction=None)
    assert not corrected.backdoored and corrected.score < corrected.threshold
    assert corrected.per_class[3]["prior_offset"] == max(r["prior_offset"] for r in corrected.per_class) > 4
    assert corrected.per_class[3]["predicted_share"] == row["predicted_share"]  # the model as given
    b, found = scans["one_target"]  # the default scan
    assert found.backdoored and found.target_classes == [b["target"]]
    assert not any(r["over_predicted"] for r in found.per_class)
    with pytest.raises(InputError, match="max_over_prediction"):
        MaskScan(max_over_prediction=0.5)


def test_prior_offsets_match_the_label_shares():
    from ibau.scanning import _Shifted, prior_offsets

    d = toy.digits_backdoor("clean")
    biased = _biased(d["model"], 3, 8.0).eval()
    b = prior_offsets(biased, d["x_clean"], d["y_clean"], 10)
    assert abs(float(b.sum())) < 1e-4
    with torch.no_grad():
        p = torch.softmax(_Shifted(biased, b)(d["x_clean"]).double(), 1).mean(0)
    share = torch.bincount(d["y_clean"], minlength=10).double() / len(d["y_clean"])
    torch.testing.assert_close(p, share, atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="prior_correction"):
        MaskScan(prior_correction="yes")


def test_unlearn_reports_a_class_the_scan_left_out_as_the_models_bias(scans):
    """ibau unlearn's scans are ibau scan's: on the logit-biased clean model the scan before flags nothing
    (so nothing is stamped), and the report carries the scan's warning about the left-out class."""
    from ibau.unlearn import unlearn

    d, _ = scans["clean"]
    biased = _biased(d["model"], 3, 8.0)
    res = unlearn(biased, d["x_clean"], d["y_clean"], holdout=100, rounds=1, batch_size=25, robustness_passes=1,
                  scan_settings={"steps": STEPS}, progress=False)
    rep = res.report
    assert not rep["scan_before"]["backdoored"] and rep["reversed_classes"] == []
    assert rep["scan_before"]["per_class"][3]["over_predicted"]
    assert any(w.startswith("scan before: class 3 is reached with a stamp") for w in rep["warnings"])


def test_the_verdict_keeps_the_largest_mask_as_the_yardstick_and_leaves_out_only_over_predicted_candidates():
    """judge() on norms like the zoo's PreAct Trojan SQ (kept 5: 9.6, 9: 18.6, over-predicted 6: 20.7): the
    over-predicted class stays the yardstick, so the target is still flagged (2.16); leaving it out of the
    yardstick too would have lost it (1.94). Its own small stamp (clean PreAct: 9 over-predicted) is left out."""
    from ibau.scanning import judge, over_predicted

    norms = {5: 9.6, 9: 18.6, 6: 20.7}
    score, flagged, left = judge(norms, [5, 9, 6], 2.0, over=[6])
    assert flagged == [5] and left == [] and score == pytest.approx(20.7 / 9.6)
    assert judge(norms, [5, 9, 6], 2.0) == (pytest.approx(20.7 / 9.6), [5], [])
    score, flagged, left = judge({9: 12.2, 3: 25.0, 4: 33.1}, [9, 3, 4], 2.0, over=[9])
    assert flagged == [] and left == [9] and score == pytest.approx(33.1 / 25.0)
    # every kept class over-predicted: nothing to judge
    assert judge({1: 1.0, 2: 5.0}, [1, 2], 2.0, over=[1, 2]) == (1.0, [], [1])
    # over-prediction needs both the ratio and an excess of 5% of the images: not a rare class by chance
    assert over_predicted([0.24, 0.004, 0.10], [0.09, 0.002, 0.10], 2.0) == [0]
    assert over_predicted([0.24, 0.004, 0.10], [0.09, 0.002, 0.10], None) == []
    assert over_predicted([0.15], [0.09], 2.0) == []
