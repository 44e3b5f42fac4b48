"""A generated image task with a genuinely backdoored tiny classifier (seconds on a CPU).

Four classes of noisy 3x8x8 images around fixed random smooth templates; a 2x2 white
patch sends poisoned images to class 0. Used by the unit tests and the quick example:
everything is generated from seeds, nothing is downloaded.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ibau.attacks import Trigger

C, S, K = 3, 8, 4  # channels, side, classes
TARGET = 0
NOISE = 0.6


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = K):
        """Two conv-BN-ELU-pool blocks and a linear head for 3x8x8 images."""
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(C, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ELU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ELU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(16 * (S // 4) ** 2, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def trigger() -> Trigger:
    mask = torch.zeros(C, S, S)
    mask[:, -3:-1, -3:-1] = 1
    return Trigger.patch(mask, torch.ones(C, S, S))


def make_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(K, C, S, S, generator=torch.Generator().manual_seed(1234))
    templates = F.avg_pool2d(templates, 3, stride=1, padding=1, count_include_pad=False)
    y = torch.randint(0, K, (n,), generator=g)
    x = (templates[y] + NOISE * torch.randn(n, C, S, S, generator=g)).clamp(0, 1)
    return x, y


@functools.lru_cache(maxsize=None)
def poisoned_state(seed: int = 0, ratio: float = 0.2, steps: int = 200):
    """State dict of a TinyNet trained on data with ``ratio`` poisoned (trigger -> TARGET)."""
    torch.manual_seed(seed)
    x, y = make_data(1200, seed)
    idx = torch.nonzero(y != TARGET).flatten()[: int(ratio * len(y))]
    x[idx] = trigger()(x[idx])
    y[idx] = TARGET
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(net(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


def poisoned_model(seed: int = 0) -> TinyNet:
    net = TinyNet()
    net.load_state_dict(poisoned_state(seed))
    return net.eval()
