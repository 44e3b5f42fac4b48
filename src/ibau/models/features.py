"""Penultimate ("flatten layer") features of a classifier, read at its last linear layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..metrics import model_device

__all__ = ["features"]


def _last_linear(model: nn.Module) -> nn.Linear:
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear module; features() reads the input of the last one"
        )
    return last


def features(model: nn.Module, x: Tensor, *, batch_size: int = 500) -> Tensor:
    """The input of ``model``'s last ``nn.Linear`` for each image in ``x``.

    For the registered models this is the flattened penultimate representation (the
    "flatten layer output" of the paper's Figure 4 t-SNE), e.g. ``N x 2048`` for
    :class:`~ibau.models.SmallVGG` on 32x32 images. "Last" is the last ``nn.Linear`` in
    ``model.modules()`` order, so wrappers such as :class:`~ibau.models.Normalized` work
    unchanged. The model runs in eval mode under ``torch.no_grad()`` in batches of
    ``batch_size`` on its own device; each submodule's training mode is restored afterwards.

    Returns:
        A float32 CPU tensor of shape ``(N, F)``.

    Raises:
        ValueError: if the model has no ``nn.Linear`` or ``batch_size`` is not positive.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    linear = _last_linear(model)
    if len(x) == 0:
        return torch.empty(0, linear.in_features, dtype=torch.float32)

    captured: list[Tensor] = []

    def hook(_module: nn.Module, inputs: tuple, _output: Tensor) -> None:
        captured.append(inputs[0])

    device = model_device(model)
    modes = [(m, m.training) for m in model.modules()]
    handle = linear.register_forward_hook(hook)
    chunks: list[Tensor] = []
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                captured.clear()
                model(x[start : start + batch_size].to(device))
                if not captured:
                    raise RuntimeError(
                        f"the last nn.Linear of {type(model).__name__} was not called in forward()"
                    )
                # If the layer runs several times in one forward, its last call counts.
                chunks.append(captured[-1].flatten(1).float().cpu())
    finally:
        handle.remove()
        for module, mode in modes:
            module.training = mode
    return torch.cat(chunks)
