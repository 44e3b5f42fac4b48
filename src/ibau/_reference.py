"""A deliberately straightforward I-BAU step, structured like the authors' released code.

Used as the oracle in tests (the optimised :class:`ibau.IBAU` must give the same
hypergradient) and as the speed baseline in ``benchmarks/perf/hypergrad_speed.py``. It does
exactly what the authors' script does, including its redundant work: two backward
passes through the outer loss, a vector-Jacobian product on the zero vector, weight
gradients computed and discarded in the inner pass, unfolded BatchNorm. Not public API.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def reference_inner_pass(model: nn.Module, batches, *, lr: float = 10.0, reg: float = 1e-3,
                         norm_bound: float | None = 10.0) -> Tensor:
    x0 = batches[0][0]
    delta = torch.zeros((1, *x0.shape[1:]), requires_grad=True, device=x0.device, dtype=x0.dtype)
    opt = torch.optim.SGD([delta], lr=lr)
    for xb, _ in batches:
        pseudo = model(xb).argmax(1)
        loss = -F.cross_entropy(model(xb + delta), pseudo) + reg * delta.norm() ** 2
        opt.zero_grad()
        loss.backward(retain_graph=True)
        opt.step()
    for p in model.parameters():
        p.grad = None
    if norm_bound is None:
        return delta.detach()
    return (delta * min(1.0, norm_bound / float(delta.detach().norm()))).detach()


def reference_hypergradient(model: nn.Module, params: list[Tensor], delta: Tensor, xb: Tensor, yb: Tensor,
                            x0: Tensor, y0: Tensor, chosen: Tensor, *, iters: int = 5, eta: float = 0.1,
                            reg: float = 1e-3, tol: float = 1e-10, clip: bool = False,
                            bound: float | None = None) -> list[Tensor]:
    """The authors' hypergradient; ``clip`` clamps every ``x + delta`` to [0, 1] and ``bound`` projects the
    fixed-point map's step onto the l2 ball of that radius (the default recipe's map), both written plainly."""
    d = delta.detach().requires_grad_(True)
    patch = torch.zeros_like(xb)
    patch[chosen] = d[0]
    image = (lambda x: x.clamp(0, 1)) if clip else (lambda x: x)
    loss = F.cross_entropy(model(image(xb + patch)), yb)
    (g_d,) = torch.autograd.grad(loss, [d], retain_graph=True)
    g_t = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    inner = -F.cross_entropy(model(image(x0 + d)), y0) + reg * d.norm() ** 2
    (g_in,) = torch.autograd.grad(inner, [d], create_graph=True)
    mapped = d - eta * g_in
    if bound is not None and float(mapped.detach().norm()) > bound:
        mapped = mapped * (bound / mapped.norm())
    v = torch.zeros_like(d)
    for _ in range(iters):
        prev = v
        (jv,) = torch.autograd.grad(mapped, [d], grad_outputs=v, retain_graph=True)
        v = jv + g_d
        if float((v - prev).norm()) < tol:
            break
    mixed = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    out = []
    for p, gt, m in zip(params, g_t, mixed):
        gt = torch.zeros_like(p) if gt is None else gt
        out.append(gt if m is None else gt + m)
    return out
