from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalized(nn.Module):
    """Wrap a model that expects ``(x - mean) / std`` so that it takes pixels in [0, 1].

    I-BAU's perturbation and every trigger live in pixel space; wrapping keeps them
    there for models trained on normalised inputs. The wrapped model's state-dict keys
    gain a ``model.`` prefix; save ``wrapper.model`` to keep the original keys.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std must have the same length")
        if any(s <= 0 for s in std):
            raise ValueError("std must be positive")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)
