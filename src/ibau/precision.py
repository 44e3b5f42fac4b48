"""The arithmetic a method computes in: float32, or bfloat16 autocast where the hardware has it.

``precision="bf16"`` runs the model's forward passes (and so their backward and double-backward
passes) under :func:`torch.autocast` with bfloat16: convolutions and matrix products in bfloat16,
weights, optimiser state and the method's own variables (perturbations, masks) in float32, the
logits cast back to float32. On a CPU with AMX or AVX512-BF16 and on recent GPUs this is 2-3x
faster per training step; elsewhere autocast is emulated and slower, which ``"auto"`` avoids.
Results are still bit-identical for a seed on one machine, but not equal to float32's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import check_choice

__all__ = ["PRECISIONS", "fast_bf16", "Autocast", "with_precision", "uses_bf16", "arithmetic", "float32_view"]

#: ``"fp32"``; ``"bf16"`` (autocast); ``"auto"``: bf16 where :func:`fast_bf16` says the device has it
PRECISIONS = ("fp32", "bf16", "auto")


def fast_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    AMX or AVX512-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        return any(bool(probe()) for probe in probes if probe is not None)
    return False


def uses_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether ``precision`` (one of :data:`PRECISIONS`) computes in bfloat16 on ``device``."""
    check_choice("precision", precision, PRECISIONS)
    return precision == "bf16" or (precision == "auto" and fast_bf16(device))


class Autocast(nn.Module):
    """``net`` computed under bfloat16 autocast, its output cast back to float32. Shares every
    parameter and buffer with ``net``."""

    def __init__(self, net: nn.Module, device_type: str):
        super().__init__()
        self.net = net
        self.device_type = device_type

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.net(x)
        return out.float()


def with_precision(net: nn.Module, device: torch.device | str, precision: str) -> nn.Module:
    """``net`` itself for float32, an :class:`Autocast` view of it for bfloat16."""
    device = torch.device(device)
    return Autocast(net, device.type) if uses_bf16(precision, device) else net


def arithmetic(precision: str, device: torch.device | str) -> str:
    """``"bf16"`` or ``"fp32"``: what ``precision`` computes in on ``device`` (for reports)."""
    return "bf16" if uses_bf16(precision, device) else "fp32"


def float32_view(view: nn.Module) -> nn.Module:
    """The float32 module under a :func:`with_precision` view (the view itself when it is float32)."""
    return view.net if isinstance(view, Autocast) else view
