"""Property-based fuzzing of the public entry points (hypothesis).

Property: every call either raises a ValueError/TypeError (an argument the message names)
or returns finite outputs and finite gradients, which agree with the float64 reference
(s2m_ext.reference) where the reference is finite.

Profiles: ``ci`` (default, bounded: the file runs in seconds) and ``long`` (selected with
S2M_FUZZ_PROFILE=long, for local soak runs). Draws are seeded by the session seed
(S2M_TEST_SEED, printed in the pytest header), so a failure replays with the same seed.
"""

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import seed as hyp_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import s2m_ext  # noqa: E402
from s2m_ext import DiagGMM, reference  # noqa: E402
from s2m_ext._validation import magnitude_bound  # noqa: E402
from s2m_ext.nn import AvgModel, HistogramLoss, NNModel, Set2Model  # noqa: E402

from conftest import SESSION_SEED  # noqa: E402

_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True, database=None)
settings.register_profile("ci", max_examples=15, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("S2M_FUZZ_EXAMPLES", "400")), **_COMMON)
settings.load_profile(os.environ.get("S2M_FUZZ_PROFILE", "ci"))

#: Examples run in this session, per test (printed at the end of a long run).
COUNTS: dict = {}


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


def _named_error(err: Exception, names) -> None:
    """A refusal must be a ValueError/TypeError whose message names one of ``names``."""
    assert isinstance(err, (ValueError, TypeError)), repr(err)
    assert any(n in str(err) for n in names), str(err)


@st.composite
def point_sets(draw, dtype=None, min_n=1):
    """(x (B,N,D), weights (B,N) or None, K, dtype, scale) with shapes covering every
    remainder of N modulo the kernel's block of 4 points, scales over the dtype's range
    (up to just past the representable bound) and weights with zeros and extreme ratios."""
    dtype = dtype or draw(st.sampled_from([torch.float32, torch.float64]))
    b = draw(st.integers(1, 3))
    n = draw(st.integers(min_n, 13))
    d = draw(st.integers(1, 4))
    k = draw(st.integers(1, 4))
    top = math.log10(magnitude_bound(dtype, d)) + 0.5  # a little past the bound: refused
    bottom = -30.0 if dtype == torch.float32 else -150.0
    log_scale = draw(st.floats(bottom, top))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64) * 10.0**log_scale
    x = x.to(dtype)
    weights = None
    kind = draw(st.sampled_from(["none", "ones", "zeros", "extreme"]))
    if kind != "none":
        w = torch.ones(b, n, dtype=dtype)
        if kind in ("zeros", "extreme"):
            w = (torch.rand(b, n, generator=g) < 0.5).to(dtype)
            w[:, 0] = 1  # at least one point of positive weight per set
        if kind == "extreme":
            w = w * 10.0 ** torch.randint(-20, 21, (b, n), generator=g).to(dtype)
        weights = w
    return x, weights, k, dtype, 10.0**log_scale


def _finite(*ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


@hyp_seed(SESSION_SEED)
@given(data=point_sets(), n_iter=st.integers(0, 3), var_floor=st.sampled_from([0.0, 1e-3, 1.0]))
def test_fit_gmm_is_finite_and_matches_the_reference(data, n_iter, var_floor):
    _count("fit_gmm")
    x, w, k, dtype, scale = data
    gen = torch.Generator().manual_seed(0)
    try:
        gmm = s2m_ext.fit_gmm(x, weights=w, n_components=k, n_iter=n_iter, var_floor=var_floor, generator=gen)
    except (ValueError, TypeError) as err:
        _named_error(err, ["x", "weights", "var_floor"])
        return
    assert _finite(*gmm.params()), (gmm.params(), scale)
    if dtype != torch.float64 or n_iter > 1 or var_floor != 0.0 and scale < 1e-3:
        # Beyond one iteration (or with a floor that dominates tiny data) the fit is compared
        # in the existing trajectory tests; here float64 one-step agreement is the property.
        return
    ref = reference.fit_gmm(x, weights=w, n_components=k, n_iter=n_iter, var_floor=var_floor,
                            generator=torch.Generator().manual_seed(0))
    if _finite(*ref.params()):
        torch.testing.assert_close(gmm.means, ref.means, rtol=1e-9, atol=1e-9 * scale)
        # Variances are at most of the order of max|x|^2, finite in the accepted range (a
        # Python scale**2 of the largest scales would overflow).
        big = float(x.abs().max())
        torch.testing.assert_close(gmm.variances, ref.variances, rtol=1e-7, atol=1e-9 * (big * big + var_floor))
        torch.testing.assert_close(gmm.log_weights, ref.log_weights, rtol=1e-7, atol=1e-9)


@hyp_seed(SESSION_SEED)
@given(data=point_sets(), backward=st.sampled_from(["unrolled", "implicit"]))
def test_fit_gmm_gradients_are_finite(data, backward):
    _count("fit_gmm backward")
    x, w, k, dtype, scale = data
    x = x.clone().requires_grad_()
    try:
        gmm = s2m_ext.fit_gmm(x, weights=w, n_components=k, n_iter=2, var_floor=1e-3 * scale**2 if scale < 1e10 else 1e-3,
                              generator=torch.Generator().manual_seed(0), backward=backward)
    except (ValueError, TypeError) as err:
        _named_error(err, ["x", "weights", "var_floor"])
        return
    loss = (gmm.means / scale).sum() + (gmm.log_weights).sum()
    loss.backward()
    assert _finite(x.grad)


@hyp_seed(SESSION_SEED)
@given(data=point_sets(dtype=torch.float64, min_n=2))
def test_unrolled_backward_matches_autograd_through_the_reference(data):
    _count("backward vs reference")
    x, w, k, dtype, scale = data
    if scale > 1e100 or scale < 1e-100:
        return
    x = (x / scale).requires_grad_()  # well conditioned: gradients compared at unit scale
    xr = x.detach().clone().requires_grad_()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ours = s2m_ext.fit_gmm(x, weights=w, n_components=k, n_iter=2, var_floor=0.1, generator=gen())
    ref = reference.fit_gmm(xr, weights=w, n_components=k, n_iter=2, var_floor=0.1, generator=gen())
    (ours.means.sum() + ours.variances.sum() + ours.log_weights.sum()).backward()
    (ref.means.sum() + ref.variances.sum() + ref.log_weights.sum()).backward()
    if _finite(xr.grad):
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-7, atol=1e-8)


@hyp_seed(SESSION_SEED)
@given(data=point_sets(), q=st.integers(0, 13), pool=st.booleans())
def test_log_prob_is_finite_and_matches_the_reference(data, q, pool):
    _count("log_prob")
    x, _, k, dtype, scale = data
    b, _, d = x.shape
    g = torch.Generator().manual_seed(q)
    mu = (x[:, :1].expand(b, k, d) * (1 + torch.rand(b, k, d, generator=g).to(dtype))).contiguous()
    # Variances at the data's scale; at the largest scales they overflow to Inf (x * x, where
    # Python's ** would raise) and DiagGMM must refuse them.
    var_scale = max(scale, 1.0) * max(scale, 1.0)
    var = (torch.rand(b, k, d, generator=g, dtype=torch.float64) + 0.5).to(dtype) * var_scale
    lw = torch.log_softmax(torch.randn(b, k, generator=g, dtype=torch.float64), 1).to(dtype)
    z = (torch.randn(b, q, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    mu.requires_grad_()
    try:
        gmm = DiagGMM(lw, mu, var)
        out = gmm.log_prob_pool(z[0]) if pool else gmm.log_prob(z)
    except (ValueError, TypeError) as err:
        _named_error(err, ["z", "means", "variances"])
        return
    out.sum().backward()
    assert not torch.isnan(out).any() and not torch.isnan(mu.grad).any()
    if dtype == torch.float64 and q > 0:
        ref_fn = reference.log_prob_pool if pool else reference.log_prob
        ref = ref_fn(z[0] if pool else z, lw, mu.detach(), var)
        if _finite(ref):
            # The pool path expands the square (see DiagGMM.log_prob_pool): relative to |l|.
            torch.testing.assert_close(out.detach(), ref, rtol=1e-6 if pool else 1e-10, atol=1e-6 if pool else 1e-10)


@st.composite
def score_tuples(draw):
    b = draw(st.integers(1, 3))
    p = draw(st.integers(1, 9))
    q = draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    fmax = torch.finfo(dtype).max
    log_scale = draw(st.floats(-40.0 if dtype == torch.float32 else -300.0, math.log10(fmax) - 0.05))
    kind = draw(st.sampled_from(["random", "tied", "two-valued", "offset", "span"]))
    if kind == "span":  # the union of the scores spans (nearly) the whole dtype range
        log_scale = math.log10(fmax) - 0.05
    s = torch.randn(b, p + q, generator=g, dtype=torch.float64)
    if kind == "tied":
        s = torch.full_like(s, float(torch.randn(1, generator=g)))
    elif kind == "two-valued":
        s = (s > 0).double()
    elif kind == "offset":
        s = 1.0 + 1e-9 * s
    elif kind == "span":
        s[:, 0], s[:, -1] = -1.0, 1.0
    s = (s / s.abs().max().clamp_min(1e-300) * 10.0**log_scale).clamp(-fmax, fmax).to(dtype)
    return s[:, :p], s[:, p:], draw(st.integers(2, 100))


@hyp_seed(SESSION_SEED)
@given(data=score_tuples())
def test_histogram_loss_is_finite_with_bounded_gradients(data):
    _count("HistogramLoss")
    pos, neg, bins = data
    pos, neg = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    loss = HistogramLoss(bins)(pos, neg)
    loss.backward()
    assert _finite(loss, pos.grad, neg.grad)
    assert 0.0 <= loss.item() <= 1.0 + 1e-6
    # The loss is scale invariant, so |s| * |dL/ds| is bounded by the bin count over the
    # relative range width, which is at least eps (narrower ranges count as ties).
    width = torch.cat([pos, neg], 1).detach()
    mag = width.abs().amax(1, keepdim=True)
    eps = torch.finfo(pos.dtype).eps
    bound = 4.0 * bins / eps
    assert float((pos.grad.abs() * mag).max()) <= bound and float((neg.grad.abs() * mag).max()) <= bound


class _Flat(torch.nn.Module):
    """A tiny embedding of vector items: (n, F) -> (n, E)."""

    def __init__(self, f: int, e: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(f, e, dtype=torch.float64)

    def forward(self, items):
        return self.lin(items)


@hyp_seed(SESSION_SEED)
@given(
    kind=st.sampled_from(["set2model-1", "set2model-2", "avg", "nn"]),
    b=st.integers(0, 3), n=st.integers(0, 9), q=st.integers(0, 6), f=st.integers(1, 4), e=st.integers(1, 4),
    masked=st.booleans(), collapsed=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_nn_models_are_finite_or_refuse(kind, b, n, q, f, e, masked, collapsed, seed):
    _count("nn models")
    torch.manual_seed(seed)
    embed = _Flat(f, e)
    if collapsed:  # every item maps to one descriptor
        with torch.no_grad():
            embed.lin.weight.zero_()
    if kind.startswith("set2model"):
        model = Set2Model(embed, n_components=int(kind[-1]), n_iter=2, item_dims=1)
    elif kind == "avg":
        model = AvgModel(embed, item_dims=1)
    else:
        model = NNModel(embed, item_dims=1)
    model = model.double()
    concept = torch.randn(b, n, f, dtype=torch.float64)
    queries = torch.randn(b, q, f, dtype=torch.float64)
    mask = (torch.rand(b, n) < 0.7) if masked else None
    try:
        scores = model(concept, queries, concept_mask=mask)
    except (ValueError, TypeError) as err:
        _named_error(err, ["concept", "queries", "mask", "B", "N", "Q"])
        return
    assert scores.shape == (b, q)
    assert _finite(scores)
    if scores.numel():
        scores.sum().backward()
        for p in model.parameters():
            assert p.grad is None or _finite(p.grad)


def test_fuzz_profile_is_known():
    assert settings._current_profile in ("ci", "long")


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    if COUNTS:
        print("\nfuzz examples run:", sum(COUNTS.values()), COUNTS)
