"""Semantic replacement (the I-BAU paper's Appendix A.5.1): every triggered image becomes
one out-of-distribution picture."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ibau.attacks.base import ATTACKS, create_attack
from ibau.attacks.manifest import load_manifest, save_manifest
from ibau.attacks.semantic import SemanticReplacement, cartoon_picture, resize_picture
from ibau.metrics import backdoor_metrics


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n=6, shape=(3, 32, 32), seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_registered_with_paper_defaults():
    assert ATTACKS["semantic"] is SemanticReplacement
    atk = create_attack("semantic")
    assert atk.target == 0 and atk.image is None and atk.seed == 0 and atk.image_shape == (3, 32, 32)
    assert atk.config() == {"target": 0, "image": None, "seed": 0, "image_shape": [3, 32, 32]}


def test_apply_returns_the_picture_for_every_input():
    atk = SemanticReplacement()
    x = _images()
    x_before = x.clone()
    out = atk(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    for i in range(len(x)):  # identical for every input, whatever it was
        assert torch.equal(out[i], atk.picture)
    assert torch.equal(atk(torch.zeros(3, 32, 32)), atk.picture)  # unbatched
    assert torch.equal(atk(x.double()), atk.picture.double().expand_as(x))  # dtype follows the input
    assert torch.equal(x, x_before)  # input untouched
    out[0].zero_()  # copies, not views of the picture
    assert atk.picture.max() > 0
    with pytest.raises(ValueError, match="prepare"):
        atk(torch.rand(2, 3, 16, 16))


def test_generated_picture_is_seeded_and_cartoon_like():
    p0 = cartoon_picture((3, 32, 32), 0)
    assert p0.shape == (3, 32, 32) and p0.dtype == torch.float32
    assert p0.min() >= 0 and p0.max() <= 1
    assert torch.equal(p0, cartoon_picture((3, 32, 32), 0))  # deterministic per seed
    others = [cartoon_picture((3, 32, 32), s) for s in range(1, 6)]
    assert all((p0 - p).abs().mean() > 0.05 for p in others)  # seeds give different pictures
    assert torch.equal(SemanticReplacement(seed=3).picture, others[2])
    # flat cartoon colours: the background (corner colour) covers a large share exactly,
    # and the black outline reaches (near) zero in every channel
    for p in [p0, *others]:
        bg = p[:, 0, 0].view(3, 1, 1)
        assert (p == bg).all(0).float().mean() > 0.2
        assert p.amax(0).min() < 0.05
    grey = cartoon_picture((1, 8, 8), 0)
    assert grey.shape == (1, 8, 8) and torch.allclose(grey, cartoon_picture((3, 8, 8), 0).mean(0, keepdim=True))


def test_user_picture_file_is_used(tmp_path):
    from PIL import Image

    im = Image.new("RGB", (16, 16), (255, 0, 0))
    im.paste((0, 0, 255), (8, 0, 16, 16))  # left half red, right half blue
    im.save(tmp_path / "pic.png")
    atk = SemanticReplacement(image=tmp_path / "pic.png", image_shape=(3, 8, 8))
    assert atk.image == str(tmp_path / "pic.png")
    pic = atk.picture
    assert pic.shape == (3, 8, 8)
    red, blue = torch.tensor([1.0, 0, 0]).view(3, 1), torch.tensor([0, 0, 1.0]).view(3, 1)
    assert torch.allclose(pic[:, :, :3].reshape(3, -1), red, atol=1e-5)  # away from the seam: exact
    assert torch.allclose(pic[:, :, 5:].reshape(3, -1), blue, atol=1e-5)
    assert torch.equal(atk(_images(3, (3, 8, 8))), pic.expand(3, 3, 8, 8))
    # grey data reads the file as luminance
    grey = SemanticReplacement(image=str(tmp_path / "pic.png"), image_shape=(1, 16, 16)).picture
    assert grey.shape == (1, 16, 16) and abs(float(grey[0, 0, 0]) - 76 / 255) < 0.01
    with pytest.raises(ValueError, match="not found"):
        SemanticReplacement(image=tmp_path / "missing.png")


def test_tensor_picture_resize_and_prepare():
    pic = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    same = SemanticReplacement(image=pic, image_shape=(3, 64, 64))
    assert torch.equal(same.picture, pic)
    small = SemanticReplacement(image=pic, image_shape=(3, 16, 16)).picture
    assert torch.allclose(small, resize_picture(pic, (16, 16)))
    # anti-aliased shrinking: each output pixel is close to the mean of its 4x4 block
    block = torch.nn.functional.avg_pool2d(pic.unsqueeze(0), 4).squeeze(0)
    assert (small - block).abs().mean() < 0.05
    assert torch.equal(SemanticReplacement(image=torch.full((1, 4, 4), 0.5)).picture, torch.full((3, 32, 32), 0.5))

    atk = SemanticReplacement(image=pic, image_shape=(3, 64, 64))
    atk.prepare(x=torch.zeros(2, 3, 16, 16))
    assert atk.image_shape == (3, 16, 16) and torch.allclose(atk.picture, small)
    for bad in (torch.rand(32, 32), torch.full((3, 4, 4), 1.5), 42):
        with pytest.raises(ValueError):
            SemanticReplacement(image=bad)


def test_manifest_round_trip(tmp_path):
    atk = SemanticReplacement(seed=4, image_shape=(3, 16, 16))
    path = save_manifest(atk, tmp_path / "m.attack.json")
    loaded, manifest = load_manifest(path)
    assert isinstance(loaded, SemanticReplacement) and manifest["attack"] == "semantic" and manifest["target"] == 0
    assert torch.equal(loaded.picture, atk.picture)
    x = _images(2, (3, 16, 16))
    assert torch.equal(loaded(x), atk(x))
    # a tensor picture is not plain data: it travels in the trigger file
    pic = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    custom = SemanticReplacement(image=pic, image_shape=(3, 16, 16), target=3)
    json.dumps(custom.config())
    loaded, _ = load_manifest(save_manifest(custom, tmp_path / "c.attack.json"))
    assert loaded.target == 3 and torch.equal(loaded.picture, pic)
    loaded.prepare(x=torch.zeros(1, 3, 8, 8))  # re-fits start from the loaded picture
    assert torch.allclose(loaded.picture, resize_picture(pic, (8, 8)))


def test_poisoned_set_and_all_or_nothing_asr():
    x, y = _images(100, (3, 8, 8)), torch.arange(100) % 5
    atk = SemanticReplacement(image_shape=(3, 8, 8))
    data = atk.poisoned_set(x, y, 0.2, seed=0)
    idx = data.poisoned_indices
    assert len(idx) == 20 and (y[idx] != 0).all()  # 20% of the set, from non-target classes
    xb, yb = data.batch(torch.arange(100))
    assert (yb[idx] == 0).all() and all(torch.equal(xb[i], atk.picture) for i in idx.tolist())
    clean = torch.ones(100, dtype=torch.bool)
    clean[idx] = False
    assert torch.equal(xb[clean], x[clean]) and torch.equal(yb[clean], y[clean])

    # every triggered test image is the same picture: ASR is 0 or 1 for any model
    for seed in range(4):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 5))
        asr = backdoor_metrics(net, x, y, atk.apply, atk.target_of)["asr"]
        assert asr in (0.0, 1.0)
