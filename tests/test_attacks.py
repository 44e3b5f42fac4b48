import numpy as np
import pytest
import torch

from ibau.attacks import Trigger, badnets_square


def test_badnets_geometry():
    t = badnets_square()
    x = torch.zeros(2, 3, 32, 32)
    out = t(x)
    changed = (out != x).any(0).any(0)
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert rows.min() == 27 and rows.max() == 30 and cols.min() == 27 and cols.max() == 30
    assert changed.sum() == 16 and (out[:, :, 27:31, 27:31] == 1).all()


def test_additive_blend_and_file_triggers(tmp_path):
    from PIL import Image

    pat = np.zeros((32, 32, 3), np.uint8)
    pat[5, 6] = (255, 0, 51)
    Image.fromarray(pat).save(tmp_path / "t.png")
    t = Trigger.from_image(tmp_path / "t.png")
    x = torch.full((1, 3, 32, 32), 0.5)
    out = t(x)
    assert torch.allclose(out[0, :, 5, 6], torch.tensor([1.0, 0.5, 0.7]))
    assert (out[0, :, 0, 0] == 0.5).all()
    b = Trigger.blend(torch.ones(3, 32, 32), 0.2)
    assert torch.allclose(b(x), torch.full_like(x, 0.6))
    mask = np.zeros((3, 32, 32), np.float32)
    mask[:, 31, 23:] = 1
    np.save(tmp_path / "m.npy", mask)
    l0 = Trigger.from_image(tmp_path / "t.png", mask=tmp_path / "m.npy")
    assert (l0(x)[0, :, 31, 23:] == 0).all()  # replaced pixels (pattern is 0 there)
    assert t.sha256() != l0.sha256() and len(t.sha256()) == 64


def test_trigger_validation():
    with pytest.raises(ValueError):
        Trigger(torch.zeros(32, 32))
    with pytest.raises(ValueError):
        Trigger(torch.zeros(3, 32, 32), torch.full((3, 32, 32), 2.0))


@pytest.mark.slow
@pytest.mark.realdata
def test_released_trigger_reproduces_the_authors_badnets_model(shared_data):
    import lzma

    from ibau.io import load_weights
    from ibau.metrics import attack_success_rate
    from ibau.models import SmallVGG

    lossless = np.load(shared_data / "cifar10" / "test_lossless.npy")
    x = np.load(lzma.open(shared_data / "cifar10" / "x_test.npy.xz"))[lossless]
    y = torch.from_numpy(np.load(shared_data / "cifar10" / "y_test.npy")[lossless].astype(np.int64))
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    net = load_weights(SmallVGG(), shared_data / "ibau-checkpoints" / "badnets_8_02_ckpt.pth")
    assert attack_success_rate(net, x, y, badnets_square(), 8) >= 0.98
