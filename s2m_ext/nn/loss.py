"""The histogram loss (Ustinova and Lempitsky, NIPS 2016) as used by Set2Model.

Per tuple, the scores of the relevant items s+ and of the irrelevant items s- are placed on
the common range [min, max] of their union, spread over R evenly spaced bin centres with a
triangular (linear) kernel, and normalised into histograms h+ and h-. The loss

    L = sum_r h-_r * cumsum(h+)_r

is a smooth estimate of P(s- >= s+), the fraction of mis-ordered (relevant, irrelevant)
pairs: exact for every pair whose two scores are at least two bin widths apart.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .._validation import value_checks_enabled

__all__ = ["HistogramLoss", "histogram_loss"]


def _check_scores(scores: Tensor, name: str, mask: Optional[Tensor], batch: Optional[int]) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, n), got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"{name} must have shape (B, n), got a {scores.dim()}-D tensor of shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {scores.dtype}")
    if batch is not None and scores.shape[0] != batch:
        raise ValueError(f"{name} must hold B = {batch} tuples like the relevant scores, got {scores.shape[0]}")
    if scores.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one score per tuple, got shape {tuple(scores.shape)}")
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != scores.shape:
        raise ValueError(f"the mask of {name} must be a bool tensor of shape {tuple(scores.shape)}")
    elif mask.device != scores.device:
        raise ValueError(f"the mask of {name} must be on {scores.device}, got {mask.device}")
    if value_checks_enabled():
        lo, hi = torch.aminmax(torch.where(mask, scores.detach(), torch.zeros_like(scores)))
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ValueError(f"{name} must be finite where its mask is True: it holds NaN or Inf")
    if not bool(mask.any(1).all()):
        raise ValueError(f"every tuple needs at least one valid entry in {name}; a row of its mask is all False")
    return mask


def _soft_histogram(t: Tensor, mask: Tensor, bins: int) -> Tensor:
    """Normalised triangular-kernel histograms over ``bins`` centres 0, 1/(R-1), ..., 1.
    t (B, n) in [0, 1], mask (B, n) -> (B, R)."""
    centres = torch.arange(bins, dtype=t.dtype, device=t.device)
    weights = (1.0 - (t.unsqueeze(-1) * (bins - 1) - centres).abs()).clamp_min(0.0)  # (B, n, R)
    weights = weights * mask.unsqueeze(-1).to(t.dtype)
    return weights.sum(1) / mask.sum(1, keepdim=True).to(t.dtype)


def histogram_loss(
    relevant: Tensor,
    irrelevant: Tensor,
    bins: int = 100,
    relevant_mask: Optional[Tensor] = None,
    irrelevant_mask: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tensor:
    """Histogram loss of B tuples; see :class:`HistogramLoss`.

    Args:
        relevant: (B, P) scores of the relevant items (higher = more relevant).
        irrelevant: (B, Q) scores of the irrelevant items.
        bins: R >= 2 bin centres per tuple.
        relevant_mask, irrelevant_mask: optional (B, P) / (B, Q) bool masks of the valid
            entries of ragged tuples (each row needs at least one True).
        reduction: ``"mean"`` over tuples (default), ``"sum"`` or ``"none"`` (B,).
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    pos_mask = _check_scores(relevant, "relevant", relevant_mask, None)
    neg_mask = _check_scores(irrelevant, "irrelevant", irrelevant_mask, relevant.shape[0])
    if irrelevant.dtype != relevant.dtype:
        raise TypeError(f"irrelevant must have the dtype of relevant ({relevant.dtype}), got {irrelevant.dtype}")

    # The common range of the union of each tuple's valid scores. The loss depends only on
    # the positions (s - lo) / (hi - lo), so it is invariant to a shift or scale of a tuple's
    # scores, and gradients through lo and hi are part of the exact derivative.
    inf = torch.tensor(float("inf"), dtype=relevant.dtype, device=relevant.device)
    lo = torch.minimum(
        torch.where(pos_mask, relevant, inf).amin(1), torch.where(neg_mask, irrelevant, inf).amin(1)
    ).unsqueeze(1)
    hi = torch.maximum(
        torch.where(pos_mask, relevant, -inf).amax(1), torch.where(neg_mask, irrelevant, -inf).amax(1)
    ).unsqueeze(1)
    # Positions are computed on the scores divided by their magnitude c = max(|lo|, |hi|), so
    # that hi - lo cannot overflow (scores spanning +-3e38 in float32). A tuple whose range
    # is at rounding level (width <= eps c) or too small for 1/width to stay finite in every
    # gradient (width < sqrt(tiny)) counts as all ties: every pair mis-ordered (loss 1), with
    # position 0 and zero gradient (a subgradient of the flat top of the loss), not 0/0.
    fi = torch.finfo(relevant.dtype)
    mag = torch.maximum(lo.abs(), hi.abs())
    with torch.no_grad():
        m = torch.where(mag > 0, mag, torch.ones_like(mag))
        w = hi / m - lo / m  # in [0, 2]
        tied = ~((w > fi.eps) & (w * m >= math.sqrt(fi.tiny)))
    # Tied rows divide by 1, not by their magnitude: their (unused) branch must not carry
    # a gradient like s / mag**2 that overflows for subnormal scores (0 * Inf in backward).
    scale = torch.where(tied, torch.ones_like(mag), mag)
    width = hi / scale - lo / scale
    safe_width = torch.where(tied, torch.ones_like(width), width)

    def positions(s: Tensor, mask: Tensor) -> Tensor:
        t = (s / scale - lo / scale) / safe_width
        return torch.where(mask & ~tied, t, torch.zeros_like(t))

    t_pos = positions(relevant, pos_mask)
    t_neg = positions(irrelevant, neg_mask)

    h_pos = _soft_histogram(t_pos, pos_mask, bins)
    h_neg = _soft_histogram(t_neg, neg_mask, bins)
    loss = (h_neg * h_pos.cumsum(1)).sum(1)  # (B,)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class HistogramLoss(nn.Module):
    """Histogram loss over a batch of (relevant, irrelevant) score tuples.

    ``HistogramLoss(bins=100)(relevant (B, P), irrelevant (B, Q))`` -> scalar: the mean over
    the B tuples of ``sum_r h-_r * cumsum(h+)_r``, where h+ and h- are the triangular-kernel
    histograms of the tuple's relevant and irrelevant scores on R = ``bins`` evenly spaced
    centres spanning the range of their union. It estimates the fraction of (relevant,
    irrelevant) pairs ranked in the wrong order (ties count as wrong); the estimate is exact
    for every pair whose scores are two bin widths or more apart. Differentiable with respect
    to both score tensors. Optional bool masks (B, P) and (B, Q) mark the valid entries of
    ragged tuples.
    """

    def __init__(self, bins: int = 100, reduction: str = "mean") -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {bins!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.bins = bins
        self.reduction = reduction

    def forward(
        self,
        relevant: Tensor,
        irrelevant: Tensor,
        relevant_mask: Optional[Tensor] = None,
        irrelevant_mask: Optional[Tensor] = None,
    ) -> Tensor:
        return histogram_loss(relevant, irrelevant, self.bins, relevant_mask, irrelevant_mask, self.reduction)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, reduction={self.reduction!r}"
