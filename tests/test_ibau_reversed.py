"""Issue 13: recovery passes that also unlearn the triggers a scan reverse-engineered
(``IBAU(reversed_fraction=..., reversed_triggers=...)``)."""

import math

import pytest
import torch

from ibau import IBAU, InputError, testing as toy
from ibau.defenses._universal import Batch
from ibau.defenses.ibau import move_flagged_mass, over_predicted
from ibau.distributed import SingleProcess
from ibau.metrics import backdoor_metrics

_data, _vgg = toy.noise_data, toy.seeded_vgg


def _triggers():
    """Two stamps: a 2x2 white corner (class 1) and a dark 3x3 centre (class 3)."""
    m1, m3 = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    m1[:, 6:, 6:] = 1.0
    m3[:, 3:6, 3:6] = 0.5
    return {1: {"mask": m1, "pattern": torch.ones(3, 8, 8)}, 3: {"mask": m3, "pattern": torch.zeros(3, 8, 8)}}


def _fit(**settings):
    x, y = _data()
    model = _vgg()
    settings = {"precision": "fp32", "fp_batch": None, "reversed_fraction": 0.0, **settings}
    res = IBAU(rounds=1, batch_size=20, norm_bound=2.0, seed=1, progress=False, **settings).fit(model, x, y)
    return model.state_dict(), res


def test_stamps_the_chosen_share_of_a_batch_with_the_triggers_in_turn():
    x, y = _data(20)
    ibau = IBAU(reversed_fraction=0.2, reversed_triggers=_triggers(), progress=False)

    class _Setup:  # what stamp_reversed reads
        reversed = ibau._reversed
        generator = torch.Generator().manual_seed(5)

    out = ibau.stamp_reversed(_Setup, Batch.of((x, y)))
    changed = [i for i in range(20) if not torch.equal(out.x[i], x[i])]
    assert len(changed) == 4 and torch.equal(out.y, y)  # 20% of 20 images; the targets are kept
    chosen = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:4].tolist()
    assert sorted(chosen) == changed
    t = list(_triggers().values())
    for j, i in enumerate(chosen):  # the triggers in turn, (1 - m) x + m p
        m, p = t[j % 2]["mask"], t[j % 2]["pattern"]
        torch.testing.assert_close(out.x[i], (1 - m) * x[i] + m * p)


def test_reversed_triggers_change_the_recovery_and_nothing_else():
    plain, _ = _fit()  # reversed_fraction 0
    stamped, res = _fit(reversed_fraction=0.3, reversed_triggers=_triggers())
    again, _ = _fit(reversed_fraction=0.3, reversed_triggers=_triggers())
    none_found, res_none = _fit(reversed_fraction=0.3, reversed_triggers={})
    assert res.extras["reversed_classes"] == [1, 3] and res_none.extras["reversed_classes"] == []
    assert all(torch.equal(stamped[k], again[k]) for k in plain)  # same seed, same weights
    assert any(not torch.equal(stamped[k], plain[k]) for k in plain)  # the stamps were trained on
    assert all(torch.equal(none_found[k], plain[k]) for k in plain)  # nothing to stamp: the plain recipe
    # no recovery pass, nothing to stamp: the fraction changes nothing
    a, _ = _fit(recovery_passes=0)
    b, _ = _fit(recovery_passes=0, reversed_fraction=0.3, reversed_triggers=_triggers())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scans_when_no_triggers_are_given_and_unlearns_the_planted_trigger():
    """On the toy's planted backdoor (a 2x2 white patch -> class 0), I-BAU scans first, finds
    class 0, and its recovery stamps the reversed trigger."""
    x_eval, y_eval = toy.make_data(600, 99)
    x_clean, y_clean = toy.make_data(800, 7)

    def run(**settings):
        model = toy.poisoned_model()
        res = IBAU(rounds=2, batch_size=50, outer_lr=1e-2, precision="fp32", seed=0, progress=False,
                   **settings).fit(
            model, x_clean, y_clean)
        return res, backdoor_metrics(model, x_eval, y_eval, toy.trigger(), toy.TARGET)

    before = backdoor_metrics(toy.poisoned_model(), x_eval, y_eval, toy.trigger(), toy.TARGET)
    # the stamps' own effect, with the recovery on the teacher as the model gave it (which alone keeps the
    # backdoor) and the stamps on any image: the recipe of BF25R3AF
    before_afd = {"flagged_mass": "keep", "stamp_classes": "all", "stop_unmoved": False}
    res, after = run(reversed_fraction=0.2, recovery_target="outer", **before_afd)
    assert res.extras["reversed_classes"] == [toy.TARGET]
    _, plain = run(reversed_fraction=0.0, recovery_target="outer", **before_afd)
    assert before["asr"] > 0.9
    # measured: ASR 0.54 (an Intel CPU) and 0.56 (an AMD one) with the stamps against 0.94 and 0.95 without
    # (the toy's universal perturbation misses the patch). This toy's trajectories depend on the CPU's float
    # kernels: the same run stayed within 5 points of accuracy on the Intel CPU and lost 5.2 on the AMD one,
    # so accuracy is asserted for the default below (AMD: 0.8 points lost with one thread, 1.9 with two).
    assert after["asr"] < plain["asr"] - 0.2, (after, plain)
    # the default: the teacher without the flagged class's excess, the stamps on images of other classes
    # only: lower still (AMD, two threads: 0.26; round 2 runs, its amplified margin is 2.9 > 0). The recovery
    # on the labels (BF25R3AFR) reaches 0.18 on this toy, lower than the default here, not on the
    # benchmark's models (README, "On a second machine")
    _, default = run(reversed_fraction=0.2)
    assert default["asr"] < after["asr"] - 0.1, (default, after)
    assert default["acc"] > before["acc"] - 0.05


def test_bad_reversed_settings_are_input_errors():
    with pytest.raises(InputError, match="reversed_fraction"):
        IBAU(reversed_fraction=1.5)
    with pytest.raises(InputError, match="mask"):
        IBAU(reversed_fraction=0.2, reversed_triggers={0: {"mask": torch.zeros(1, 8, 8)}})
    with pytest.raises(InputError):
        IBAU(reversed_triggers={-1: _triggers()[1]})


def test_reversed_scan_settings_reach_the_scan_inside_fit(monkeypatch):
    from ibau.scanning import MaskScan

    seen = []
    original = MaskScan.run

    def run(self, model, x, y):
        seen.append((self.mask_tv, self.steps, self.seed))
        return original(self, model, x, y)

    monkeypatch.setattr(MaskScan, "run", run)
    x, y = toy.make_data(200, 7)
    IBAU(rounds=1, batch_size=50, seed=3, progress=False, precision="fp32",
         reversed_scan={"mask_tv": 1.0, "steps": 30}).fit(toy.poisoned_model(), x, y)
    assert seen == [(1.0, 30, 3)]  # its settings, I-BAU's seed
    # the default recipe's stamp scan is ibau scan's without the success rates; the paper recipe's is ibau scan's
    assert IBAU().reversed_scan == {"success_images": 0} and MaskScan().success_images > 0
    assert IBAU.paper(reversed_fraction=0.2, recovery_passes=1).reversed_scan == {}
    with pytest.raises(InputError, match="reversed_scan"):
        IBAU(reversed_scan={"mask_tvv": 1.0})
    with pytest.raises(InputError, match="mask_tv"):
        IBAU(reversed_scan={"mask_tv": -1.0})


def test_unlearn_stamps_the_triggers_of_its_own_scan_without_scanning_again(monkeypatch):
    pytest.importorskip("sklearn")
    from ibau.scanning import MaskScan
    from ibau.unlearn import unlearn

    runs, stamped = [], []
    original_run, original_stamp = MaskScan.run, IBAU.stamp_reversed

    def run(self, model, x, y):
        runs.append(len(x))
        return original_run(self, model, x, y)

    def stamp(self, setup, batch, labels=None):
        stamped.append(sorted(setup.reversed))
        return original_stamp(self, setup, batch, labels)

    monkeypatch.setattr(MaskScan, "run", run)
    monkeypatch.setattr(IBAU, "stamp_reversed", stamp)
    d = toy.digits_backdoor("one_target")
    res = unlearn(d["model"], d["x_clean"], d["y_clean"], holdout=100, rounds=1, batch_size=25, robustness_passes=1,
                  scan_settings={"steps": 150}, progress=False, precision="fp32", reversed_fraction=0.2)
    assert len(runs) == 2  # the scans before and after; I-BAU took the first one's triggers
    assert res.report["scan_before"]["target_classes"] == [d["target"]]
    assert stamped and all(s == [d["target"]] for s in stamped)  # every recovery step, the flagged class
    assert res.report["config"]["reversed_fraction"] == 0.2


def test_recovery_on_hard_labels_changes_only_the_recovery_of_soft_targets(monkeypatch):
    fitted = []
    original = IBAU.recovery_batch

    def recovery_batch(self, setup, batch, labels=None):  # the targets each recovery step fits
        out = original(self, setup, batch, labels)
        fitted.append((batch.y, out.y))
        return out

    soft, _ = _fit(outer_target="teacher", recovery_target="outer")
    monkeypatch.setattr(IBAU, "recovery_batch", recovery_batch)
    hard, _ = _fit(outer_target="teacher", recovery_target="argmax")
    assert fitted and all(soft_y.dim() == 2 for soft_y, _ in fitted)  # the teacher's soft rows come in
    assert all(torch.equal(y, soft_y.argmax(1)) for soft_y, y in fitted)  # and their top class is fitted
    monkeypatch.setattr(IBAU, "recovery_batch", original)
    assert any(not torch.equal(soft[k], hard[k]) for k in soft)
    # with the labels as targets there is nothing soft to harden: the same weights
    a, _ = _fit(outer_target="labels", recovery_target="outer")
    b, _ = _fit(outer_target="labels", recovery_target="argmax")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="recovery_target"):
        IBAU(recovery_target="soft")


def test_recovery_on_the_labels_fits_the_clean_labels_while_the_outer_steps_keep_the_teacher(monkeypatch):
    x, y = _data()
    fitted, outer = [], []
    original_batch, original_hyper = IBAU.recovery_batch, IBAU.hypergradient

    def recovery_batch(self, setup, batch, labels=None):
        out = original_batch(self, setup, batch, labels)
        fitted.append(out.y)
        return out

    def hypergradient(self, net, params, delta, batch, *args, **kwargs):
        outer.append(batch.y)
        return original_hyper(self, net, params, delta, batch, *args, **kwargs)

    monkeypatch.setattr(IBAU, "recovery_batch", recovery_batch)
    monkeypatch.setattr(IBAU, "hypergradient", hypergradient)
    mixed, _ = _fit(outer_target="teacher", recovery_target="labels")
    # passes over the batches of 20, in order: the recovery fits y itself; the outer steps the soft rows
    nb = len(x) // 20
    assert len(outer) == nb and len(fitted) == nb * IBAU().recovery_pass_count(nb)
    assert all(torch.equal(f, y[20 * (i % nb):20 * (i % nb + 1)]) for i, f in enumerate(fitted))
    assert all(o.dim() == 2 for o in outer)
    monkeypatch.setattr(IBAU, "recovery_batch", original_batch)
    monkeypatch.setattr(IBAU, "hypergradient", original_hyper)
    soft, _ = _fit(outer_target="teacher", recovery_target="outer")
    labels, _ = _fit(outer_target="labels")
    default, _ = _fit(outer_target="teacher")  # nothing flagged (no stamps): the default's "auto" fits the labels
    assert IBAU().recovery_target == "auto" and all(torch.equal(mixed[k], default[k]) for k in mixed)
    assert any(not torch.equal(mixed[k], soft[k]) for k in soft)
    assert any(not torch.equal(mixed[k], labels[k]) for k in labels)
    # with the labels as the outer targets too, "labels" and "outer" are one recipe
    again, _ = _fit(outer_target="labels", recovery_target="labels")
    assert all(torch.equal(labels[k], again[k]) for k in labels)


def test_round_one_reuses_the_teachers_forward_passes_for_its_pseudo_labels(monkeypatch):
    """The inner pass of round 1 takes the model's top classes from _prepare's teacher forward passes
    instead of running them again: the same weights, bit for bit, as computing them in the pass."""
    x, y = toy.make_data(200, 7)
    calls = []
    original = IBAU.synthesize

    def spy(self, net, batches, *, comm=None, pseudo=None):
        calls.append(pseudo is not None)
        return original(self, net, batches, comm=comm, pseudo=pseudo)

    monkeypatch.setattr(IBAU, "synthesize", spy)

    def run(reuse):
        model = toy.poisoned_model()
        defense = IBAU(rounds=2, batch_size=50, seed=1, progress=False, precision="fp32", reversed_fraction=0.0)
        if not reuse:
            prepare = defense._prepare

            def no_reuse(r):
                setup = prepare(r)
                setup.pseudo = None
                return setup
            monkeypatch.setattr(defense, "_prepare", no_reuse)
        defense.fit(model, x, y)
        return model.state_dict()

    a, b = run(True), run(False)
    assert calls == [True, False, False, False]  # round 1 reuses them; round 2 (a changed model) does not
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- amplified stamps (amplify_steps) ------------------------------------------------------
def test_trigger_region_is_the_dilated_support_or_none():
    from ibau.defenses.ibau import trigger_region

    m = torch.zeros(1, 8, 8)
    m[0, 4, 4], m[0, 4, 5], m[0, 0, 0] = 0.8, 0.3, 0.01  # 0.01 is under 5% of the largest value
    region = trigger_region(m)
    expected = torch.zeros(1, 8, 8)
    expected[0, 3:6, 3:7] = 1.0  # the two pixels dilated by one
    assert torch.equal(region, expected)
    assert trigger_region(torch.zeros(1, 8, 8)) is None  # nothing found
    big = torch.zeros(1, 8, 8)
    big[0, 1:7, 1:7] = 1.0
    assert trigger_region(big) is None  # more than a quarter of the image: a blend's, kept as found


def _amplify(model, found, start=None, steps=30):
    from ibau.defenses._universal import Setup
    from ibau.distributed import communicator

    x, y = toy.make_data(200, 5)
    batches = [Batch.of((x[i:i + 50], y[i:i + 50])) for i in range(0, 200, 50)]
    params = [p for p in model.parameters() if p.requires_grad]
    setup = Setup(net=model, params=params, batches=batches, optimizer=torch.optim.Adam(params),
                  generator=torch.Generator().manual_seed(0), comm=communicator(False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, numbers = IBAU(amplify_steps=steps, progress=False).amplify(setup, found, start)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model is not touched
    assert all(p.grad is None for p in model.parameters())
    return out, numbers, x


def _margin(model, x, trig, k):
    with torch.no_grad():
        z = model((1 - trig["mask"]) * x + trig["mask"] * trig["pattern"])
    others = z.clone()
    others[:, k] = -torch.inf
    return float((z[:, k] - others.max(1).values).mean())


def test_amplify_fills_the_region_with_the_pattern_that_flips_the_model_most():
    """A faint guess at the toy's backdoor (a grey 2x2 patch, mask 0.3) becomes a full-strength
    stamp over its dilated region whose margin for the target is far larger."""
    model = toy.poisoned_model()
    mask = torch.zeros(1, toy.S, toy.S)
    mask[:, -3:-1, -3:-1] = 0.3
    found = {toy.TARGET: {"mask": mask, "pattern": torch.full((toy.C, toy.S, toy.S), 0.5)}}
    out, numbers, x = _amplify(model, found)
    trig = out[toy.TARGET]
    from ibau.defenses.ibau import trigger_region

    assert torch.equal(trig["mask"], trigger_region(mask))
    assert 0 <= float(trig["pattern"].min()) and float(trig["pattern"].max()) <= 1
    assert _margin(model, x, trig, toy.TARGET) > _margin(model, x, found[toy.TARGET], toy.TARGET) + 2.0
    assert numbers["amplify_margin"] > 0


def test_amplify_keeps_the_last_stamp_where_nothing_flips_the_model_any_more():
    model = toy.poisoned_model()
    with torch.no_grad():
        model.classifier.bias[toy.TARGET] = -1e4  # no pattern can reach the target now
    mask = torch.zeros(1, toy.S, toy.S)
    mask[:, -3:-1, -3:-1] = 1.0
    found = {toy.TARGET: {"mask": mask, "pattern": torch.ones(toy.C, toy.S, toy.S)}}
    last = {toy.TARGET: {"mask": mask, "pattern": torch.zeros(toy.C, toy.S, toy.S)}}
    out, numbers, _ = _amplify(model, found, start=last, steps=5)
    assert out[toy.TARGET] is last[toy.TARGET] and numbers["amplify_margin"] < 0
    out, _, _ = _amplify(model, found, steps=5)  # round 1 (no last stamp): the amplified one
    assert not torch.equal(out[toy.TARGET]["pattern"], found[toy.TARGET]["pattern"])


def test_amplified_stamps_change_the_recovery_reproducibly_and_are_recorded():
    # class 1's corner is amplified; class 3's 3x3 centre dilates past a quarter of the 8x8 image: kept
    plain, _ = _fit(reversed_fraction=0.3, reversed_triggers=_triggers(), amplify_steps=0)
    amp, res = _fit(reversed_fraction=0.3, reversed_triggers=_triggers(), amplify_steps=10)
    again, _ = _fit(reversed_fraction=0.3, reversed_triggers=_triggers(), amplify_steps=10)
    assert all(torch.equal(amp[k], again[k]) for k in amp)
    assert any(not torch.equal(amp[k], plain[k]) for k in amp)
    point = res.history[-1]
    assert "amplify_margin" in point and point["seconds_amplify"] >= 0
    with pytest.raises(InputError, match="amplify_steps"):
        IBAU(amplify_steps=-1)


def test_recovery_smoothing_fits_the_smoothed_labels(monkeypatch):
    """``recovery_smoothing=eps`` fits ``(1 - eps) * onehot(y) + eps / C`` in the recovery steps only:
    the same weights as the unsmoothed recovery handed those soft rows."""
    smoothed, _ = _fit(outer_target="teacher", recovery_target="labels", recovery_smoothing=0.1)
    plain, _ = _fit(outer_target="teacher", recovery_target="labels")
    assert any(not torch.equal(smoothed[k], plain[k]) for k in plain)
    original = IBAU.recovery_batch

    def soft_rows(self, setup, batch, labels=None):
        out = original(self, setup, batch, labels)
        return out._replace(y=0.9 * torch.nn.functional.one_hot(out.y, 5).float() + 0.1 / 5)  # 5 classes

    monkeypatch.setattr(IBAU, "recovery_batch", soft_rows)
    by_hand, _ = _fit(outer_target="teacher", recovery_target="labels")
    # the same loss along two float paths: measured 2.3e-6 apart, where the smoothing moves weights by 3.4e-2
    assert all(torch.allclose(smoothed[k], by_hand[k], atol=2e-5) for k in plain)
    with pytest.raises(InputError, match="recovery_smoothing"):
        IBAU(recovery_smoothing=1.0)


def test_recovery_schedule_cosine_decays_the_recovery_step_size_and_restores_it(monkeypatch):
    """``recovery_schedule="cosine"``: recovery step ``i`` of ``T`` runs at ``lr * (1 + cos(pi i / T)) / 2``;
    the outer steps and the next round run at ``lr`` again; ``"constant"`` keeps ``lr`` throughout."""
    seen = {}
    original_recovery, original_outer = IBAU.recovery_step, IBAU.outer_step

    def recovery(self, setup, batch, labels=None):
        seen.setdefault(self.recovery_schedule, []).append(("recovery", setup.optimizer.param_groups[0]["lr"]))
        return original_recovery(self, setup, batch, labels)

    def outer(self, setup, delta, batch):
        seen.setdefault(self.recovery_schedule, []).append(("outer", setup.optimizer.param_groups[0]["lr"]))
        return original_outer(self, setup, delta, batch)

    monkeypatch.setattr(IBAU, "recovery_step", recovery)
    monkeypatch.setattr(IBAU, "outer_step", outer)
    x, y = _data()
    for schedule in ("constant", "cosine"):
        IBAU(rounds=2, batch_size=20, norm_bound=2.0, seed=1, progress=False, precision="fp32", fp_batch=None,
             reversed_fraction=0.0, recovery_passes=2, recovery_min_steps=0, guard_drop=None, outer_lr=1e-3,
             recovery_schedule=schedule).fit(_vgg(), x, y)
    batches = len(x) // 20
    constant, cosine = seen["constant"], seen["cosine"]
    assert [k for k, _ in cosine] == [k for k, _ in constant] == (["outer"] * batches + ["recovery"] * 2 * batches) * 2
    assert all(lr == 1e-3 for _, lr in constant)
    for r in range(2):
        steps = cosine[r * 3 * batches:(r + 1) * 3 * batches]
        assert all(lr == 1e-3 for _, lr in steps[:batches])
        decayed = [lr for _, lr in steps[batches:]]
        total = len(decayed)
        assert decayed == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * i / total)) for i in range(total)])
        assert decayed[0] == 1e-3 and decayed[-1] < 0.1 * 1e-3
    with pytest.raises(InputError, match="recovery_schedule"):
        IBAU(recovery_schedule="linear")


def test_recovery_average_keeps_the_mean_of_the_last_recovery_pass_weights(monkeypatch):
    """``recovery_average=True``: a round ends on the mean of the weights after each step of its last
    recovery pass (tail averaging); the steps themselves are those of the plain recovery."""
    snapshots = []
    original = IBAU.recovery_step

    def recovery(self, setup, batch, labels=None):
        loss = original(self, setup, batch, labels)
        snapshots.append([p.detach().clone() for p in setup.params])
        return loss

    monkeypatch.setattr(IBAU, "recovery_step", recovery)
    x, y = _data()
    settings = dict(rounds=1, batch_size=20, norm_bound=2.0, seed=1, progress=False, precision="fp32", fp_batch=None,
                    reversed_fraction=0.0, recovery_passes=2, recovery_min_steps=0, guard_drop=None, fold_bn=False)
    plain_model, averaged_model = _vgg(), _vgg()
    IBAU(**settings).fit(plain_model, x, y)
    plain_steps, snapshots[:] = list(snapshots), []
    IBAU(recovery_average=True, **settings).fit(averaged_model, x, y)
    batches = len(x) // 20
    assert len(snapshots) == len(plain_steps) == 2 * batches
    for a, b in zip(snapshots[-1], plain_steps[-1]):  # the same trajectory
        assert torch.equal(a, b)
    params = [p for p in averaged_model.parameters() if p.requires_grad]
    for j, p in enumerate(params):
        mean = torch.stack([s[j] for s in snapshots[batches:]]).mean(0)
        torch.testing.assert_close(p.detach(), mean, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(params, plain_model.parameters()))
    with pytest.raises(InputError, match="recovery_average"):
        IBAU(recovery_average="yes")


def test_flagged_mass_moves_each_flagged_class_to_the_label_on_rows_of_other_labels():
    p = torch.softmax(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), 1)
    y = torch.tensor([0, 1, 2, 3, 4, 1, 3, 0])
    out = move_flagged_mass(p, y, [1, 3])
    torch.testing.assert_close(out.sum(1), p.sum(1))
    for i in range(8):
        moved = [k for k in (1, 3) if k != int(y[i])]
        for c in range(5):
            if c in moved:
                assert out[i, c] == 0  # the flagged class, on an image of another label: nothing left
            elif c == int(y[i]):
                torch.testing.assert_close(out[i, c], p[i, c] + sum(p[i, k] for k in moved))
            else:
                assert out[i, c] == p[i, c]
    assert torch.equal(move_flagged_mass(p, y, []), p)
    # a process's empty share of a batch holds its (empty) hard labels, not soft rows: left as given
    empty = torch.zeros(0, dtype=torch.long)
    assert move_flagged_mass(empty, empty, [1, 3]) is empty


def _outer_targets(monkeypatch, flagged_mass):
    """The teacher-fitting toy run with both stamps, once with ``flagged_mass="keep"`` and once with
    ``flagged_mass``: ``(keep weights, teacher targets, weights, result, targets)``, the targets being
    what each outer step fitted (the batches of 20, in order); the hypergradient is restored after."""
    outer = []
    original = IBAU.hypergradient

    def hypergradient(self, net, params, delta, batch, *args, **kwargs):
        outer.append(batch.y)
        return original(self, net, params, delta, batch, *args, **kwargs)

    monkeypatch.setattr(IBAU, "hypergradient", hypergradient)
    runs = []
    for mass in ("keep", flagged_mass):
        outer.clear()
        weights, res = _fit(outer_target="teacher", reversed_fraction=0.3, reversed_triggers=_triggers(),
                            flagged_mass=mass)
        runs.append((weights, res, list(outer)))
    monkeypatch.setattr(IBAU, "hypergradient", original)
    (keep, _, teacher), (moved, res, targets) = runs
    return keep, teacher, moved, res, targets


def test_flagged_mass_changes_the_teacher_only_where_a_class_was_flagged(monkeypatch):
    x, y = _data()
    keep, teacher, moved, _, outer = _outer_targets(monkeypatch, "label")
    assert any(not torch.equal(keep[k], moved[k]) for k in keep)
    for i, (t, m) in enumerate(zip(teacher, outer)):  # batches of 20, in order
        labels = y[20 * i:20 * (i + 1)]
        torch.testing.assert_close(m, move_flagged_mass(t, labels, [1, 3]))
        assert all(m[r, k] == 0 for r in range(len(labels)) for k in (1, 3) if int(labels[r]) != k)
    # nothing flagged, or no teacher (the outer steps fit the labels): the same weights as "keep"
    a, _ = _fit(outer_target="teacher", reversed_fraction=0.3, reversed_triggers={}, flagged_mass="keep")
    b, _ = _fit(outer_target="teacher", reversed_fraction=0.3, reversed_triggers={}, flagged_mass="label")
    c, _ = _fit(outer_target="labels", reversed_fraction=0.3, reversed_triggers=_triggers(), flagged_mass="keep")
    d, _ = _fit(outer_target="labels", reversed_fraction=0.3, reversed_triggers=_triggers(), flagged_mass="label")
    assert all(torch.equal(a[k], b[k]) and torch.equal(c[k], d[k]) for k in a)
    with pytest.raises(InputError, match="flagged_mass"):
        IBAU(flagged_mass="target")


def test_over_predicted_compares_the_soft_mass_with_the_labels_share_over_every_batch():
    # class 1: 0.6 + 0.2 + 0.3 = 1.1 of probability for one image labelled 1 -> over-predicted;
    # class 2: 0.1 + 0.1 + 0.4 = 0.6 for one image labelled 2 -> under; class 0: 0.3 + 0.7 + 0.3 = 1.3 for one -> over
    probs = [torch.tensor([[0.3, 0.6, 0.1], [0.7, 0.2, 0.1]]), torch.tensor([[0.3, 0.3, 0.4]])]
    labels = [torch.tensor([0, 1]), torch.tensor([2])]
    comm = SingleProcess()
    assert over_predicted(probs, labels, [1, 2], comm) == [1]
    assert over_predicted(probs, labels, {2: None, 0: None, 1: None}, comm) == [0, 1]
    assert over_predicted(probs, labels, [], comm) == []
    # a mass equal to the labels' share is not over-predicted; an empty share of a batch counts nothing
    none = torch.zeros(0, dtype=torch.long)
    assert over_predicted([torch.tensor([[0.25, 0.75], [0.75, 0.25]]), none], [torch.tensor([0, 1]), none],
                          [0, 1], comm) == []
    assert over_predicted([torch.tensor([[0.5, 0.5]]), none], [torch.tensor([0]), none], [0, 1], comm) == [1]


def test_over_predicted_with_a_share_asks_the_excess_to_be_that_share_of_the_other_labels_probability():
    # class 0: excess 1.3 - 1 = 0.3 against 0.7 + 0.3 = 1.0 on images labelled 1 and 2 (0.3 of it);
    # class 1: excess 0.1 against 0.6 + 0.3 = 0.9 (0.11 of it)
    probs = [torch.tensor([[0.3, 0.6, 0.1], [0.7, 0.2, 0.1]]), torch.tensor([[0.3, 0.3, 0.4]])]
    labels = [torch.tensor([0, 1]), torch.tensor([2])]
    comm = SingleProcess()
    assert over_predicted(probs, labels, [0, 1, 2], comm, 0.0) == [0, 1]
    assert over_predicted(probs, labels, [0, 1, 2], comm, 0.1) == [0, 1]
    assert over_predicted(probs, labels, [0, 1, 2], comm, 0.2) == [0]
    assert over_predicted(probs, labels, [0, 1, 2], comm, 0.3) == [0]  # equality counts
    assert over_predicted(probs, labels, [0, 1, 2], comm, 0.31) == []
    with pytest.raises(InputError, match="excess_share"):
        IBAU(excess_share=1.5)


def test_flagged_mass_excess_moves_only_the_over_predicted_flagged_classes(monkeypatch):
    x, y = _data()
    keep, teacher, moved, res, outer = _outer_targets(monkeypatch, "excess")
    labels = [y[20 * i:20 * (i + 1)] for i in range(len(teacher))]
    expected = [k for k in (1, 3) if float(sum(t[:, k].sum() for t in teacher)) > int((y == k).sum())]
    assert res.extras["debiased_classes"] == expected == [1]  # the toy's teacher over-predicts 1, not 3: both branches
    for t, m, lab in zip(teacher, outer, labels):
        torch.testing.assert_close(m, move_flagged_mass(t, lab, expected))
    assert (expected == []) == all(torch.equal(keep[k], moved[k]) for k in keep)
    # "label" moves every flagged class and says so
    _, res_label = _fit(outer_target="teacher", reversed_fraction=0.3, reversed_triggers=_triggers(), flagged_mass="label")
    assert res_label.extras["debiased_classes"] == [1, 3]


def test_stamp_classes_others_never_stamps_a_class_trigger_on_an_image_of_that_class():
    x, _ = _data(20)
    ibau = IBAU(reversed_fraction=0.5, reversed_triggers=_triggers(), stamp_classes="others", progress=False)
    t = _triggers()
    chosen = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:10].tolist()

    def stamp(labels, triggers):
        class _Setup:
            reversed = triggers
            generator = torch.Generator().manual_seed(5)

        return ibau.stamp_reversed(_Setup, Batch.of((x, labels)), labels).x

    ones = torch.ones(20, dtype=torch.long)
    assert torch.equal(stamp(ones, {1: t[1]}), x)  # every image is of the only trigger's class: none stamped
    out = stamp(ones, t)  # both triggers: the images labelled 1 all take class 3's
    for i in range(20):
        want = (1 - t[3]["mask"]) * x[i] + t[3]["mask"] * t[3]["pattern"] if i in chosen else x[i]
        torch.testing.assert_close(out[i], want)
    labels = torch.full((20,), 4)  # no image of a flagged class: the triggers in turn, as with "all"
    every = IBAU(reversed_fraction=0.5, reversed_triggers=_triggers(), stamp_classes="all", progress=False)

    class _Setup:
        reversed = every._reversed
        generator = torch.Generator().manual_seed(5)

    assert torch.equal(stamp(labels, ibau._reversed), every.stamp_reversed(_Setup, Batch.of((x, labels)), labels).x)
    with pytest.raises(InputError, match="stamp_classes"):
        IBAU(stamp_classes="none")


def test_recovery_target_auto_fits_the_teacher_where_a_class_was_flagged_and_the_labels_where_none():
    common = {"outer_target": "teacher", "reversed_fraction": 0.3}
    flagged = {t: _fit(recovery_target=t, reversed_triggers=_triggers(), **common)[0] for t in ("auto", "outer", "labels")}
    none = {t: _fit(recovery_target=t, reversed_triggers={}, **common)[0] for t in ("auto", "outer", "labels")}
    assert all(torch.equal(flagged["auto"][k], flagged["outer"][k]) for k in flagged["auto"])
    assert all(torch.equal(none["auto"][k], none["labels"][k]) for k in none["auto"])
    assert any(not torch.equal(flagged["auto"][k], flagged["labels"][k]) for k in flagged["auto"])
    assert any(not torch.equal(none["auto"][k], none["outer"][k]) for k in none["auto"])


def test_the_default_recovery_fits_the_moved_teacher_and_round_two_records_its_amplification(monkeypatch):
    x, y = _data()
    fitted = []
    original = IBAU.recovery_batch

    def recovery_batch(self, setup, batch, labels=None):
        out = original(self, setup, batch, labels)
        fitted.append((out.y, labels))
        return out

    monkeypatch.setattr(IBAU, "recovery_batch", recovery_batch)
    res = IBAU(rounds=2, batch_size=20, norm_bound=2.0, seed=1, progress=False, precision="fp32", fp_batch=None,
               reversed_fraction=0.3, reversed_triggers={1: _triggers()[1]}, amplify_steps=5,
               stop_unmoved=False).fit(_vgg(), x, y)
    assert fitted and all(t.dim() == 2 for t, _ in fitted)  # the (soft) teacher, a class being flagged
    for t, labels in fitted:  # without class 1's probability on the images of other labels
        assert all(float(t[r, 1]) == 0.0 for r in range(len(labels)) if int(labels[r]) != 1)
        torch.testing.assert_close(t.sum(1), torch.ones(len(t)))
    rounds = [h for h in res.history if h.get("round")]
    assert len(rounds) == 2 and all("amplify_margin" in h and h["seconds_amplify"] >= 0 for h in rounds)
    assert all("amplify_margins" not in h for h in res.history)


def test_stop_unmoved_ends_the_run_before_a_round_whose_amplified_triggers_move_nothing(monkeypatch):
    margins = {}

    def amplify(self, setup, found, start=None):  # the triggers as found, with the margins the test sets
        m = margins["value"]
        return dict(found), {"amplify_margin": sum(m) / len(m), "amplify_margins": list(m)}

    monkeypatch.setattr(IBAU, "amplify", amplify)

    seconds = {}

    stamped = {}
    monkeypatch.setattr(IBAU, "stamp_margin", lambda self, setup, k, t: stamped.setdefault(k, stamped["value"]))

    def run(m, triggers=None, stamp=0.0, **settings):
        margins["value"] = m
        stamped.clear()
        stamped["value"] = stamp
        x, y = _data()
        res = IBAU(rounds=3, batch_size=20, norm_bound=2.0, seed=1, progress=False, precision="fp32", fp_batch=None,
                   reversed_fraction=0.3, reversed_triggers=triggers or {1: _triggers()[1]}, amplify_steps=5,
                   **{"stop_unmoved": True, **settings}).fit(_vgg(), x, y)
        seconds.update({"run": res.seconds, "last point": res.history[-1]["elapsed"]})
        return [h["round"] for h in res.history if h.get("round")], res.stop_reason

    done, reason = run([-1.0])  # round 1 always runs; before round 2 nothing moves the model: the end
    assert done == [1] and reason.startswith("stopped before round 2") and "-1.00" in reason
    assert seconds["run"] > seconds["last point"]  # the check that stopped it is the run's work too
    assert run([0.5]) == ([1, 2, 3], "completed 3 rounds")  # the trigger still moves it: on
    assert run([-1.0], stop_unmoved=False)[0] == [1, 2, 3]  # the rule off
    # class 3's trigger is too wide to amplify: its stamp as found is measured (stamp_margin) and counts too
    done, reason = run([-1.0], triggers=_triggers(), stamp=-0.5)
    assert done == [1] and "stamped trigger(s) no longer move the model (best margin -0.50" in reason
    assert 3 in stamped and 1 not in stamped  # only the trigger left as found is measured that way
    assert run([-1.0], triggers=_triggers(), stamp=0.3)[0] == [1, 2, 3]  # the wide stamp still moves it
    assert run([0.2], triggers=_triggers(), stamp=-0.5)[0] == [1, 2, 3]  # the amplified one still moves it
    with pytest.raises(InputError, match="stop_unmoved"):
        IBAU(stop_unmoved="yes")


def test_stamp_margin_is_the_mean_target_margin_of_the_stamp_as_found_on_the_first_clean_images():
    x, y = _data()
    model = _vgg()
    ibau = IBAU(batch_size=20, precision="fp32", progress=False, reversed_fraction=0.3, reversed_triggers=_triggers())
    seen = {}
    original = IBAU.before_round

    def before_round(self, r, setup):
        seen["setup"] = setup
        return original(self, r, setup)

    IBAU.before_round = before_round
    try:
        ibau.rounds = 1
        ibau.fit(model, x, y)
    finally:
        IBAU.before_round = original
    setup = seen["setup"]
    t = _triggers()[3]
    with torch.no_grad():
        z = setup.net((1 - t["mask"]) * x + t["mask"] * t["pattern"])
    others = torch.cat([z[:, :3], z[:, 4:]], 1)
    by_hand = float((z[:, 3] - others.max(1).values).mean())
    assert ibau.stamp_margin(setup, 3, t) == pytest.approx(by_hand, rel=1e-5, abs=1e-6)


def test_unlearn_reports_a_stop_before_the_requested_rounds(monkeypatch):
    from ibau.unlearn import unlearn

    monkeypatch.setattr(IBAU, "before_round", lambda self, r, setup: "stopped before round 2: a test" if r == 2 else None)
    d = toy.digits_backdoor("one_target")
    res = unlearn(d["model"], d["x_clean"], d["y_clean"], holdout=100, rounds=2, batch_size=25, robustness_passes=1,
                  scan=False, progress=False, precision="fp32", reversed_fraction=0.0)
    assert res.report["stop_reason"] == "stopped before round 2: a test" and res.report["rounds"] == 1


def test_relative_lr_steps_each_weight_tensor_by_a_share_of_its_own_scale(monkeypatch):
    """``relative_lr``: the outer optimiser (which the recovery shares) steps a weight tensor of two or
    more dimensions at ``relative_lr`` times its RMS before unlearning, biases and normalisation
    parameters at ``outer_lr``; Adam's first step moves no element by more than its step size."""
    seen, original = [], IBAU.outer_step

    def outer_step(self, setup, delta, batch):
        before = [p.detach().clone() for p in setup.params]
        loss = original(self, setup, delta, batch)
        if not seen:
            lr = {id(p): g["lr"] for g in setup.optimizer.param_groups for p in g["params"]}
            seen.extend((b, p.detach() - b, lr[id(p)]) for b, p in zip(before, setup.params))
        return loss

    monkeypatch.setattr(IBAU, "outer_step", outer_step)
    x, y = _data()
    model = _vgg()
    IBAU(rounds=1, batch_size=20, norm_bound=2.0, seed=1, progress=False, precision="fp32", fp_batch=None,
         reversed_fraction=0.0, guard_drop=None, fold_bn=False, outer_lr=1e-3, relative_lr=0.02).fit(model, x, y)
    assert len(seen) == len([p for p in model.parameters() if p.requires_grad])
    for w0, step, lr in seen:
        assert lr == pytest.approx(0.02 * float(w0.pow(2).mean().sqrt()) if w0.dim() >= 2 else 1e-3, rel=1e-6)
        assert float(step.abs().max()) <= lr * (1 + 1e-4) and bool(step.ne(0).any())
    assert len({round(lr, 8) for _, _, lr in seen}) > 3
    # a model without biases or norms: its first group is still the (empty) one at outer_lr, which the guard reports
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.Flatten(), torch.nn.Linear(144, 5, bias=False))
    groups = IBAU(outer_lr=1e-3, relative_lr=0.02).relative_optimizer(list(net.parameters())).param_groups
    assert groups[0]["params"] == [] and groups[0]["lr"] == 1e-3 and len(groups) == 3
    with pytest.raises(InputError, match="relative_lr"):
        IBAU(relative_lr=0.0)
