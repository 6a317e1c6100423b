"""Masks of the baseline scorers: padded concept items never win the NN maximum, and an
all-padding concept set gives the AVG scorer a zero (finite) mean."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from s2m_ext.nn import make_scorer


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_nn_padding_never_wins_the_maximum():
    # The padded rows hold 10x a query: as items they would be the most similar to it by far,
    # so a maximum that looked at them would return 10 instead of the true nearest similarity.
    scorer = make_scorer("nn")
    x, z = _unit(2, 6, 4, seed=0), _unit(2, 3, 4, seed=1)
    mask = torch.tensor([[True] * 6, [True, False, True, True, False, False]])
    padded = torch.where(mask.unsqueeze(-1), x, 10 * z[:, :1].expand(2, 6, 4))
    got = scorer.score(scorer.fit(padded, mask), z)
    got_pool = scorer.score_pool(scorer.fit(padded, mask), z[1])
    for b in range(2):
        kept = x[b][mask[b]]
        torch.testing.assert_close(got[b], (kept @ z[b].T).amax(0), rtol=0, atol=1e-15)
        torch.testing.assert_close(got_pool[b], (kept @ z[1].T).amax(0), rtol=0, atol=1e-15)


def test_avg_masked_mean_and_all_padding_set_refused():
    # An all-padding set is refused by every scorer alike (the masked mean never sees 0/0).
    scorer = make_scorer("avg")
    x = _unit(2, 5, 4, seed=2)
    mask = torch.tensor([[True, True, False, True, True], [True, False, False, False, False]])
    state = scorer.fit(x, mask)
    torch.testing.assert_close(state[0], x[0][mask[0]].mean(0), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(state[1], x[1, 0], rtol=0, atol=0)
    mask[1] = False
    with pytest.raises(ValueError, match="^mask: every set needs at least one True entry"):
        scorer.fit(x, mask)
