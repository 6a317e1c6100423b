"""Few-shot classification, the paper's second protocol (its Table 2): in an N-way K-shot
episode, N held-out classes each give K support images and some query images; each
class's support set is fitted by a scorer, and a query goes to the class whose model scores
it highest. (Omniglot's rotations by multiples of 90 degrees are classes of their own in
the data, so they enter episodes as such.)"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .scorers import SetScorer

__all__ = ["classify", "sample_episode", "episode_accuracy"]


def classify(scorer: SetScorer, support: Tensor, support_labels: Tensor, queries: Tensor,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """Predicted labels of ``queries`` from labelled support descriptors.

    Args:
        scorer: any :class:`~s2m_ext.nn.SetScorer` (e.g. ``make_scorer("gauss")``).
        support: (S, D) support descriptors.
        support_labels: (S,) int64 labels; each distinct label is one class, whatever its
            number of support items (classes with fewer items are padded and masked).
        queries: (Q, D) descriptors to classify.
        generator: for the scorer's fit (k-means++ draws of mixture scorers).

    Returns:
        (Q,) int64: for each query, the label whose model scores it highest (ties go to the
        smaller label).
    """
    if support.dim() != 2 or queries.dim() != 2 or queries.shape[1] != support.shape[1]:
        raise ValueError(f"support and queries must be (S, D) and (Q, D) descriptors, "
                         f"got {tuple(support.shape)} and {tuple(queries.shape)}")
    if support_labels.shape != (support.shape[0],) or support_labels.dtype != torch.int64:
        raise ValueError(f"support_labels must be an int64 tensor of shape ({support.shape[0]},), got "
                         f"{support_labels.dtype} {tuple(support_labels.shape)}")
    if support.shape[0] == 0:
        raise ValueError("support must hold at least one item")
    classes, inverse, counts = torch.unique(support_labels, return_inverse=True, return_counts=True)
    n_classes, most = classes.numel(), int(counts.max())
    # (C, most) slots, class c's items first in their given order, the rest masked out.
    order = torch.argsort(inverse, stable=True)
    slot = torch.arange(support.shape[0], device=support.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)
    sets = support.new_zeros(n_classes, most, support.shape[1])
    mask = torch.zeros(n_classes, most, dtype=torch.bool, device=support.device)
    sets[inverse[order], slot] = support[order]
    mask[inverse[order], slot] = True
    state = scorer.fit(sets, None if bool(mask.all()) else mask, generator)
    scores = scorer.score_pool(state, queries)  # (C, Q)
    return classes[scores.argmax(0)]


def sample_episode(labels: Tensor, ways: int, shots: int, queries_per_class: int,
                   generator: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    """One N-way K-shot episode over the items with class ``labels`` (M,).

    Draws ``ways`` distinct classes among those with at least ``shots + queries_per_class``
    items, then, per class, ``shots`` support and ``queries_per_class`` query items (distinct).

    Returns:
        (support (ways * shots,), query (ways * queries_per_class,), query_labels): indices
        into ``labels`` and the queries' labels; class-major order.
    """
    need = shots + queries_per_class
    if ways < 1 or shots < 1 or queries_per_class < 1:
        raise ValueError(f"ways, shots and queries per class must be >= 1, got {ways}, {shots}, {queries_per_class}")
    counts = torch.bincount(labels)
    eligible = (counts >= need).nonzero().flatten()
    if eligible.numel() < ways:
        raise ValueError(f"a {ways}-way episode with {shots} shots and {queries_per_class} queries per class needs "
                         f"{ways} classes of >= {need} items; the data has {eligible.numel()}")
    chosen = eligible[torch.randperm(eligible.numel(), generator=generator)[:ways]]
    support, query = [], []
    for c in chosen.tolist():
        own = (labels == c).nonzero().flatten()
        picked = own[torch.randperm(own.numel(), generator=generator)[:need]]
        support.append(picked[:shots])
        query.append(picked[shots:])
    query_idx = torch.cat(query)
    return torch.cat(support), query_idx, labels[query_idx]


@torch.no_grad()
def episode_accuracy(scorer: SetScorer, desc: Tensor, labels: Tensor, ways: int, shots: int,
                     queries_per_class: int, generator: torch.Generator) -> float:
    """Accuracy of :func:`classify` on one episode drawn by :func:`sample_episode` from the
    descriptors ``desc`` (M, D) with class ``labels`` (M,)."""
    support, query, truth = sample_episode(labels, ways, shots, queries_per_class, generator)
    dev = desc.device
    predicted = classify(scorer, desc[support.to(dev)], labels[support].to(dev), desc[query.to(dev)], generator)
    return float((predicted.cpu() == truth).double().mean())
