"""CIFAR-10 (32x32) variants of ResNet-18, GoogLeNet and DenseNet-121.

These are the three extra architectures of the paper's appendix (Zeng et al., "Adversarial
Unlearning of Backdoors via Implicit Hypergradient", ICLR 2022, Appendix A.2.3, Table 7),
where each is poisoned with the Trojan watermark on CIFAR-10 and then cleaned with I-BAU.

All three follow the layout commonly used for 32x32 inputs: a 3x3 stride-1 stem without
the ImageNet 7x7 convolution and max-pooling, and a global (adaptive) average pool before a
single ``nn.Linear`` named ``classifier``, so any input side >= 8 works and penultimate
features can be read uniformly (see :func:`ibau.models.features`).

The ``width`` argument is our addition, not the paper's: it multiplies every channel count
(rounded to an int, at least 1) so that CPU profiles and tests can use e.g. ``width=0.25``.
``width=1`` gives the standard networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResNet18", "GoogLeNet", "DenseNet121"]


def _scaled(channels: int, width: float) -> int:
    """``channels`` times the ``width`` multiplier, rounded, at least 1 (``width`` must be > 0)."""
    width = float(width)
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    return max(1, int(round(channels * width)))


def _doc(description: str, n_params: str,
         width: str = "multiplier of every channel count (our addition, for CPU profiles).") -> str:
    """Class docstring of a Table 7 network: its description, parameter count and the
    ``(num_classes, in_channels, width)`` arguments all three constructors take."""
    return f"""{description}

    Parameters at ``width=1`` with 10 classes: {n_params}.

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        width: {width}
    """


def _conv_bn_relu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------- ResNet-18


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    __doc__ = _doc("""ResNet-18 (He et al., 2016) for 32x32 inputs, one of the paper's Table 7 models.

    Zeng et al. (ICLR 2022), Appendix A.2.3, Table 7. A 3x3 stride-1 stem convolution
    (64 channels, BatchNorm, ReLU), four stages of two post-activation BasicBlocks with
    64-128-256-512 channels (stages 2-4 downsample by 2 with a 1x1 projection shortcut),
    global average pooling and one linear layer ``classifier`` on 512 features.""",
                   "11,173,962 (~11.2M)")

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        c_stem = _scaled(64, width)
        self.stem = _conv_bn_relu(in_channels, c_stem, 3)
        stages = []
        c_in = c_stem
        for i, base in enumerate((64, 128, 256, 512)):
            c_out = _scaled(base, width)
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --------------------------------------------------------------------------- GoogLeNet

# (name, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection) of Szegedy et al. (2015),
# Table 1; "pool" marks the stride-2 max-pooling between the groups.
_INCEPTION_CFG: tuple = (
    ("a3", 64, 96, 128, 16, 32, 32),
    ("b3", 128, 128, 192, 32, 96, 64),
    "pool",
    ("a4", 192, 96, 208, 16, 48, 64),
    ("b4", 160, 112, 224, 24, 64, 64),
    ("c4", 128, 128, 256, 24, 64, 64),
    ("d4", 112, 144, 288, 32, 64, 64),
    ("e4", 256, 160, 320, 32, 128, 128),
    "pool",
    ("a5", 256, 160, 320, 32, 128, 128),
    ("b5", 384, 192, 384, 48, 128, 128),
)


class _Inception(nn.Module):
    def __init__(self, c_in: int, n1: int, n3_red: int, n3: int, n5_red: int, n5: int, n_pool: int):
        super().__init__()
        self.branch1 = _conv_bn_relu(c_in, n1, 1)
        self.branch3 = nn.Sequential(_conv_bn_relu(c_in, n3_red, 1), _conv_bn_relu(n3_red, n3, 3))
        # The "5x5" branch as two stacked 3x3 convolutions (same receptive field), as in
        # the usual CIFAR GoogLeNet.
        self.branch5 = nn.Sequential(
            _conv_bn_relu(c_in, n5_red, 1), _conv_bn_relu(n5_red, n5, 3), _conv_bn_relu(n5, n5, 3)
        )
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _conv_bn_relu(c_in, n_pool, 1))
        self.out_channels = n1 + n3 + n5 + n_pool

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], dim=1)


class GoogLeNet(nn.Module):
    __doc__ = _doc("""GoogLeNet (Szegedy et al., 2015) for 32x32 inputs, one of the paper's Table 7 models.

    Zeng et al. (ICLR 2022), Appendix A.2.3, Table 7. The usual CIFAR layout: a 3x3
    stride-1 stem with 192 channels (BatchNorm, ReLU) replaces the ImageNet stem; then
    Inception modules 3a-3b, stride-2 max-pooling, 4a-4e, stride-2 max-pooling, 5a-5b with
    Szegedy et al.'s branch widths (every convolution followed by BatchNorm and ReLU, the
    5x5 branch realised as two 3x3 convolutions), global average pooling and one linear
    layer ``classifier`` on 1024 features. (Table 7 of the paper lists W=832 for GoogLeNet;
    we keep the standard module widths, whose last module outputs 1024 channels.)""",
                   "6,158,346 (~6.2M)")

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        c_in = _scaled(192, width)
        self.stem = _conv_bn_relu(in_channels, c_in, 3)
        layers: list[nn.Module] = []
        names: list[str] = []
        n_pools = 0
        for entry in _INCEPTION_CFG:
            if entry == "pool":
                n_pools += 1
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
                names.append(f"pool{n_pools}")
                continue
            name, *cfg = entry
            module = _Inception(c_in, *(_scaled(c, width) for c in cfg))
            layers.append(module)
            names.append(name)
            c_in = module.out_channels
        self.inception = nn.Sequential()
        for name, layer in zip(names, layers):
            self.inception.add_module(name, layer)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.inception(self.stem(x))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --------------------------------------------------------------------------- DenseNet-121


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (4*growth) - BN-ReLU-3x3 conv (growth), concatenated to the input."""

    def __init__(self, c_in: int, growth: int):
        super().__init__()
        bottleneck = 4 * growth
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, bottleneck, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck)
        self.conv2 = nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class _Transition(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet121(nn.Module):
    __doc__ = _doc("""DenseNet-121 (Huang et al., 2017) for 32x32 inputs, one of the paper's Table 7 models.

    Zeng et al. (ICLR 2022), Appendix A.2.3, Table 7. A 3x3 stride-1 stem convolution with
    2*growth channels, four dense blocks of 6-12-24-16 bottleneck layers (growth rate 32,
    bottleneck width 4*growth), transitions with compression 0.5 and 2x2 average pooling
    between them, a final BatchNorm-ReLU, global average pooling and one linear layer
    ``classifier`` on 1024 features.""",
                   "6,956,298 (~7.0M)",
                   width="""multiplier of the growth rate, hence of every channel count (our addition,
            for CPU profiles).""")

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        growth = _scaled(32, width)
        c_in = 2 * growth
        self.stem = nn.Conv2d(in_channels, c_in, 3, padding=1, bias=False)
        blocks = []
        for i, n_layers in enumerate((6, 12, 24, 16)):
            layers: list[nn.Module] = []
            for _ in range(n_layers):
                layers.append(_DenseLayer(c_in, growth))
                c_in += growth
            if i < 3:
                c_out = max(1, c_in // 2)
                layers.append(_Transition(c_in, c_out))
                c_in = c_out
            blocks.append(nn.Sequential(*layers))
        self.block1, self.block2, self.block3, self.block4 = blocks
        self.bn = nn.BatchNorm2d(c_in)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block4(self.block3(self.block2(self.block1(self.stem(x)))))
        out = F.relu(self.bn(out))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))
