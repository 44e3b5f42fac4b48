import pytest
import torch
import torch.nn.functional as F

from ibau.hypergrad import implicit_grad



@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def quadratic():
    """Inner: w*(theta) = argmin 0.5 w'Aw - w'B theta = A^-1 B theta; outer: 0.5|w - c|^2 + 0.5 theta'D theta."""
    g = torch.Generator().manual_seed(0)
    n, m = 6, 4
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = q @ q.T / n + 0.5 * torch.eye(n)
    B = torch.randn(n, m, generator=g, dtype=torch.float64)
    D = torch.diag(torch.rand(m, generator=g, dtype=torch.float64))
    c = torch.randn(n, generator=g, dtype=torch.float64)
    theta = torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True)
    eta = 1.0 / float(torch.linalg.eigvalsh(A).max())
    w_star = torch.linalg.solve(A, B @ theta.detach())

    def outer_loss(inner, outer):
        return 0.5 * (inner[0] - c).pow(2).sum() + 0.5 * outer[0] @ D @ outer[0]

    def fp_map(inner, outer):
        return [inner[0] - eta * (A @ inner[0] - B @ outer[0])]

    exact = B.T @ torch.linalg.solve(A, w_star - c) + D @ theta.detach()
    return dict(A=A, B=B, D=D, c=c, theta=theta, eta=eta, w=w_star, outer_loss=outer_loss, fp_map=fp_map, exact=exact)


def test_fixed_point_converges_to_closed_form(quadratic):
    q = quadratic
    (g,) = implicit_grad(q["outer_loss"], q["fp_map"], [q["w"]], [q["theta"]], iters=2000, tol=0.0)
    assert rel(g, q["exact"]) < 1e-5


def test_cg_converges_to_closed_form(quadratic):
    q = quadratic
    (g,) = implicit_grad(q["outer_loss"], q["fp_map"], [q["w"]], [q["theta"]], solver="cg", iters=12, tol=0.0)
    assert rel(g, q["exact"]) < 1e-5


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_fixed_point_equals_K_term_neumann_sum(quadratic, K):
    q = quadratic
    J = torch.eye(len(q["w"])) - q["eta"] * q["A"]  # dPhi/dw
    rhs = q["w"] - q["c"]  # dE/dw
    v = sum(torch.linalg.matrix_power(J.T, k) @ rhs for k in range(K))
    expected = q["D"] @ q["theta"].detach() + q["eta"] * q["B"].T @ v  # dE/dtheta + (dPhi/dtheta)^T v
    (g,) = implicit_grad(q["outer_loss"], q["fp_map"], [q["w"]], [q["theta"]], iters=K, tol=0.0)
    assert rel(g, expected) < 1e-12
    if K < 5:  # truncation matters: K terms differ from the exact answer
        assert rel(g, q["exact"]) > 1e-4


def test_zero_iterations_is_the_direct_gradient(quadratic):
    q = quadratic
    (g,) = implicit_grad(q["outer_loss"], q["fp_map"], [q["w"]], [q["theta"]], iters=0)
    assert rel(g, q["D"] @ q["theta"].detach()) < 1e-12


def test_tolerance_stops_early(quadratic):
    q = quadratic
    calls = []

    def counting_map(inner, outer):
        calls.append(1)
        return q["fp_map"](inner, outer)

    (g_loose,) = implicit_grad(q["outer_loss"], counting_map, [q["w"]], [q["theta"]], iters=5000, tol=1e-3)
    (g_tight,) = implicit_grad(q["outer_loss"], q["fp_map"], [q["w"]], [q["theta"]], iters=5000, tol=0.0)
    assert rel(g_loose, q["exact"]) < 1e-2
    assert not torch.equal(g_loose, g_tight)  # it did stop before the end


def _tiny_problem():
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    delta = 0.1 * torch.randn(5, generator=g, dtype=torch.float64)
    reg = 2.0  # makes the inner problem strongly convex around delta
    params = list(net.parameters())

    def flat_inner(d, flat_params):
        ps, i = [], 0
        for p in params:
            ps.append(flat_params[i:i + p.numel()].view_as(p))
            i += p.numel()
        w1, b1, w2, b2 = ps
        logits = torch.tanh((x + d) @ w1.T + b1) @ w2.T + b2
        return F.cross_entropy(logits, y) + reg * d.pow(2).sum()

    def outer_loss(inner, outer):
        return F.cross_entropy(net(x[:3] + inner[0]), (y[:3] + 1) % 3)

    eta = 0.1

    def fp_map(inner, outer):
        loss = F.cross_entropy(net(x + inner[0]), y) + reg * inner[0].pow(2).sum()
        (gd,) = torch.autograd.grad(loss, inner, create_graph=True)
        return [inner[0] - eta * gd]

    return net, params, delta, flat_inner, outer_loss, fp_map


def test_matches_explicit_hessian_solve_on_a_network():
    net, params, delta, flat_inner, outer_loss, fp_map = _tiny_problem()
    flat = torch.cat([p.detach().flatten() for p in params])
    H = torch.autograd.functional.hessian(lambda d: flat_inner(d, flat), delta)
    assert torch.linalg.eigvalsh(H).min() > 0
    mixed = torch.autograd.functional.jacobian(
        lambda fp: torch.autograd.functional.jacobian(lambda d: flat_inner(d, fp), delta, create_graph=True), flat)
    d = delta.clone().requires_grad_(True)
    loss = outer_loss([d], params)
    g_all = torch.autograd.grad(loss, [d, *params])
    g_d, g_t = g_all[0], torch.cat([t.flatten() for t in g_all[1:]])
    exact = g_t - mixed.T @ torch.linalg.solve(H, g_d)
    for solver, iters in (("fixed_point", 3000), ("cg", 10)):
        grads = implicit_grad(outer_loss, fp_map, [delta], params, solver=solver, iters=iters, tol=0.0)
        got = torch.cat([t.flatten() for t in grads])
        assert rel(got, exact) < 1e-5, solver
        for p in params:
            assert p.grad is None  # never writes .grad


def test_unused_outer_variable_gets_zeros(quadratic):
    q = quadratic
    extra = torch.ones(3, requires_grad=True)
    g, g_extra = implicit_grad(q["outer_loss"], q["fp_map"], [q["w"]], [q["theta"], extra], iters=3)
    assert torch.equal(g_extra, torch.zeros(3))


def test_bad_arguments(quadratic):
    q = quadratic
    with pytest.raises(ValueError, match="unknown solver"):
        implicit_grad(q["outer_loss"], q["fp_map"], [q["w"]], [q["theta"]], solver="newton")
    with pytest.raises(ValueError, match="returned 2 tensors"):
        implicit_grad(q["outer_loss"], lambda i, o: q["fp_map"](i, o) * 2, [q["w"]], [q["theta"]])
