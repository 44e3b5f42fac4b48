from __future__ import annotations

from torch import Tensor, nn


class SmallVGG(nn.Module):
    """The paper's small VGG (Table 9), used for all its CIFAR-10 and GTSRB models.

    Three blocks of two 3x3 convolutions (32, 64, 128 channels) with bias, BatchNorm
    and ELU, each block followed by 2x2 max-pooling and dropout (0.3, 0.4, 0.4), then
    one linear layer. The layer indices inside ``features`` match the authors'
    released checkpoints, which therefore load with ``strict=True``.

    Args:
        num_classes: number of output logits (10 for CIFAR-10, 43 for GTSRB).
        in_channels: image channels (3 for RGB).
        image_size: side of the square input; must be divisible by 8.
        batchnorm: ``False`` puts an identity where each BatchNorm was (our addition: the
            network without BatchNorm of the ablation, issue 13); indices are unchanged.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, batchnorm: bool = True):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be divisible by 8, got {image_size}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for width, p_drop in ((32, 0.3), (64, 0.4), (128, 0.4)):
            for _ in range(2):
                norm = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
                layers += [nn.Conv2d(c_in, width, 3, padding=1), norm, nn.ELU(inplace=False)]
                c_in = width
            layers += [nn.MaxPool2d(2), nn.Dropout(p_drop)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128 * (image_size // 8) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))
