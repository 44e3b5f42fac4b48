"""Implicit hypergradients of bi-level problems (paper Section 4, Eq. 2-3).

Given an inner solution ``w`` that is (approximately) a fixed point of a map
``w = Phi(w, theta)`` and an outer objective ``E(w, theta)``, the implicit function
theorem gives the total derivative of ``E`` with respect to the outer variables::

    dE/dtheta = dE/dtheta|_w + (dPhi/dtheta)^T v,   v = (I - dPhi/dw^T)^{-1} dE/dw

``implicit_grad`` computes it with reverse-mode vector-Jacobian products only; the
linear system for ``v`` is solved either by the truncated Neumann / fixed-point
iteration of Grazzi et al. (2020) -- what the I-BAU authors use -- or by conjugate
gradient (Rajeswaran et al., 2019).

Nothing here writes ``.grad``: the caller decides what to do with the result (e.g.
all-reduce it across processes before an optimiser step).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import InputError, check_int

__all__ = ["implicit_grad", "SOLVERS"]

TensorList = list[Tensor]


def _grads(outputs, inputs, grad_outputs=None, *, retain_graph=False) -> TensorList:
    """``torch.autograd.grad`` with zeros for inputs the outputs do not depend on."""
    grads = torch.autograd.grad(
        outputs,
        inputs,
        grad_outputs=grad_outputs,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def second_order_kernels() -> contextlib.AbstractContextManager:
    """A context in which scaled-dot-product attention (``F.scaled_dot_product_attention``,
    ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``...) runs its math kernel: the fused
    flash and memory-efficient kernels have no second derivatives, which the implicit
    hypergradient takes through the fixed-point map. Nothing changes for models without attention."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _second_order_error(err: RuntimeError) -> InputError | None:
    """The :class:`InputError` for a model operation without second derivatives, else ``None``."""
    found = re.search(r"derivative for (\S+) is not implemented", str(err))
    if found is None:
        return None
    return InputError(f"the model uses an operation without second derivatives ({found.group(1)}); I-BAU's implicit "
                      "hypergradient differentiates the model twice: replace that operation (for example a fused or "
                      "custom kernel) with one PyTorch can differentiate twice")


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _norm(a: Sequence[Tensor]) -> float:
    return float(torch.sqrt(sum((x * x).sum() for x in a)))


def _fixed_point(jvp_t: Callable[[TensorList], TensorList], rhs: TensorList,
                 iters: int, tol: float) -> TensorList:
    """Truncated Neumann series ``v_{k+1} = J^T v_k + rhs`` from ``v_0 = 0``.

    ``iters`` = K iterations gives ``v_K = sum_{k<K} (J^T)^k rhs``. The first
    iteration maps ``v_0 = 0`` to ``rhs`` exactly, so it is done without a
    vector-Jacobian product (the authors' code spends one double-backward pass on
    ``J^T 0``); K iterations cost K - 1 products.
    """
    if iters <= 0:
        return [torch.zeros_like(r) for r in rhs]
    v = [r.clone() for r in rhs]
    if _norm(v) < tol:  # ||v_1 - v_0|| < tol: the authors stop here too
        return v
    for _ in range(iters - 1):
        v_new = [jv + r for jv, r in zip(jvp_t(v), rhs)]
        delta = _norm([a - b for a, b in zip(v_new, v)])
        v = v_new
        if delta < tol:
            break
    return v


def _conjugate_gradient(jvp_t: Callable[[TensorList], TensorList], rhs: TensorList,
                        iters: int, tol: float) -> TensorList:
    """Conjugate gradient on ``(I - J^T) v = rhs`` from ``v_0 = 0``.

    For I-BAU's map ``Phi = w - eta * grad_w L_in`` the operator ``I - J^T`` equals
    ``eta * Hess_w L_in``, which is symmetric; CG converges when it is also positive
    definite. Stops after ``iters`` steps or when the residual norm is below ``tol``.
    """
    v = [torch.zeros_like(r) for r in rhs]
    r = [x.clone() for x in rhs]
    p = [x.clone() for x in rhs]
    rr = _dot(r, r)
    if float(rr) ** 0.5 < tol:
        return v
    for _ in range(iters):
        ap = [pi - jpi for pi, jpi in zip(p, jvp_t(p))]
        alpha = rr / _dot(p, ap)
        v = [vi + alpha * pi for vi, pi in zip(v, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        rr_new = _dot(r, r)
        if float(rr_new) ** 0.5 < tol:
            break
        beta = rr_new / rr
        p = [ri + beta * pi for ri, pi in zip(r, p)]
        rr = rr_new
    return v


SOLVERS: dict[str, Callable[..., TensorList]] = {
    "fixed_point": _fixed_point,
    "neumann": _fixed_point,
    "cg": _conjugate_gradient,
}


def implicit_grad(
    outer_loss: Callable[[TensorList, TensorList], Tensor],
    fp_map: Callable[[TensorList, TensorList], TensorList],
    inner: Sequence[Tensor],
    outer: Sequence[Tensor],
    *,
    solver: str = "fixed_point",
    iters: int = 5,
    tol: float = 1e-10,
    reduce: Callable[[TensorList], TensorList] | None = None,
    return_loss: bool = False,
) -> TensorList | tuple[TensorList, Tensor]:
    """Hypergradient ``d outer_loss / d outer`` through the implicit function theorem.

    Args:
        outer_loss: ``outer_loss(inner, outer) -> scalar`` (the paper's ``H`` / ``E``).
        fp_map: ``fp_map(inner, outer) -> list`` whose fixed point is the inner
            solution; for a gradient-based inner problem, one gradient step
            ``w - eta * grad_w L_in(w, outer)`` built with ``create_graph=True``.
        inner: the inner solution (e.g. I-BAU's universal perturbation). Detached here.
        outer: the outer variables (e.g. model parameters); must require grad.
        solver: ``"fixed_point"`` (alias ``"neumann"``) or ``"cg"``.
        iters: fixed-point iterations K (the K-term Neumann sum), or CG steps.
        tol: early stop when successive iterates (fixed point) or the residual (CG)
            are closer than this in l2 norm.
        reduce: data parallelism (:mod:`ibau.distributed`): when each process passes
            its share of ``outer_loss`` and ``fp_map`` (terms that sum to the global
            ones), ``reduce`` sums inner-sized vectors over processes -- the outer
            loss's inner gradient and every product ``(dPhi/dw)^T v`` -- so all
            processes solve the same linear system; the returned outer gradient is
            still this process's share (sum it over processes too).
        return_loss: also return the value of ``outer_loss`` (detached).

    Returns:
        One tensor per entry of ``outer`` (with ``return_loss``: and the outer loss, as
        ``(grads, loss)``). ``.grad`` is never written.

    The fixed-point solver returns ``dE/dtheta + (dPhi/dtheta)^T v_K`` with
    ``v_K = sum_{k<K} (dPhi/dw^T)^k dE/dw``, exactly the iteration
    ``v <- J^T v + dE/dw`` from ``v = 0`` (reference.md §1).
    """
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r} (parameter solver); choose one of {sorted(SOLVERS)}")
    solve = SOLVERS[solver]
    check_int("iters", iters, low=0)
    inner = [w.detach().requires_grad_(True) for w in inner]
    outer = list(outer)
    try:
        with torch.enable_grad(), second_order_kernels():
            return _implicit_grad(outer_loss, fp_map, inner, outer, solve, iters, tol, reduce, return_loss)
    except RuntimeError as err:
        mapped_err = _second_order_error(err)
        if mapped_err is None:
            raise
        raise mapped_err from err


def _implicit_grad(outer_loss, fp_map, inner: TensorList, outer: TensorList, solve, iters: int, tol: float,
                   reduce, return_loss: bool):
    """:func:`implicit_grad`'s computation, its arguments checked."""
    n_in = len(inner)
    loss = outer_loss(inner, outer)
    # One backward pass for both partial derivatives of the outer loss.
    g_all = _grads(loss, inner + outer)
    g_inner, g_outer = g_all[:n_in], g_all[n_in:]
    mapped = list(fp_map(inner, outer))
    if len(mapped) != n_in:
        raise ValueError(f"fp_map returned {len(mapped)} tensors for {n_in} inner tensors")

    def jvp_t(v: TensorList) -> TensorList:  # (dPhi/dw)^T v
        out = _grads(mapped, inner, v, retain_graph=True)
        return out if reduce is None else reduce(out)

    rhs = [g.detach() for g in g_inner]
    v = solve(jvp_t, rhs if reduce is None else reduce(rhs), iters, tol)
    mixed = _grads(mapped, outer, v)
    grads = [go + m for go, m in zip(g_outer, mixed)]
    return (grads, loss.detach()) if return_loss else grads
