"""The one-vs-rest linear SVM scorer (the paper's SVM baseline): shapes, masks, separable data,
agreement with scikit-learn's LinearSVC and the refusal of bad arguments."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import functional as F

from s2m_ext.nn import SVMScorer, make_scorer
from s2m_ext.nn.fewshot import classify

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(*shape: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_svm_shapes_and_paired_equals_pool(dtype):
    g = torch.Generator().manual_seed(torch.initial_seed())
    scorer = make_scorer("svm", negatives=_unit(30, 5, g=g, dtype=dtype))
    desc, queries = _unit(3, 4, 5, g=g, dtype=dtype), _unit(3, 7, 5, g=g, dtype=dtype)
    w, b = scorer.fit(desc)
    assert w.shape == (3, 5) and b.shape == (3,) and w.dtype == dtype
    paired, pool = scorer.score(scorer.fit(desc), queries), scorer.score_pool(scorer.fit(desc), queries[0])
    assert paired.shape == (3, 7) and pool.shape == (3, 7)
    assert torch.isfinite(paired).all() and torch.isfinite(pool).all()
    # Row 0 of the paired scores is set 0 against queries[0]: the pool scores of row 0.
    torch.testing.assert_close(paired[0], pool[0])


def test_svm_mask_equals_fitting_the_unpadded_set():
    g = torch.Generator().manual_seed(torch.initial_seed())
    neg = _unit(40, 6, g=g)
    scorer = SVMScorer(neg)
    desc = _unit(2, 5, 6, g=g)
    mask = torch.tensor([[True] * 5, [True, False, True, False, False]])
    padded = desc.clone()
    padded[1, ~mask[1]] = 3 * neg[0]  # padding that would pull the SVM if it were counted
    w, b = scorer.fit(padded, mask)
    w1, b1 = scorer.fit(desc[1:2, mask[1]])
    # float64 and a Newton solve to rounding: the two fits agree to ~1e-15 relative.
    torch.testing.assert_close(w[1], w1[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b[1], b1[0], rtol=1e-10, atol=1e-12)


def test_svm_ranks_separable_data_perfectly():
    # Each concept is a tight cluster; the negatives are the other clusters and random points.
    g = torch.Generator().manual_seed(torch.initial_seed())
    centres = torch.eye(4, dtype=torch.float64)
    sets = F.normalize(centres[:, None] + 0.05 * torch.randn(4, 6, 4, generator=g, dtype=torch.float64), dim=-1)
    others = F.normalize(torch.randn(50, 4, generator=g, dtype=torch.float64).abs() + 0.3, dim=-1)
    negatives = torch.cat([sets[:2].reshape(-1, 4), others])  # clusters 0 and 1 also appear as negatives
    scorer = SVMScorer(negatives, C=10.0)
    pool_rel = F.normalize(centres[2:] [:, None] + 0.05 * torch.randn(2, 5, 4, generator=g, dtype=torch.float64), dim=-1)
    pool = torch.cat([pool_rel.reshape(-1, 4), others])
    scores = scorer.score_pool(scorer.fit(sets[2:]), pool)  # concepts 2 and 3
    for c in range(2):
        relevant = torch.zeros(pool.shape[0], dtype=torch.bool)
        relevant[5 * c : 5 * c + 5] = True
        assert scores[c, relevant].min() > scores[c, ~relevant].max(), c
    # The same in few-shot classification: every query goes to its own class.
    labels = torch.arange(4).repeat_interleave(6)
    queries = F.normalize(centres + 0.02, dim=-1)
    assert classify(scorer, sets.reshape(-1, 4), labels, queries).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("C", [0.1, 1.0, 10.0])
def test_svm_agrees_with_sklearn_linearsvc(C):
    svm = pytest.importorskip("sklearn.svm")
    g = torch.Generator().manual_seed(torch.initial_seed())
    B, N, M, D = 3, 10, 80, 16
    desc, neg, queries = _unit(B, N, D, g=g), _unit(M, D, g=g), _unit(40, D, g=g)
    scorer = SVMScorer(neg, C=C)
    state = scorer.fit(desc)
    ours = scorer.score_pool(state, queries)
    for b in range(B):
        x = torch.cat([desc[b], neg]).numpy()
        y = [1] * N + [-1] * M
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # liblinear may still call tol=1e-10 unmet; it is far below ours
            ref = svm.LinearSVC(C=C, loss="squared_hinge", penalty="l2", intercept_scaling=1.0, tol=1e-10,
                                max_iter=200_000).fit(x, y)
        want = torch.as_tensor(ref.decision_function(queries.numpy()))
        # Both solve the same strictly convex problem in float64; liblinear's dual coordinate
        # descent stops at tol 1e-10 on the dual gap, which bounds the primal error ~1e-6
        # relative to the scores' scale (~1), while our Newton solve is exact to rounding.
        torch.testing.assert_close(ours[b], want, rtol=0, atol=1e-6)
        torch.testing.assert_close(state[0][b], torch.as_tensor(ref.coef_[0]), rtol=0, atol=1e-6)
        assert torch.equal(torch.argsort(ours[b], descending=True)[:10], torch.argsort(want, descending=True)[:10])


def test_svm_is_deterministic_and_finite_on_duplicates():
    # Every positive also a negative: no separating plane, still a unique finite optimum.
    g = torch.Generator().manual_seed(torch.initial_seed())
    desc = _unit(2, 4, 3, g=g)
    scorer = SVMScorer(desc.reshape(-1, 3), C=1e3)
    w1, b1 = scorer.fit(desc)
    w2, b2 = scorer.fit(desc)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert torch.isfinite(w1).all() and torch.isfinite(b1).all()


def test_svm_refuses_bad_arguments():
    neg = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="^negatives must be an \\(M, D\\) tensor"):
        SVMScorer(torch.zeros(5))
    with pytest.raises(ValueError, match="^negatives must be an \\(M, D\\) tensor"):
        SVMScorer(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="^negatives must be floating point"):
        SVMScorer(torch.zeros(5, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="^negatives must be finite"):
        SVMScorer(torch.tensor([[0.0, float("nan"), 0.0]]))
    for bad in (0.0, -1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="^C must be a number > 0"):
            SVMScorer(neg, C=bad)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="^n_iter must be an int >= 1"):
            SVMScorer(neg, n_iter=bad)
    with pytest.raises(ValueError, match="negatives have D = 3, the concept descriptors D = 4"):
        SVMScorer(neg).fit(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="^concept descriptors must be a \\(B, N, D\\)"):
        SVMScorer(neg).fit(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="scorer 'svm' needs negatives"):
        make_scorer("svm")
