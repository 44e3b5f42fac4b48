"""A small, seeded training loop (used for poisoned models in the demo and the attacks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import model_device

__all__ = ["train_classifier"]


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 10, batch_size: int = 128,
                     lr: float = 1e-3, seed: int = 0, progress: bool = True, desc: str = "training") -> nn.Module:
    """Adam on cross-entropy over shuffled mini-batches (the paper trains its poisoned
    models with Adam, batch 128). Shuffling uses a generator seeded by ``seed``;
    dropout draws from torch's global generator, seeded here too for repeatability."""
    from tqdm.auto import tqdm

    device = model_device(model)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    y = torch.as_tensor(y).long()
    model.train()
    bar = tqdm(range(epochs), desc=desc, disable=not progress, unit="epoch", leave=False)
    for _ in bar:
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch_size):
            b = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[b].to(device)), y[b].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        bar.set_postfix(loss=f"{total / len(x):.3f}")
    model.eval()
    return model
