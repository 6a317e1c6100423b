"""The k-means++ initial model as fit_gmm returns it at n_iter = 0, against values computed
by hand: means are points of the set, every component's variance is the set's weighted
per-dimension variance (about the weighted mean) plus var_floor, the weights uniform."""

from __future__ import annotations

import math

import pytest
import torch

import s2m_ext


@pytest.mark.parametrize("fit", [s2m_ext.fit_gmm, s2m_ext.reference.fit_gmm], ids=["op", "reference"])
@pytest.mark.parametrize("k", [1, 3])
def test_initial_model_matches_the_weighted_moments(k, fit):
    g = torch.Generator().manual_seed(7)
    b, n, d, var_floor = 3, 9, 4, 0.05
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    w = torch.rand(b, n, generator=g, dtype=torch.float64) * 3
    w[:, -2:] = 0.0  # padding: must not move the moments
    w[:, 0] = 5.0    # a heavy point: pulls the weighted mean far from the plain one
    x[:, 0] += 4.0
    gmm = fit(x, w, k, n_iter=0, var_floor=var_floor, generator=torch.Generator().manual_seed(1))
    for s in range(b):
        ws = w[s].unsqueeze(-1)
        mean = (ws * x[s]).sum(0) / ws.sum()
        var = (ws * (x[s] - mean) ** 2).sum(0) / ws.sum() + var_floor
        plain = x[s].var(0, unbiased=False) + var_floor
        assert (var - plain).abs().max() > 0.1  # the case separates weighted from plain moments
        torch.testing.assert_close(gmm.variances[s], var.expand(k, d), rtol=1e-12, atol=0)
        torch.testing.assert_close(gmm.log_weights[s], torch.full((k,), -math.log(k), dtype=torch.float64), rtol=0, atol=1e-15)
        for c in range(k):  # each mean is one of the set's weighted points
            dist = (x[s][w[s] > 0] - gmm.means[s, c]).abs().amax(1)
            assert float(dist.min()) == 0.0
