import pytest
import torch
from torch import nn

from ibau.attacks import badnets_square
from ibau.metrics import attack_success_rate, backdoor_metrics, clean_accuracy, robust_accuracy


class Oracle(nn.Module):
    """Reads the class from the image's mean brightness; a bright bottom-right corner means class 0."""

    def __init__(self, classes=4):
        super().__init__()
        self.classes = classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        label = (x[:, :, :8, :8].mean((1, 2, 3)) * self.classes).long().clamp(0, self.classes - 1)
        label = torch.where(x[:, :, 28:30, 28:30].mean((1, 2, 3)) > 0.99, 0, label)
        return nn.functional.one_hot(label, self.classes).float() + 0 * self.dummy


def data():
    y = torch.tensor([0, 1, 2, 3, 1, 2, 3, 3])
    x = ((y.float() + 0.5) / 4).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).clone()
    return x, y


def test_metrics_on_a_known_model():
    x, y = data()
    m = Oracle()
    trig = badnets_square()
    assert clean_accuracy(m, x, y) == 1.0
    assert attack_success_rate(m, x, y, trig, 0) == 1.0  # all 7 non-target images flip
    assert attack_success_rate(m, x, y, trig, 0, include_target=True) == 1.0
    assert robust_accuracy(m, x, y, trig, 0) == 0.0
    # target 3: no image goes to 3 under the trigger; the target-class images count only with include_target
    assert attack_success_rate(m, x, y, trig, 3) == 0.0
    assert attack_success_rate(m, x, y, trig, 3, include_target=True) == 0.0
    # all-to-all: y -> y + 1; only y = 3 -> 0 succeeds
    assert attack_success_rate(m, x, y, trig, lambda t: (t + 1) % 4) == pytest.approx(3 / 8)
    full = backdoor_metrics(m, x, y, trig, 0, batch_size=3)
    assert full == {"acc": 1.0, "asr": 1.0, "asr_all": 1.0, "ra": 0.0}
    assert clean_accuracy(m, x, torch.zeros(8, dtype=torch.long)) == pytest.approx(1 / 8)


def test_asr_needs_non_target_images():
    x, y = data()
    with pytest.raises(ValueError, match="no image"):
        attack_success_rate(Oracle(), x[:1], y[:1], badnets_square(), 0)


def test_near_chance_warning():
    from ibau.metrics import NEAR_CHANCE, near_chance_warning

    balanced = torch.arange(10).repeat(10)  # 10 classes, 10% each
    assert near_chance_warning(0.9, balanced) is None
    assert near_chance_warning(0.1 + NEAR_CHANCE * 0.9, balanced) is None  # at the limit: fine
    msg = near_chance_warning(0.15, balanced)
    assert msg is not None and "15.0%" in msg and "10.0%" in msg and "--normalize" in msg
    skewed = torch.tensor([0] * 80 + [1] * 10 + [2] * 10)  # always answering 0 gives 80%
    assert near_chance_warning(0.81, skewed) is not None and near_chance_warning(0.9, skewed) is None
    assert near_chance_warning(0.0, torch.tensor([], dtype=torch.long)) is None
