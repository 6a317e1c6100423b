"""The implicit backward (gradient of the EM fixed point) of fit_gmm(..., backward="implicit"):
against the unrolled backward through the same converged run, against independent dense
solves of the optimality conditions built with torch.func, gradcheck, singular cases, the
custom ops' contracts and torch.compile."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import DEVICES
from problems import Problem, assert_grads_rel, assert_rel, rel_err

import s2m_ext
from s2m_ext import DiagGMM, ImplicitBackward, ImplicitGradientWarning, reference
from s2m_ext.adjoint import solve_adjoint
from s2m_ext.implicit import DEFAULT_SOLVE_TOL

SOLVERS = ["fixed_point", "gmres"]
T_CONVERGED = 1000
NAMES = ("x", "weights", "log_weights0", "means0", "variances0")


def separated_problem(
    B, N, D, K, *, sep=4.0, var_floor=1e-3, pad=False, device="cpu", adjust=None, converge=T_CONVERGED
) -> Problem:
    """float64 sets of K clusters whose centres are at least ``sep`` noise standard deviations
    apart, with balanced labels, positive weights (optionally zero-weight padding) and initial
    means near the centres: EM converges to a strict local maximum, at a rate that still
    leaves the adjoint solve real work (some overlap between clusters).

    ``adjust(problem)`` edits a draw in place (e.g. plants a dead component). Draws whose
    ``converge`` iterations do not reach the fixed point (a slow rate, rare at these
    separations) are replaced by fresh ones (0: no check), so the precondition of the
    exactness tests holds by construction rather than by luck of the draw."""
    for _ in range(20):
        p = _draw_separated(B, N, D, K, sep, var_floor, pad, device)
        if adjust is not None:
            adjust(p)
        if not converge or _is_converged(p, converge):
            return p
    raise AssertionError("20 draws in a row did not converge: the problem's parameters must be changed")


def _draw_separated(B, N, D, K, sep, var_floor, pad, device) -> Problem:
    f64 = torch.float64
    centres = []
    for _ in range(B):
        while True:
            c = sep * K / 2 * torch.randn(K, D, dtype=f64)
            if K == 1 or torch.pdist(c).min() >= sep:
                break
        centres.append(c)
    centres = torch.stack(centres)
    labels = torch.stack([torch.randperm(N) % K for _ in range(B)])
    x = centres.gather(1, labels.unsqueeze(-1).expand(B, N, D)) + torch.randn(B, N, D, dtype=f64)
    w = 0.5 + torch.rand(B, N, dtype=f64)
    if pad:
        valid = torch.randint(N - N // 4, N, (B,))
        w = torch.where(torch.arange(N).unsqueeze(0) < valid.unsqueeze(1), w, torch.zeros_like(w))
    means = centres + 0.5 * torch.randn(B, K, D, dtype=f64)
    variances = torch.full((B, K, D), 2.0, dtype=f64)
    log_weights = torch.full((B, K), -math.log(K), dtype=f64)
    return Problem(x, w, (log_weights, means, variances), var_floor).to(f64, device)


def _is_converged(p: Problem, n_iter: int = T_CONVERGED) -> bool:
    """n_iter iterations reached the fixed point: 100 more change nothing beyond rounding."""
    a = s2m_ext.ops.em_fit(p.x, p.weights, *p.init, n_iter, p.var_floor, 0.0, False)
    b = s2m_ext.ops.em_fit(p.x, p.weights, *p.init, n_iter + 100, p.var_floor, 0.0, False)
    return all(rel_err(s, t) < 1e-12 for s, t in zip(a[:3], b[:3]))


def assert_converged(p: Problem, n_iter: int = T_CONVERGED) -> None:
    """Precondition of every exactness claim (separated_problem arranges it for T_CONVERGED)."""
    assert _is_converged(p, n_iter), "test problem did not converge: its generator must be fixed"


def _grads(p: Problem, backward, n_iter=T_CONVERGED, tol=0.0, dtype=torch.float64, upstream=None):
    """Gradients (x, weights, init) of L = <c, fit params> + sum log_prob(queries), and the
    upstream tensors used (fresh unless given)."""
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (p.x, p.weights, *p.init)]
    x, w, lw0, mu0, var0 = leaves
    gmm = s2m_ext.fit_gmm(x, w, n_iter=n_iter, init=DiagGMM(lw0, mu0, var0), var_floor=p.var_floor, tol=tol, backward=backward)
    if upstream is None:
        upstream = [torch.randn(t.shape, dtype=torch.float64, device=t.device) for t in gmm.params()]
        upstream.append(p.x[:, :5].detach() + 0.3 * torch.randn_like(p.x[:, :5]))  # queries near the data
    loss = sum((a * c.to(dtype)).sum() for a, c in zip(gmm.params(), upstream[:3]))
    loss = loss + gmm.log_prob(upstream[3].to(dtype)).sum()
    return torch.autograd.grad(loss, leaves), upstream


# ----------------------------------------------------------------------------- exactness
SHAPES = [
    ("generic", 3, 40, 3, 3, {}),
    ("padded", 3, 40, 2, 2, {"pad": True}),
    ("K=1", 2, 20, 3, 1, {}),
    ("D=1", 3, 40, 1, 2, {}),
    ("K=4,D=5", 2, 60, 5, 4, {}),
    ("no-floor", 3, 40, 2, 2, {"var_floor": 0.0}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("name,B,N,D,K,opts", SHAPES, ids=[s[0] for s in SHAPES])
def test_matches_unrolled_backward_through_the_converged_run(name, B, N, D, K, opts, solver, device):
    """float64, T = 1000 iterations (converged): the unrolled backward through those
    iterations and the implicit gradient agree to 1e-6 relative to the largest gradient (the
    unrolled one differs from the exact one by ~rho^T, the implicit one by its solve tolerance
    1e-12 / (1 - rho)); the initial parameters get ~0 from both (exactly 0 from implicit)."""
    p = separated_problem(B, N, D, K, device=device, **opts)
    assert_converged(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitGradientWarning)
        implicit, upstream = _grads(p, ImplicitBackward(solver=solver))
    unrolled, _ = _grads(p, "unrolled", upstream=upstream)
    assert_grads_rel(implicit, unrolled, 1e-6, NAMES)
    for g in implicit[2:]:
        assert torch.equal(g, torch.zeros_like(g)), "alive components: the optimum does not depend on the start"


def _lagrangian_stationarity(K: int, D: int):
    """G(z; x, w) = (dLag/dpi, dLag/dmu, dLag/dv, sum(pi) - 1) for z = (pi, mu, v, lambda) and
    Lag = sum_n w_n log sum_k pi_k N(x_n | mu_k, diag v_k) - lambda (sum_k pi_k - 1): the
    first-order optimality (KKT) conditions of the weighted maximum likelihood with the
    weights constrained to the simplex. Written from the definition, sharing no code with EM."""
    log_2pi = math.log(2 * math.pi)

    def stationarity(z, x, w):
        pi, mu, v, lam = z[:K], z[K : K + K * D].view(K, D), z[K + K * D : K + 2 * K * D].view(K, D), z[-1]

        def lagrangian(pi, mu, v):
            log_dens = -0.5 * (D * log_2pi + v.log().sum(-1)) - 0.5 * ((x.unsqueeze(1) - mu) ** 2 / v).sum(-1)
            return (w * torch.logsumexp(pi.log() + log_dens, dim=1)).sum() - lam * (pi.sum() - 1)

        g_pi, g_mu, g_v = torch.func.grad(lagrangian, argnums=(0, 1, 2))(pi, mu, v)
        return torch.cat((g_pi, g_mu.flatten(), g_v.flatten(), (pi.sum() - 1).view(1)))

    return stationarity


@pytest.mark.parametrize("K,D", [(2, 1), (2, 2), (3, 2)])
def test_matches_dense_solve_of_the_lagrangian_optimality_system(K, D):
    """var_floor = 0: the fit is a constrained maximum of the weighted likelihood. Implicit
    function theorem on its KKT system G(z*; x, w) = 0 with z = (pi, mu, v, lambda), Jacobians
    by torch.func.jacrev, dense solve: dL/dx = -(dG/dx)^T (dG/dz)^-T dL/dz. The implicit
    backward must agree to 1e-6 relative."""
    B, N = 2, 40
    p = separated_problem(B, N, D, K, sep=5.0, var_floor=0.0)  # no floor: keep EM's rate well below 1
    assert_converged(p)
    implicit, upstream = _grads(p, "implicit")
    gmm = s2m_ext.fit_gmm(p.x, p.weights, n_iter=T_CONVERGED, init=DiagGMM(*p.init), var_floor=0.0)
    stationarity = _lagrangian_stationarity(K, D)
    for b in range(B):
        x, w = p.x[b], p.weights[b]
        pi, mu, v = gmm.log_weights[b].exp(), gmm.means[b], gmm.variances[b]
        z = torch.cat((pi, mu.flatten(), v.flatten(), w.sum().view(1)))  # lambda* = total weight
        residual = stationarity(z, x, w)
        assert residual.abs().max() < 1e-8 * w.sum(), "the fit must satisfy the optimality conditions"
        g_z, g_x, g_w = (torch.func.jacrev(stationarity, argnums=i)(z, x, w) for i in range(3))
        # dL/dz from the loss: it sees log pi (so dL/dpi = dL/dlog pi / pi), mu, v, not lambda.
        params = [t[b].detach().clone().requires_grad_() for t in gmm.params()]
        loss = sum((a * c[b]).sum() for a, c in zip(params, upstream[:3]))
        loss = loss + DiagGMM(*(t.unsqueeze(0) for t in params)).log_prob(upstream[3][b : b + 1]).sum()
        d_lw, d_mu, d_v = torch.autograd.grad(loss, params)
        d_z = torch.cat((d_lw / pi, d_mu.flatten(), d_v.flatten(), torch.zeros(1, dtype=torch.float64)))
        adjoint = torch.linalg.solve(g_z.T, d_z)
        dense_x = -torch.einsum("i,ind->nd", adjoint, g_x)
        dense_w = -g_w.T @ adjoint
        assert_grads_rel((implicit[0][b], implicit[1][b]), (dense_x, dense_w), 1e-6, NAMES[:2])


def test_matches_dense_fixed_point_solve_with_a_variance_floor():
    """var_floor > 0 (no longer a likelihood maximum): implicit function theorem on
    theta = F(theta; x, w) with F the one-step map of the plain-PyTorch reference, dense
    Jacobians by torch.func.jacrev. Checks the gradients, the adjoint u itself, and that the
    residual the solver reports is the true one."""
    B, N, D, K = 2, 40, 2, 3
    p = separated_problem(B, N, D, K, sep=5.0, var_floor=0.3)
    assert_converged(p)
    implicit, upstream = _grads(p, "implicit")
    gmm = s2m_ext.fit_gmm(p.x, p.weights, n_iter=T_CONVERGED, init=DiagGMM(*p.init), var_floor=p.var_floor)
    sizes = (K, K * D, K * D)

    def one_step(theta, x, w):
        lw, mu, v = torch.split(theta, sizes)
        lw, mu, v = lw.view(1, K), mu.view(1, K, D), v.view(1, K, D)
        resp, _ = reference.e_step(x.unsqueeze(0), w.unsqueeze(0), lw, mu, v)
        new = reference.m_step(x.unsqueeze(0), w.unsqueeze(0), resp, (lw, mu, v), p.var_floor)
        return torch.cat([t.flatten() for t in new])

    grads_on_fit = []
    for b in range(B):
        params = [t[b].detach().clone().requires_grad_() for t in gmm.params()]
        loss = sum((a * c[b]).sum() for a, c in zip(params, upstream[:3]))
        loss = loss + DiagGMM(*(t.unsqueeze(0) for t in params)).log_prob(upstream[3][b : b + 1]).sum()
        grads_on_fit.append(torch.autograd.grad(loss, params))
    solution = solve_adjoint(p.x, p.weights, gmm.params(), [torch.stack(g) for g in zip(*grads_on_fit)], p.var_floor)
    assert solution.converged.all()
    for b in range(B):
        theta = torch.cat([t[b].flatten() for t in gmm.params()])
        x, w = p.x[b], p.weights[b]
        j_theta, j_x, j_w = (torch.func.jacrev(one_step, argnums=i)(theta, x, w) for i in range(3))
        g = torch.cat([t.flatten() for t in grads_on_fit[b]])
        u = torch.linalg.solve((torch.eye(theta.numel(), dtype=torch.float64) - j_theta).T, g)
        assert_rel(solution.u[b], u, 1e-9, "adjoint u")
        true_residual = (g + j_theta.T @ solution.u[b] - solution.u[b]).norm() / g.norm()
        assert true_residual <= DEFAULT_SOLVE_TOL[torch.float64] * 1.01
        assert abs(float(true_residual) - float(solution.residual[b])) <= 1e-3 * float(true_residual) + 1e-15
        dense_x = torch.einsum("p,pnd->nd", u, j_x)
        dense_w = j_w.T @ u
        assert_grads_rel((implicit[0][b], implicit[1][b]), (dense_x, dense_w), 1e-6, NAMES[:2])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_at_a_converged_fit(device):
    """Where the forward is the fixed point (converged to rounding), the implicit gradient is
    its exact derivative: finite differences of the converged fit, including the initial
    parameters, whose derivative is then zero."""
    T = 400
    p = separated_problem(2, 10, 2, 2, sep=5.0, device=device, converge=T)
    assert_converged(p, T)
    z = p.x[:, :3].detach() + 0.2

    def fit(x, w, lw0, mu0, var0):
        init = DiagGMM(torch.log_softmax(lw0, dim=1), mu0, var0)
        gmm = s2m_ext.fit_gmm(x, w, n_iter=T, init=init, var_floor=p.var_floor, backward="implicit")
        return (*gmm.params(), gmm.log_prob(z))

    leaves = [t.clone().requires_grad_() for t in (p.x, p.weights, *p.init)]
    assert torch.autograd.gradcheck(fit, leaves)


# ----------------------------------------------------------------------------- special sets
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_dead_component_passes_its_gradient_to_the_init_like_unrolled(solver, device):
    """A component far from every point dies at the first step and keeps its initial mean and
    variance: the fixed-point equation is the identity there. Its gradient goes to the initial
    parameters and nowhere else, as in the unrolled backward; the rest matches unrolled."""

    def plant_dead(p):
        p.init[1][:, 2] = 1e3

    p = separated_problem(3, 40, 3, 3, device=device, adjust=plant_dead)
    assert_converged(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitGradientWarning)
        implicit, upstream = _grads(p, ImplicitBackward(solver=solver))
    unrolled, _ = _grads(p, "unrolled", upstream=upstream)
    assert_grads_rel(implicit, unrolled, 1e-6, NAMES)
    # Exactly the upstream gradient of the dead component's mean/variance (the loss's direct
    # term plus the queries' score term), and zero for the live ones.
    gmm = s2m_ext.fit_gmm(p.x, p.weights, n_iter=T_CONVERGED, init=DiagGMM(*p.init), var_floor=p.var_floor)
    params = [t.detach().clone().requires_grad_() for t in gmm.params()]
    loss = sum((a * c).sum() for a, c in zip(params, upstream[:3])) + DiagGMM(*params).log_prob(upstream[3]).sum()
    _, d_mu, d_var = torch.autograd.grad(loss, params)
    assert torch.equal(implicit[3][:, 2], d_mu[:, 2]) and torch.equal(implicit[4][:, 2], d_var[:, 2])
    assert torch.equal(implicit[3][:, :2], torch.zeros_like(implicit[3][:, :2]))


def _unrolled_at_the_fit(p: Problem, fit: DiagGMM, n_iter, upstream, pool=False):
    """Per set b, gradients (x[b], weights[b]) of the test loss through n_iter[b] EM steps
    unrolled from the fit itself: at a fixed point, the adjoint of those steps is the
    truncated series sum_{i<n_iter[b]} (J^T)^i g."""
    out = []
    for b, steps in enumerate(n_iter):
        x, w = (t[b : b + 1].detach().clone().requires_grad_() for t in (p.x, p.weights))
        gmm = s2m_ext.fit_gmm(x, w, n_iter=int(steps), init=fit[b], var_floor=p.var_floor)
        loss = sum((a * c[b : b + 1]).sum() for a, c in zip(gmm.params(), upstream[:3]))
        if len(upstream) > 3:
            loss = loss + gmm.log_prob(upstream[3][b : b + 1]).sum()
        out.append([t[0] for t in torch.autograd.grad(loss, (x, w))])
    return [torch.stack(t) for t in zip(*out)]


def _smallest_residual_series(step, g, max_iter):
    """u_m = sum_{i<m} (J^T)^i g for m = 1..max_iter: (the u_m of smallest residual
    ||g + J^T u_m - u_m|| (first one on ties), its m, that residual relative to ||g||) per set."""
    u, best_u = g.clone(), g.clone()
    best = torch.full((g.shape[0],), math.inf, dtype=torch.float64)
    best_m = torch.zeros(g.shape[0], dtype=torch.long)
    for m in range(1, max_iter + 1):
        u_next = g + step.jt(u)
        res = (u_next - u).norm(dim=1) / g.norm(dim=1)
        better = res < best
        best_u[better], best[better], best_m[better] = u[better], res[better], m
        u = u_next
    return best_u, best_m, best


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_singular_optimum_warns_and_stays_finite(solver, device):
    """Set 0: all points identical and both components started on them, so the components
    coincide, every responsibility equals the mixture weight and F leaves the weights as they
    are (dF/dlog pi has the eigenvalue 1): u = g + J^T u has no solution (GMRES finds a huge
    one of the system that rounding makes regular, which the conditioning check rejects). The
    solve says so for that set only, which gets the gradient of the m <= max_iter EM steps
    unrolled at the fit whose adjoint has the smallest residual (finite), and set 1, a regular
    fit in the same batch, stays exact."""
    p = separated_problem(2, 30, 2, 2, sep=6.0, device=device, converge=0)  # set 1: fast, so 100 products suffice
    p.x[0] = p.x[0, :1]
    p.init[0][0] = torch.tensor([0.3, 0.7], dtype=torch.float64, device=device).log()
    p.init[1][0] = p.x[0, :2]
    p.init[2][0] = 1.0
    max_iter = 100
    with pytest.warns(ImplicitGradientWarning, match=r"solve u = g \+ \(dF/dtheta\)\^T u failed for 1 of 2 sets"):
        implicit, upstream = _grads(p, ImplicitBackward(solver=solver, max_iter=max_iter))
    assert all(torch.isfinite(g).all() for g in implicit)
    unrolled, _ = _grads(p, "unrolled", upstream=upstream)
    assert_grads_rel([g[1] for g in implicit], [g[1] for g in unrolled], 1e-6, NAMES)
    fit = s2m_ext.fit_gmm(p.x, p.weights, n_iter=T_CONVERGED, init=DiagGMM(*p.init), var_floor=p.var_floor)
    params = [t.detach().clone().requires_grad_() for t in fit.params()]
    loss = sum((a * c).sum() for a, c in zip(params, upstream[:3])) + DiagGMM(*params).log_prob(upstream[3]).sum()
    grads_on_fit = torch.autograd.grad(loss, params)
    from s2m_ext.adjoint import _make_step, _pack

    step = _make_step(p.x, p.weights, fit.params(), p.var_floor)
    _, m, _ = _smallest_residual_series(step, _pack(*grads_on_fit), max_iter)
    truncated = _unrolled_at_the_fit(p, fit, m[:1], upstream)
    assert_grads_rel([g[0] for g in implicit[:2]], [g[0] for g in truncated], 1e-10, NAMES[:2])


@pytest.mark.parametrize("solver", SOLVERS)
def test_iteration_cap_gives_the_unrolled_gradient_at_the_fit(solver):
    """max_iter = 2 for regular fits: the sets the cap stops are not converged, warned about,
    get the truncated series g (+ J^T g) of smallest residual, report that residual (checked
    with one more product), and their gradient is that of the corresponding 1 or 2 EM steps
    unrolled at the fit, for either solver. Set 0's clusters are planted 3.5 standard
    deviations apart on a line (the others may be so far apart that one product solves them):
    its responsibilities overlap, so dF/dtheta is far from 0 and the cap binds for it."""
    N, K = 40, 3

    def overlap_set_0(p):
        centres = torch.zeros(K, 2, dtype=torch.float64)
        centres[:, 0] = 3.5 * torch.arange(K, dtype=torch.float64)
        p.x[0] = centres[torch.arange(N) % K] + torch.randn(N, 2, dtype=torch.float64)
        p.init[1][0] = centres + 0.5 * torch.randn(K, 2, dtype=torch.float64)

    p = separated_problem(6, N, 2, K, sep=3.5, adjust=overlap_set_0)
    assert_converged(p)
    fit = s2m_ext.fit_gmm(p.x, p.weights, n_iter=T_CONVERGED, init=DiagGMM(*p.init), var_floor=p.var_floor)
    grads = [torch.randn_like(t) for t in fit.params()]
    config = ImplicitBackward(solver=solver, max_iter=2, restart=1)
    solution = solve_adjoint(p.x, p.weights, fit.params(), grads, p.var_floor, config)
    exact = solve_adjoint(p.x, p.weights, fit.params(), grads, p.var_floor, ImplicitBackward(solver="gmres"))
    assert exact.converged.all()
    capped = ~solution.converged
    assert capped[0], "the cap must bind for the overlapping set"
    from s2m_ext.adjoint import _make_step, _pack

    step = _make_step(p.x, p.weights, fit.params(), p.var_floor)
    g = _pack(*grads)
    series, m, _ = _smallest_residual_series(step, g, 2)
    assert_rel(solution.u[capped], series[capped], 1e-13, "u = the truncated series of smallest residual")
    recomputed = (g + step.jt(solution.u) - solution.u).norm(dim=1) / g.norm(dim=1)
    assert_rel(solution.residual, recomputed, 1e-10, "reported residual")
    assert (solution.residual[capped] > DEFAULT_SOLVE_TOL[torch.float64]).all()
    n_capped = int(capped.sum())
    with pytest.warns(ImplicitGradientWarning, match=rf"failed for {n_capped} of 6 sets .* solver='{solver}'"):
        g_x, g_w, *_ = s2m_ext.adjoint.implicit_vjp(p.x, p.weights, fit.params(), grads, p.var_floor, config)
    unrolled = _unrolled_at_the_fit(p, fit, m, grads)
    assert_grads_rel((g_x[capped], g_w[capped]), [t[capped] for t in unrolled], 1e-10, NAMES[:2])


@pytest.mark.parametrize("solver", SOLVERS)
def test_diverging_series_stays_bounded(solver):
    """Two well-separated clusters fitted by two components started identical: they stay
    identical, so EM converges to the one-Gaussian fit, a saddle of the likelihood. There J^T
    has an eigenvalue above 1 (splitting the components raises the likelihood) and one equal
    to 1 (the weights), so the series diverges. The set fails with a warning and gets the
    iterate of smallest residual, no larger than the first terms, not the exploding tail.

    One fixed draw (problem and upstream gradient): how fast the series grows and how large
    its best iterate is depend on the draw (100 terms grew it only 890x in 1 of 200 draws),
    and the claims are about this saddle's geometry, not about every draw."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20161205)
        p = separated_problem(1, 40, 2, 2, sep=6.0, converge=0)
        p.init[1][:] = (p.weights.unsqueeze(-1) * p.x).sum(1, keepdim=True) / p.weights.sum()
        p.init[2][:] = 1.0
        fit = s2m_ext.fit_gmm(p.x, p.weights, n_iter=50, init=DiagGMM(*p.init), var_floor=p.var_floor)
        grads = [torch.randn_like(t) for t in fit.params()]
    assert torch.equal(fit.means[0, 0], fit.means[0, 1]), "the components stay identical"
    from s2m_ext.adjoint import _make_step, _pack

    step = _make_step(p.x, p.weights, fit.params(), p.var_floor)
    g = _pack(*grads)
    u = g.clone()
    for _ in range(1000):
        u = g + step.jt(u)
        if u.norm() > 1e6 * g.norm():
            break
    assert u.norm() > 1e6 * g.norm(), "the series diverges at this saddle"
    with pytest.warns(ImplicitGradientWarning, match="failed for 1 of 1 sets"):
        g_x, g_w, *_, solution = s2m_ext.adjoint.implicit_vjp(
            p.x, p.weights, fit.params(), grads, p.var_floor, ImplicitBackward(solver=solver, max_iter=100)
        )
    assert not solution.converged.any()
    series, _, best = _smallest_residual_series(step, g, 100)
    assert_rel(solution.u, series, 1e-12, "the iterate of smallest residual")
    assert_rel(solution.residual, best, 1e-10, "its residual")
    assert solution.u.norm() < 1e3 * g.norm()
    assert torch.isfinite(g_x).all() and torch.isfinite(g_w).all()


@pytest.mark.parametrize("device", DEVICES)
def test_zero_iterations_and_zero_gradients(device):
    """n_iter = 0 returns the initial parameters: their gradient passes through, like
    unrolled. A set whose upstream gradient is zero needs no solve (u = 0, 0 products); the
    other converges, at a fit that is the fixed point (converged by construction, well
    separated clusters: a fast rate, so the default 1000 products reach the tolerance)."""
    p = separated_problem(2, 12, 2, 2, sep=6.0, device=device)
    implicit, upstream = _grads(p, "implicit", n_iter=0)
    unrolled, _ = _grads(p, "unrolled", n_iter=0, upstream=upstream)
    assert_grads_rel(implicit, unrolled, 1e-14, NAMES)
    gmm = s2m_ext.fit_gmm(p.x, p.weights, n_iter=T_CONVERGED, init=DiagGMM(*p.init), var_floor=p.var_floor)
    grads = [torch.randn_like(t) for t in gmm.params()]
    for g in grads:
        g[0] = 0
    solution = solve_adjoint(p.x, p.weights, gmm.params(), grads, p.var_floor)
    assert solution.converged.all() and int(solution.n_iter[0]) == 0 and int(solution.n_iter[1]) > 0
    assert torch.equal(solution.u[0], torch.zeros_like(solution.u[0]))


def test_gradient_does_not_depend_on_the_path():
    """Two different starts that converge to the same optimum give the same implicit
    gradient (the unrolled one would differ by the path's remnants if T were short)."""
    p = separated_problem(3, 40, 3, 3)
    # The second start: the first fit's optimum, moved by a tenth of a standard deviation in
    # the means and 20% in the variances: well inside its basin of attraction (a start drawn
    # independently can, rarely, reach another local optimum).
    lw, mu, var = s2m_ext.ops.em_fit(p.x, p.weights, *p.init, T_CONVERGED, p.var_floor, 0.0, False)[:3]
    moved = (lw[0], mu[0] + 0.1 * var[0].sqrt() * torch.randn_like(mu[0]), var[0] * 1.2)
    near = Problem(p.x, p.weights, moved, p.var_floor)
    assert_converged(p)
    assert_converged(near)
    fit_p = s2m_ext.ops.em_fit(p.x, p.weights, *p.init, T_CONVERGED, p.var_floor, 0.0, False)
    fit_near = s2m_ext.ops.em_fit(near.x, near.weights, *near.init, T_CONVERGED, near.var_floor, 0.0, False)
    for s_, t_ in zip(fit_p[:3], fit_near[:3]):
        assert rel_err(t_, s_) < 1e-10, "the two starts must reach the same optimum"
    a, upstream = _grads(p, "implicit")
    b, _ = _grads(near, "implicit", upstream=upstream)
    assert_grads_rel(b, a, 1e-8, NAMES)


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_is_as_accurate_as_the_unrolled_float32_backward(solver):
    """float32 with the default tolerance (1e-6): the implicit gradient is as close to the
    float64 one as the unrolled float32 backward is to the float64 unrolled one (bar: 1e-4,
    or twice that error), and the solve converges without a warning."""
    p = separated_problem(3, 40, 4, 3)
    exact, upstream = _grads(p, "implicit")
    exact_unrolled, _ = _grads(p, "unrolled", upstream=upstream)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitGradientWarning)
        got, _ = _grads(p, ImplicitBackward(solver=solver), dtype=torch.float32, upstream=upstream)
    unrolled32, _ = _grads(p, "unrolled", dtype=torch.float32, upstream=upstream)
    scale = max(e.abs().max().item() for e in exact[:2])
    for i, name in enumerate(NAMES[:2]):
        bar = max(1e-4, 2 * rel_err(unrolled32[i], exact_unrolled[i], scale))
        assert got[i].dtype == torch.float32
        assert_rel(got[i], exact[i], bar, f"d/d{name}", scale)


# ----------------------------------------------------------------------------- contracts
def _op_args(device, requires_grad):
    p = separated_problem(2, 12, 3, 2, device=device)
    tensors = [t.clone().requires_grad_(requires_grad) for t in (p.x, p.weights, *p.init)]
    return (*tensors, 300, p.var_floor, 0.0, 1e-12, 500)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_opcheck(solver, device):
    args = (*_op_args(device, True), solver, 20)
    torch.library.opcheck(torch.ops.s2m.em_fit_implicit.default, args)
    torch.library.opcheck(torch.ops.s2m.em_fit_implicit.default, (*_op_args(device, False), solver, 20))
    out = torch.ops.s2m.em_fit_implicit(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    grads = [torch.randn_like(t) for t in out[:3]]
    x, w = args[0].detach(), args[1].detach()
    torch.library.opcheck(
        torch.ops.s2m.em_fit_implicit_backward.default, (*grads, x, w, *out[:3], args[6], 1e-12, 500, solver, 20)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    p = separated_problem(3, 20, 3, 2, sep=6.0, device=device)
    init = DiagGMM(*p.init)
    z = p.x[:, :4] + 0.1

    def fit_and_score(x, w, z):
        gmm = s2m_ext.fit_gmm(x, w, n_iter=500, init=init, var_floor=1e-3, tol=1e-12, backward="implicit")
        return gmm.log_prob(z), gmm.means

    x = p.x.clone().requires_grad_()
    w = p.weights.clone().requires_grad_()
    eager = fit_and_score(x, w, z)
    compiled = torch.compile(fit_and_score, fullgraph=True)(x, w, z)
    for a, b in zip(compiled, eager):
        assert_rel(a, b, 1e-12)
    g_eager = torch.autograd.grad(sum(t.sum() for t in eager), (x, w))
    g_compiled = torch.autograd.grad(sum(t.sum() for t in compiled), (x, w))
    assert_grads_rel(g_compiled, g_eager, 1e-12, NAMES[:2])


@pytest.mark.parametrize(
    "backward,exc,match",
    [
        ("implict", ValueError, r"^backward must be 'unrolled' or 'implicit' \(or an ImplicitBackward\), got 'implict'"),
        ("", ValueError, "^backward must be 'unrolled' or 'implicit'"),
        (None, TypeError, "^backward must be 'unrolled', 'implicit' or an s2m_ext.ImplicitBackward, got NoneType"),
        (1, TypeError, "^backward must be 'unrolled', 'implicit' or an s2m_ext.ImplicitBackward, got int"),
    ],
)
def test_fit_gmm_rejects_a_bad_backward(backward, exc, match):
    with pytest.raises(exc, match=match):
        s2m_ext.fit_gmm(torch.randn(2, 6, 3), n_iter=2, backward=backward)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"tol": 0.0}, ValueError, r"^ImplicitBackward.tol must be a finite number > 0, got 0.0"),
        ({"tol": float("nan")}, ValueError, "^ImplicitBackward.tol must be a finite number > 0"),
        ({"tol": "1e-6"}, TypeError, "^ImplicitBackward.tol must be a real number or None, got str"),
        ({"max_iter": 0}, ValueError, "^ImplicitBackward.max_iter must be >= 1, got 0"),
        ({"max_iter": 2.0}, TypeError, "^ImplicitBackward.max_iter must be an int, got float"),
        ({"restart": 0}, ValueError, "^ImplicitBackward.restart must be >= 1, got 0"),
        ({"solver": "cg"}, ValueError, "^ImplicitBackward.solver must be 'fixed_point' or 'gmres', got 'cg'"),
    ],
)
def test_implicit_backward_settings_are_validated(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ImplicitBackward(**kwargs)


def test_default_settings_are_documented_values():
    config = ImplicitBackward()
    assert (config.tol, config.max_iter, config.solver, config.restart) == (None, 1000, "fixed_point", 20)
    assert config.tol_for(torch.float64) == 1e-12 and config.tol_for(torch.float32) == 1e-6
    assert ImplicitBackward(tol=1e-3).tol_for(torch.float64) == 1e-3
