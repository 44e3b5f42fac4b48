"""Issue 15's cheaper outer steps: the fixed-point map on a subset of the first batch
(``fp_batch``) and bfloat16 autocast (``precision``)."""

import copy

import pytest
import torch

from ibau import IBAU, InputError, testing as toy
from ibau._reference import reference_hypergradient
from ibau.defenses.ibau import PAPER_SETTINGS
from ibau.precision import Autocast, fast_bf16, uses_bf16, with_precision

_data, _vgg = toy.noise_data, toy.seeded_vgg


def _fit(**settings):
    """One round on a small VGG; float32 and the whole first batch unless ``settings`` say otherwise."""
    x, y = _data()
    model = _vgg()
    # without the reversed triggers' scan: these tests are about the outer steps
    settings = {"precision": "fp32", "fp_batch": None, "reversed_fraction": 0.0, **settings}
    IBAU(rounds=1, batch_size=20, norm_bound=2.0, seed=1, progress=False, **settings).fit(model, x, y)
    return model.state_dict()


def _firsts(monkeypatch, **settings):
    """The ``first`` batch that every outer step's hypergradient is given."""
    seen = []
    original = IBAU.hypergradient

    def spy(self, net, params, delta, batch, first, generator, **kw):
        seen.append(first)
        return original(self, net, params, delta, batch, first, generator, **kw)

    monkeypatch.setattr(IBAU, "hypergradient", spy)
    _fit(**settings)
    monkeypatch.undo()
    return seen


def test_fp_batch_is_the_first_images_of_the_first_batch(monkeypatch):
    x, y = _data()
    firsts = _firsts(monkeypatch, fp_batch=7, outer_target="labels")
    assert len(firsts) == 3  # one per outer step, always the same images
    for first in firsts:
        assert torch.equal(first.x, x[:7]) and torch.equal(first.y, y[:7])
        assert (first.weight, first.size) == (1.0, 7)
    # with the default soft targets: the model's own predictions on those images
    (first, *_) = _firsts(monkeypatch, fp_batch=7)
    assert first.y.shape == (7, 5) and torch.allclose(first.y.sum(1), torch.ones(7))
    # no subset (or one as large as a batch): the whole first batch, as in the paper
    for settings in ({}, {"fp_batch": 20}, {"fp_batch": 500}):  # _fit's default: None
        (first, *_) = _firsts(monkeypatch, outer_target="labels", **settings)
        assert torch.equal(first.x, x[:20])


def test_fp_batch_as_large_as_a_batch_changes_nothing_and_a_smaller_one_does():
    plain = _fit()
    same = _fit(fp_batch=20)
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    other = _fit(fp_batch=5)
    assert any(not torch.equal(plain[k], other[k]) for k in plain)


def test_bf16_is_bit_identical_for_a_seed_and_its_hypergradient_close_to_float32():
    first, again, fp32 = _fit(precision="bf16"), _fit(precision="bf16"), _fit()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], fp32[k]) for k in first)  # bf16 arithmetic is not float32's
    # one outer step's hypergradient: the same direction, to bf16's rounding
    net = _vgg()
    params = list(net.parameters())
    x, y = _data()
    delta = 0.3 * torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    grads = {}
    for precision in ("fp32", "bf16"):
        d = IBAU(batch_size=20, norm_bound=2.0, perturb_fraction=0.2, progress=False, precision=precision)
        view = d.compute_view(net, torch.device("cpu"))
        g, _ = d.hypergradient(view, params, delta, (x[20:40], y[20:40]), (x[:20], y[:20]),
                               torch.Generator().manual_seed(11))
        grads[precision] = torch.cat([t.flatten() for t in g])
    a, b = grads["bf16"], grads["fp32"]
    assert float(b.norm()) > 0
    assert float((a - b).norm() / b.norm()) < 0.05


def test_the_inner_maximisation_has_its_own_precision(monkeypatch):
    """``inner_precision`` sets the inner pass's arithmetic apart from the outer steps'; ``None`` (the
    default) follows ``precision``."""
    seen = []
    original = IBAU.synthesize

    def spy(self, net, batches, **kw):
        seen.append(isinstance(net, Autocast))
        return original(self, net, batches, **kw)

    monkeypatch.setattr(IBAU, "synthesize", spy)
    for inner, expected in (("fp32", False), (None, True), ("bf16", True)):
        seen.clear()
        _fit(precision="bf16", inner_precision=inner)
        assert seen == [expected], inner
    seen.clear()
    _fit(inner_precision="bf16")  # bf16 inner pass under float32 outer steps
    assert seen == [True]
    assert IBAU().inner_precision is None and IBAU.paper().inner_precision is None
    with pytest.raises(InputError, match="inner_precision"):
        IBAU(inner_precision="half")


def test_bf16_view_shares_the_weights_and_returns_float32():
    net = _vgg()
    view = with_precision(net, "cpu", "bf16")
    assert isinstance(view, Autocast)
    assert {id(p) for p in view.parameters()} == {id(p) for p in net.parameters()}
    x, _ = _data(4)
    out = view(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, net(x), atol=0.05, rtol=0.05)
    assert with_precision(net, "cpu", "fp32") is net
    assert uses_bf16("auto", "cpu") == fast_bf16("cpu")
    assert uses_bf16("bf16", "cpu") and not uses_bf16("fp32", "cpu")


def test_the_default_recipe_is_cheaper_and_the_paper_recipe_keeps_float32_and_the_whole_batch():
    default = IBAU()
    assert (default.fp_batch, default.precision) == (25, "auto")
    with pytest.raises(InputError, match="precision"):
        IBAU(precision="fp16")
    with pytest.raises(InputError, match="fp_batch"):
        IBAU(fp_batch=0)
    paper = IBAU.paper(progress=False)
    assert (paper.fp_batch, paper.precision) == (None, "fp32") == (PAPER_SETTINGS["fp_batch"],
                                                                    PAPER_SETTINGS["precision"])


def test_the_default_recipe_in_float32_computes_the_exact_k_step_hypergradient_of_its_map():
    """Issue 15: the cheaper outer step keeps the mathematics. In float32 (``precision="fp32"``) the default
    recipe's step - BatchNorm folded, the projected map, clamped images, soft targets, K = 2 - gives the
    hypergradient of its fixed-point map computed plainly in float64, to 1e-3 relative."""
    from ibau.models import SmallVGG

    torch.manual_seed(0)
    net = toy.randomise_batchnorm(SmallVGG(num_classes=5, image_size=8)).eval()
    with torch.no_grad():  # sharper logits: input gradients large enough for the map's step to leave the ball
        [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(50)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 3, 8, 8, generator=g)
    t = torch.softmax(3 * torch.randn(40, 5, generator=g), 1)  # the teacher's soft targets
    # on the ball's surface along the inner loss's ascent, as the inner pass leaves it: the map's step then
    # leaves the ball, so that the projection's Jacobian is part of the map
    start = torch.zeros(1, 3, 8, 8, requires_grad=True)
    (ascent,) = torch.autograd.grad(torch.nn.functional.cross_entropy(net((x[:8] + start).clamp(0, 1)), t[:8]), [start])
    delta = 0.5 * ascent / ascent.norm()
    d = IBAU(batch_size=20, norm_bound=0.5, perturb_fraction=0.5, precision="fp32", progress=False)
    assert d.fp_projected and d.clip_images and d.hypergrad_iters == 2 and d.outer_target == "teacher"
    first = (x[:8], t[:8])  # the map's images: the first fp_batch images of the first batch
    got, _ = d.hypergradient(d.compute_view(net, torch.device("cpu")), list(net.parameters()), delta,
                             (x[20:], t[20:]), first, torch.Generator().manual_seed(11))
    got = torch.cat([a.flatten() for a in got]).double()
    chosen = d.choose_perturbed(20, torch.Generator().manual_seed(11))
    net64, x64, t64 = copy.deepcopy(net).double(), x.double(), t.double()

    def reference(iters):
        # the default recipe's map written plainly (no folding, no shortcuts): clamped images, projected step
        g = reference_hypergradient(net64, list(net64.parameters()), delta.double(), x64[20:], t64[20:], x64[:8],
                                    t64[:8], chosen, iters=iters, eta=d.fp_step, reg=d.inner_reg, clip=True, bound=0.5)
        return torch.cat([a.flatten() for a in g])

    exact = reference(d.hypergrad_iters)
    assert float(exact.norm()) > 0
    d64 = delta.double().requires_grad_(True)
    inner = -torch.nn.functional.cross_entropy(net64((x64[:8] + d64).clamp(0, 1)), t64[:8]) \
        + d.inner_reg * d64.pow(2).sum()
    assert float((d64 - d.fp_step * torch.autograd.grad(inner, [d64])[0]).detach().norm()) > 0.5  # the projection is active
    assert float((got - exact).norm() / exact.norm()) < 1e-3
    # the map's (implicit) term on its own, against the direct gradient: computed to the same precision
    direct = reference(0)
    implicit = exact - direct
    assert float(implicit.norm()) > 0
    assert float(((got - direct) - implicit).norm() / implicit.norm()) < 1e-2
