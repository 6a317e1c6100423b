"""Bad input raises ValueError or TypeError naming the argument; nothing fails silently."""

from __future__ import annotations

import math

import pytest
import torch

import s2m_ext
from s2m_ext import DiagGMM


@pytest.fixture
def data():
    x = torch.randn(3, 8, 4)
    return x, torch.ones(3, 8)


def _gmm(B=3, K=2, D=4, dtype=torch.float32):
    return DiagGMM(torch.full((B, K), -math.log(K), dtype=dtype), torch.randn(B, K, D, dtype=dtype), torch.ones(B, K, D, dtype=dtype))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"x": torch.randn(8, 4)}, ValueError, r"^x must have shape \(B, N, D\)"),
        ({"x": torch.randint(0, 3, (3, 8, 4))}, TypeError, "^x must have a floating dtype"),
        ({"x": torch.randn(3, 8, 4, dtype=torch.float16)}, TypeError, "^x must have a floating dtype"),
        ({"x": torch.randn(3, 0, 4)}, ValueError, "^x must hold N >= 1"),
        ({"x": [[1.0]]}, TypeError, "^x must be a torch.Tensor"),
        ({"weights": torch.ones(3, 7)}, ValueError, r"^weights must have shape \(B, N\) = \(3, 8\)"),
        ({"weights": torch.ones(3, 8, 1)}, ValueError, r"^weights must have shape \(B, N\)"),
        ({"weights": torch.ones(3, 8, dtype=torch.long)}, TypeError, "^weights must be a floating-point or bool"),
        ({"weights": torch.ones(3, 8, device="meta")}, ValueError, "^weights must be on the device of x"),
        ({"n_components": 0}, ValueError, "^n_components must be >= 1"),
        ({"n_components": 2.0}, TypeError, "^n_components must be an int"),
        ({"n_components": True}, TypeError, "^n_components must be an int"),
        ({"n_iter": -1}, ValueError, "^n_iter must be >= 0"),
        ({"var_floor": -1e-3}, ValueError, "^var_floor must be a finite number >= 0"),
        ({"var_floor": float("nan")}, ValueError, "^var_floor must be a finite number >= 0"),
        ({"tol": -1.0}, ValueError, "^tol must be a finite number >= 0"),
        ({"init": "random"}, ValueError, "^init must be 'kmeans\\+\\+' or a DiagGMM"),
        ({"init": 3}, TypeError, "^init must be 'kmeans\\+\\+' or a DiagGMM"),
        ({"init": _gmm(B=2)}, ValueError, "^init must hold B = 3 mixtures in D = 4"),
        ({"init": _gmm(D=5)}, ValueError, "^init must hold B = 3 mixtures in D = 4"),
        ({"init": _gmm(dtype=torch.float64)}, TypeError, "^init must have the dtype of x"),
        ({"init": _gmm(K=2), "n_components": 3}, ValueError, "^n_components = 3 contradicts init"),
        ({"generator": 42}, TypeError, "^generator must be a torch.Generator"),
    ],
)
def test_fit_gmm_rejects_bad_arguments(data, kwargs, exc, match):
    x, w = data
    kwargs = dict(kwargs)
    args = {"x": kwargs.pop("x", x), "weights": kwargs.pop("weights", w)}
    with pytest.raises(exc, match=match):
        s2m_ext.fit_gmm(**args, **kwargs)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x, w: w.__setitem__((1, 2), -0.5), "^weights must be >= 0"),
        (lambda x, w: w.__setitem__((1, 2), float("inf")), "^weights must be finite"),
        (lambda x, w: w.__setitem__(2, 0.0), r"^weights: every set needs a positive total weight, but set\(s\) \[2\]"),
        (lambda x, w: x.__setitem__((0, 1, 2), float("nan")), "^x must be finite"),
        (lambda x, w: x.__setitem__((0, 1, 2), float("-inf")), "^x must be finite"),
    ],
)
def test_fit_gmm_rejects_bad_values(data, mutate, match):
    x, w = data
    mutate(x, w)
    with pytest.raises(ValueError, match=match):
        s2m_ext.fit_gmm(x, w)


def test_value_checks_can_be_switched_off_and_stay_finite(data):
    """Without value checks an all-zero set keeps its initial parameters, finitely."""
    x, w = data
    w[1] = 0
    s2m_ext.set_validation(False)
    try:
        gmm = s2m_ext.fit_gmm(x, w, n_components=2, n_iter=4)
    finally:
        s2m_ext.set_validation(True)
    for t in (*gmm.params(), gmm.loglik):
        assert torch.isfinite(t).all()
    assert gmm.loglik[1] == 0


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.zeros(3, 2), torch.zeros(3, 2, 4), torch.ones(3, 2, 4, dtype=torch.float64)), TypeError,
         "^variances must have the dtype of means"),
        ((torch.zeros(3, 3), torch.zeros(3, 2, 4), torch.ones(3, 2, 4)), ValueError, r"^log_weights must have shape \(B, K\) = \(3, 2\)"),
        ((torch.zeros(3, 2), torch.zeros(3, 2, 4), torch.ones(3, 2, 5)), ValueError, "^variances must have the shape of means"),
        ((torch.zeros(3, 2), torch.zeros(2, 4), torch.ones(2, 4)), ValueError, r"^means must have shape \(B, K, D\)"),
        ((torch.zeros(3, 2), torch.zeros(3, 2, 4, dtype=torch.long), torch.ones(3, 2, 4)), TypeError, "^means must have a floating dtype"),
        ((torch.full((3, 2), -math.log(2)), torch.zeros(3, 2, 4), torch.zeros(3, 2, 4)), ValueError, "^variances must be finite and > 0"),
        ((torch.zeros(3, 2), torch.zeros(3, 2, 4), torch.ones(3, 2, 4)), ValueError, "^log_weights must be normalised"),
        ((torch.full((3, 2), -math.log(2)), torch.full((3, 2, 4), float("nan")), torch.ones(3, 2, 4)), ValueError, "^means must be finite"),
    ],
)
def test_diaggmm_rejects_bad_parameters(args, exc, match):
    with pytest.raises(exc, match=match):
        DiagGMM(*args)


@pytest.mark.parametrize(
    "method,z,exc,match",
    [
        ("log_prob", torch.randn(3, 4), ValueError, r"^z must have shape \(B, Q, D\)"),
        ("log_prob", torch.randn(2, 5, 4), ValueError, "^z.shape\\[0\\] must equal the number of mixtures B = 3"),
        ("log_prob", torch.randn(3, 5, 6), ValueError, "^z.shape\\[-1\\] must equal the mixture dimension D = 4"),
        ("log_prob", torch.randn(3, 5, 4, dtype=torch.float64), TypeError, "^z must have the dtype of the mixture"),
        ("log_prob", torch.full((3, 5, 4), float("nan")), ValueError, "^z must be finite"),
        ("log_prob_pool", torch.randn(3, 5, 4), ValueError, r"^z must have shape \(M, D\)"),
        ("log_prob_pool", torch.randn(5, 3), ValueError, "^z.shape\\[-1\\] must equal the mixture dimension D = 4"),
    ],
)
def test_scoring_rejects_bad_queries(method, z, exc, match):
    with pytest.raises(exc, match=match):
        getattr(_gmm(), method)(z)


def test_ops_called_directly_check_their_arguments():
    """The C++ glue names the op argument too (ValueError / TypeError, not a crash)."""
    x, w = torch.randn(2, 5, 3), torch.ones(2, 5)
    lw, mu, var = torch.zeros(2, 2), torch.zeros(2, 2, 3), torch.ones(2, 2, 3)
    em = s2m_ext.ops.em_fit
    with pytest.raises(ValueError, match=r"x.shape\[2\] must equal the dimension D"):
        em(torch.randn(2, 5, 4), w, lw, mu, var, 2, 1e-3, 0.0, True)
    with pytest.raises(ValueError, match=r"weights.shape\[1\] must equal x.shape\[1\]"):
        em(x, torch.ones(2, 6), lw, mu, var, 2, 1e-3, 0.0, True)
    with pytest.raises(TypeError, match="weights must have the dtype of x"):
        em(x, w.double(), lw, mu, var, 2, 1e-3, 0.0, True)
    with pytest.raises(ValueError, match="n_iter must be >= 0"):
        em(x, w, lw, mu, var, -1, 1e-3, 0.0, True)
    with pytest.raises(ValueError, match="var_floor must be a finite number >= 0"):
        em(x, w, lw, mu, var, 2, -1.0, 0.0, True)
    with pytest.raises(TypeError, match="x must be float32 or float64 on the CPU"):
        em(x.half(), w.half(), lw.half(), mu.half(), var.half(), 2, 1e-3, 0.0, True)
    with pytest.raises(ValueError, match="log_weights.shape\\[1\\] must equal means.shape\\[1\\]"):
        s2m_ext.ops.score_paired(torch.randn(2, 4, 3), torch.zeros(2, 3), mu, var)
    with pytest.raises(ValueError, match="z.shape\\[1\\] must equal the dimension D"):
        s2m_ext.ops.score_pool(torch.randn(4, 5), lw, mu, var)
    with pytest.raises(TypeError, match="uniforms must be float64"):
        s2m_ext.ops.kmeanspp(x, w, torch.rand(2, 2))
    with pytest.raises(TypeError, match="uniforms must be float64"):
        s2m_ext.ops.kmeanspp_init(x, w, torch.rand(2, 2), 1e-3)
    with pytest.raises(ValueError, match="var_floor must be a finite number >= 0"):
        s2m_ext.ops.kmeanspp_init(x, w, torch.rand(2, 2, dtype=torch.float64), -1e-3)
