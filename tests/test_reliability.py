"""Regression tests for numerical edge cases: ties in the histogram loss, padded and
zero-weight rows far from every component, and inputs beyond the dtype's range."""

import math

import pytest
import torch

import s2m_ext
from s2m_ext import DiagGMM, reference
from s2m_ext.nn import HistogramLoss
from s2m_ext.nn.loss import histogram_loss

from conftest import DEVICES, DTYPES, RTOL


def test_histogram_loss_collapsed_scores_give_zero_gradient():
    # All scores of a tuple equal (a collapsed embedding): loss 1, gradient finite and 0.
    a = torch.tensor(1.0, requires_grad=True)
    s = torch.full((2, 20), 10.0)
    loss = HistogramLoss()(a * s[:, :10], a * s[:, 10:])
    loss.backward()
    assert loss.item() == 1.0
    assert a.grad.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_histogram_loss_scores_spanning_the_dtype_range(dtype):
    big = torch.finfo(dtype).max * 0.9
    s = (torch.linspace(-1, 1, 20, dtype=dtype) * big).reshape(1, 20)
    s = torch.cat([s[:, 10:], s[:, :10]], 1).requires_grad_()  # relevant above irrelevant
    loss = histogram_loss(s[:, :10], s[:, 10:])
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(s.grad).all()
    # The same scores divided by the range give the same loss (scale invariance).
    torch.testing.assert_close(histogram_loss(s[:, :10] / big, s[:, 10:] / big), loss)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_histogram_loss_refuses_non_finite_scores(bad):
    pos, neg = torch.randn(2, 5), torch.randn(2, 4)
    neg[1, 2] = bad
    with pytest.raises(ValueError, match="irrelevant must be finite"):
        histogram_loss(pos, neg)
    # Masked-out entries are not looked at.
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(histogram_loss(pos, neg, irrelevant_mask=mask))


@pytest.mark.parametrize("n", range(5, 13))
def test_fit_padding_rows_far_from_every_component_stay_finite(n):
    # Points at 1e18 collapse the variance to eps^2; the kernel's padding rows (x = 0) are
    # then farther than float32 can express from every component (log-densities all -inf).
    x = torch.full((1, n, 2), 1e18)
    x[0, n // 2 :, 0] = -1e18
    gmm = s2m_ext.fit_gmm(x, n_components=2, n_iter=3, var_floor=0.0, generator=torch.Generator().manual_seed(0))
    for t in gmm.params():
        assert torch.isfinite(t).all()
    # (No comparison with the reference here: at 1e18 in float32 with variances eps^2 the fit
    # is chaotic in the summation order; the fuzz suite compares on well-conditioned inputs.)


@pytest.mark.parametrize("q", range(1, 10))
def test_log_prob_backward_with_far_padding_rows(q):
    mu = torch.full((1, 1, 2), 1e18, requires_grad=True)
    var = torch.full((1, 1, 2), 1e-3)
    z = torch.full((1, q, 2), 1e18)
    DiagGMM(torch.zeros(1, 1), mu, var).log_prob(z).sum().backward()
    assert torch.isfinite(mu.grad).all() and mu.grad.abs().max() == 0.0


def test_zero_weight_rows_far_away_in_seeding_and_fit():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 9, 2, generator=g)
    w = torch.ones(1, 9)
    x[:, 6:] = 1e18
    w[:, 6:] = 0
    for fit in (s2m_ext.fit_gmm, reference.fit_gmm):
        gmm = fit(x, weights=w, n_components=2, n_iter=0, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(gmm.variances).all()
    xr = x.clone().requires_grad_()
    gmm = s2m_ext.fit_gmm(xr, weights=w, n_components=2, n_iter=3, var_floor=0.0, generator=torch.Generator().manual_seed(0))
    (gmm.means.sum() + gmm.variances.sum()).backward()
    assert torch.isfinite(gmm.means).all() and torch.isfinite(xr.grad).all()


def test_all_underflow_rows_get_uniform_responsibilities_in_reference():
    x = torch.tensor([[[0.0], [1e18]]])
    resp, ll = reference.e_step(x, torch.tensor([[1.0, 0.0]]), torch.log(torch.full((1, 3), 1 / 3)),
                                torch.zeros(1, 3, 1), torch.full((1, 3, 1), 1e-3))
    torch.testing.assert_close(resp[0, 1], torch.full((3,), 1 / 3))
    assert torch.isfinite(ll).all()


# (variance, far coordinate) per dtype: (far - mean)^2 / variance overflows, near ones don't.
_UNDERFLOW_SCALES = {torch.float64: (1e-20, 1e150), torch.float32: (1e-12, 1e16)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", [False, True], ids=["paired", "pool"])
def test_queries_scored_minus_inf_pass_no_gradient(device, dtype, pool):
    """A query farther from every component than the dtype can express scores -inf (the
    uniform-responsibility rule) and passes no gradient, in every backend and the reference:
    the other queries' gradients stay finite and equal to the reference's."""
    g = torch.Generator().manual_seed(torch.initial_seed())
    var_scale, far = _UNDERFLOW_SCALES[dtype]
    B, K, D, Q = 2, 3, 3, 7  # Q crosses the CPU kernels' blocks of 4
    lw = torch.log_softmax(torch.randn(B, K, generator=g, dtype=torch.float64), 1)
    # Components within a few standard deviations of each other: the near queries are near
    # every mixture (far apart, the pool's expanded form loses eps * distance^2 / variance).
    var = var_scale * (0.5 + torch.rand(B, K, D, generator=g, dtype=torch.float64))
    mu = var_scale**0.5 * torch.randn(B, K, D, generator=g, dtype=torch.float64)
    near = mu[:, :1] + var[:, :1].sqrt() * torch.randn(B, Q, D, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(B, Q, D, generator=g) < 0.5, -1.0, 1.0).double()
    is_far = torch.tensor([True, False, False, True, False, True, False])
    z = torch.where(is_far[None, :, None], far * sign, near)
    if pool:
        z = z[0]
    args = [t.to(device, dtype).requires_grad_() for t in (z, lw, mu, var)]
    op = DiagGMM(*args[1:]).log_prob_pool if pool else DiagGMM(*args[1:]).log_prob
    ref = reference.log_prob_pool if pool else reference.log_prob
    got, want = op(args[0]), ref(*args)
    assert bool((got[:, is_far] == -math.inf).all()) and bool(torch.isfinite(got[:, ~is_far]).all())
    torch.testing.assert_close(got[:, ~is_far], want[:, ~is_far], rtol=RTOL[dtype], atol=RTOL[dtype])
    w = torch.randn(got.shape, generator=g, dtype=torch.float64).to(device, dtype)
    grads = torch.autograd.grad((got.masked_fill(~got.isfinite(), 0) * w).sum(), args)
    ref_grads = torch.autograd.grad((want.masked_fill(~want.isfinite(), 0) * w).sum(), args)
    for name, a, b in zip(["z", "log_weights", "means", "variances"], grads, ref_grads):
        assert bool(torch.isfinite(b).all()), f"reference gradient of {name} not finite"
        assert bool(torch.isfinite(a).all()), f"gradient of {name} not finite"
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=RTOL[dtype], atol=RTOL[dtype] * scale, msg=lambda m, name=name: f"{name}: {m}")
    if not pool:
        assert bool((grads[0][:, is_far] == 0).all()), "a query scored -inf passed gradient to z"


def test_pool_scores_whose_expanded_terms_overflow_are_minus_inf_not_nan():
    # Components at +-1e140 with variance 1e-20: for the item at 1e150 both z . mu / v and
    # z^2 / v overflow in the CPU kernel's expanded form (Inf - Inf); the entry is recomputed
    # directly and scores -inf like the reference.
    mu = torch.tensor([[[1e140], [-1e140]]], dtype=torch.float64)
    var = torch.full((1, 2, 1), 1e-20, dtype=torch.float64)
    lw = torch.log(torch.full((1, 2), 0.5, dtype=torch.float64))
    z = torch.tensor([[1e150], [-1e150]], dtype=torch.float64)
    got = DiagGMM(lw, mu, var).log_prob_pool(z)
    assert got.tolist() == reference.log_prob_pool(z, lw, mu, var).tolist() == [[-math.inf, -math.inf]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_points_beyond_the_representable_range_are_refused(dtype):
    bound = s2m_ext._validation.magnitude_bound(dtype, 2)
    x = torch.zeros(1, 8, 2, dtype=dtype)
    # A fit also needs its weighted moments W * D * (2 max|x|)^2 finite: W = 8 here.
    x[0, 0, 0] = bound * 0.99 / math.sqrt(8)
    assert torch.isfinite(s2m_ext.fit_gmm(x, n_components=1, n_iter=1).variances).all()
    x[0, 0, 0] = bound * 0.99
    with pytest.raises(ValueError, match="total weight W = 8"):
        s2m_ext.fit_gmm(x, n_components=1, n_iter=1)
    x[0, 0, 0] = bound * 1.01
    with pytest.raises(ValueError, match=r"x must satisfy \|x\| <="):
        s2m_ext.fit_gmm(x, n_components=1, n_iter=1)
    gmm = DiagGMM(torch.zeros(1, 1, dtype=dtype), torch.zeros(1, 1, 2, dtype=dtype), torch.ones(1, 1, 2, dtype=dtype))
    # Queries are checked where their score is not finite: past the bound a query is scored
    # while its squared distances stay finite, and refused once one overflows.
    assert torch.isfinite(gmm.log_prob(x)).all() and torch.isfinite(gmm.log_prob_pool(x[0])).all()
    x[0, 0, 0] = 1.01 * math.sqrt(torch.finfo(dtype).max)
    with pytest.raises(ValueError, match=r"z must satisfy \|z\| <="):
        gmm.log_prob(x)
    with pytest.raises(ValueError, match=r"z must satisfy \|z\| <="):
        gmm.log_prob_pool(x[0])
    with pytest.raises(ValueError, match=r"means must satisfy"):
        DiagGMM(torch.zeros(1, 1, dtype=dtype), x[:, :1], torch.ones(1, 1, 2, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_query_coordinate_is_refused_wherever_it_is(dtype, bad):
    # The queries' values are checked after scoring, on the rows scored NaN or +-Inf: every
    # single bad coordinate must leave its row's score non-finite, in both scoring paths.
    B, Q, D, K = 3, 6, 5, 3
    gmm = DiagGMM(torch.log_softmax(torch.randn(B, K, dtype=dtype), 1), torch.randn(B, K, D, dtype=dtype),
                  torch.rand(B, K, D, dtype=dtype) + 0.5)
    z = torch.randn(B, Q, D, dtype=dtype)
    for b, q, d in [(0, 0, 0), (2, 5, 4), (1, 3, 2)] + [tuple(int(torch.randint(n, (1,))) for n in (B, Q, D))]:
        bad_z = z.clone()
        bad_z[b, q, d] = bad
        with pytest.raises(ValueError, match="^z must be finite"):
            gmm.log_prob(bad_z)
        with pytest.raises(ValueError, match="^z must be finite"):
            gmm.log_prob_pool(bad_z[b])


def test_var_floor_must_be_finite_in_the_dtype_of_x():
    x = torch.randn(1, 8, 2)
    with pytest.raises(ValueError, match="var_floor must be <="):
        s2m_ext.fit_gmm(x, n_components=1, var_floor=1e39)
    s2m_ext.fit_gmm(x.double(), n_components=1, var_floor=1e39)


def test_weight_totals_that_overflow_are_refused():
    x = torch.randn(1, 8, 2)
    with pytest.raises(ValueError, match="total weight"):
        s2m_ext.fit_gmm(x, weights=torch.full((1, 8), 1e38), n_components=1)
    # The same ratios scaled down fit, and the fit depends only on the ratios.
    a = s2m_ext.fit_gmm(x, weights=torch.full((1, 8), 1e30), n_components=1, n_iter=2)
    b = s2m_ext.fit_gmm(x, n_components=1, n_iter=2)
    torch.testing.assert_close(a.means, b.means)


def test_initial_variances_below_eps_squared_are_refused():
    x = torch.randn(1, 8, 2)
    init = DiagGMM(torch.zeros(1, 1), torch.zeros(1, 1, 2), torch.full((1, 1, 2), 1e-45))
    with pytest.raises(ValueError, match=r"init.variances must be >= eps\*\*2"):
        s2m_ext.fit_gmm(x, init=init, n_iter=1)


@pytest.mark.parametrize("name", ["n_components", "n_iter"])
def test_huge_counts_are_refused_naming_the_argument(name):
    with pytest.raises(ValueError, match=f"{name} must be <= 2147483647"):
        s2m_ext.fit_gmm(torch.randn(1, 8, 2), **{name: 2**63})


# ----------------------------------------------------------------------------- nn models
def _vector_models():
    from s2m_ext.nn import AvgModel, NNModel, Set2Model

    embed = torch.nn.Linear(3, 4, dtype=torch.float64)
    return [Set2Model(embed, n_components=2, n_iter=2, item_dims=1), AvgModel(embed, item_dims=1),
            NNModel(embed, item_dims=1)]


@pytest.mark.parametrize("model", _vector_models(), ids=["set2model", "avg", "nn"])
def test_models_refuse_empty_concepts_and_all_false_mask_rows_alike(model):
    q = torch.randn(2, 3, 3, dtype=torch.float64)
    for b, n in ((0, 4), (2, 0)):
        with pytest.raises(ValueError, match="B >= 1 sets of N >= 1 items"):
            model(torch.randn(b, n, 3, dtype=torch.float64), q[:b])
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"mask: every set needs at least one True entry, but set\(s\) \[1\]"):
        model(torch.randn(2, 4, 3, dtype=torch.float64), q, concept_mask=mask)
    # No queries: an empty (B, 0) score matrix, like DiagGMM.log_prob with Q = 0.
    assert model(torch.randn(2, 4, 3, dtype=torch.float64), q[:, :0]).shape == (2, 0)


@pytest.mark.parametrize("model", _vector_models(), ids=["set2model", "avg", "nn"])
def test_models_with_collapsed_embeddings_train_without_nan(model):
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.bias.fill_(0.5)
    concept, rel, irr = (torch.randn(2, n, 3, dtype=torch.float64) for n in (4, 3, 3))
    scores = model(concept, torch.cat([rel, irr], 1))
    HistogramLoss()(scores[:, :3], scores[:, 3:]).backward()
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()


# ----------------------------------------------------------------------------- programs
def _usage_error(main, argv, capsys, match):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "Traceback" not in err and match in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


@pytest.mark.parametrize(
    "flags, match",
    [(["--threads", "-1"], "--threads must be >= 1"), (["--device", "bogus"], "--device must be cpu, cuda or cuda:N"),
     (["--checkpoint-every", "-5"], "--checkpoint-every must be >= 0"),
     (["--var-floor", "1e300"], "--var-floor must be <= 3.4e+38")],
)
def test_train_bad_flags_are_usage_errors(flags, match, tmp_path, capsys):
    from s2m_ext.train import main

    _usage_error(main, ["--out", str(tmp_path / "o"), "--no-progress", *flags], capsys, match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_train_and_eval_refuse_cuda_without_cuda(tmp_path, capsys):
    from s2m_ext import eval as s2m_eval
    from s2m_ext.train import main

    _usage_error(main, ["--out", str(tmp_path / "o"), "--device", "cuda"], capsys, "no usable CUDA device")
    _usage_error(s2m_eval.main, ["--device", "cuda", str(tmp_path / "x.pt")], capsys, "no usable CUDA device")


@pytest.mark.parametrize("flags, match", [(["--threads", "-1"], "--threads must be >= 1"),
                                          (["--device", "bogus"], "--device must be"),
                                          (["--var-floor", "1e300"], "--var-floor must be a finite number in")])
def test_eval_bad_flags_are_usage_errors(flags, match, tmp_path, capsys):
    from s2m_ext import eval as s2m_eval

    _usage_error(s2m_eval.main, [*flags, str(tmp_path / "x.pt")], capsys, match)


def test_resume_with_fewer_steps_or_another_out_folder_is_refused(tmp_path, capsys):
    from s2m_ext.train import main

    run = ["--data", "glyphs", "--train-classes", "24", "--val-classes", "6", "--test-classes", "6",
           "--per-class", "20", "--tuples", "4", "--width", "8", "--depth", "2", "--dim", "8", "--threads", "1",
           "--val-every", "1000", "--no-progress"]
    assert main([*run, "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    _usage_error(main, ["--out", str(tmp_path / "a"), "--resume", "--steps", "1", "--no-progress"], capsys,
                 "--steps 1 is below the 2 steps")
    _usage_error(main, ["--resume", str(tmp_path / "a" / "last.pt"), "--out", str(tmp_path / "b"), "--no-progress"],
                 capsys, "names another folder")


@pytest.mark.parametrize("pos, neg", [(1e-39, -1.9042e-40), (1e-45, 0.0), (3e-39, 3e-39)])
def test_histogram_loss_subnormal_scores_have_finite_gradients(pos, neg):
    # Found by the fuzz suite: a tie by the sqrt(tiny) rule with subnormal float32 scores.
    p = torch.tensor([[pos]], requires_grad=True)
    n = torch.tensor([[neg]], requires_grad=True)
    loss = histogram_loss(p, n, bins=2)
    loss.backward()
    assert loss.item() == 1.0 and p.grad.item() == 0.0 and n.grad.item() == 0.0


# ----------------------------------------------------------------------------- arguments
def test_mixture_index_out_of_range_raises_index_error():
    gmm = DiagGMM(torch.zeros(3, 1), torch.zeros(3, 1, 2), torch.ones(3, 1, 2))
    with pytest.raises(IndexError, match="out of range for B = 3"):
        gmm[7]
    with pytest.raises(IndexError):
        gmm[-4]
    assert gmm[-1].batch_size == 1 and gmm[2].batch_size == 1


@pytest.mark.parametrize("kw, match", [(dict(var_floor=math.inf), "var_floor"), (dict(var_floor=True), "var_floor"),
                                       (dict(tol=math.inf), "tol")])
def test_set2model_constructor_refuses_bad_settings(kw, match):
    from s2m_ext.nn import Set2Model

    with pytest.raises(ValueError, match=match):
        Set2Model(torch.nn.Linear(3, 4), n_components=2, item_dims=1, **kw)


def test_generators_of_the_wrong_type_are_refused():
    from s2m_ext.nn import Set2Model

    model = Set2Model(torch.nn.Linear(3, 4), n_components=2, n_iter=1, item_dims=1)
    with pytest.raises(TypeError, match="generators must be None, a torch.Generator or a list"):
        model(torch.randn(2, 4, 3), torch.randn(2, 2, 3), generators=5)


@pytest.mark.parametrize("backward", ["unrolled", "implicit"])
def test_double_backward_of_the_fit_raises_instead_of_giving_zeros(backward):
    x = torch.randn(2, 12, 3, dtype=torch.float64, requires_grad=True)
    gmm = s2m_ext.fit_gmm(x, n_components=2, n_iter=30, tol=1e-10 if backward == "implicit" else 0.0,
                          generator=torch.Generator().manual_seed(0), backward=backward)
    (g,) = torch.autograd.grad(gmm.means.square().sum(), x, create_graph=True)
    assert torch.isfinite(g).all() and g.abs().sum() > 0  # the first gradient itself is unaffected
    with pytest.raises(RuntimeError, match=r"s2m::em_fit(_implicit)?_backward is not differentiable.*double backward"):
        torch.autograd.grad(g.sum(), x)


@pytest.mark.parametrize("pool", [False, True])
def test_double_backward_of_scoring_raises(pool):
    z = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    gmm = s2m_ext.fit_gmm(torch.randn(2, 9, 3, dtype=torch.float64), n_components=2)
    out = gmm.log_prob_pool(z[0]) if pool else gmm.log_prob(z)
    (g,) = torch.autograd.grad(out.sum(), z, create_graph=True)
    name = "score_pool_backward" if pool else "score_paired_backward"
    with pytest.raises(RuntimeError, match=f"s2m::{name} is not differentiable"):
        torch.autograd.grad(g.square().sum(), z)


def test_meta_tensors_give_shapes_through_every_entry_point():
    """Meta tensors (deferred initialisation, shape inference) pass the value checks, which
    have no values to read, and reach the ops' fake implementations."""
    from torch import nn

    from s2m_ext.nn import AvgModel, NNModel, Set2Model

    x = torch.empty(2, 5, 3, device="meta")
    for backward in ("unrolled", "implicit"):
        gmm = s2m_ext.fit_gmm(x, n_components=2, tol=1e-3, backward=backward)
        assert gmm.means.is_meta and gmm.means.shape == (2, 2, 3) and gmm.variances.shape == (2, 2, 3)
    assert gmm.log_prob(torch.empty(2, 4, 3, device="meta")).shape == (2, 4)
    assert gmm.log_prob_pool(torch.empty(7, 3, device="meta")).shape == (2, 7)
    mixture = DiagGMM(torch.empty(1, 2, device="meta"), torch.empty(1, 2, 3, device="meta"), torch.empty(1, 2, 3, device="meta"))
    assert mixture.log_prob(torch.empty(1, 4, 3, device="meta")).shape == (1, 4)
    for make in (lambda e: Set2Model(e, n_components=2, item_dims=1), lambda e: AvgModel(e, item_dims=1),
                 lambda e: NNModel(e, item_dims=1)):
        with torch.device("meta"):
            model = make(nn.Linear(4, 3))
            out = model(torch.empty(2, 5, 4), torch.empty(2, 6, 4), concept_mask=torch.ones(2, 5, dtype=torch.bool))
        assert out.is_meta and out.shape == (2, 6)



def test_normalisation_check_allows_the_rounding_of_many_components():
    """float32 log weights of millions of components, from log_softmax (K = 2^22: ~4e-4) or
    from a fit (K = 2^21: ~7e-4), are off their normalisation by rounding only, beyond
    sqrt(eps) = 3.5e-4: the constructor accepts them, and still refuses unnormalised ones."""
    k = 2**22
    g = torch.Generator().manual_seed(torch.initial_seed())
    lw = torch.log_softmax(3 * torch.randn(1, k, generator=g), 1)
    means, variances = torch.zeros(1, k, 1), torch.ones(1, k, 1)
    DiagGMM(lw, means, variances)
    fit = s2m_ext.fit_gmm(torch.randn(1, 64, 1, generator=g), n_components=k // 2, n_iter=1, generator=g)
    DiagGMM(fit.log_weights, fit.means, fit.variances)
    with pytest.raises(ValueError, match="log_weights must be normalised"):
        DiagGMM(lw + 0.7, means, variances)
    with pytest.raises(ValueError, match="log_weights must be normalised"):
        DiagGMM(torch.log_softmax(torch.randn(1, 3), 1) + 1e-3, torch.zeros(1, 3, 1), torch.ones(1, 3, 1))
