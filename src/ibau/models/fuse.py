"""An eval-mode view of a model with each BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals one
convolution with weight ``W * s`` and bias ``(b - mean) * s + beta`` where
``s = gamma / sqrt(var + eps)``. The view computes the folded weight *from the original
parameters* on every call, so gradients flow to the same ``nn.Parameter`` objects
(conv weight and bias, BatchNorm gamma and beta) and are mathematically identical to
the unfolded model's; only float rounding differs. It skips BatchNorm's own kernels,
whose double-backward (needed by I-BAU's Hessian-vector products) is slow on CPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["fold_batchnorm"]


class _FoldedConvBN(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.conv = conv  # shared, not copied
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        scale = (bn.running_var + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = bn.weight * scale
        bias = -bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        if bn.bias is not None:
            bias = bias + bn.bias
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        if self.channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        if conv.padding_mode != "zeros":
            return conv._conv_forward(x, weight, bias)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


def fold_batchnorm(model: nn.Module, *, channels_last: bool = False) -> nn.Module:
    """Return an eval-only view of ``model`` with Conv2d -> BatchNorm2d pairs folded.

    The view shares every parameter and buffer with ``model`` (updating one updates
    the other). Returns ``model`` itself when it holds no foldable pair or cannot be
    traced by ``torch.fx`` (data-dependent control flow).
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception:
        return model
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        if not _foldable(modules[prev.target], modules[node.target]):
            continue
        name = f"_folded_{folded}"
        gm.add_submodule(name, _FoldedConvBN(modules[prev.target], modules[node.target], channels_last))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, prev.args, prev.kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.graph.erase_node(prev)
        folded += 1
    if not folded:
        return model
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return gm
