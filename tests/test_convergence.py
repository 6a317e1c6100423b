"""Per-set convergence of the forward: fit_gmm(..., n_iter=max_iter, tol=tol) stops each set
on its own when its mean weighted log-likelihood changes by less than tol (scikit-learn's
rule), reports per set the iterations used and whether it converged, warns for the sets that
did not, and a stopped set costs no further work (forward or backward)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import DEVICES
from problems import Problem, assert_rel, make_problem

import s2m_ext
from s2m_ext import ConvergenceWarning, DiagGMM, reference


def _fit(p, n_iter, tol, **kw):
    return s2m_ext.fit_gmm(p.x, p.weights, n_iter=n_iter, init=DiagGMM(*p.init), var_floor=p.var_floor, tol=tol, **kw)


def _mean_logliks(p, n_iter):
    """Mean weighted log-likelihood (float64) of theta_0 .. theta_T of a tol = 0 run: (T+1, B)."""
    lw, mu, var, *_ = s2m_ext.ops.em_fit(p.x, p.weights, *p.init, n_iter, p.var_floor, 0.0, True)
    w = p.weights.double()
    lls = [
        reference.e_step(p.x.double(), w, lw[t].double(), mu[t].double(), var[t].double())[1] / w.sum(1)
        for t in range(n_iter + 1)
    ]
    return torch.stack(lls)


def _rule(lls, tol, n_iter):
    """scikit-learn's rule from its definition: iteration t (E-step under theta_{t-1}, then
    M-step) stops the fit if t >= 2 and |ll(theta_{t-1}) - ll(theta_{t-2})| < tol.
    Returns (n_iter_used, converged, margin): margin = the smallest | |change| - tol | among
    the decisions taken, to tell a meaningful comparison from a rounding coin-flip."""
    margin = math.inf
    for t in range(2, n_iter + 1):
        change = abs(float(lls[t - 1] - lls[t - 2]))
        margin = min(margin, abs(change - tol))
        if change < tol:
            return t, True, margin
    return n_iter, False, margin


def _sklearn(x, init, K, var_floor, tol, max_iter):
    from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
    from sklearn.mixture import GaussianMixture

    lw, mu, var = init
    gm = GaussianMixture(
        n_components=K,
        covariance_type="diag",
        reg_covar=var_floor,
        tol=tol,
        max_iter=max_iter,
        weights_init=lw.exp().numpy(),
        means_init=mu.numpy(),
        precisions_init=(1.0 / var).numpy(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkConvergenceWarning)
        gm.fit(x.numpy())
    return gm.n_iter_, bool(gm.converged_)


def _tol_clear_of_rounding(lls, tol, n_iter):
    """The first of tol, tol (1 + 1e-3), tol (1 + 2e-3), ... from which every |change| the rule
    compares, in every set, differs by more than 1e-9, so that no decision is a rounding
    coin-flip (scikit-learn's log-likelihoods agree with ours to ~1e-12 in float64). There
    are at most B * n_iter changes, each ruling out a 2e-9 wide window: one is found."""
    for j in range(4 * lls.numel()):
        candidate = tol * (1 + 1e-3 * j)
        if all(_rule(lls[:, b], candidate, n_iter)[2] > 1e-9 for b in range(lls.shape[1])):
            return candidate
    raise AssertionError("no tolerance clear of the log-likelihood changes")


def _converged_start(p, b):
    """Set b of p started at its own fixed point (500 iterations on): it stops at iteration 2."""
    fixed = s2m_ext.ops.em_fit(p.x, p.weights, *p.init, 500, p.var_floor, 0.0, False)[:3]
    for start, end in zip(p.init, fixed):
        start[b] = end[0, b]


@pytest.mark.parametrize("tol", [1e-1, 1e-3, 1e-5])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_stopping_matches_scikit_learn(K, tol):
    """Same initial parameters and tol: the same iteration count and flag, set by set. The
    decisions are compared only where they are not decided by rounding: tol is moved by a
    few 1e-3 relative, if needed, to differ from every |change| by more than 1e-9. Set 0
    starts at its fixed point, so the sets do not all stop at the same iteration."""
    B, T = 8, 40
    p = make_problem(B, 50, 3, K, scale=0.5)  # clusters of spread ~1.5 around noise 0.5: EM takes a while
    p.weights = torch.ones_like(p.weights)  # scikit-learn has no point weights
    _converged_start(p, 0)
    lls = _mean_logliks(p, T)
    tol = _tol_clear_of_rounding(lls, tol, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = _fit(p, T, tol)
    assert (int(ours.n_iter[0]), bool(ours.converged[0])) == (2, True), "set 0 starts converged"
    for b in range(B):
        expected_iter, expected_conv, margin = _rule(lls[:, b], tol, T)
        assert margin > 1e-9, f"set {b}: a change lies within {margin:.1e} of tol; the comparison would be a coin-flip"
        n_iter, converged = _sklearn(p.x[b], [t[b] for t in p.init], K, p.var_floor, tol, T)
        assert (n_iter, converged) == (int(ours.n_iter[b]), bool(ours.converged[b])), f"set {b}"
        assert (expected_iter, expected_conv) == (n_iter, converged), f"set {b}"
    if K > 1 and tol < 1e-2:
        # The sets did not all stop at the same iteration: the stop is per set.
        assert len(set(ours.n_iter.tolist())) > 1


def test_integer_weights_stop_like_repeated_points_in_scikit_learn():
    """The rule uses the weighted mean log-likelihood: integer weights act as repeated points,
    for the iteration count too."""
    B, K, T, tol = 4, 2, 40, 1e-4
    p = make_problem(B, 20, 2, K, scale=0.5)
    counts = torch.randint(1, 4, (B, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = s2m_ext.fit_gmm(p.x, counts.double(), n_iter=T, init=DiagGMM(*p.init), var_floor=p.var_floor, tol=tol)
    for b in range(B):
        repeated = p.x[b].repeat_interleave(counts[b], dim=0)
        assert _sklearn(repeated, [t[b] for t in p.init], K, p.var_floor, tol, T) == (
            int(ours.n_iter[b]),
            bool(ours.converged[b]),
        ), f"set {b}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tol", [1e-2, 1e-6])
def test_op_and_reference_follow_the_rule(tol, device):
    """The op, the plain-PyTorch reference and the rule from its definition agree on every
    set, with padding, with T = 1 (never converged: the first change is against -inf) and a
    longer T."""
    p = make_problem(6, 30, 3, 3, pad=True, scale=0.5).to(torch.float64, device)
    for T in (1, 2, 25):
        _, _, _, _, used, converged = s2m_ext.ops.em_fit(p.x, p.weights, *p.init, T, p.var_floor, tol, False)
        ref = reference.em_fit(p.x, p.weights, *p.init, T, p.var_floor, tol)
        assert torch.equal(used.cpu(), ref[4].cpu()) and torch.equal(converged.cpu(), ref[5].cpu())
        lls = _mean_logliks(p, T).cpu()
        for b in range(6):
            n_iter, conv, margin = _rule(lls[:, b], tol, T)
            if margin > 1e-9:
                assert (int(used[b]), bool(converged[b])) == (n_iter, conv), f"T={T} set {b}"
        if T == 1:
            assert not converged.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_padding_does_not_change_when_a_set_stops(dtype, device):
    p = make_problem(4, 23, 4, 3, pad=True, scale=0.5).to(dtype, device)
    T, tol = 30, 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        padded = _fit(p, T, tol)
        for b in range(4):
            keep = p.weights[b] > 0
            init = DiagGMM(*(t[b : b + 1] for t in p.init))
            alone = s2m_ext.fit_gmm(p.x[b : b + 1, keep], p.weights[b : b + 1, keep], n_iter=T, init=init, var_floor=p.var_floor, tol=tol)
            assert int(alone.n_iter) == int(padded.n_iter[b]) and bool(alone.converged) == bool(padded.converged[b])


@pytest.mark.parametrize("device", DEVICES)
def test_a_stopped_set_keeps_its_parameters_and_costs_no_more_iterations(device):
    """A set that stops at iteration t_b ends with exactly the parameters of a run of t_b
    iterations (bitwise: no later iteration touched it), its trajectory stays constant after
    t_b, and the unrolled backward through the batch equals per-set backwards through t_b
    iterations only."""
    p = make_problem(6, 30, 3, 3, scale=0.5)
    _converged_start(p, 0)  # set 0 stops at iteration 2, the others later
    p = p.to(torch.float64, device)
    T, tol = 40, 1e-4
    x = p.x.clone().requires_grad_()
    lw, mu, var, _, used, _ = s2m_ext.ops.em_fit(x, p.weights, *p.init, T, p.var_floor, tol, True)
    assert (used < T).any() and len(set(used.tolist())) > 1, "need sets stopping at different iterations"
    upstream = [torch.randn_like(t[-1]) for t in (lw, mu, var)]
    (g_batch,) = torch.autograd.grad(sum((t[-1] * u).sum() for t, u in zip((lw, mu, var), upstream)), x)
    for b in range(6):
        t_b = int(used[b])
        alone_x = p.x[b : b + 1].clone().requires_grad_()
        alone = s2m_ext.ops.em_fit(alone_x, p.weights[b : b + 1], *(t[b : b + 1] for t in p.init), t_b, p.var_floor, 0.0, True)
        for traj, ref in zip((lw, mu, var), alone[:3]):
            assert torch.equal(traj[-1, b], ref[-1, 0])
            assert all(torch.equal(traj[s, b], traj[t_b, b]) for s in range(t_b, T + 1))
        loss = sum((t[-1] * u[b : b + 1]).sum() for t, u in zip(alone[:3], upstream))
        (g_alone,) = torch.autograd.grad(loss, alone_x)
        assert_rel(g_batch[b], g_alone[0], 1e-12, f"set {b}")


def test_warning_names_the_sets_that_did_not_converge():
    p = make_problem(5, 30, 3, 3, scale=0.5)
    with pytest.warns(ConvergenceWarning, match=r"of 5 sets did not converge within n_iter=2 iterations \(tol=1e-08\)"):
        gmm = _fit(p, 2, 1e-8)
    assert not gmm.converged.any() and torch.equal(gmm.n_iter, torch.full((5,), 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        gmm = _fit(p, 500, 1e-3)  # every set converges: no warning
        assert gmm.converged.all() and (gmm.n_iter < 500).all()
        gmm = _fit(p, 7, 0.0)  # tol = 0: exactly n_iter iterations, never "converged", no warning
        assert not gmm.converged.any() and torch.equal(gmm.n_iter, torch.full((5,), 7))


@pytest.mark.parametrize("device", DEVICES)
def test_implicit_and_unrolled_fits_are_the_same_fit(device):
    """backward= changes only the gradient: parameters, loglik, n_iter and converged agree bitwise."""
    p = make_problem(5, 30, 3, 3, scale=0.5).to(torch.float64, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = _fit(p, 30, 1e-5)
        b = _fit(p, 30, 1e-5, backward="implicit")
    for got, want in zip((*b.params(), b.loglik, b.n_iter, b.converged), (*a.params(), a.loglik, a.n_iter, a.converged)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_a_decreasing_log_likelihood_does_not_stop_the_fit(device):
    """K = 1 started at the unfloored maximum-likelihood fit, var_floor = 0.5: iteration 1
    adds the floor to the variances, which lowers the log-likelihood by far more than tol;
    iteration 2 changes nothing (closed form). The rule compares |change| with tol, so it
    stops at iteration 3 (|ll_2 - ll_1| = 0 < tol), not at iteration 2 (the change there is
    negative, below tol but large): the op, the reference and scikit-learn agree."""
    B, N, D, tol, floor = 3, 30, 2, 1e-6, 0.5
    x = torch.randn(B, N, D, dtype=torch.float64)
    mean = x.mean(1, keepdim=True)
    init = (torch.zeros(B, 1, dtype=torch.float64), mean.clone(), ((x - mean) ** 2).mean(1, keepdim=True))
    lls = _mean_logliks(Problem(x, torch.ones(B, N, dtype=torch.float64), init, floor), 10)
    assert (lls[1] - lls[0] < -1e3 * tol).all(), "the first step lowers the log-likelihood"
    x, init = x.to(device), [t.to(device) for t in init]
    w = torch.ones(B, N, dtype=torch.float64, device=device)
    _, _, _, _, used, converged = s2m_ext.ops.em_fit(x, w, *init, 10, floor, tol, False)
    ref = reference.em_fit(x, w, *init, 10, floor, tol)
    assert used.tolist() == [3] * B and converged.all()
    assert torch.equal(ref[4].cpu(), used.cpu()) and torch.equal(ref[5].cpu(), converged.cpu())
    for b in range(B):
        assert _rule(lls[:, b], tol, 10)[:2] == (3, True)
        assert _sklearn(x[b].cpu(), [t[b].cpu() for t in init], 1, floor, tol, 10) == (3, True)


@pytest.mark.parametrize("device", DEVICES)
def test_a_change_equal_to_tol_does_not_stop_the_fit(device):
    """The rule is strict, |change| < tol (scikit-learn's): with tol set to exactly the
    change of iteration 2, |ll(theta_1) - ll(theta_0)|, the fit goes on past iteration 2;
    with the next float above it, it stops there."""
    B, N, D, K = 1, 40, 2, 2
    x = torch.randn(B, N, D, dtype=torch.float64, device=device)
    w = torch.ones(B, N, dtype=torch.float64, device=device)
    init = (torch.log(torch.full((B, K), 0.5, dtype=torch.float64, device=device)),
            x[:, :K].clone(), torch.ones(B, K, D, dtype=torch.float64, device=device))
    # ll(theta_t) as the op computes it: the final log-likelihood of a tol = 0 run of t steps.
    ll0, ll1 = (s2m_ext.ops.em_fit(x, w, *init, t, 0.0, 0.0, False)[3].item() for t in (0, 1))
    change = abs(ll1 - ll0)
    assert change > 0
    used = [s2m_ext.ops.em_fit(x, w, *init, 50, 0.0, tol, False)[4].item()
            for tol in (change, math.nextafter(change, math.inf))]
    assert used[1] == 2 and used[0] > 2
