"""HistogramLoss against the brute-force fraction of mis-ordered (relevant, irrelevant) pairs."""

from __future__ import annotations

import pytest
import torch

from s2m_ext.nn import HistogramLoss, histogram_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def misordered_fraction(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per tuple: the fraction of pairs (i, j) with neg[j] >= pos[i] (brute force)."""
    return (neg.unsqueeze(1) >= pos.unsqueeze(2)).double().mean((1, 2))


def ambiguous_fraction(pos: torch.Tensor, neg: torch.Tensor, bins: int) -> torch.Tensor:
    """Per tuple: the fraction of pairs closer than two bin widths on the tuple's range.
    The histogram estimate is exact for every other pair (see the proof in the test)."""
    both = torch.cat([pos, neg], 1)
    lo, hi = both.amin(1, keepdim=True), both.amax(1, keepdim=True)
    width = 2.0 * (hi - lo) / (bins - 1)
    return ((neg.unsqueeze(1) - pos.unsqueeze(2)).abs() < width.unsqueeze(-1)).double().mean((1, 2))


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (8, 10, 10), (2, 40, 3)])
@pytest.mark.parametrize("bins", [2, 10, 100, 1000])
def test_matches_brute_force_up_to_pairs_within_two_bins(shape, bins):
    # A pair two bin widths or more apart falls in bins that are strictly ordered, so its
    # contribution sum_r k(neg, r) * sum_{r' <= r} k(pos, r') is exactly 1 or 0: the loss
    # can differ from the brute-force fraction only by the fraction of closer pairs.
    b, p, q = shape
    g = torch.Generator().manual_seed(b * 1000 + p * 10 + q + bins)
    pos = torch.randn(b, p, generator=g, dtype=torch.float64) + 0.7
    neg = torch.randn(b, q, generator=g, dtype=torch.float64) * 1.5
    loss = histogram_loss(pos, neg, bins=bins, reduction="none")
    brute = misordered_fraction(pos, neg)
    slack = ambiguous_fraction(pos, neg, bins)
    assert torch.all((loss - brute).abs() <= slack + 1e-12), (loss, brute, slack)


def test_converges_to_brute_force_as_bins_grow():
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(6, 30, generator=g, dtype=torch.float64) + 0.5
    neg = torch.randn(6, 30, generator=g, dtype=torch.float64)
    brute = misordered_fraction(pos, neg)
    errors = [(histogram_loss(pos, neg, bins=r, reduction="none") - brute).abs().max().item() for r in (5, 50, 500, 20000)]
    assert errors[-1] < 1e-3
    assert errors[-1] < errors[0]
    assert all(e1 <= e0 + 1e-3 for e0, e1 in zip(errors, errors[1:])), errors


def test_separated_scores_give_exact_zero_and_one():
    pos = torch.tensor([[5.0, 6.0, 7.0]], dtype=torch.float64)
    neg = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    assert histogram_loss(pos, neg, bins=100).item() == 0.0
    assert histogram_loss(neg, pos, bins=100).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("bins", [2, 3, 100])
@pytest.mark.parametrize("value", [0.0, 10.0, -3e38])
def test_all_equal_scores_count_as_misordered_and_are_finite(bins, value):
    pos = torch.full((2, 4), value, dtype=torch.float64, requires_grad=True)
    neg = torch.full((2, 3), value, dtype=torch.float64, requires_grad=True)
    loss = histogram_loss(pos, neg, bins=bins)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert torch.isfinite(pos.grad).all() and torch.isfinite(neg.grad).all()
    # All ties is the loss's maximum: its gradient is a subgradient of size O(1) at most
    # (0 here), never the 1/tiny of a range divided by zero.
    assert pos.grad.abs().max() <= 1.0 and neg.grad.abs().max() <= 1.0


def test_invariant_to_shift_and_scale_per_tuple():
    g = torch.Generator().manual_seed(2)
    pos = torch.randn(4, 10, generator=g, dtype=torch.float64)
    neg = torch.randn(4, 12, generator=g, dtype=torch.float64)
    a = torch.tensor([[0.5], [3.0], [100.0], [1e-3]], dtype=torch.float64)
    c = torch.tensor([[-2.0], [7.0], [0.0], [1e4]], dtype=torch.float64)
    torch.testing.assert_close(
        histogram_loss(a * pos + c, a * neg + c, reduction="none"), histogram_loss(pos, neg, reduction="none"),
        rtol=1e-9, atol=1e-12,
    )


@pytest.mark.parametrize("bins", [3, 17, 100])
def test_gradcheck_float64(bins):
    g = torch.Generator().manual_seed(bins)
    pos = (torch.randn(3, 6, generator=g, dtype=torch.float64) + 0.4).requires_grad_()
    neg = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, n: histogram_loss(p, n, bins=bins), (pos, neg))


def test_gradcheck_with_masks_float64():
    g = torch.Generator().manual_seed(5)
    pos = torch.randn(2, 6, generator=g, dtype=torch.float64).requires_grad_()
    neg = torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_()
    pm = torch.tensor([[True] * 6, [True, True, False, True, False, False]])
    nm = torch.tensor([[True, False, True, True, True], [True] * 5])
    assert torch.autograd.gradcheck(lambda p, n: histogram_loss(p, n, 20, pm, nm), (pos, neg))


def test_masked_entries_equal_dropped_entries():
    g = torch.Generator().manual_seed(3)
    pos = torch.randn(1, 8, generator=g, dtype=torch.float64)
    neg = torch.randn(1, 6, generator=g, dtype=torch.float64)
    pm = torch.tensor([[True, False, True, True, False, True, True, True]])
    nm = torch.tensor([[False, True, True, True, True, False]])
    padded = pos.masked_fill(~pm, 1e6), neg.masked_fill(~nm, -1e6)  # masked values must not matter
    got = histogram_loss(*padded, bins=50, relevant_mask=pm, irrelevant_mask=nm)
    want = histogram_loss(pos[pm].view(1, -1), neg[nm].view(1, -1), bins=50)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.autograd.grad(histogram_loss(padded[0].requires_grad_(), neg, 50, pm, None), padded[0])[0]
    assert torch.all(grad[~pm] == 0)


def test_gradient_pushes_relevant_up_and_irrelevant_down():
    pos = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    neg = torch.tensor([[0.5, 1.1, 2.5]], requires_grad=True)  # 1.0 and 1.1 share a bin
    HistogramLoss(bins=10)(pos, neg).backward()
    # Interior points only: the extremes set the range, and moving one of them rescales all.
    assert pos.grad[0, 1] < 0 and neg.grad[0, 1] > 0


def test_module_reductions_and_float32():
    pos, neg = torch.randn(4, 5), torch.randn(4, 7)
    per = HistogramLoss(bins=25, reduction="none")(pos, neg)
    assert per.shape == (4,) and per.dtype == torch.float32
    torch.testing.assert_close(HistogramLoss(bins=25)(pos, neg), per.mean())
    torch.testing.assert_close(HistogramLoss(bins=25, reduction="sum")(pos, neg), per.sum())
    torch.testing.assert_close(per.double(), histogram_loss(pos.double(), neg.double(), 25, reduction="none"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: HistogramLoss(bins=1), ValueError, "bins"),
        (lambda: HistogramLoss(reduction="max"), ValueError, "reduction"),
        (lambda: histogram_loss(torch.randn(3), torch.randn(3, 2)), ValueError, r"relevant must have shape \(B, n\)"),
        (lambda: histogram_loss(torch.randn(3, 2), torch.randn(2, 2)), ValueError, "B = 3"),
        (lambda: histogram_loss(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2)), TypeError, "floating"),
        (lambda: histogram_loss(torch.randn(2, 2), torch.randn(2, 2).double()), TypeError, "dtype"),
        (lambda: histogram_loss(torch.randn(2, 2), torch.randn(2, 2), relevant_mask=torch.zeros(2, 2, dtype=torch.bool)),
         ValueError, "at least one valid"),
        (lambda: histogram_loss(torch.randn(2, 2), torch.randn(2, 2), relevant_mask=torch.ones(2, 3, dtype=torch.bool)),
         ValueError, "mask of relevant"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def loss_from_the_definition(pos, neg, bins: int) -> float:
    """The histogram loss of one tuple in plain Python floats, written from its definition
    (independent of the library's tensor code): positions t = (s - lo) / (hi - lo) on the
    range of the union, centres r / (R - 1), triangular kernel max(0, 1 - |t (R - 1) - r|),
    normalised histograms, L = sum_r h-_r sum_{r' <= r} h+_r'."""
    lo, hi = min(pos + neg), max(pos + neg)

    def hist(scores):
        h = [0.0] * bins
        for s in scores:
            t = (s - lo) / (hi - lo)
            for r in range(bins):
                h[r] += max(0.0, 1.0 - abs(t * (bins - 1) - r)) / len(scores)
        return h

    h_pos, h_neg = hist(pos), hist(neg)
    return sum(h_neg[r] * sum(h_pos[: r + 1]) for r in range(bins))


@pytest.mark.parametrize("bins", [2, 3, 10, 100])
def test_range_ends_fill_the_first_and_last_bin(bins):
    """The lowest score of a tuple lies on the first centre and the highest on the last, so a
    relevant score at the top and an irrelevant one at the bottom give exactly 0 (the reverse
    exactly 1), for any R; a middle irrelevant score at t = 1/2 between them gives the value
    worked out by hand from the kernel."""
    pos = torch.tensor([[4.0], [-1.0]], dtype=torch.float64)
    neg = torch.tensor([[-1.0], [4.0]], dtype=torch.float64)
    assert histogram_loss(pos, neg, bins=bins, reduction="none").tolist() == [0.0, 1.0]
    # relevant {lo, hi}: h+ = (1/2 at the first centre, 1/2 at the last); irrelevant at t = 1/2.
    # Odd R: on the middle centre (R - 1)/2, where cumsum(h+) = 1/2: L = 1/2. Even R: split
    # 1/2, 1/2 between the two centres around it, where cumsum(h+) = 1/2 too (R >= 4), or
    # 1/2 and 1 (R = 2: the second centre is the last): L = 3/4.
    want = 0.75 if bins == 2 else 0.5
    got = histogram_loss(torch.tensor([[0.0, 2.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64), bins=bins)
    assert got.item() == pytest.approx(want, abs=1e-12)
    # Relevant {0, R - 1} (t = 0 and 1), irrelevant R - 3/2, halfway between the last two
    # centres: h- = 1/2 on each, where cumsum(h+) = 1/2 and 1 (the top relevant score fills
    # the last bin): L = 3/4 for every R.
    got = histogram_loss(torch.tensor([[0.0, bins - 1.0]], dtype=torch.float64),
                         torch.tensor([[bins - 1.5]], dtype=torch.float64), bins=bins)
    assert got.item() == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize("bins", [2, 3, 10])
def test_matches_the_definition_computed_independently(bins):
    """Against the loss computed from its definition in plain Python: exact to rounding, for
    few bins too, where the two-bin-widths bound of the brute-force comparison allows any
    value (at R = 2 every pair is closer than two bin widths)."""
    g = torch.Generator().manual_seed(bins)
    pos = torch.randn(4, 5, generator=g, dtype=torch.float64) + 0.5
    neg = torch.randn(4, 6, generator=g, dtype=torch.float64)
    got = histogram_loss(pos, neg, bins=bins, reduction="none")
    for b in range(4):
        assert got[b].item() == pytest.approx(loss_from_the_definition(pos[b].tolist(), neg[b].tolist(), bins), abs=1e-12)
