"""The implicit hypergradient on models with attention: second derivatives through
scaled-dot-product attention, and a clear error where an operation has none."""

import pytest
import torch
from torch import nn

from ibau.defenses.ibau import IBAU
from ibau.errors import InputError
from ibau import hypergrad


class TinyAttention(nn.Module):
    """Patches -> one pre-norm transformer layer (nn.MultiheadAttention inside) -> linear head."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.layer(t).mean(1))


def _world(seed=0):
    torch.manual_seed(seed)
    return TinyAttention(), torch.rand(48, 3, 8, 8), torch.randint(0, 4, (48,))


def _hypergradient(model, x, y):
    """One implicit hypergradient of I-BAU's outer loss (the paper's recipe) at a small perturbation."""
    ibau = IBAU.paper(progress=False)
    params = [p for p in model.parameters()]
    delta = 0.05 * torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    grads, loss = ibau.hypergradient(model, params, delta, (x[:32], y[:32]), (x[32:], y[32:]),
                                     torch.Generator().manual_seed(2))
    return grads, loss


def test_hypergradient_through_attention_matches_an_explicit_math_kernel():
    model, x, y = _world()
    model.train()
    grads, loss = _hypergradient(model, x, y)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the same computation with the math kernel chosen by the caller: the same hypergradient
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        again, loss2 = _hypergradient(model, x, y)
    assert loss == loss2
    for a, b in zip(grads, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unlearning_a_model_with_attention_runs_and_changes_it():
    model, x, y = _world()
    before = [p.detach().clone() for p in model.parameters()]
    out = IBAU.paper(rounds=1, progress=False).fit(model, x, y)
    after = list(out.model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_an_operation_without_second_derivatives_is_an_input_error(monkeypatch):
    """Force the fused CPU attention kernel, whose backward has no derivative: the failure is an
    InputError naming the operation, not a bare RuntimeError from autograd."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x, y = _world()
    model.train()
    monkeypatch.setattr(hypergrad, "second_order_kernels", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]))
    try:
        _hypergradient(model, x, y)
    except InputError as err:
        assert "second derivatives" in str(err) and "is not implemented" not in str(err)
        assert "flash" in str(err)
        return
    except RuntimeError as err:  # the fused kernel itself refused these shapes on this build
        pytest.skip(f"the fused attention kernel is not available here: {err}")
    pytest.skip("this torch differentiates the fused attention kernel twice")
