"""Set2Model, the baselines and the scorers: values, gradients, masks, batching, compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import s2m_ext
from s2m_ext.nn import (
    AvgModel, AvgScorer, ConceptModel, ConvEmbedding, GMMScorer, HistogramLoss, NNModel, NNScorer, Set2Model,
    build_model, display_name, make_scorer,
)

from conftest import DEVICES


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_embed(dim: int = 8) -> ConvEmbedding:
    return ConvEmbedding(dim=dim, width=8, depth=2, groups=4)


def desc(b: int, n: int, d: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, n, d, generator=g, dtype=dtype), dim=-1)


# ----------------------------------------------------------------------------- scorers
def test_gauss_scorer_is_the_closed_form_gaussian():
    x, z = desc(3, 7, 5), desc(3, 4, 5, seed=1)
    scorer = GMMScorer(1, var_floor=0.01)
    state = scorer.fit(x)
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True) + 0.01
    want = torch.distributions.Normal(mean, var.sqrt()).log_prob(z).sum(-1)
    torch.testing.assert_close(scorer.score(state, z), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [2, 3])
def test_gmm_scorer_matches_reference_fit(k):
    x, z = desc(4, 10, 6), desc(4, 5, 6, seed=1)
    scorer = GMMScorer(k, n_iter=5, var_floor=0.01)
    got = scorer.score(scorer.fit(x, generators=torch.Generator().manual_seed(3)), z)
    ref = s2m_ext.reference.fit_gmm(x, n_components=k, n_iter=5, var_floor=0.01, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, ref.log_prob(z), rtol=1e-9, atol=1e-9)


def test_per_set_generators_make_fits_independent_of_batching():
    x = desc(5, 10, 4)
    scorer = GMMScorer(3, n_iter=4)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(5)]  # noqa: E731
    whole = scorer.fit(x, generators=gens())
    for i in range(5):
        alone = scorer.fit(x[i : i + 1], generators=[gens()[i]])
        torch.testing.assert_close(alone.means, whole.means[i : i + 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="one torch.Generator per concept set"):
        scorer.fit(x, generators=gens()[:2])


@pytest.mark.parametrize("name", ["gauss", "gmm2", "avg", "nn"])
def test_mask_equals_dropping_padded_items(name):
    scorer = make_scorer(name, n_iter=3)
    x, z = desc(2, 8, 5), desc(2, 6, 5, seed=1)
    mask = torch.tensor([[True] * 8, [True, True, True, False, True, True, False, False]])
    padded = x.masked_fill(~mask.unsqueeze(-1), 0.3)  # padding values must not matter
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    got = scorer.score(scorer.fit(padded, mask, gens()), z)
    for b in range(2):
        kept = x[b][mask[b]].unsqueeze(0)
        if name == "gmm2":
            # k-means++ draws depend on the padded layout: fit the kept items from the same
            # initial model, the one the scorer's per-set generator gives the padded set.
            init = s2m_ext.fit_gmm(padded[b : b + 1], mask[b : b + 1].double(), n_components=2, n_iter=0,
                                   var_floor=scorer.var_floor, generator=gens()[b])
            fit = s2m_ext.fit_gmm(kept, None, n_iter=3, init=init, var_floor=scorer.var_floor)
            want = scorer.score(fit, z[b : b + 1])
        else:
            want = scorer.score(scorer.fit(kept, None, [gens()[b]]), z[b : b + 1])
        torch.testing.assert_close(got[b : b + 1], want, rtol=1e-10, atol=1e-10)


def test_masked_gmm_equals_weighted_fit():
    x, z = desc(2, 8, 5), desc(2, 6, 5, seed=1)
    mask = torch.tensor([[True] * 8, [True, True, True, False, True, True, False, False]])
    scorer = GMMScorer(2, n_iter=4)
    got = scorer.score(scorer.fit(x, mask, torch.Generator().manual_seed(0)), z)
    want = s2m_ext.fit_gmm(x, mask.double(), 2, 4, var_floor=0.01, generator=torch.Generator().manual_seed(0)).log_prob(z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_avg_and_nn_scorers():
    x, z = desc(3, 6, 4), desc(3, 5, 4, seed=1)
    avg, nn_ = AvgScorer(), NNScorer()
    torch.testing.assert_close(avg.score(avg.fit(x), z), (z * x.mean(1, keepdim=True)).sum(-1))
    brute = torch.tensor([[max(float(z[b, q] @ x[b, n]) for n in range(6)) for q in range(5)] for b in range(3)], dtype=torch.float64)
    torch.testing.assert_close(nn_.score(nn_.fit(x), z), brute.to(z.dtype), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["gauss", "gmm2", "avg", "nn"])
def test_pool_scores_equal_paired_scores(name):
    scorer = make_scorer(name, n_iter=3)
    x, pool = desc(3, 7, 5), desc(1, 9, 5, seed=1)[0]
    state = scorer.fit(x, generators=torch.Generator().manual_seed(0))
    paired = scorer.score(state, pool.unsqueeze(0).expand(3, -1, -1).contiguous())
    torch.testing.assert_close(scorer.score_pool(state, pool), paired, rtol=1e-9, atol=1e-9)


def test_make_scorer_names():
    assert make_scorer("gauss").n_components == 1 and make_scorer("gmm4").n_components == 4
    assert isinstance(make_scorer("avg"), AvgScorer) and isinstance(make_scorer("nn"), NNScorer)
    assert [display_name(n) for n in ("gauss", "gmm2", "avg", "nn")] == ["S2M-Gauss", "S2M-GMM2", "AVG-FT", "NN-FT"]
    with pytest.raises(ValueError, match="unknown scorer 'svr'"):
        make_scorer("svr")
    with pytest.raises(ValueError, match="scorer 'svm' needs negatives"):
        make_scorer("svm")
    with pytest.raises(ValueError, match="var_floor"):
        GMMScorer(1, var_floor=0.0)


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("model_cls, kwargs", [(Set2Model, {"n_components": 1}), (Set2Model, {"n_components": 2, "n_iter": 3}),
                                               (AvgModel, {}), (NNModel, {})])
def test_gradients_reach_concept_and_query_images(model_cls, kwargs):
    torch.manual_seed(0)
    model = model_cls(tiny_embed(), **kwargs).double()
    concept = torch.rand(2, 6, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    queries = torch.rand(2, 8, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    scores = model(concept, queries, generators=[torch.Generator().manual_seed(i) for i in range(2)])
    assert scores.shape == (2, 8)
    # Every image influences a generic smooth objective of the scores (the histogram loss
    # is flat for scores that share no bin with the other side, so it is checked below).
    weights = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (scores * weights).sum().backward(retain_graph=True)
    for name, t in (("concept", concept), ("queries", queries)):
        per_set = t.grad.abs().flatten(2).sum(-1)
        assert torch.isfinite(t.grad).all()
        if model_cls is NNModel and name == "concept":
            # NN's score is a max: only the nearest concept example of some query is reached.
            assert (per_set.sum(1) > 0).all()
            continue
        assert (per_set > 0).all(), f"no gradient for some {name} images: {per_set}"
    model.zero_grad()
    HistogramLoss(bins=10)(scores[:, :4], scores[:, 4:]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_set2model_gauss_image_gradients_match_finite_differences():
    # Through the CNN, the closed-form Gaussian fit and the scoring, for concept and queries.
    torch.manual_seed(0)
    model = Set2Model(tiny_embed(4), n_components=1).double()
    concept = torch.rand(1, 3, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    queries = torch.rand(1, 2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, q: model(c, q), (concept, queries), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 3])
def test_gmm_gradients_equal_autograd_through_reference_em(k):
    # For K > 1 the k-means++ initial model is a constant (as in the core API), so the exact
    # gradient is that of T EM steps from that initial model: the reference computes it
    # with plain autograd.
    x = desc(3, 9, 5).requires_grad_()
    z = desc(3, 4, 5, seed=1).requires_grad_()
    seeds = [11, 12, 13]
    scorer = GMMScorer(k, n_iter=4, var_floor=0.01)
    out = scorer.score(scorer.fit(x, generators=[torch.Generator().manual_seed(s) for s in seeds]), z)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gx, gz = torch.autograd.grad((out * w).sum(), (x, z))

    inits = [s2m_ext.fit_gmm(x[i : i + 1].detach(), n_components=k, n_iter=0, var_floor=0.01,
                             generator=torch.Generator().manual_seed(s)) for i, s in enumerate(seeds)]
    init = s2m_ext.DiagGMM(*(torch.cat(t) for t in zip(*(g.params() for g in inits))))
    ref = s2m_ext.reference.fit_gmm(x, init=init, n_iter=4, var_floor=0.01)
    ref_out = s2m_ext.reference.log_prob(z, *ref.params())
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    rx, rz = torch.autograd.grad((ref_out * w).sum(), (x, z))
    torch.testing.assert_close(gx, rx, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gz, rz, rtol=1e-8, atol=1e-10)


def test_implicit_backward_equals_unrolled_at_convergence():
    # Fitted to convergence, the gradient of the optimum (implicit) equals the gradient of
    # the iterations that reached it (unrolled): s2m_ext.implicit's contract, here through
    # the scorer's generators, masks and scores.
    x = desc(3, 12, 4).requires_grad_()
    z = desc(3, 5, 4, seed=1)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 9:] = False
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = {}
    for backward in ("unrolled", "implicit"):
        scorer = GMMScorer(2, n_iter=400, var_floor=0.01, tol=1e-13, backward=backward)
        gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
        state = scorer.fit(x, mask, generators=gens)
        assert bool(state.converged.all())
        (grads[backward],) = torch.autograd.grad((scorer.score(state, z) * w).sum(), x)
    torch.testing.assert_close(grads["implicit"], grads["unrolled"], rtol=1e-6, atol=1e-9)
    assert grads["implicit"][1, 9:].abs().max() == 0  # padded items get no gradient


def test_gmm_scorer_rejects_bad_settings():
    with pytest.raises(ValueError, match="backward must be one of"):
        GMMScorer(2, backward="exact")
    with pytest.raises(ValueError, match="tol must be a number >= 0"):
        GMMScorer(2, tol=-1.0)
    scorer = make_scorer("gmm3", n_iter=50, tol=1e-4, backward="implicit")
    assert (scorer.n_iter, scorer.tol, scorer.backward) == (50, 1e-4, "implicit")


def test_forward_equals_embed_fit_score():
    torch.manual_seed(0)
    model = Set2Model(tiny_embed(), n_components=2, n_iter=4).double()
    concept = torch.rand(3, 5, 1, 12, 12, dtype=torch.float64)
    queries = torch.rand(3, 4, 1, 12, 12, dtype=torch.float64)
    got = model(concept, queries, generators=torch.Generator().manual_seed(1))
    state = model.fit(model.embed_items(concept), generators=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, model.score(state, model.embed_items(queries)), rtol=1e-12, atol=1e-12)
    d = model.embed_items(concept)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(3, 5, dtype=torch.float64))


def test_vector_items_with_an_mlp_embedding():
    model = Set2Model(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)), item_dims=1)
    scores = model(torch.randn(2, 5, 6), torch.randn(2, 3, 6))
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()


def test_bad_model_input():
    model = AvgModel(tiny_embed())
    with pytest.raises(ValueError, match="at least 5 dimensions"):
        model(torch.rand(5, 1, 12, 12), torch.rand(2, 3, 1, 12, 12))
    with pytest.raises(ValueError, match="batch size and item shape"):
        model(torch.rand(2, 5, 1, 12, 12), torch.rand(3, 3, 1, 12, 12))
    with pytest.raises(TypeError, match="embed must be a torch.nn.Module"):
        ConceptModel(lambda x: x, AvgScorer())
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model(torch.rand(2, 5, 1, 12, 12), torch.rand(2, 3, 1, 12, 12), concept_mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("name", ["gauss", "gmm2", "avg", "nn"])
def test_torch_compile_matches_eager(name):
    torch.manual_seed(0)
    model = build_model(name, {"dim": 8, "width": 8, "depth": 2, "groups": 4}, n_iter=3)
    concept, queries = torch.rand(2, 6, 1, 12, 12), torch.rand(2, 5, 1, 12, 12)
    torch.manual_seed(1)
    eager = model(concept, queries)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=name in ("gauss", "avg", "nn"))
    torch.manual_seed(1)
    got = compiled(concept, queries)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gauss", "gmm2"])
def test_runs_on_device(device, name):
    torch.manual_seed(0)
    model = build_model(name, {"dim": 8, "width": 8, "depth": 2, "groups": 4}, n_iter=3).to(device)
    concept, queries = torch.rand(2, 6, 1, 12, 12, device=device), torch.rand(2, 5, 1, 12, 12, device=device)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    scores = model(concept, queries, generators=gens)
    scores.sum().backward()
    assert scores.device.type == device and torch.isfinite(scores).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # Independent of the device's kernels: the same descriptors, fitted and scored by the
    # plain-PyTorch reference in float64 on the CPU from the same per-set k-means++ draws.
    with torch.no_grad():
        desc_c, desc_q = (model.embed_items(t.flatten(0, 1)).reshape(2, t.shape[1], -1).cpu().double()
                          for t in (concept, queries))
    k = model.scorer.n_components
    want = torch.cat([
        s2m_ext.reference.fit_gmm(desc_c[b : b + 1], n_components=k, n_iter=1 if k == 1 else 3,
                                  var_floor=model.scorer.var_floor,
                                  generator=torch.Generator().manual_seed(b)).log_prob(desc_q[b : b + 1])
        for b in range(2)
    ])
    torch.testing.assert_close(scores.detach().cpu().double(), want, rtol=1e-3, atol=1e-3)
