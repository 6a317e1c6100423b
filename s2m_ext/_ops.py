"""Every Python registration of the ``torch.ops.s2m`` custom ops: fake (meta) kernels for
tracing and torch.compile, autograd formulas that call the analytic backward ops, and the
composite kernels of the implicit fit (built from the other s2m ops and
:mod:`s2m_ext.adjoint`).

Every schema and the CPU/CUDA kernels live in C++ (``csrc/s2m.cpp``, ``csrc/cpu/``,
``csrc/cuda/``); importing this module loads them. Users call the public API in
:mod:`s2m_ext.gmm`, not these ops.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loads the library: registers the s2m schemas and kernels)
except ImportError as exc:  # the source tree without a build, shadowing the installed package
    import os

    raise ImportError(
        f"s2m_ext's compiled kernels (s2m_ext._C) are not in {os.path.dirname(__file__)}: import the installed "
        "package (run from outside the source tree, e.g. .venv/bin/pytest rather than python -m pytest in the "
        "repository root), or build in place: python setup.py build_ext --inplace"
    ) from exc
from .adjoint import implicit_vjp
from .implicit import ImplicitBackward

ops = torch.ops.s2m


# ----------------------------------------------------------------------------- fake kernels
def fit_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of em_fit's trajectory and log-likelihood: float16/bfloat16 inputs (CUDA) are
    computed in float32 and their trajectory kept in float32, so that the backward recomputes
    exactly what the forward used."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("s2m::em_fit")
def _em_fit_fake(x, weights, log_weights, means, variances, n_iter, var_floor, tol, keep_trajectory):
    batch, _, dims = x.shape
    k = means.shape[1]
    steps = n_iter + 1 if keep_trajectory else 1
    dtype = fit_dtype(x.dtype)
    return (
        x.new_empty(steps, batch, k, dtype=dtype),
        x.new_empty(steps, batch, k, dims, dtype=dtype),
        x.new_empty(steps, batch, k, dims, dtype=dtype),
        x.new_empty(batch, dtype=dtype),
        x.new_empty(batch, dtype=torch.long),
        x.new_empty(batch, dtype=torch.bool),
    )


@torch.library.register_fake("s2m::em_fit_backward")
def _em_fit_backward_fake(g_lw, g_mu, g_var, x, weights, lw_traj, mu_traj, var_traj, n_iter_used, var_floor):
    # Gradients come in the dtypes of the inputs they belong to (the initial parameters have x's).
    return (
        torch.empty_like(x),
        torch.empty_like(weights),
        x.new_empty(lw_traj.shape[1:]),
        x.new_empty(mu_traj.shape[1:]),
        x.new_empty(var_traj.shape[1:]),
    )


@torch.library.register_fake("s2m::score_paired")
def _score_paired_fake(z, log_weights, means, variances):
    return z.new_empty(z.shape[:2])


@torch.library.register_fake("s2m::score_pool")
def _score_pool_fake(z, log_weights, means, variances):
    return z.new_empty(log_weights.shape[0], z.shape[0])


@torch.library.register_fake("s2m::score_pool_topk")
def _score_pool_topk_fake(z, log_weights, means, variances, values, indices, offset, k):
    width = min(k, values.shape[1] + z.shape[0])
    return values.new_empty(values.shape[0], width), indices.new_empty(indices.shape[0], width)


def _score_backward_fake(grad, z, log_weights, means, variances):
    return (torch.empty_like(z), torch.empty_like(log_weights), torch.empty_like(means), torch.empty_like(variances))


torch.library.register_fake("s2m::score_paired_backward")(_score_backward_fake)
torch.library.register_fake("s2m::score_pool_backward")(_score_backward_fake)


@torch.library.register_fake("s2m::kmeanspp")
def _kmeanspp_fake(x, weights, uniforms):
    return x.new_empty(uniforms.shape, dtype=torch.long)


@torch.library.register_fake("s2m::kmeanspp_init")
def _kmeanspp_init_fake(x, weights, uniforms, var_floor):
    batch, _, dims = x.shape
    k = uniforms.shape[1]
    return x.new_empty(batch, k), x.new_empty(batch, k, dims), x.new_empty(batch, k, dims)


# ----------------------------------------------------------------------------- autograd
def _em_fit_setup_context(ctx, inputs, output):
    x, weights, _, _, _, _, var_floor, _, _ = inputs
    lw_traj, mu_traj, var_traj, loglik, used, converged = output
    ctx.save_for_backward(x, weights, lw_traj, mu_traj, var_traj, used)
    ctx.var_floor = var_floor
    # loglik is a diagnostic: no gradient flows through it (use DiagGMM.log_prob instead).
    ctx.mark_non_differentiable(loglik, used, converged)


def _em_fit_backward(ctx, g_lw, g_mu, g_var, _g_loglik, _g_used, _g_converged):
    x, weights, lw_traj, mu_traj, var_traj, used = ctx.saved_tensors
    g_x, g_w, g_lw0, g_mu0, g_var0 = ops.em_fit_backward(
        g_lw, g_mu, g_var, x, weights, lw_traj, mu_traj, var_traj, used, ctx.var_floor
    )
    return g_x, g_w, g_lw0, g_mu0, g_var0, None, None, None, None


torch.library.register_autograd("s2m::em_fit", _em_fit_backward, setup_context=_em_fit_setup_context)


def _score_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _make_score_backward(backward_op):
    def backward(ctx, grad):
        return backward_op(grad.contiguous(), *ctx.saved_tensors)

    return backward


torch.library.register_autograd(
    "s2m::score_paired", _make_score_backward(ops.score_paired_backward), setup_context=_score_setup_context
)
torch.library.register_autograd(
    "s2m::score_pool", _make_score_backward(ops.score_pool_backward), setup_context=_score_setup_context
)


def _once_differentiable(name: str):
    """Autograd of a backward op: refuses to be differentiated. A gradient taken with
    create_graph=True is fine; differentiating it again (double backward, Hessian-vector
    products) raises instead of silently giving zeros."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"s2m::{name} is not differentiable: the gradients of s2m_ext's ops (fit_gmm, log_prob, log_prob_pool) "
            "are differentiable once; double backward (e.g. a Hessian-vector product) is not supported"
        )

    return backward


for _name in ("em_fit_backward", "score_paired_backward", "score_pool_backward"):
    torch.library.register_autograd(f"s2m::{_name}", _once_differentiable(_name))


# ----------------------------------------------------------------------------- implicit fit
def _em_fit_implicit(
    x: Tensor,
    weights: Tensor,
    log_weights: Tensor,
    means: Tensor,
    variances: Tensor,
    n_iter: int,
    var_floor: float,
    tol: float,
    solve_tol: float,
    solve_max_iter: int,
    solver: str,
    restart: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """s2m::em_fit_implicit: em_fit without a trajectory, differentiated implicitly. Returns
    the final (log_weights (B,K), means (B,K,D), variances (B,K,D), loglik (B),
    n_iter_used (B), converged (B)), the first four in em_fit's dtype (float32 for
    float16/bfloat16 x). The solve settings only matter for the backward."""
    lw, mu, var, loglik, used, converged = ops.em_fit(
        x, weights, log_weights, means, variances, n_iter, var_floor, tol, False
    )
    return lw[0], mu[0], var[0], loglik, used, converged


def _em_fit_implicit_fake(x, weights, log_weights, means, variances, n_iter, var_floor, tol, solve_tol, solve_max_iter, solver, restart):
    batch = x.shape[0]
    dtype = fit_dtype(x.dtype)
    return (
        log_weights.new_empty(log_weights.shape, dtype=dtype),
        means.new_empty(means.shape, dtype=dtype),
        variances.new_empty(variances.shape, dtype=dtype),
        x.new_empty(batch, dtype=dtype),
        x.new_empty(batch, dtype=torch.long),
        x.new_empty(batch, dtype=torch.bool),
    )


def _em_fit_implicit_backward(
    grad_log_weights: Tensor,
    grad_means: Tensor,
    grad_variances: Tensor,
    x: Tensor,
    weights: Tensor,
    log_weights: Tensor,
    means: Tensor,
    variances: Tensor,
    var_floor: float,
    solve_tol: float,
    solve_max_iter: int,
    solver: str,
    restart: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """s2m::em_fit_implicit_backward: implicit gradients (x, weights, log_weights0, means0,
    variances0) of the fit (log_weights, means, variances) given the gradients on it; see
    :func:`implicit_vjp`."""
    config = ImplicitBackward(tol=solve_tol, max_iter=solve_max_iter, solver=solver, restart=restart)
    return implicit_vjp(
        x, weights, (log_weights, means, variances), (grad_log_weights, grad_means, grad_variances), var_floor, config
    )[:5]


def _em_fit_implicit_backward_fake(grad_log_weights, grad_means, grad_variances, x, weights, log_weights, means, variances, *_):
    # The initial parameters have x's dtype (the fit's may be float32 for float16/bfloat16 x).
    return (
        torch.empty_like(x),
        torch.empty_like(weights),
        x.new_empty(log_weights.shape),
        x.new_empty(means.shape),
        x.new_empty(variances.shape),
    )


# Composed of s2m ops, so one kernel serves every device that has them. Registered through a
# torch.library.Library rather than the torch.library.custom_op decorator: the decorator wraps
# kernels in torch._disable_dynamo, whose first call imports torch._dynamo (about 150 MB of
# resident memory), which a plain fit should not pay for.
_LIB = torch.library.Library("s2m", "IMPL")
_LIB.impl("em_fit_implicit", _em_fit_implicit, "CompositeExplicitAutograd")
_LIB.impl("em_fit_implicit_backward", _em_fit_implicit_backward, "CompositeExplicitAutograd")
torch.library.register_fake("s2m::em_fit_implicit", _em_fit_implicit_fake)
torch.library.register_fake("s2m::em_fit_implicit_backward", _em_fit_implicit_backward_fake)


def _em_fit_implicit_setup_context(ctx, inputs, output):
    x, weights, _, _, _, n_iter, var_floor, _, solve_tol, solve_max_iter, solver, restart = inputs
    lw, mu, var, loglik, used, converged = output
    ctx.save_for_backward(x, weights, lw, mu, var)
    ctx.n_iter = n_iter
    ctx.settings = (var_floor, solve_tol, solve_max_iter, solver, restart)
    ctx.mark_non_differentiable(loglik, used, converged)


def _em_fit_implicit_autograd(ctx, g_lw, g_mu, g_var, _g_loglik, _g_used, _g_converged):
    x, weights, lw, mu, var = ctx.saved_tensors
    fill = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
    g_lw, g_mu, g_var = fill(g_lw, lw), fill(g_mu, mu), fill(g_var, var)
    if ctx.n_iter == 0:  # no EM step ran: the output is the initial parameters (in x's dtype)
        init_grads = (g.to(x.dtype) for g in (g_lw, g_mu, g_var))
        return torch.zeros_like(x), torch.zeros_like(weights), *init_grads, *([None] * 7)
    grads = ops.em_fit_implicit_backward(g_lw, g_mu, g_var, x, weights, lw, mu, var, *ctx.settings)
    return (*grads, *([None] * 7))


torch.library.register_autograd(
    "s2m::em_fit_implicit", _em_fit_implicit_autograd, setup_context=_em_fit_implicit_setup_context
)
torch.library.register_autograd("s2m::em_fit_implicit_backward", _once_differentiable("em_fit_implicit_backward"))


