"""The fused EM op and its analytic backward against the plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, DTYPES, RTOL
from problems import (
    SHAPES,
    assert_grads_rel,
    assert_matches_reference,
    assert_rel,
    float32_bar,
    make_problem,
    rel_err,
    step_problems,
)

import s2m_ext
from s2m_ext import reference

T_ITER = 6


def _run_op(p, n_iter, keep_trajectory=True, tol=0.0):
    return s2m_ext.ops.em_fit(p.x, p.weights, *p.init, n_iter, p.var_floor, tol, keep_trajectory)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,B,N,D,K,opts", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_matches_reference(name, B, N, D, K, opts, dtype, device):
    p = make_problem(B, N, D, K, **opts).to(dtype, device)
    lw, mu, var, loglik, used, converged = _run_op(p, T_ITER)
    assert lw.shape == (T_ITER + 1, B, K) and mu.shape == (T_ITER + 1, B, K, D)
    assert all(t.dtype == dtype for t in (lw, mu, var, loglik))
    assert_rel(lw[0], p.init[0], 0.0, "step 0 is the initial log_weights")
    assert_rel(mu[0], p.init[1], 0.0, "step 0 is the initial means")
    assert_matches_reference((lw, mu, var, loglik), p, device, T_ITER, dtype)
    assert torch.equal(used.cpu(), torch.full((B,), T_ITER))
    assert not converged.any()


def _reference_trajectory_grads(inputs, upstream, n_iter, var_floor, dtype):
    """Autograd through the reference of L = sum_t <upstream[t], theta_t>, in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    loss = 0
    for step in range(n_iter + 1):
        theta = reference.em_fit(*leaves, step, var_floor)[:3]
        loss = loss + sum((o * g[step].to(dtype)).sum() for o, g in zip(theta, upstream))
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,B,N,D,K,opts", SHAPES, ids=[s[0] for s in SHAPES])
def test_backward_matches_autograd_through_reference(name, B, N, D, K, opts, dtype, device):
    """Gradients for x, weights and the initial parameters, with upstream gradients on every
    step of the trajectory, equal autograd through the reference.

    float64: the whole 4-step backward to 1e-10. float32: each step's vector-Jacobian
    product, from the op's own states, since the adjoint of T steps amplifies rounding as
    much as the forward does (see assert_matches_reference); the float64 run checks how the
    steps compose, in the same templated code."""
    p = make_problem(B, N, D, K, **opts).to(dtype, device)
    n_iter = 4
    if dtype == torch.float32:
        traj = _run_op(p, n_iter)[:3]
        inputs = [t.clone().requires_grad_() for t in step_problems(traj, p, device, dtype)]
        n_iter = 1
    else:
        inputs = [t.clone().requires_grad_() for t in (p.x, p.weights, *p.init)]
    names = ("x", "weights", "log_weights0", "means0", "variances0")
    out = s2m_ext.ops.em_fit(*inputs, n_iter, p.var_floor, 0.0, True)
    upstream = [torch.randn_like(t) for t in out[:3]]
    grads = torch.autograd.grad(sum((o * g).sum() for o, g in zip(out[:3], upstream)), inputs)
    assert all(g.dtype == dtype for g in grads)
    exact = _reference_trajectory_grads(inputs, upstream, n_iter, p.var_floor, torch.float64)
    if dtype == torch.float64:
        assert_grads_rel(grads, exact, RTOL[dtype], names)
        return
    # Some one-step gradients are ill-conditioned too (the weight of a padding point far from
    # every component is a difference of large terms), so the bar is the accuracy of the same
    # computation done plainly in float32 (float32_bar), at several scales of the problem.
    scale = max(e.abs().max().item() for e in exact)
    plain_errors = _plain_float32_errors(inputs, upstream, p.var_floor, exact, scale)
    for got, plain_error, want, what in zip(grads, plain_errors, exact, names):
        assert_rel(got, want, float32_bar(plain_error), f"d/d{what}", scale)


#: Rescalings of a one-step problem that change every float32 rounding (no power of 2).
RESCALINGS = (0.7, 1.3, 3.1)


def _plain_float32_errors(inputs, upstream, var_floor, exact, scale):
    """Per gradient (x, weights, log_weights0, means0, variances0): the largest relative error
    of one plain float32 reference step against float64, over the problem as given and
    rescaled by each s of RESCALINGS. The rescaled step (x and means times s, variances and
    the floor times s^2, upstream gradients divided to match) is the same computation with
    other roundings; its gradients, mapped back, are those of the original. One draw of the
    rounding can be far luckier than another where a gradient is a cancelling difference
    (measured: 7.3e-7 at s = 1 and 6.8e-6 at s = 1.3 on a component collapsed on a
    duplicated pair), so the bar must not rest on one draw."""
    plain = _reference_trajectory_grads(inputs, upstream, 1, var_floor, torch.float32)
    errors = [rel_err(a, e, scale) for a, e in zip(plain, exact)]
    x, w, lw, mu, var = (t.detach().double() for t in inputs)
    for s in RESCALINGS:
        scaled = [(x * s).float(), w.float(), lw.float(), (mu * s).float(), (var * s * s).float()]
        up = [upstream[0], (upstream[1].double() / s).float(), (upstream[2].double() / (s * s)).float()]
        back = (s, 1.0, 1.0, s, s * s)  # d/dx, d/dw, d/dlw, d/dmu, d/dvar of the original
        want = _reference_trajectory_grads(scaled, up, 1, var_floor * s * s, torch.float64)
        got = _reference_trajectory_grads(scaled, up, 1, var_floor * s * s, torch.float32)
        errors = [max(err, rel_err(g.double() * b, e * b, scale)) for err, g, e, b in zip(errors, got, want, back)]
    return errors


@pytest.mark.parametrize("device", DEVICES)
def test_no_trajectory_gives_final_parameters_only(device):
    p = make_problem(3, 12, 4, 2).to(torch.float64, device)
    full = _run_op(p, 5, keep_trajectory=True)
    final = _run_op(p, 5, keep_trajectory=False)
    assert final[0].shape == (1, 3, 2)
    for a, b in zip(final[:3], full[:3]):
        assert torch.equal(a[0], b[-1])
    assert torch.equal(final[3], full[3])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_without_trajectory_is_refused(device):
    p = make_problem(2, 9, 3, 2).to(torch.float64, device)
    x = p.x.clone().requires_grad_()
    out = s2m_ext.ops.em_fit(x, p.weights, *p.init, 3, p.var_floor, 0.0, False)
    with pytest.raises(ValueError, match="keep_trajectory"):
        out[1].sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_iterations_return_the_initial_parameters(dtype, device):
    p = make_problem(3, 10, 4, 3).to(dtype, device)
    gmm = s2m_ext.fit_gmm(p.x, p.weights, n_iter=0, init=s2m_ext.DiagGMM(*p.init))
    for got, want in zip(gmm.params(), p.init):
        assert torch.equal(got, want)
    # The reported log-likelihood is that of the initial parameters.
    ll = reference.em_fit(*[t.double() for t in (p.x, p.weights, *p.init)], 0, p.var_floor)[3]
    assert_rel(gmm.loglik, ll, RTOL[dtype], "loglik at T=0")


@pytest.mark.parametrize("device", DEVICES)
def test_single_component_is_closed_form(device):
    """K = 1: one M-step with r = 1 gives the weighted mean and variance, whatever T >= 1."""
    p = make_problem(4, 30, 5, 1, pad=True).to(torch.float64, device)
    w = p.weights.unsqueeze(-1)
    mean = (w * p.x).sum(1) / w.sum(1)
    var = (w * (p.x - mean.unsqueeze(1)) ** 2).sum(1) / w.sum(1) + p.var_floor
    for n_iter in (1, 2, 7):
        lw, mu, v, *_ = _run_op(p, n_iter)
        assert_rel(mu[-1, :, 0], mean, 1e-12, "K=1 mean")
        assert_rel(v[-1, :, 0], var, 1e-12, "K=1 variance")
        assert torch.equal(lw[-1], torch.zeros_like(lw[-1]))


def test_float32_exp_of_the_e_step_is_accurate_to_a_few_ulps():
    """The CPU kernels' vectorised float32 exp, through the E-step: one point at the common
    mean of two components of variance 1 whose log weights differ by delta in [-1.5, 0]
    (the range reduction then covers every r in [-ln2/2, ln2/2], the whole domain of its
    polynomial). Component 1's responsibility is e^delta / (1 + e^delta), so one step's new
    log weight log r_1 carries a relative error of the exp almost as an absolute error
    (divided by 1 + e^delta <= 2). Against float64: within 8 float32 ulps (the other
    roundings of the step add about 3; one polynomial term too few costs ~1e-5)."""
    n = 4096
    delta = -1.5 * torch.arange(n, dtype=torch.float64) / (n - 1)
    lw = torch.log_softmax(torch.stack([torch.zeros_like(delta), delta], 1), 1).float()
    x = torch.zeros(n, 1, 1)
    w = torch.ones(n, 1)
    mu, var = torch.zeros(n, 2, 1), torch.ones(n, 2, 1)
    got = s2m_ext.ops.em_fit(x, w, lw, mu, var, 1, 0.0, 0.0, False)[0][0]
    want = reference.em_fit(x.double(), w.double(), lw.double(), mu.double(), var.double(), 1, 0.0)[0]
    err = (got.double() - want).abs().max().item()
    assert err <= 8 * torch.finfo(torch.float32).eps, f"max error {err:.2e}"
