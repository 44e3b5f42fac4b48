"""A small vision transformer the package does not ship (patch embedding, pre-norm encoder layers with
multi-head self-attention, GELU, dropout, LayerNorm; no convolution after the stem, no BatchNorm): the
second architecture of ``benchmarks/unseen_models.py``, given to ``ibau unlearn --model-def`` as a
user's own file would be."""

import torch
from torch import nn


class TinyViT(nn.Module):
    def __init__(self, num_classes=10, image=32, patch=4, dim=96, depth=4, heads=4):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])


def build(num_classes=10):
    return TinyViT(num_classes)
