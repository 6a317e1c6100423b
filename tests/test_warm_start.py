"""The training-time warm start (s2m_ext.nn.WarmStartCache and s2m-train --warm-start): a
cached concept starts EM from its last fit with the warm floor, the others fit fresh, rows
keep their order and their gradients, the cache survives a checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_train import tiny

import s2m_ext
from s2m_ext.data import EpisodeSampler, make_glyphs
from s2m_ext.nn import ConvEmbedding, GMMScorer, Set2Model, WarmStartCache
from s2m_ext.nn.checkpoint import load_checkpoint
from s2m_ext.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

B, N, D, K = 5, 12, 6, 2


def _desc(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(B, N, D, generator=g, dtype=torch.float64), dim=-1)


def _gens(seed: int):
    return [torch.Generator().manual_seed(seed + i) for i in range(B)]


def _keys(classes):
    return torch.tensor([[c, -1] for c in classes], dtype=torch.int64)


def _params(gmm):
    return gmm.log_weights, gmm.means, gmm.variances


def test_a_new_concept_is_fitted_fresh_and_a_cached_one_from_its_last_fit():
    scorer = GMMScorer(K, n_iter=4, var_floor=0.01)
    cache = WarmStartCache(var_floor=1e-6)
    first, second = _desc(1), _desc(2)
    fitted = cache.fit(scorer, first, None, _gens(10), _keys([0, 1, 2, 3, 4]))
    for a, b in zip(_params(fitted), _params(scorer.fit(first, None, _gens(10)))):
        assert torch.equal(a, b)
    assert len(cache) == B and (cache.fresh_fits, cache.warm_fits) == (B, 0)
    # Concepts 1 and 3 come back (rows 0 and 2); 7, 8, 9 are new.
    got = cache.fit(scorer, second, None, _gens(20), _keys([3, 7, 1, 8, 9]))
    warm_init = s2m_ext.DiagGMM(*(t[[3, 1]] for t in _params(fitted)))
    warm = s2m_ext.fit_gmm(second[[0, 2]], init=warm_init, n_iter=4, var_floor=1e-6)
    fresh = scorer.fit(second[[1, 3, 4]], None, [_gens(20)[i] for i in (1, 3, 4)])
    for name in ("log_weights", "means", "variances"):
        want = torch.empty_like(getattr(got, name))
        want[[0, 2]] = getattr(warm, name)
        want[[1, 3, 4]] = getattr(fresh, name)
        assert torch.equal(getattr(got, name), want), name
    assert (cache.fresh_fits, cache.warm_fits) == (B + 3, 2)
    # The warm fit is not the fresh one (other start, other floor).
    assert not torch.allclose(got.variances[0], scorer.fit(second[:1], None, _gens(20)[:1]).variances[0])
    assert torch.equal(cache._entries[(3, -1)][1], got.means[0])  # the cache holds the latest fit


def test_gradients_reach_every_row_of_a_mixed_batch():
    scorer = GMMScorer(K, n_iter=3, var_floor=0.01)
    cache = WarmStartCache()
    cache.fit(scorer, _desc(1), None, _gens(1), _keys([0, 1, 2, 3, 4]))
    desc = _desc(2).requires_grad_()
    state = cache.fit(scorer, desc, None, _gens(2), _keys([0, 9, 2, 8, 4]))
    queries = _desc(3)
    (grad,) = torch.autograd.grad(state.log_prob(queries).sum(), desc)
    # Row by row: the same fit on its own (row 0 warm from concept 0, row 1 fresh) gives the
    # same gradient.
    for row, (before, key) in enumerate(((0, 0), (1, 9))):
        alone = WarmStartCache()
        alone.fit(scorer, _desc(1)[row : row + 1], None, _gens(1)[row : row + 1], _keys([before]))
        leaf = _desc(2)[row : row + 1].requires_grad_()
        one = alone.fit(scorer, leaf, None, _gens(2)[row : row + 1], _keys([key]))
        assert alone.warm_fits == (1 if key == before else 0)
        (g_one,) = torch.autograd.grad(one.log_prob(queries[row : row + 1]).sum(), leaf)
        torch.testing.assert_close(grad[row : row + 1], g_one, rtol=1e-12, atol=1e-14)
    assert grad.abs().amax((1, 2)).gt(0).all()


def test_the_cache_round_trips_through_its_state_dict():
    scorer = GMMScorer(K, n_iter=3)
    cache = WarmStartCache(var_floor=1e-5)
    cache.fit(scorer, _desc(1), None, _gens(1), _keys([0, 1, 2, 3, 4]))
    restored = WarmStartCache(var_floor=1e-5)
    restored.load_state_dict(cache.state_dict())
    assert (len(restored), restored.fresh_fits, restored.warm_fits) == (5, 5, 0)
    a = cache.fit(scorer, _desc(2), None, _gens(2), _keys([4, 3, 2, 1, 0]))
    b = restored.fit(scorer, _desc(2), None, _gens(2), _keys([4, 3, 2, 1, 0]))
    for x, y in zip(_params(a), _params(b)):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="var_floor 1e-05"):
        WarmStartCache(var_floor=1e-6).load_state_dict(cache.state_dict())


def test_bad_uses_are_refused():
    cache = WarmStartCache()
    with pytest.raises(ValueError, match="K >= 2"):
        cache.fit(GMMScorer(1), _desc(1), None, None, _keys([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"warm_keys must be an int64 tensor of shape \(B, 2\) = \(5, 2\)"):
        cache.fit(GMMScorer(2), _desc(1), None, None, torch.zeros(5, dtype=torch.int64))
    cache.fit(GMMScorer(2), _desc(1), None, None, _keys([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="K = 3 components"):
        cache.fit(GMMScorer(3), _desc(1), None, None, _keys([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="var_floor must be a number > 0"):
        WarmStartCache(var_floor=0.0)
    model = Set2Model(ConvEmbedding(dim=8, width=8, depth=2), n_components=2)
    images = torch.rand(2, 3, 1, 28, 28)
    with pytest.raises(ValueError, match="warm_keys needs a WarmStartCache"):
        model(images, images, warm_keys=torch.zeros(2, 2, dtype=torch.int64))


def test_episode_batches_name_the_classes_of_their_concepts():
    data = make_glyphs("train", 12, 20, 0)
    batch = EpisodeSampler(data, polysemy=0.5, seed=3).batch(0, 0, 30)
    assert batch.classes.shape == (30, 2) and batch.classes.dtype == torch.int64
    assert torch.equal(batch.classes[:, 1] >= 0, batch.polysemous)
    for row in range(30):  # the relevant items are images of exactly the named classes
        relevant = set(data.labels[batch.relevant[row]].tolist())
        assert relevant == {c for c in batch.classes[row].tolist() if c >= 0}


def test_warm_started_training_resumes_exactly_and_logs_its_fits(tmp_path):
    kw = dict(scorer="gmm2", warm_start=True, steps=7, checkpoint_every=3, train_classes=6)
    straight = train(tiny(tmp_path, "straight", **kw))
    cut = tiny(tmp_path, "cut", **kw)
    assert train(cut, stop_after=5)["interrupted"]
    saved = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert saved["step"] == 3 and saved["warm_start"]["warm_fits"] > 0  # 12 tuples over 6 classes
    resumed = train(replace(cut, resume="auto"), explicit=["resume", "out"])
    assert resumed["history"] == straight["history"]
    end = [json.loads(line) for line in open(tmp_path / "straight" / "log.jsonl")][-1]
    assert end["warm_fits"] + end["fresh_fits"] == 7 * 4 and end["cached_concepts"] <= 6
    with pytest.raises(ValueError, match="--warm-start needs a mixture scorer"):
        train(tiny(tmp_path, "gauss", scorer="gauss", warm_start=True))
    with pytest.raises(ValueError, match="--objective classify fits none"):
        train(tiny(tmp_path, "pl", scorer="gmm2", objective="classify", warm_start=True))
