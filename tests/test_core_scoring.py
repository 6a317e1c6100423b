"""Scoring ops (paired and pool) and their backward against the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, DTYPES, RTOL
from problems import assert_grads_rel, assert_rel

import s2m_ext
from s2m_ext import DiagGMM, reference

#: (B, Q or M, D, K)
SCORE_SHAPES = [(3, 7, 5, 3), (1, 1, 1, 1), (4, 13, 1, 2), (2, 9, 17, 1), (5, 0, 3, 2), (0, 4, 3, 2)]


def random_mixture(B, D, K, dtype, device, *, offset=0.0, spread=1.0, var_scale=1.0):
    log_weights = torch.log_softmax(torch.randn(B, K, dtype=torch.float64), dim=1)
    means = offset + spread * torch.randn(B, K, D, dtype=torch.float64)
    variances = var_scale * (0.2 + torch.rand(B, K, D, dtype=torch.float64))
    return DiagGMM(*(t.to(dtype=dtype, device=device) for t in (log_weights, means, variances)))


#: op name -> (query shape for B sets of dimension D, reference function)
SCORERS = {
    "score_paired": (lambda B, Q, D: (B, Q, D), reference.log_prob),
    "score_pool": (lambda B, M, D: (M, D), reference.log_prob_pool),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Q,D,K", SCORE_SHAPES)
@pytest.mark.parametrize("op", sorted(SCORERS))
def test_scores_and_gradients(op, B, Q, D, K, dtype, device):
    query_shape, ref_fn = SCORERS[op]
    gmm = random_mixture(B, D, K, dtype, device)
    z = torch.randn(*query_shape(B, Q, D), dtype=dtype, device=device)
    leaves = [t.clone().requires_grad_() for t in (z, *gmm.params())]
    out = getattr(s2m_ext.ops, op)(*leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = ref_fn(*ref_leaves)
    assert out.shape == (B, Q) and out.dtype == dtype
    assert_rel(out, ref, RTOL[dtype], "log p")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    assert_grads_rel(grads, ref_grads, RTOL[dtype], ("z", "log_weights", "means", "variances"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "offset,spread,var_scale",
    [(100.0, 1.0, 1.0), (0.0, 1.0, 1e-3), (1e3, 0.1, 1e-2)],
    ids=["far-from-origin", "narrow", "far-and-narrow"],
)
def test_pool_expansion_error_is_bounded_in_float32(offset, spread, var_scale, device):
    """The matrix-product expansion cancels when z ~ mu far from the origin; centring keeps
    the float32 error of scores and gradients within 1e-4 relative (direct float64 form as
    truth; measured here: 2e-7..5e-7 for scores, 1e-7..5e-6 for gradients)."""
    B, M, D, K = 6, 200, 64, 4
    gmm = random_mixture(B, D, K, torch.float32, device, offset=offset, spread=spread, var_scale=var_scale)
    # Pool items near the components (the hard case: small Mahalanobis distances).
    pick = torch.randint(0, B * K, (M,))
    z = gmm.means.reshape(B * K, D)[pick] + (gmm.variances.reshape(B * K, D)[pick].sqrt() * torch.randn(M, D, device=device))
    leaves = [t.clone().requires_grad_() for t in (z, *gmm.params())]
    out = s2m_ext.ops.score_pool(*leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.log_prob_pool(*ref_leaves)
    assert_rel(out, ref, 1e-4, "pool log p")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    for got, want, name in zip(grads, ref_grads, ("z", "log_weights", "means", "variances")):
        assert_rel(got, want, 1e-4, f"d/d{name}")


@pytest.mark.parametrize("device", DEVICES)
def test_pool_equals_paired_on_the_broadcast_pool(device):
    gmm = random_mixture(4, 6, 3, torch.float64, device)
    z = torch.randn(10, 6, dtype=torch.float64, device=device)
    assert_rel(gmm.log_prob_pool(z), gmm.log_prob(z.expand(4, 10, 6)), 1e-12)


def test_pool_scoring_spans_several_chunks(monkeypatch):
    """More pool rows than one chunk (2^24 / (B K) rows): chunks are stitched correctly."""
    B, K, D = 4096, 8, 2  # B*K = 32768 -> 512 rows per chunk
    gmm = random_mixture(B, D, K, torch.float32, "cpu")
    z = torch.randn(1100, D)
    out = gmm.log_prob_pool(z)
    ref = reference.log_prob(z[None].expand(B, -1, -1).double(), *(t.double() for t in gmm.params()))
    assert_rel(out, ref, 1e-4, "chunked pool")
