"""fit_gmm's per-set generators: each set's k-means++ draws are those it gets fitted alone."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

import s2m_ext


@pytest.mark.parametrize("device", DEVICES)
def test_one_generator_per_set_equals_fitting_each_set_alone(device):
    x = torch.randn(5, 13, 3, dtype=torch.float64, device=device)
    w = (torch.rand(5, 13, device=device) > 0.2).to(torch.float64)
    w[:, 0] = 1.0
    seeds = [int(s) for s in torch.randint(0, 2**31, (5,))]
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    batched = s2m_ext.fit_gmm(x, w, n_components=3, n_iter=4, generator=gens)
    for b, seed in enumerate(seeds):
        alone = s2m_ext.fit_gmm(x[b : b + 1], w[b : b + 1], n_components=3, n_iter=4,
                                generator=torch.Generator(device=device).manual_seed(seed))
        for got, want in zip(batched[b : b + 1].params(), alone.params()):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_per_set_generators_differ_from_one_shared_generator():
    # Guards against the list being ignored (or its first generator used for every set).
    x = torch.randn(4, 40, 2, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]
    per_set = s2m_ext.fit_gmm(x, n_components=4, n_iter=0, generator=gens).means
    same = s2m_ext.fit_gmm(x, n_components=4, n_iter=0, generator=[torch.Generator().manual_seed(1)] * 4).means
    shared = s2m_ext.fit_gmm(x, n_components=4, n_iter=0, generator=torch.Generator().manual_seed(1)).means
    assert not torch.equal(per_set, same)
    assert torch.equal(per_set[0], same[0])
    # A shared generator draws the whole (B, K) block at once: set 0 gets the same draws.
    assert torch.equal(shared[0], same[0])


@pytest.mark.parametrize(
    "generator, error, match",
    [
        ([torch.Generator()] * 2, ValueError, r"^generator must hold one torch.Generator per set \(B = 3\)"),
        ([torch.Generator(), 5, torch.Generator()], ValueError, r"^generator must hold one torch.Generator per set"),
        (5, TypeError, "^generator must be a torch.Generator, a list of B torch.Generators or None"),
    ],
)
def test_bad_generators_name_the_argument(generator, error, match):
    with pytest.raises(error, match=match):
        s2m_ext.fit_gmm(torch.randn(3, 6, 2), n_components=2, generator=generator)
