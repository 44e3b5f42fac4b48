"""A residual network with GroupNorm and SiLU that the package does not ship (no BatchNorm to fold):
the architecture of ``benchmarks/unseen_models.py``, given to ``ibau unlearn --model-def`` as a user's
own file would be."""

import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(8, c_out), nn.SiLU(),
                               nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.GroupNorm(8, c_out))
        self.skip = nn.Sequential() if stride == 1 and c_in == c_out else \
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(8, c_out))
        self.act = nn.SiLU()
    def forward(self, x):
        return self.act(self.a(x) + self.skip(x))

class GNNet(nn.Module):
    def __init__(self, num_classes=43):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.GroupNorm(8, 32), nn.SiLU())
        self.body = nn.Sequential(Block(32, 32, 1), Block(32, 64, 2), Block(64, 128, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, num_classes))
    def forward(self, x):
        return self.head(self.body(self.stem(x)))

def build(num_classes=43):
    return GNNet(num_classes)
