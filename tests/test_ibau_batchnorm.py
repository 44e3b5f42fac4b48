"""Issue 13: ``IBAU(freeze_batchnorm=True)`` leaves BatchNorm's scales and shifts as they are."""

import pytest
import torch
from torch import nn

from ibau import IBAU, InputError, testing as toy


def _fit(**settings) -> tuple[dict, dict, set]:
    x, y = toy.noise_data()
    model = toy.seeded_vgg()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    IBAU(rounds=1, batch_size=20, norm_bound=2.0, seed=1, progress=False, precision="fp32", fp_batch=None,
         reversed_fraction=0.0, **settings).fit(model, x, y)
    bn = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return before, model.state_dict(), bn


@pytest.mark.parametrize("fold_bn", [True, False])
def test_frozen_batchnorm_keeps_its_scales_and_shifts_and_trains_the_rest(fold_bn):
    before, after, bn = _fit(freeze_batchnorm=True, fold_bn=fold_bn)
    assert bn  # the premise: the model has BatchNorm layers
    affine = [k for k in before if k.rsplit(".", 1)[0] in bn and k.rsplit(".", 1)[1] in ("weight", "bias")]
    others = [k for k in before if k.rsplit(".", 1)[0] not in bn and before[k].is_floating_point()]
    assert affine and all(torch.equal(before[k], after[k]) for k in affine)
    assert all(not torch.equal(before[k], after[k]) for k in others)  # every conv / linear layer moved
    _, unfrozen, _ = _fit(fold_bn=fold_bn)
    assert any(not torch.equal(before[k], unfrozen[k]) for k in affine)  # without it they move


def test_freeze_batchnorm_is_checked():
    with pytest.raises(InputError, match="freeze_batchnorm"):
        IBAU(freeze_batchnorm="yes")
