"""A MobileNet-style network the package does not ship (depthwise-separable convolutions, BatchNorm,
ReLU6 in place, inverted residual blocks, dropout): the third architecture of
``benchmarks/unseen_models.py``, given to ``ibau unlearn --model-def`` as a user's own file would be."""

from torch import nn


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expand=3):
        super().__init__()
        hidden = c_in * expand
        self.block = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.block(x)
        return x + out if self.residual else out


class MobileNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(InvertedResidual(24, 32, 2), InvertedResidual(32, 32, 1),
                                    InvertedResidual(32, 64, 2), InvertedResidual(64, 64, 1),
                                    InvertedResidual(64, 96, 2))
        self.head = nn.Sequential(nn.Conv2d(96, 192, 1, bias=False), nn.BatchNorm2d(192), nn.ReLU6(inplace=True),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(192, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def build(num_classes=10):
    return MobileNet(num_classes)
