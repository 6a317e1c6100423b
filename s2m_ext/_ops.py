"""Registration of the ``torch.ops.s2m`` custom ops: fake (meta) kernels for tracing and
torch.compile, and autograd formulas that call the analytic backward ops.

The schemas and the CPU/CUDA kernels live in C++ (``csrc/``); importing this module loads
them. Users call the public API in :mod:`s2m_ext.gmm`, not these ops.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: registers the s2m schemas and kernels)

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


def _score_backward_fake(grad, z, log_weights, means, variances):
    return (torch.empty_like(z), torch.empty_like(log_weights), torch.empty_like(means), torch.empty_like(variances))


torch.library.register_fake("s2m::score_paired_backward")(_score_backward_fake)
torch.library.register_fake("s2m::score_pool_backward")(_score_backward_fake)


@torch.library.register_fake("s2m::kmeanspp")
def _kmeanspp_fake(x, weights, uniforms):
    return x.new_empty(uniforms.shape, dtype=torch.long)


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
