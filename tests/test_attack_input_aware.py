"""Input-aware dynamic backdoor (IAB): per-image triggers, the batch recipe (own /
cross / clean), state round trips, resume, and one end-to-end backdoor on real 8x8
digits."""

from __future__ import annotations

import copy

import pytest
import torch

from ibau.attacks.input_aware import InputAware, InputAwareSet
from ibau.attacks.manifest import load_manifest, save_manifest
from ibau.demo import load_digits_tensors
from ibau.models import SmallVGG
from ibau.poisoning import evaluate_attack, poison_and_train
from ibau.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def _rms(a, b):
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def _pairwise_pattern_distance(atk, x):
    with torch.no_grad():
        p = atk.pattern(x)
    d = _rms(p.unsqueeze(1).expand(-1, len(p), -1, -1, -1).flatten(0, 1),
             p.unsqueeze(0).expand(len(p), -1, -1, -1, -1).flatten(0, 1)).view(len(p), len(p))
    return d[~torch.eye(len(p), dtype=torch.bool)]


def test_defaults_and_validation():
    atk = InputAware()
    assert (atk.target, atk.poison_ratio, atk.cross_ratio, atk.lambda_div, atk.lambda_norm, atk.mask_density,
            atk.mask_epochs, atk.generator_lr) == (0, 0.1, 0.1, 1.0, 100.0, 0.032, 25, 1e-2)
    assert not atk.needs_model
    for bad in (dict(poison_ratio=0.6, cross_ratio=0.5), dict(poison_ratio=-0.1), dict(mask_density=0),
                dict(mask_epochs=-1), dict(width=0), dict(generator_lr=0)):
        with pytest.raises(ValueError):
            InputAware(**bad)
    with pytest.raises(ValueError, match="channel"):
        atk.apply(torch.rand(2, 1, 8, 8))


def test_apply_shape_range_determinism(digits):
    x = digits[0][:32]
    x_before = x.clone()
    atk = InputAware(image_shape=(1, 8, 8), seed=3)
    out = atk.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, x_before)  # input untouched
    assert (out - x).abs().amax(dim=(1, 2, 3)).min() > 0  # every image changed
    assert torch.allclose(atk.apply(x[5]), out[5], atol=1e-6)  # (C, H, W) input
    assert torch.equal(atk.apply(x), out)  # deterministic
    assert torch.equal(InputAware(image_shape=(1, 8, 8), seed=3).apply(x), out)  # per seed
    assert not torch.equal(InputAware(image_shape=(1, 8, 8), seed=4).apply(x), out)
    assert atk.apply(x.double()).dtype == torch.float64
    # any image size, and prepare(x=...) rebuilds for another number of channels
    assert atk.apply(torch.rand(2, 1, 10, 14)).shape == (2, 1, 10, 14)
    rgb = torch.rand(3, 3, 32, 32)
    assert atk.prepare(x=rgb).apply(rgb).shape == rgb.shape and atk.image_shape == (3, 32, 32)


def test_triggers_are_input_specific(digits):
    x = digits[0][:40]
    atk = InputAware(image_shape=(1, 8, 8))
    d = _pairwise_pattern_distance(atk, x)
    # rms distance between the patterns of two images; measured untrained (seeds 0-2):
    # min 0.016-0.032, mean 0.048-0.069
    assert d.min() > 0.005 and d.mean() > 0.02
    # the triggered image depends on which image generated the trigger (cross mode)
    own, cross = atk.apply(x), atk.apply(x, source=torch.roll(x, 1, 0))
    assert (_rms(own, cross) > 0).all()
    with pytest.raises(ValueError):
        atk.apply(x, source=x[:3])


def test_training_batch_own_cross_clean(digits):
    x, y = digits[0][:40], digits[1][:40]
    atk = InputAware(image_shape=(1, 8, 8), target=7, poison_ratio=0.1, cross_ratio=0.2)
    xb, yb, x2 = x[:20], y[:20], x[20:40]
    inputs, labels, div = atk.training_batch(xb, yb, x2)
    nb, nc = 2, 4  # int(0.1 * 20), int(0.2 * 20)
    assert inputs.shape == xb.shape and labels.shape == yb.shape
    assert (labels[:nb] == 7).all()
    assert torch.equal(labels[nb:], yb[nb:])  # cross-trigger samples keep their true labels
    assert torch.allclose(inputs[:nb], atk.apply(xb[:nb]), atol=1e-6)
    assert torch.allclose(inputs[nb:nb + nc], atk.apply(xb[nb:nb + nc], source=x2[nb:nb + nc]), atol=1e-6)
    assert not torch.allclose(inputs[nb:nb + nc], atk.apply(xb[nb:nb + nc]), atol=1e-3)
    assert torch.equal(inputs[nb + nc:], xb[nb + nc:])  # the rest stays clean
    assert div.requires_grad and float(div.detach()) > 0
    # the diversity loss rewards different triggers for different images
    (g,) = torch.autograd.grad(div, next(atk.pattern_net.parameters()))
    assert g.abs().sum() > 0


def test_poisoned_set_count_and_batches(digits):
    x, y = digits[0][:300], digits[1][:300]
    atk = InputAware(image_shape=(1, 8, 8), target=3)
    ds = atk.poisoned_set(x, y, 0.5, seed=1)  # ratio ignored: poison_ratio decides
    assert isinstance(ds, InputAwareSet) and len(ds) == 300 and int(ds.mask.sum()) == 30
    assert torch.equal(ds.mask, atk.poisoned_set(x, y, 0.2, seed=1).mask)
    assert not torch.equal(ds.mask, atk.poisoned_set(x, y, 0.2, seed=2).mask)
    idx = torch.arange(300)
    xb, yb = ds.batch(idx)
    m = ds.mask
    assert (yb[m] == 3).all() and torch.equal(yb[~m], y[~m]) and torch.equal(xb[~m], x[~m])
    assert torch.allclose(xb[m], atk.apply(x[m]), atol=1e-6)
    assert torch.equal(ds.x, x)  # train_poisoned reads the clean images


def test_state_and_manifest_round_trip(tmp_path, digits):
    x = digits[0][:16]
    atk = InputAware(image_shape=(1, 8, 8), target=2, seed=5, width=8)
    state = atk.state_dict()
    assert state and all(k.startswith(("pattern.", "mask.")) for k in state)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    path = save_manifest(atk, tmp_path / "m.attack.json")
    again, manifest = load_manifest(path)
    assert isinstance(again, InputAware) and manifest["attack"] == "input_aware" and again.target == 2
    assert torch.equal(again.apply(x), atk.apply(x))
    with pytest.raises(ValueError, match="width"):
        InputAware(image_shape=(1, 8, 8)).load_state_dict(state)


def test_resume_gives_the_same_generators_and_model(tmp_path, digits):
    x, y = digits[0][:192], digits[1][:192]
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-3, seed=1)

    def fresh():
        torch.manual_seed(0)
        return SmallVGG(10, 1, 8), InputAware(image_shape=(1, 8, 8), mask_epochs=1, width=8, seed=2)

    model_a, atk_a = fresh()
    atk_a.train_poisoned(model_a, atk_a.poisoned_set(x, y, 0.1), cfg, progress=False)

    model_b, atk_b = fresh()
    ckpt = tmp_path / "iab.ckpt"
    calls, real = {"n": 0}, atk_b._joint_step

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # first batch of the second joint epoch (3 batches per epoch)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    atk_b._joint_step = crash
    with pytest.raises(KeyboardInterrupt):
        atk_b.train_poisoned(model_b, (x, y), cfg, checkpoint=ckpt, progress=False)
    assert ckpt.exists()
    del atk_b._joint_step
    model_c, atk_c = fresh()  # a new process: everything comes from the checkpoint
    atk_c.train_poisoned(model_c, (x, y), cfg, checkpoint=ckpt, progress=False)
    assert not ckpt.exists()
    assert all(torch.equal(v, model_c.state_dict()[k]) for k, v in model_a.state_dict().items())
    assert all(torch.equal(v, atk_c.state_dict()[k]) for k, v in atk_a.state_dict().items())


def test_end_to_end_backdoor_on_digits(tmp_path, digits):
    """A small VGG trained jointly with the generators on 8x8 digits learns the
    input-specific backdoor, in 12 epochs instead of the paper's hundreds:

    * the mask density and the poisoned share are raised from the paper's 0.032 / 0.1
      (two pixels of an 8x8 image) to 0.2 / 0.2;
    * the generators learn at 2e-3 instead of 1e-2: at 1e-2 the mask generator's
      density does not settle on images this small (epoch to epoch it jumped between
      0.02 and 0.33), so the mask frozen after ``mask_epochs`` was a draw, and so was
      the ASR after 10 epochs (0.29-0.91 over seeds; 0.39 on one CI machine).

    Measured over generator, initialisation and shuffling seeds: ACC 0.98, ASR 0.80-0.96,
    mask density 0.14-0.16 (clean model: ASR 0.00)."""
    xtr, ytr, xte, yte = digits
    cfg = TrainConfig(epochs=12, batch_size=64, lr=1e-3)
    atk = InputAware(image_shape=(1, 8, 8), poison_ratio=0.2, mask_density=0.2, mask_epochs=2, generator_lr=2e-3)
    torch.manual_seed(0)
    model = SmallVGG(10, 1, 8)
    clean = copy.deepcopy(model)
    record = poison_and_train(model, xtr, ytr, atk, config=cfg, progress=False, eval_data=(xte, yte))
    assert record["poisoned"] == 280
    metrics = record["metrics"]
    train(clean, (xtr, ytr), cfg, progress=False)
    clean_asr = evaluate_attack(clean, atk, xte, yte)["asr"]
    assert metrics["acc"] > 0.95
    assert metrics["asr"] > 0.6 and metrics["asr"] > clean_asr + 0.5
    with torch.no_grad():
        assert 0.05 < float(atk.mask(xte).mean()) < 0.25  # near its density target of 0.2
    assert _pairwise_pattern_distance(atk, xte[:40]).mean() > 0.2  # trained triggers stay diverse (0.57-0.63)
    # the saved attack re-applies exactly the same triggers (and the same ASR)
    again, _ = load_manifest(save_manifest(atk, tmp_path / "iab.attack.json"))
    assert torch.equal(again.apply(xte), atk.apply(xte))
    assert evaluate_attack(model, again, xte, yte)["asr"] == metrics["asr"]
