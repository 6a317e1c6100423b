"""What a fit means: padding, integer weights, scikit-learn agreement, degenerate sets,
determinism, warm starts and the distribution view."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import DEVICES, DTYPES, RTOL
from problems import SHAPES, assert_grads_rel, assert_rel, float32_bar, make_problem, rel_err

import s2m_ext
from s2m_ext import DiagGMM, reference


def _fit(p, n_iter, **kw):
    return s2m_ext.fit_gmm(p.x, p.weights, n_iter=n_iter, init=DiagGMM(*p.init), var_floor=p.var_floor, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padding_equals_removing_the_points(dtype, device):
    """Points of weight 0 have no effect, whatever their values (here: huge)."""
    p = make_problem(4, 23, 5, 3, pad=True).to(dtype, device)
    x = torch.where(p.weights.unsqueeze(-1) > 0, p.x, torch.full_like(p.x, 1e6))
    padded = s2m_ext.fit_gmm(x, p.weights, n_iter=7, init=DiagGMM(*p.init), var_floor=p.var_floor)
    for b in range(4):
        keep = p.weights[b] > 0
        init = DiagGMM(*(t[b : b + 1] for t in p.init))
        alone = s2m_ext.fit_gmm(p.x[b : b + 1, keep], p.weights[b : b + 1, keep], n_iter=7, init=init, var_floor=p.var_floor)
        for got, want in zip(padded[b].params(), alone.params()):
            assert_rel(got, want, RTOL[dtype], f"set {b}")
        assert_rel(padded.loglik[b : b + 1], alone.loglik, RTOL[dtype], "loglik")


@pytest.mark.parametrize("device", DEVICES)
def test_integer_weights_equal_repeated_points(device):
    p = make_problem(3, 12, 4, 3).to(torch.float64, device)
    counts = torch.randint(0, 4, (3, 12), device=device)
    counts[:, 0] = 1  # no set without weight
    weighted = s2m_ext.fit_gmm(p.x, counts.double(), n_iter=6, init=DiagGMM(*p.init), var_floor=p.var_floor)
    for b in range(3):
        repeated = p.x[b].repeat_interleave(counts[b], dim=0).unsqueeze(0)
        init = DiagGMM(*(t[b : b + 1] for t in p.init))
        plain = s2m_ext.fit_gmm(repeated, None, n_iter=6, init=init, var_floor=p.var_floor)
        for got, want in zip(weighted[b].params(), plain.params()):
            assert_rel(got, want, 1e-12, f"set {b}")


@pytest.mark.parametrize("n_iter", [1, 5, 20])
@pytest.mark.parametrize("K", [1, 3])
def test_agrees_with_scikit_learn(n_iter, K):
    """Same initial parameters, tol=0: scikit-learn's diag GaussianMixture runs the same
    iterations. It computes variances as E[x^2] - 2 x mu + mu^2, which loses about
    |x|^2 / var ulps to cancellation (data here are O(10) around spreads O(1)): hence 1e-9."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    p = make_problem(3, 40, 4, K, var_floor=1e-3)
    ours = s2m_ext.fit_gmm(p.x, None, n_iter=n_iter, init=DiagGMM(p.init[0], p.init[1], p.init[2]), var_floor=p.var_floor)
    for b in range(3):
        gm = GaussianMixture(
            n_components=K,
            covariance_type="diag",
            reg_covar=p.var_floor,
            tol=0.0,
            max_iter=n_iter,
            weights_init=p.init[0][b].exp().numpy(),
            means_init=p.init[1][b].numpy(),
            precisions_init=(1.0 / p.init[2][b]).numpy(),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(p.x[b].numpy())
        assert_rel(ours.log_weights[b].exp(), torch.from_numpy(gm.weights_), 1e-9, "weights")
        assert_rel(ours.means[b], torch.from_numpy(gm.means_), 1e-9, "means")
        assert_rel(ours.variances[b], torch.from_numpy(gm.covariances_), 1e-9, "variances")
        assert gm.n_iter_ == n_iter == int(ours.n_iter[b])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dead_component_keeps_its_parameters_and_stays_finite(dtype, device):
    """A component far from every point gets no responsibility: it keeps its mean and
    variance, its weight drops to ~0, and values and gradients stay finite."""
    p = make_problem(2, 20, 3, 3).to(dtype, device)
    lw, mu, var = (t.clone() for t in p.init)
    mu[:, 2] = 1e3  # thousands of standard deviations away from the data
    x = p.x.clone().requires_grad_()
    gmm = s2m_ext.fit_gmm(x, p.weights, n_iter=5, init=DiagGMM(lw, mu, var), var_floor=p.var_floor)
    assert torch.equal(gmm.means[:, 2], mu[:, 2])
    assert torch.equal(gmm.variances[:, 2], var[:, 2])
    assert (gmm.log_weights[:, 2] <= math.log(torch.finfo(dtype).eps)).all()
    assert torch.allclose(gmm.log_weights.exp().sum(1), torch.ones(2, dtype=dtype, device=device))
    (gmm.means.sum() + gmm.variances.sum() + gmm.log_weights[:, :2].sum() + gmm.log_prob(x.detach()).sum()).backward()
    assert torch.isfinite(x.grad).all()
    # The reference under the same dtype's rules (the dead weight is log(tiny) of the dtype).
    ref = reference.em_fit(p.x, p.weights, lw, mu, var, 5, p.var_floor)
    for got, want in zip(gmm.params(), ref[:3]):
        assert_rel(got, want, RTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("var_floor", [0.0, 1e-3])
def test_identical_points_stay_finite(var_floor, dtype, device):
    """All points equal and no variance floor: the likelihood is unbounded, the variance
    collapses to the rounding level of the mean (|x| eps)^2 or the clamp eps^2, whichever is
    larger, and nothing becomes NaN or Inf, gradients included."""
    x = torch.full((2, 9, 4), 0.3, dtype=dtype, device=device)
    x[1] = 1e4
    x.requires_grad_()
    gmm = s2m_ext.fit_gmm(x, None, n_components=3, n_iter=8, var_floor=var_floor)
    eps = torch.finfo(dtype).eps
    assert (gmm.variances >= eps**2).all()
    if var_floor == 0.0:
        resolution = (4 * eps * x.detach().abs().amax(dim=(1, 2))) ** 2  # a few ulps of the mean, squared
        assert (gmm.variances.amax(dim=(1, 2)) <= torch.maximum(resolution, torch.tensor(eps**2))).all()
    scores = gmm.log_prob(x.detach() + 0.01)
    total = gmm.means.sum() + gmm.variances.sum() + gmm.log_weights.sum() + scores.sum() + gmm.loglik.sum()
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_fit_and_reference_agrees(device):
    x = torch.randn(5, 30, 6, dtype=torch.float64, device=device)
    fits = [s2m_ext.fit_gmm(x, n_components=3, generator=torch.Generator(device).manual_seed(7)) for _ in range(2)]
    ref = reference.fit_gmm(x, n_components=3, generator=torch.Generator(device).manual_seed(7))
    other = s2m_ext.fit_gmm(x, n_components=3, generator=torch.Generator(device).manual_seed(8))
    for a, b, r in zip(fits[0].params(), fits[1].params(), ref.params()):
        assert torch.equal(a, b)
        assert_rel(a, r, 1e-10)
    assert not torch.equal(fits[0].means, other.means)


def test_cpu_results_do_not_depend_on_the_thread_count():
    """The CPU kernels split the work over sets (scoring: over rows), and each set's sums run
    in one fixed order, so the bits are the same with 1 and 3 threads: seeding, the fit, its
    gradients and both scores (a run's results do not depend on the machine's load)."""
    p = make_problem(13, 37, 9, 4, pad=True).to(torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            x, w = p.x.clone().requires_grad_(), p.weights.clone().requires_grad_()
            gmm = s2m_ext.fit_gmm(x, w, n_components=4, n_iter=5, generator=torch.Generator().manual_seed(3))
            scores = gmm.log_prob(x.detach())
            pool = gmm.log_prob_pool(x.detach().reshape(-1, 9))
            grads = torch.autograd.grad(gmm.means.sum() + gmm.variances.sum() + scores.sum(), (x, w))
            runs.append((*gmm.params(), scores, pool, *grads))
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("log_weights", "means", "variances", "scores", "pool scores", "d/dx", "d/dw"), *runs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_set_of_several_point_chunks_gives_the_same_bits_on_any_thread_count(dtype):
    """With fewer sets than threads, the CPU EM kernels split each set's points over the
    threads in fixed chunks (kChunkPoints = 512) whose sums are added in chunk order. A set of
    four chunks (the last one partial, the second one without weight) gives the same bits
    alone on 1, 2 and 3 threads (chunks in parallel) and as one set of a batch of 3 (sets in
    parallel): the fit, its log-likelihood and every gradient, forward and backward."""
    N, D, K = 1900, 5, 3
    x = torch.randn(1, N, D, dtype=dtype)
    x[0, N // 2 :] += 4.0  # two clusters across the chunk boundaries
    w = 0.5 + torch.rand(1, N, dtype=dtype)
    w[0, 512:1024] = 0.0
    lw = torch.full((1, K), -math.log(K), dtype=dtype)
    mu = x[:, [0, 1100, 1800]].clone()
    var = torch.ones(1, K, D, dtype=dtype)
    steps = 6
    g = [torch.randn(steps, 1, *shape, dtype=dtype) for shape in ((K,), (K, D), (K, D))]

    def run(batch, threads):
        torch.set_num_threads(threads)
        rep = [t.repeat(batch, *([1] * (t.dim() - 1))) for t in (x, w, lw, mu, var)]
        fit = s2m_ext.ops.em_fit(*rep, steps - 1, 1e-3, 0.0, True)
        grads = [t.repeat(1, batch, *([1] * (t.dim() - 2))) for t in g]
        back = s2m_ext.ops.em_fit_backward(*grads, rep[0], rep[1], *fit[:3], fit[4], 1e-3)
        fit_0 = [t[:, :1] for t in fit[:3]] + [fit[3][:1]]
        return fit_0 + [t[:1] for t in back]

    threads = torch.get_num_threads()
    try:
        runs = {(1, 1): run(1, 1), (1, 2): run(1, 2), (1, 3): run(1, 3), (3, 2): run(3, 2)}
    finally:
        torch.set_num_threads(threads)
    names = ("log_weights", "means", "variances", "loglik", "d/dx", "d/dw", "d/dlw0", "d/dmu0", "d/dvar0")
    for key, got in runs.items():
        for name, a, b in zip(names, got, runs[(1, 1)]):
            assert torch.equal(a, b), f"{name}: {key[0]} set(s) on {key[1]} thread(s) differ from one thread"


def test_point_chunks_on_other_threads_run_in_the_callers_floating_point_mode():
    """The CPU backward flushes subnormal results to zero (FTZ/DAZ) on its thread; the point
    chunks it hands to other threads must run in the same mode. With an upstream gradient of
    1e-36 on the means of two clusters of 950 points, every contribution to d/dx (about
    1e-36 / 950) is below float32's smallest normal, so d/dx is exactly 0, on one thread and
    on two."""
    N, D, K = 1900, 4, 2
    x = torch.randn(1, N, D)
    x[0, N // 2 :] += 10.0
    w = torch.ones(1, N)
    lw = torch.full((1, K), -math.log(K))
    mu, var = x[:, [0, 1500]].clone(), torch.ones(1, K, D)
    fit = s2m_ext.ops.em_fit(x, w, lw, mu, var, 2, 1e-3, 0.0, True)
    g_mu = torch.full_like(fit[1], 1e-36)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(s2m_ext.ops.em_fit_backward(None, g_mu, None, x, w, *fit[:3], fit[4], 1e-3))
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("d/dx", "d/dw", "d/dlw0", "d/dmu0", "d/dvar0"), *runs):
        assert torch.equal(a, b), name
    assert not runs[1][0].any(), "d/dx: subnormal contributions survived on another thread"
    assert torch.equal(runs[0][3], g_mu[0]), "d/dmu0: the upstream gradient of step 0 passes as it is"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kmeanspp_op_matches_reference(dtype, device):
    B, N, D, K = 6, 25, 3, 4
    x = torch.randn(B, N, D, dtype=dtype, device=device)
    x[0, 5:] = x[0, 0]  # set 0: 5 distinct points
    x[1, 2:] = x[1, 0]  # set 1: 2 distinct points < K: falls back to drawing by weight
    w = torch.rand(B, N, dtype=dtype, device=device)
    w[2, :20] = 0
    u = torch.rand(B, K, dtype=torch.float64, device=device)
    idx = s2m_ext.ops.kmeanspp(x, w, u)
    assert torch.equal(idx, reference.kmeanspp(x, w, u))
    assert (idx[2] >= 20).all(), "zero-weight points are never chosen"
    assert len(set(idx[0].tolist())) == K, "distinct points are chosen while there are enough"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,B,N,D,K,opts", SHAPES, ids=[s[0] for s in SHAPES])
def test_kmeanspp_init_op_matches_reference(name, B, N, D, K, opts, dtype, device):
    """The initial parameters from the same uniforms: log weights and means (the drawn points)
    exactly, variances to the rounding of another summation order: RTOL in float64; in
    float32 against float64, the bar of the reference computing plainly in float32."""
    p = make_problem(B, N, D, K, **opts)
    p.weights[-1] = 0.0  # a set of zero weight: centre and spread 0, variance = the floor
    u = torch.rand(B, K, dtype=torch.float64)
    q = p.to(dtype, device)
    lw, mu, var = s2m_ext.ops.kmeanspp_init(q.x, q.weights, u.to(device), p.var_floor)
    want = reference.kmeanspp_init(q.x, q.weights, u.to(device), p.var_floor)
    assert torch.equal(lw, want[0]) and torch.equal(mu, want[1])
    exact = reference.kmeanspp_init(p.x, p.weights, u, p.var_floor)[2]
    if dtype == torch.float64:
        assert_rel(var, exact, RTOL[dtype], "variances")
    else:
        plain = reference.kmeanspp_init(p.x.float(), p.weights.float(), u, p.var_floor)[2]
        assert_rel(var, exact, float32_bar(rel_err(plain, exact)), "variances")
    floor = max(p.var_floor, torch.finfo(dtype).eps ** 2)
    assert torch.equal(var[-1].cpu(), torch.full((K, D), floor, dtype=dtype)), "zero-weight set"


@pytest.mark.parametrize("device", DEVICES)
def test_kmeanspp_draws_at_the_ends_of_the_unit_interval_skip_zero_probability_points(device):
    """u = 0 and u just below 1 pick the first and the last point of positive probability:
    leading and trailing zero-weight points (and, after the first centre, the centre itself at
    distance 0) are never drawn, whatever the rounding of the cumulative sum."""
    x = torch.tensor([[[0.0], [1.0], [2.0], [4.0], [5.0]]], dtype=torch.float64, device=device)
    w = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64, device=device)
    for u0, first in ((0.0, 1), (1.0 - 2**-53, 3)):
        u = torch.tensor([[u0, 0.0, 1.0 - 2**-53]], dtype=torch.float64, device=device)
        idx = s2m_ext.ops.kmeanspp(x, w, u)
        assert idx[0, 0].item() == first
        assert bool(w[0, idx[0]].gt(0).all()) and len(set(idx[0].tolist())) == 3
        assert torch.equal(idx, reference.kmeanspp(x, w, u))


def test_kmeanspp_draws_proportionally_to_weighted_squared_distance():
    """Second draw: P(n) = w_n d_n^2 / sum. Checked by the empirical frequency over many sets."""
    pts = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    B = 20000
    x, weights = pts.expand(B, 3, 1), w.expand(B, 3)
    u = torch.rand(B, 2, dtype=torch.float64)
    u[:, 0] = 0.0  # first draw: always point 0
    idx = s2m_ext.ops.kmeanspp(x, weights, u)
    assert (idx[:, 0] == 0).all()
    freq = torch.bincount(idx[:, 1], minlength=3).double() / B
    expected = torch.tensor([0.0, 2 * 1.0, 1 * 9.0], dtype=torch.float64) / 11.0
    # 5 binomial standard deviations
    assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / B).sqrt() + 1e-12).all(), freq


@pytest.mark.parametrize("device", DEVICES)
def test_warm_start_continues_the_fit(device):
    """fit(T1 + T2) == fit(T2, init=fit(T1)): the per-class cache of the paper."""
    p = make_problem(3, 20, 4, 3).to(torch.float64, device)
    full = _fit(p, 9)
    half = _fit(p, 4)
    resumed = s2m_ext.fit_gmm(p.x, p.weights, n_iter=5, init=half, var_floor=p.var_floor)
    for a, b in zip(full.params(), resumed.params()):
        assert_rel(a, b, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_to_distribution_gives_the_same_densities(dtype, device):
    p = make_problem(3, 20, 4, 2).to(dtype, device)
    gmm = _fit(p, 5)
    z = torch.randn(3, 7, 4, dtype=dtype, device=device)
    dist = gmm.to_distribution()
    assert dist.batch_shape == (3,) and dist.event_shape == (4,)
    assert_rel(dist.log_prob(z.transpose(0, 1)).transpose(0, 1), gmm.log_prob(z), RTOL[dtype])
    pool = torch.randn(11, 4, dtype=dtype, device=device)
    assert_rel(dist.log_prob(pool.unsqueeze(1)).t(), gmm.log_prob_pool(pool), RTOL[dtype])


def test_fit_reports_log_likelihood_of_the_returned_parameters():
    p = make_problem(4, 30, 3, 2)
    gmm = _fit(p, 6)
    ll = (p.weights * gmm.log_prob(p.x)).sum(1) / p.weights.sum(1)
    assert_rel(gmm.loglik, ll, 1e-12)
    assert gmm.loglik.grad_fn is None  # a diagnostic, not differentiable


def test_em_never_decreases_the_likelihood():
    """EM's defining property (with a variance floor the objective is the penalised one,
    so check the unfloored case). A component that collapses onto one point reaches the
    eps**2 clamp of the variances, where the unfloored likelihood is capped and may fall
    by rounding (S2M_TEST_SEED=996174507: set 5 at steps 7 -> 8): such a set is checked up
    to that step only."""
    p = make_problem(6, 50, 3, 3, var_floor=0.0)
    fits = [_fit(p, t) for t in range(0, 12)]
    var_min = s2m_ext.reference.limits(torch.float64)[2]
    checked = 0
    for before, after in zip(fits, fits[1:]):
        unclamped = after.variances.amin((1, 2)) > var_min
        rose = after.loglik >= before.loglik - 1e-9 * before.loglik.abs()
        assert (rose | ~unclamped).all()
        checked += int(unclamped.sum())
    assert checked >= 11 * 6 // 2, "most steps must be checked"


def test_kmeanspp_third_draw_uses_the_nearest_chosen_centre():
    """K = 3: after points 0 and 10 (forced by the uniforms), the third draw is proportional
    to w d^2 with d the distance to the nearer of the two: points at 1 and 3 have
    w d^2 = 2 * 1 and 1 * 9, so P = (0, 2/11, 9/11, 0). (The distance to the first centre
    alone gives (0, 2, 9, 100) / 111; to the last one alone, (100, 162, 49, 0) / 311.)"""
    pts = torch.tensor([[0.0], [1.0], [3.0], [10.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    B = 20000
    x, weights = pts.expand(B, 4, 1), w.expand(B, 4)
    u = torch.rand(B, 3, dtype=torch.float64)
    u[:, 0] = 0.0  # first draw: point 0
    u[:, 1] = 0.99  # second: cumsum of w d^2 = (0, 2, 11, 111), 0.99 * 111 > 11: point 3
    idx = s2m_ext.ops.kmeanspp(x, weights, u)
    assert (idx[:, 0] == 0).all() and (idx[:, 1] == 3).all()
    freq = torch.bincount(idx[:, 2], minlength=4).double() / B
    expected = torch.tensor([0.0, 2.0, 9.0, 0.0], dtype=torch.float64) / 11.0
    # 5 binomial standard deviations
    assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / B).sqrt() + 1e-12).all(), freq


def _band_problem(dtype, device):
    """2 sets of 6 points in 2-D near the origin (|x_0| <= 1/2) and 3 components of variance 1:
    component 0 at the origin, 1 at (10, 0), 2 at (1000, 0). Component 1's responsibilities
    are exp(-50 + 10 x_0) ~ e^-45..e^-55 of component 0's, so its mass Nk / W lies strictly
    between tiny and eps in float32 (1.2e-38, 1.2e-7) and float64 (2.2e-308, 2.2e-16): it is
    dead (keeps its mean and variance) but its log weight log(Nk / W) still comes from the
    data. Component 2's mass underflows: dead with log weight log(tiny)."""
    f64 = torch.float64
    x = torch.rand(2, 6, 2, dtype=f64) - 0.5
    w = 0.5 + torch.rand(2, 6, dtype=f64)
    means = torch.zeros(2, 3, 2, dtype=f64)
    means[:, 1, 0], means[:, 2, 0] = 10.0, 1000.0
    variances = torch.ones(2, 3, 2, dtype=f64)
    log_weights = torch.full((2, 3), -math.log(3.0), dtype=f64)
    return [t.to(dtype=dtype, device=device) for t in (x, w, log_weights, means, variances)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dead_component_between_tiny_and_eps_keeps_a_log_weight_from_the_data(dtype, device):
    x, w, lw, mu, var = _band_problem(dtype, device)
    n_iter, floor = 3, 1e-3
    out = s2m_ext.ops.em_fit(x, w, lw, mu, var, n_iter, floor, 0.0, True)
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    for t in range(1, n_iter + 1):
        assert torch.equal(out[1][t, :, 1:], mu[:, 1:]) and torch.equal(out[2][t, :, 1:], var[:, 1:]), "dead: kept"
    # The band itself, after the first step: log(tiny) < log(Nk / W) < log(eps). (Later steps
    # multiply the mass by ~e^-50 again: float32 then underflows to log(tiny), float64 not.)
    first_lw = out[0][1]
    assert ((first_lw[:, 1] > math.log(tiny) + 1) & (first_lw[:, 1] < math.log(eps) - 1)).all(), first_lw
    assert (first_lw[:, 2] == reference.limits(dtype)[3]).all()
    # Component 1's log weight from its definition, in float64 from the initial state:
    # log(sum_n w_n r_n1 / W).
    resp, _ = reference.e_step(x.double(), w.double(), lw.double(), mu.double(), var.double())
    want = ((w.double() * resp[..., 1]).sum(1) / w.double().sum(1)).log()
    assert_rel(first_lw[:, 1], want, 1e-6 if dtype == torch.float32 else 1e-13, "log weight in the band")
    # Every step against the reference in the same dtype's rules, in float64 arithmetic.
    ref = [x.double(), w.double(), lw.double(), mu.double(), var.double()]
    for t in range(1, n_iter + 1):
        ref[2:] = reference.em_fit(*ref[:2], *ref[2:], 1, floor)[:3] if dtype == torch.float64 else _ref_step(ref, floor, dtype)
        for got, want, name in zip(out[:3], ref[2:], ("log_weights", "means", "variances")):
            assert_rel(got[t], want, RTOL[dtype], f"{name} after {t} steps")


def _ref_step(ref, floor, dtype):
    """One reference step in float64 arithmetic, under the dead-component rules of ``dtype``."""
    x, w, lw, mu, var = ref
    resp, _ = reference.e_step(x, w, lw, mu, var)
    q = (w.unsqueeze(-1) * resp)
    nk, total = q.sum(1), w.sum(1, keepdim=True)
    eps, tiny, _, lw_min = reference.limits(dtype)
    alive = nk > total * eps
    safe = torch.where(alive, nk, torch.ones_like(nk)).unsqueeze(-1)
    new_mu = torch.where(alive.unsqueeze(-1), torch.einsum("bnk,bnd->bkd", q, x) / safe, mu)
    s2 = torch.einsum("bnk,bnkd->bkd", q, (x.unsqueeze(2) - new_mu.unsqueeze(1)) ** 2)
    new_var = torch.where(alive.unsqueeze(-1), s2 / safe + floor, var)
    live = nk > total * tiny
    new_lw = torch.where(live, torch.where(live, nk, torch.ones_like(nk)).log() - total.log(), torch.full_like(nk, lw_min))
    return [new_lw, new_mu, new_var]


@pytest.mark.parametrize("device", DEVICES)
def test_dead_component_gradients_match_autograd_through_the_reference(device):
    """float64, the band problem (one component dead in the eps band, one far away): the
    gradients for x, weights and the initial parameters (those of the dead components pass
    through to their initial mean and variance) equal autograd through the reference."""
    inputs = [t.requires_grad_() for t in _band_problem(torch.float64, device)]
    n_iter, floor = 3, 1e-3
    out = s2m_ext.ops.em_fit(*inputs, n_iter, floor, 0.0, True)
    upstream = [torch.randn_like(t[-1]) for t in out[:3]]
    z = inputs[0].detach()[:, :4] + 0.1
    names = ("x", "weights", "log_weights0", "means0", "variances0")

    def loss(params):
        return sum((p * u).sum() for p, u in zip(params, upstream)) + reference.log_prob(z, *params).sum()

    grads = torch.autograd.grad(loss([t[-1] for t in out[:3]]), inputs)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    exact = torch.autograd.grad(loss(reference.em_fit(*leaves, n_iter, floor)[:3]), leaves)
    assert_grads_rel(grads, exact, RTOL[torch.float64], names)
    # The pass-through: a dead component's initial mean gets its upstream gradient plus the
    # query scores' gradient, which is not zero for component 1 (log-densities ~ -50 apart).
    assert (exact[3][:, 1].abs() > 0).all()
