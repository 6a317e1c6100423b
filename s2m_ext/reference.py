"""Plain-PyTorch reference of every s2m_ext computation: the correctness oracle.

Short and literal: batched (B sets), weighted (w = 0 marks padding), differentiable by
autograd, with no attempt at speed or memory economy. Each function mirrors one op of the
extension and follows the exact rules of ``csrc/common/gmm_math.h``:

* variance     ``v = max(S2 / Nk + var_floor, eps**2)``, S2 centred at the new mean;
* dead         a component with ``Nk <= W * eps`` keeps its previous mean and variance;
* log weight   ``log(Nk) - log(W)`` if ``Nk > W * tiny`` else ``log(tiny)``;
* ``W == 0``   a set without weight keeps its parameters,

where eps and tiny are ``torch.finfo(dtype).eps`` and ``.tiny``.

Shapes: x (B, N, D), weights (B, N), log_weights (B, K), means and variances (B, K, D).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._rules import LOG_2PI, limits, weighted

__all__ = [
    "limits",
    "weighted",
    "component_log_densities",
    "e_step",
    "m_step",
    "em_fit",
    "log_prob",
    "log_prob_pool",
    "kmeanspp",
    "kmeanspp_init",
    "fit_gmm",
]


def component_log_densities(z: Tensor, log_weights: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """l[b,q,k] = log pi_k + log N(z[b,q] | mu_k, diag v_k). z (B,Q,D) -> (B,Q,K)."""
    dims = z.shape[-1]
    log_norm = log_weights - 0.5 * (dims * LOG_2PI + variances.log().sum(-1))
    maha = ((z.unsqueeze(2) - means.unsqueeze(1)) ** 2 / variances.unsqueeze(1)).sum(-1)
    return log_norm.unsqueeze(1) - 0.5 * maha


def e_step(x: Tensor, weights: Tensor, log_weights: Tensor, means: Tensor, variances: Tensor) -> Tuple[Tensor, Tensor]:
    """Responsibilities (B,N,K) and the weighted log-likelihood sum_n w_n log p(x_n) (B)."""
    log_dens = component_log_densities(x, log_weights, means, variances)
    lse = torch.logsumexp(log_dens, dim=-1)
    # A point with every log-density -inf gets uniform responsibilities (never -inf - -inf);
    # a point of weight 0 adds 0 to the log-likelihood whatever its log-density.
    underflow = (lse == -math.inf).unsqueeze(-1)
    resp = torch.where(underflow, torch.full_like(log_dens, 1.0 / log_dens.shape[-1]), torch.exp(log_dens - lse.unsqueeze(-1)))
    return resp, weighted(weights, lse).sum(1)


def m_step(
    x: Tensor,
    weights: Tensor,
    resp: Tensor,
    prev: Tuple[Tensor, Tensor, Tensor],
    var_floor: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Weighted M-step; ``prev`` = (log_weights, means, variances) before it."""
    eps, tiny, var_min, log_weight_min = limits(x.dtype)
    lw_prev, mu_prev, var_prev = prev
    q = weighted(weights.unsqueeze(-1), resp)  # (B,N,K)
    nk = q.sum(1)  # (B,K)
    total = weights.sum(1, keepdim=True)  # (B,1)
    has_weight = total > 0
    alive = has_weight & (nk > total * eps)
    nk_alive = torch.where(alive, nk, torch.ones_like(nk))
    mu = torch.einsum("bnk,bnd->bkd", q, x) / nk_alive.unsqueeze(-1)
    mu = torch.where(alive.unsqueeze(-1), mu, mu_prev)
    s2 = weighted(q.unsqueeze(-1), (x.unsqueeze(2) - mu.unsqueeze(1)) ** 2).sum(1)
    var = (s2 / nk_alive.unsqueeze(-1) + var_floor).clamp_min(var_min)
    var = torch.where(alive.unsqueeze(-1), var, var_prev)
    lw_live = has_weight & (nk > total * tiny)
    safe_total = torch.where(has_weight, total, torch.ones_like(total))
    lw = torch.log(torch.where(lw_live, nk, torch.ones_like(nk))) - torch.log(safe_total)
    lw = torch.where(lw_live, lw, torch.full_like(lw, log_weight_min))
    lw = torch.where(has_weight, lw, lw_prev)
    return lw, mu, var


def _mean_loglik(loglik_sum: Tensor, total: Tensor) -> Tensor:
    return torch.where(total > 0, loglik_sum / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


def em_fit(
    x: Tensor,
    weights: Tensor,
    log_weights: Tensor,
    means: Tensor,
    variances: Tensor,
    n_iter: int,
    var_floor: float,
    tol: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``n_iter`` EM iterations. Returns (log_weights, means, variances, loglik, n_iter_used,
    converged): the final parameters, the mean weighted log-likelihood under them (B), the
    iterations each set ran and whether it stopped on ``tol`` (|change of the mean
    log-likelihood| < tol, scikit-learn's rule; tol = 0 never stops)."""
    batch = x.shape[0]
    total = weights.sum(1)
    theta = (log_weights, means, variances)
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    converged = torch.zeros_like(active)
    used = torch.zeros(batch, dtype=torch.long, device=x.device)
    ll_prev = torch.full((batch,), -math.inf, dtype=torch.float64, device=x.device)
    for _ in range(n_iter):
        resp, ll_sum = e_step(x, weights, *theta)
        new = m_step(x, weights, resp, theta, var_floor)
        theta = tuple(
            torch.where(active.view(-1, *([1] * (n.dim() - 1))), n, o) for n, o in zip(new, theta)
        )
        used = used + active.long()
        if tol > 0:
            ll = _mean_loglik(ll_sum, total).detach().double()
            stop = active & ((ll - ll_prev).abs() < tol)
            converged = converged | stop
            active = active & ~stop
            ll_prev = ll
    _, ll_sum = e_step(x, weights, *theta)
    loglik = _mean_loglik(ll_sum, total)
    return theta[0], theta[1], theta[2], loglik, used, converged


def log_prob(z: Tensor, log_weights: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """Paired scoring: log p(z[b,q]) under mixture b. z (B,Q,D) -> (B,Q).

    A query whose log-densities are all -inf scores -inf and passes no gradient (its exact
    gradient overflows): it is scored again at the mixture's first mean, off the graph's path,
    so that no Inf or NaN enters the backward.
    """
    with torch.no_grad():
        underflow = torch.logsumexp(component_log_densities(z, log_weights, means, variances), dim=-1) == -math.inf
    safe_z = torch.where(underflow.unsqueeze(-1), means[:, :1].detach().expand_as(z), z)
    lse = torch.logsumexp(component_log_densities(safe_z, log_weights, means, variances), dim=-1)
    return torch.where(underflow, torch.full_like(lse, -math.inf), lse)


def log_prob_pool(z: Tensor, log_weights: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """Pool scoring: log p(z[m]) under every mixture b. z (M,D) -> (B,M)."""
    batch = log_weights.shape[0]
    return log_prob(z.unsqueeze(0).expand(batch, *z.shape), log_weights, means, variances)


def _sample(p: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw per row: first n with cumsum(p)[n] > u * sum(p); where rounding leaves
    none (u within an ulp of 1, or a row of zeros), the last n with p > 0 (0 if none), as the
    kernels do."""
    cum = p.double().cumsum(1)
    target = (u * cum[:, -1]).unsqueeze(1)
    first = torch.searchsorted(cum, target, right=True).squeeze(1)
    positions = torch.arange(p.shape[1], device=p.device)
    last_positive = torch.where(p > 0, positions, torch.zeros_like(positions)).amax(1)
    return torch.where(first < p.shape[1], first, last_positive)


def kmeanspp(x: Tensor, weights: Tensor, uniforms: Tensor) -> Tensor:
    """k-means++ (D^2) seeding: indices (B,K) of the chosen points, one uniform per draw.

    The first point is drawn with probability proportional to its weight, each next one
    proportional to weight times squared distance to the nearest chosen point; a set with
    fewer distinct weighted points than K falls back to drawing by weight."""
    batch, n_points, _ = x.shape
    k = uniforms.shape[1]
    rows = torch.arange(batch, device=x.device)
    idx = torch.empty(batch, k, dtype=torch.long, device=x.device)
    idx[:, 0] = _sample(weights, uniforms[:, 0])
    d2 = torch.full((batch, n_points), math.inf, dtype=x.dtype, device=x.device)
    for j in range(1, k):
        center = x[rows, idx[:, j - 1]]
        d2 = torch.minimum(d2, ((x - center.unsqueeze(1)) ** 2).sum(-1))
        p = weighted(weights, d2)
        by_distance = p.double().sum(1) > 0
        idx[:, j] = torch.where(by_distance, _sample(p, uniforms[:, j]), _sample(weights, uniforms[:, j]))
    return idx


def kmeanspp_init(x: Tensor, weights: Tensor, uniforms: Tensor, var_floor: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The initial parameters of a k-means++ fit: log weights (B,K) = -log K, means (B,K,D) =
    the points :func:`kmeanspp` draws, variances (B,K,D) = the set's weighted per-dimension
    variance + var_floor (at least eps**2), the same for every component. A set of zero
    weight has centre and spread 0."""
    batch, _, dims = x.shape
    k = uniforms.shape[1]
    idx = kmeanspp(x, weights, uniforms)
    means = torch.gather(x, 1, idx.unsqueeze(-1).expand(batch, k, dims))
    w = weights.unsqueeze(-1)
    total = w.sum(1)
    total = torch.where(total > 0, total, torch.ones_like(total))
    centre = (w * x).sum(1) / total
    spread = (w * (x - centre.unsqueeze(1)) ** 2).sum(1) / total
    variances = (spread + var_floor).clamp_min(limits(x.dtype)[2]).unsqueeze(1).expand(batch, k, dims).contiguous()
    log_weights = torch.full((batch, k), -math.log(k), dtype=x.dtype, device=x.device)
    return log_weights, means, variances


def fit_gmm(
    x: Tensor,
    weights: Optional[Tensor] = None,
    n_components: Optional[int] = None,
    n_iter: int = 10,
    init="kmeans++",
    var_floor: float = 1e-3,
    generator: Optional[torch.Generator] = None,
    tol: float = 0.0,
):
    """:func:`s2m_ext.fit_gmm` computed by this reference (same arguments, same validation,
    same initialisation for the same generator state). Returns a :class:`s2m_ext.DiagGMM`
    whose tensors carry autograd history through the reference computation."""
    from .gmm import DiagGMM, prepare_fit

    x, weights, init_params, settings = prepare_fit(
        x, weights, n_components, n_iter, init, var_floor, generator, tol, initialiser=kmeanspp_init
    )
    lw, mu, var, loglik, used, converged = em_fit(x, weights, *init_params, **settings)
    return DiagGMM._from_fit(lw, mu, var, loglik, used, converged)
