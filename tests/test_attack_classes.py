"""The attack classes: one contract test over every registered attack, then the
geometry each paper setting prescribes, label rules and the registry."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ibau.attacks import (
    ATTACKS, AllToAll, Attack, BadNets, Blend, L0Inv, L2Inv, MultiTrigger, Smooth, TrojanSquare,
    TrojanWatermark, SemanticReplacement, WaNet, InputAware, HiddenTrigger, create_attack, gaussian_blur, procedural_pattern, square_mask, watermark_mask,
)
from ibau.testing import TinyNet, make_data, poisoned_model

SHAPE = (3, 8, 8)
STEPS = 10


@contextlib.contextmanager
def one_thread():
    # the machine is shared; these tiny problems are fastest on one thread anyway
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class AnySizeNet(nn.Module):
    """A small conv net for any image size (global pooling before the head)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ELU(), nn.Conv2d(8, 16, 3, padding=1),
                                      nn.ELU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def any_size_net(num_classes: int = 10) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AnySizeNet(num_classes).eval()


@pytest.fixture(scope="module")
def model() -> TinyNet:
    with one_thread():
        return poisoned_model(0)


@pytest.fixture(scope="module")
def data():
    return make_data(96, seed=11)


GEN = dict(steps=STEPS, batch_size=48)
FACTORIES = {
    "badnets": lambda seed: BadNets(image_shape=SHAPE),
    "blend": lambda seed: Blend(seed=seed, image_shape=SHAPE),
    "l0_inv": lambda seed: L0Inv(target=2, pixels=4, seed=seed, **GEN),
    "l2_inv": lambda seed: L2Inv(target=2, norm=1.5, seed=seed, **GEN),
    "smooth": lambda seed: Smooth(target=2, seed=seed, **GEN),
    "trojan_sq": lambda seed: TrojanSquare(target=2, norm=2.0, seed=seed, **GEN),
    "trojan_wm": lambda seed: TrojanWatermark(target=2, norm=2.0, seed=seed, **GEN),
    "all_to_all": lambda seed: AllToAll(num_classes=4, image_shape=SHAPE),
    "multi": lambda seed: MultiTrigger([(L2Inv(target=3, norm=1.0, seed=seed, **GEN), 3),
                                        (BadNets(target=1, image_shape=SHAPE), 1)]),
    "semantic": lambda seed: SemanticReplacement(seed=seed, image_shape=SHAPE),
    "wanet": lambda seed: WaNet(seed=seed, image_shape=SHAPE),
    "input_aware": lambda seed: InputAware(seed=seed, width=8, image_shape=SHAPE),
    "hidden_trigger": lambda seed: HiddenTrigger(target=2, source=1, num_poisons=8, num_source=16, patch_size=3,
                                                 steps=STEPS, batch_size=48, seed=seed),
}
SEEDED = {"blend", "l0_inv", "l2_inv", "smooth", "trojan_sq", "trojan_wm", "multi", "semantic", "wanet", "input_aware",
          "hidden_trigger"}


def test_every_registered_attack_is_covered():
    assert set(ATTACKS) == set(FACTORIES)
    for name, cls in ATTACKS.items():
        assert cls.name == name and cls.__doc__ and "Example" in cls.__doc__


def _prepared(name, seed, model, data):
    atk = FACTORIES[name](seed)
    if atk.needs_model:
        atk.prepare(model, *data)
    return atk


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_attack_contract(name, model, data):
    x, y = data
    atk = FACTORIES[name](0)
    assert isinstance(atk, Attack)
    if atk.needs_model:
        with pytest.raises(RuntimeError, match="call prepare"):
            atk.apply(x)
        model.train()
        params = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.random.get_rng_state()
        atk.prepare(model, x, y)
        assert model.training and all(m.training for m in model.modules())  # mode restored
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(rng, torch.random.get_rng_state())  # global RNG untouched
        model.eval()

    out = atk.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().amax(dim=(1, 2, 3)).min() > 0  # every image is changed
    assert torch.allclose(atk.apply(x[3]), out[3], atol=1e-6)  # unbatched input
    assert torch.equal(x, make_data(96, seed=11)[0])  # input not modified in place

    state = atk.state_dict()
    assert state and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())

    same = _prepared(name, 0, model, data)
    assert _states_equal(state, same.state_dict()) and torch.equal(same.apply(x), out)
    if name in SEEDED:
        other = _prepared(name, 1, model, data)
        assert not _states_equal(state, other.state_dict())
        assert not torch.equal(other.apply(x), out)

    fresh = FACTORIES[name](1)  # another seed, never prepared: everything comes from the state
    fresh.load_state_dict(state)
    assert torch.equal(fresh.apply(x), out)
    assert _states_equal(fresh.state_dict(), state)

    config = json.loads(json.dumps(atk.config()))  # settings are plain data ...
    if name != "multi":  # ... that rebuild the attack through the registry (multi: per part)
        rebuilt = create_attack(name, **config).load_state_dict(state)
        assert rebuilt.config() == config and torch.equal(rebuilt.apply(x), out)


def test_badnets_square_geometry():
    atk = BadNets()
    assert atk.target == 8
    x = torch.zeros(2, 3, 32, 32)
    changed = (atk(x) != x).any(0).any(0)
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (27, 30, 27, 30) and changed.sum() == 16
    atk.prepare(x=torch.zeros(1, 3, 16, 16))  # the trigger follows the image size
    assert atk.trigger.shape == (3, 16, 16) and atk(torch.zeros(3, 16, 16))[:, 11:15, 11:15].eq(1).all()
    with pytest.raises(ValueError):
        atk(torch.zeros(1, 3, 32, 32))


def test_blend_mixes_the_given_picture(tmp_path):
    from PIL import Image

    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pic = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    atk = Blend(image=pic, image_shape=SHAPE)
    assert atk.target == 1 and atk.alpha == 0.2
    assert torch.allclose(atk(x), 0.8 * x + 0.2 * pic, atol=1e-6)

    Image.new("RGB", (4, 4), (255, 0, 51)).save(tmp_path / "p.png")
    from_file = Blend(image=tmp_path / "p.png", image_shape=(3, 16, 16))
    assert torch.allclose(from_file.picture, torch.tensor([1.0, 0.0, 0.2]).view(3, 1, 1).expand(3, 16, 16), atol=1e-5)

    p0, p1 = procedural_pattern((3, 32, 32), 0), procedural_pattern((3, 32, 32), 1)
    assert p0.shape == (3, 32, 32) and p0.min() == 0 and p0.max() == 1 and not torch.equal(p0, p1)
    assert torch.equal(p0, procedural_pattern((3, 32, 32), 0))
    assert torch.allclose(Blend().picture, p0, atol=1e-6)


def test_l0_inv_changes_at_most_pixels_positions(model, data):
    x, y = data
    atk = L0Inv(target=2, pixels=5, **GEN).prepare(model, x, y)
    moved = (atk(x) != x).any(1).flatten(1).sum(1)
    assert moved.max() <= 5 and moved.max() > 0
    assert atk.mask.shape == (3, 8, 8) and atk.mask.any(0).sum() == 5 and set(atk.mask.unique().tolist()) <= {0.0, 1.0}

    mask = L0Inv.bottom_row_mask(9, (3, 32, 32))
    assert mask[:, 31, 23:].eq(1).all() and mask.sum() == 27
    pattern = mask * torch.tensor([0.9, 0.1, 0.5]).view(3, 1, 1)
    fixed = L0Inv.fixed(mask[0], pattern, target=4)
    fixed.prepare(model, x, y)  # a given trigger is kept as it is
    xi = torch.rand(2, 3, 32, 32)
    assert fixed.target == 4 and torch.allclose(fixed(xi), xi * (1 - mask) + pattern)


def test_l2_inv_norm_and_effect(model, data):
    x, y = data
    atk = L2Inv(target=2, norm=1.5, steps=30, batch_size=48).prepare(model, x, y)
    assert abs(float(atk.pattern.norm()) - 1.5) < 1e-4
    assert torch.allclose(atk(x), (x + atk.pattern).clamp(0, 1))
    with torch.no_grad():
        clean, trig = (F.softmax(model(v), 1)[:, 2].mean() for v in (x, atk(x)))
    assert trig > clean + 0.1  # the trigger pushes towards its target
    assert L2Inv().norm == 3.2


def _high_frequency_share(t: torch.Tensor, cutoff: float = 1 / 8) -> float:
    """Share of the (mean-free) energy above ``cutoff`` cycles/pixel. The image is
    mirrored first so that the FFT's wrap-around adds no artificial edge."""
    t = torch.cat([t, t.flip(-1)], -1)
    t = torch.cat([t, t.flip(-2)], -2)
    spec = torch.fft.rfft2(t - t.mean()).abs().pow(2)
    fy = torch.fft.fftfreq(t.shape[-2]).abs().view(-1, 1)
    fx = torch.fft.rfftfreq(t.shape[-1]).view(1, -1)
    high = (fy ** 2 + fx ** 2).sqrt() > cutoff
    return float(spec[..., high].sum() / spec.sum())


def test_smooth_trigger_is_low_frequency_and_in_range():
    net = any_size_net()
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    atk = Smooth(steps=3, batch_size=16).prepare(net, x)
    t = atk.pattern
    assert atk.target == 6 and t.shape == (3, 32, 32)
    assert t.min() >= 0 and t.max() <= 0.2 and t.max() > 0.19
    noise = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(4))
    noise = noise * t.norm() / noise.norm()
    assert _high_frequency_share(t) < 0.01 < 0.5 < _high_frequency_share(noise)
    out = atk(x)
    assert torch.allclose(out.amin(dim=(1, 2, 3)), torch.zeros(16)) and torch.allclose(out.amax(dim=(1, 2, 3)), torch.ones(16))
    o = x[0] + t
    assert torch.allclose(out[0], (o - o.min()) / (o.max() - o.min()), atol=1e-6)


def test_gaussian_blur():
    const = torch.full((2, 3, 10, 10), 0.3)
    assert torch.allclose(gaussian_blur(const, 6.0), const)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[..., 10, 10] = 1
    out = gaussian_blur(impulse, 2.0)[0, 0]
    assert abs(float(out.sum()) - 1) < 1e-5 and out[10, 10] == out.max() and torch.allclose(out, out.T, atol=1e-7)
    assert out[10, 10] < 0.05 and torch.allclose(out[10, 12] / out[10, 10], torch.tensor(0.6065), atol=1e-3)


@pytest.mark.parametrize("cls", [TrojanSquare, TrojanWatermark])
def test_trojan_pattern_mask_norm_and_neurons(cls, model, data):
    x, y = data
    atk = cls(target=2, norm=2.0, steps=30, batch_size=48).prepare(model, x, y)
    t = atk.pattern
    assert (t * (1 - atk.region)).abs().max() == 0 and (t != 0).any()
    assert abs(float(t.norm()) - 2.0) < 1e-4
    assert torch.allclose(atk(x), (x + t).clamp(0, 1))
    assert atk.selected is not None and len(atk.selected) == 1
    expected = model.classifier.weight.abs().sum(0).argmax().item()  # TrojanNN's selection rule
    assert atk.selected == [expected]
    assert atk.activation(model, atk(x)).mean() > atk.activation(model, x).mean()
    assert cls().norm == 8.7 and cls().target == 2


def test_trojan_geometry_and_named_layer(model, data):
    sq = square_mask((3, 32, 32))[0]
    rows, cols = torch.nonzero(sq, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (21, 29, 21, 29) and sq.sum() == 81
    wm = watermark_mask((3, 32, 32))
    assert wm.shape == (1, 32, 32) and 250 <= wm.sum() <= 350
    assert torch.equal(wm, wm.flip(-1)) and 50 <= watermark_mask((3, 16, 16)).sum() <= 100

    x, y = data
    atk = TrojanSquare(target=2, layer="features.2", neurons=2, norm=2.0, **GEN).prepare(model, x, y)
    conv = model.features[4].weight.abs().sum(dim=(0, 2, 3))  # next layer after features.2
    assert atk.selected == sorted(torch.topk(conv, 2).indices.tolist())
    with pytest.raises(ValueError):
        TrojanSquare(layer="nope", **GEN).prepare(model, x, y)


def test_all_to_all_labels(model, data):
    x, y = data
    atk = AllToAll(num_classes=4, image_shape=SHAPE)
    assert torch.equal(atk.target_of(torch.tensor([0, 1, 2, 3])), torch.tensor([1, 2, 3, 0]))
    assert torch.equal(atk(x), BadNets(image_shape=SHAPE)(x))
    custom = AllToAll(10, trigger=lambda v: 1 - v)
    assert torch.equal(custom(x), 1 - x) and custom.target_of(torch.tensor([9]))[0] == 0 and custom.state_dict() == {}


def test_multi_trigger_pairs_and_state(model, data):
    x, y = data
    bad, l2 = BadNets(target=1, image_shape=SHAPE), L2Inv(target=3, norm=1.0, **GEN)
    multi = MultiTrigger([(bad, 1), (l2, 3)])
    assert multi.attacks == [bad, l2] and multi.needs_model
    multi.prepare(model, x, y)
    assert torch.equal(multi.apply(x, which=0), bad(x)) and torch.equal(multi.apply(x, which=1), l2(x))
    assert multi.target_of(y, which=0).eq(1).all() and multi.target_of(y, which=1).eq(3).all()
    state = multi.state_dict()
    assert set(state) == {"0.pattern", "0.mask", "1.pattern"}
    with pytest.raises(IndexError):
        multi.apply(x, which=2)
    with pytest.raises(ValueError):
        MultiTrigger([(L2Inv(target=3), 4)])


def test_multi_trigger_paper_preset():
    preset = MultiTrigger.paper(num_classes=10, seed=0, steps=2, batch_size=8)
    kinds = [type(a) for a in preset.attacks]
    assert kinds == [TrojanWatermark, TrojanSquare, BadNets, Smooth, Blend, L0Inv, L2Inv]
    assert preset.targets == [9, 2, 0, 1, 3, 4, 5]
    net = any_size_net(10)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    preset.prepare(net, x, torch.arange(8))
    for i in range(len(preset)):
        out = preset.apply(x, which=i)
        assert out.shape == x.shape and not torch.equal(out, x)
    again = MultiTrigger.paper(seed=0, steps=2, batch_size=8).load_state_dict(preset.state_dict())
    assert all(torch.equal(again.apply(x, which=i), preset.apply(x, which=i)) for i in range(7))


def test_registry():
    atk = create_attack("badnets", target=3)
    assert isinstance(atk, BadNets) and atk.target == 3 and atk.target_of(torch.zeros(2)).eq(3).all()
    with pytest.raises(KeyError):
        create_attack("no-such-attack")
