"""The template of every defense (``Defense.fit``): up-front validation of the settings and
the data, mode restore, gradient clean-up, trace points, extras kept when a run stops early."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ibau import InputError
from ibau.defenses import DEFENSES, DPSGD, IBAU, NAD, DeepInspect, FinePruning, NaiveUAP, NeuralCleanse, TABOR, create
from ibau.defenses.base import Defense, Run

NAN, INF = math.nan, math.inf

# (defense class, bad settings, the parameter the message must name)
BAD_SETTINGS = [
    (IBAU, {"batch_size": 0}, "batch_size"),
    (IBAU, {"norm_bound": -1}, "norm_bound"),
    (IBAU, {"perturb_fraction": 2}, "perturb_fraction"),
    (IBAU, {"outer_lr": NAN}, "outer_lr"),
    (IBAU, {"hypergrad_iters": -1}, "hypergrad_iters"),
    (IBAU, {"inner_lr": INF}, "inner_lr"),
    (IBAU, {"inner_optimizer": "lbfgs"}, "inner_optimizer"),
    (IBAU, {"outer_optimizer": "rmsprop"}, "outer_optimizer"),
    (IBAU, {"hypergrad_solver": "newton"}, "hypergrad_solver"),
    (IBAU, {"rounds": 1.5}, "rounds"),
    (IBAU, {"fp_step": 0}, "fp_step"),
    (IBAU, {"inner_reg": -1e-3}, "inner_reg"),
    (IBAU, {"hypergrad_tol": NAN}, "hypergrad_tol"),
    (IBAU, {"normalize": ((0.5,), (0.0,))}, "normalize"),
    (IBAU, {"normalize": ((0.5, 0.5), (0.2,))}, "normalize"),
    (IBAU, {"clip_images": "yes"}, "clip_images"),
    (IBAU, {"distributed": "maybe"}, "distributed"),
    (IBAU, {"seed": "x"}, "seed"),
    (NaiveUAP, {"uap_steps": 0}, "uap_steps"),
    (NaiveUAP, {"uap_step_size": NAN}, "uap_step_size"),
    (NaiveUAP, {"norm_bound": INF}, "norm_bound"),
    (NaiveUAP, {"batch_size": -3}, "batch_size"),
    (NeuralCleanse, {"init_cost": -1}, "init_cost"),
    (NeuralCleanse, {"lr": 0}, "lr"),
    (NeuralCleanse, {"epochs": 0}, "epochs"),
    (NeuralCleanse, {"cost_multiplier": 1.0}, "cost_multiplier"),
    (NeuralCleanse, {"success_threshold": 1.5}, "success_threshold"),
    (NeuralCleanse, {"threshold": 0}, "threshold"),
    (NeuralCleanse, {"unlearn_fraction": 0}, "unlearn_fraction"),
    (NeuralCleanse, {"unlearn_lr": NAN}, "unlearn_lr"),
    (NeuralCleanse, {"unlearn_batch_size": 0}, "unlearn_batch_size"),
    (NeuralCleanse, {"classes": [0, -1, 2]}, "classes"),
    (TABOR, {"block_cost": -1}, "block_cost"),
    (TABOR, {"smooth_cost": NAN}, "smooth_cost"),
    (TABOR, {"epoch_images": 0}, "epoch_images"),
    (DeepInspect, {"steps": 0}, "steps"),
    (DeepInspect, {"z_dim": 2.5}, "z_dim"),
    (DeepInspect, {"max_value": 1.5}, "max_value"),
    (DeepInspect, {"gan_cost": INF}, "gan_cost"),
    (DeepInspect, {"unlearn_epochs": -1}, "unlearn_epochs"),
    (FinePruning, {"prune_images": 0}, "prune_images"),
    (FinePruning, {"prune_images": 1.0}, "prune_images"),
    (FinePruning, {"acc_drop": 1.5}, "acc_drop"),
    (FinePruning, {"drop_mode": "percent"}, "drop_mode"),
    (FinePruning, {"prune_step": 0}, "prune_step"),
    (FinePruning, {"optimizer": "rmsprop"}, "optimizer"),
    (FinePruning, {"momentum": 1.0}, "momentum"),
    (FinePruning, {"lr": INF}, "lr"),
    (NAD, {"teacher_epochs": -1}, "teacher_epochs"),
    (NAD, {"betas": (1.0, 2.0)}, "betas"),
    (NAD, {"betas": (1.0, NAN, 1.0)}, "betas"),
    (NAD, {"distance": "kl"}, "distance"),
    (NAD, {"p": 0}, "p"),
    (NAD, {"lr_gamma": 0}, "lr_gamma"),
    (NAD, {"crop_pad": -1}, "crop_pad"),
    (DPSGD, {"noise_multiplier": NAN}, "noise_multiplier"),
    (DPSGD, {"max_grad_norm": 0.0}, "max_grad_norm"),
    (DPSGD, {"epochs": -1}, "epochs"),
    (DPSGD, {"lr": INF}, "lr"),
    (DPSGD, {"momentum": 1.0}, "momentum"),
    (DPSGD, {"delta": 1.0}, "delta"),
    (DPSGD, {"accountant": "moments"}, "accountant"),
]


@pytest.mark.parametrize("cls,bad,param", BAD_SETTINGS,
                         ids=[f"{c.name}-{next(iter(b))}-{i}" for i, (c, b, _) in enumerate(BAD_SETTINGS)])
def test_bad_settings_raise_input_error_naming_the_parameter(cls, bad, param):
    with pytest.raises(InputError, match=param):
        cls(**bad)


def test_every_registered_defense_is_covered_by_the_bad_settings():
    assert {c.name for c, _, _ in BAD_SETTINGS} == set(DEFENSES)


def _net(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, classes)).eval()


def _data(n: int = 20, classes: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("name", sorted(DEFENSES))
@pytest.mark.parametrize("case,match", [("nan", "NaN"), ("inf", "NaN or infinite"), ("label_high", "5 outputs"),
                                        ("label_negative", "labels"), ("y_2d", "y must hold one label"),
                                        ("float_labels", "integer labels"), ("nchw", "N, C, H, W"),
                                        ("length", "labels"), ("empty", "empty")])
def test_fit_validates_the_data_before_any_work(name, case, match):
    x, y = _data()
    if case == "nan":
        x[3, 0, 0, 0] = NAN
    elif case == "inf":
        x[0, 1, 2, 3] = INF
    elif case == "label_high":
        y[4] = 5
    elif case == "label_negative":
        y[0] = -1
    elif case == "y_2d":
        y = y[:, None]
    elif case == "float_labels":
        y = y.float() + 0.5
    elif case == "nchw":
        x = x[:, 0]
    elif case == "length":
        y = y[:-1]
    elif case == "empty":
        x, y = x[:0], y[:0]
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    with pytest.raises(InputError, match=match):
        create(name, progress=False).fit(model, x, y, evaluate=lambda m: calls.append(1) or {})
    assert calls == []  # rejected before the "before" evaluation
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class Steps(Defense):
    """A minimal defense for the template: three SGD steps, a point after each."""

    name = "steps_test"
    point_key = "step"

    def __init__(self, steps: int = 3):
        self.steps = steps

    def _prepare(self, run: Run) -> torch.optim.Optimizer:
        run.model.eval()  # before the clock: `evaluate` sees eval mode at "before"
        return torch.optim.SGD(run.model.parameters(), lr=0.1)

    def _fit(self, run: Run, opt: torch.optim.Optimizer) -> None:
        run.reason = f"completed {self.steps} steps"
        run.model.train()
        for i in range(1, self.steps + 1):
            loss = nn.functional.cross_entropy(run.model(run.x), run.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.extras["last_loss"] = float(loss.detach())
            run.point(f"step {i}", step=i, loss=run.extras["last_loss"])


def test_template_restores_mode_clears_gradients_and_records_points():
    x, y = _data()
    model = _net().train()
    modes = []
    res = Steps().fit(model, x, y, evaluate=lambda m: modes.append(m.training) or {"acc": 0.0})
    assert model.training  # the caller's mode is back
    assert modes[0] is False  # `_prepare` ran before the "before" evaluation
    assert all(p.grad is None for p in model.parameters())
    assert [h["point"] for h in res.history] == ["before", "step 1", "step 2", "step 3"]
    assert [h["step"] for h in res.history] == [0, 1, 2, 3]  # point_key: 0 on "before"
    assert res.stop_reason == "completed 3 steps" and res.model is model
    assert res.seconds == res.history[-1]["elapsed"]


def test_template_keeps_extras_on_early_stop_and_cleans_up_after_errors():
    x, y = _data()
    model = _net()
    res = Steps().fit(model, x, y, evaluate=lambda m: {}, stop_when=lambda rec: rec["step"] == 2 and "enough")
    assert [h["point"] for h in res.history] == ["before", "step 1", "step 2"]
    assert res.stop_reason == "enough" and "last_loss" in res.extras
    assert not model.training and all(p.grad is None for p in model.parameters())

    class Fails(Steps):
        def _fit(self, run, opt):
            super()._fit(run, opt)
            raise FloatingPointError("diverged")

    with pytest.raises(FloatingPointError):
        Fails().fit(model, x, y)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_scan_restores_frozen_parameters():
    """The trigger scan freezes the model while it searches, then restores each parameter's
    own ``requires_grad`` (it used to make every parameter trainable)."""
    x, y = _data(30)
    model = _net()
    model[0].weight.requires_grad_(False)
    NeuralCleanse(epochs=1, epoch_images=30, progress=False).scan(model, x, y)
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True]


def test_paper_configuration():
    """``IBAU.paper()``: the settings of the paper and the authors' code (reference.md section 1),
    whatever the defaults are."""
    cfg = IBAU.paper(seed=3).config()
    expected = dict(rounds=5, norm_bound=10.0, inner_lr=10.0, inner_reg=1e-3, inner_optimizer="sgd", fp_step=0.1,
                    hypergrad_iters=5, hypergrad_solver="fixed_point", outer_lr=1e-3, outer_optimizer="adam",
                    batch_size=100, perturb_fraction=0.01, clip_images=None, seed=3)
    assert {k: cfg[k] for k in expected} == expected
