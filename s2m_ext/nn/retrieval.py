"""The paper's retrieval protocol: for each test class a concept set of n of its images
(optionally with a fraction replaced by images of other classes), all other test images
ranked by the concept's model, average precision per class, mean AP over classes."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .scorers import SetScorer

__all__ = ["average_precision", "sample_concepts", "sample_polysemous_concepts", "embed_all", "retrieval_scores",
           "retrieval_ap"]


def average_precision(scores: Tensor, relevant: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Average precision of B rankings of M items (higher score ranks first).

    Args:
        scores: (B, M) scores.
        relevant: (B, M) bool, the relevant items.
        valid: optional (B, M) bool: items outside the ranking (e.g. the concept set itself).

    Returns:
        (B,) AP = mean, over the relevant valid items, of the precision at their rank; rows
        without a relevant valid item raise ValueError (their AP is undefined).
    """
    if scores.dim() != 2 or relevant.shape != scores.shape or relevant.dtype != torch.bool:
        raise ValueError(f"scores must be (B, M) and relevant a bool tensor of the same shape, "
                         f"got {tuple(scores.shape)} and {tuple(relevant.shape)}")
    if valid is not None:
        if valid.shape != scores.shape or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape {tuple(scores.shape)}")
        relevant = relevant & valid
        # Excluded items go to the end: after every relevant item, so they change no precision.
        scores = scores.masked_fill(~valid, float("-inf"))
    n_relevant = relevant.sum(1)
    if bool((n_relevant == 0).any()):
        raise ValueError("every ranking needs at least one relevant item; AP is undefined otherwise")
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    hits = torch.gather(relevant, 1, order).double()
    ranks = torch.arange(1, scores.shape[1] + 1, dtype=torch.float64, device=scores.device)
    precision_at_hits = hits.cumsum(1) / ranks * hits
    return precision_at_hits.sum(1) / n_relevant.double()


def sample_concepts(labels: Tensor, concept_size: int, noise: float, generator: torch.Generator) -> Tensor:
    """One concept set per class: ``concept_size`` indices into ``labels`` (M,), of which
    ``round(noise * concept_size)`` are images of other classes (drawn uniformly among all of
    them) and the rest distinct images of the class. Returns (C, concept_size) int64, class
    c in row c; the noisy entries come last."""
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    n_classes = int(labels.max()) + 1
    n_noise = int(round(noise * concept_size))
    n_clean = concept_size - n_noise
    rows = []
    for c in range(n_classes):
        own = (labels == c).nonzero().flatten()
        if own.numel() <= n_clean:
            raise ValueError(
                f"class {c} has {own.numel()} images: a concept set of {n_clean} clean images leaves none to retrieve"
            )
        clean = own[torch.randperm(own.numel(), generator=generator)[:n_clean]]
        others = (labels != c).nonzero().flatten()
        noisy = others[torch.randperm(others.numel(), generator=generator)[:n_noise]]
        rows.append(torch.cat([clean, noisy]))
    return torch.stack(rows)


def sample_polysemous_concepts(labels: Tensor, concept_size: int, noise: float,
                               generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """One two-class concept set per class c: c and a partner class drawn uniformly among the
    others share the clean images (c takes the larger half), and ``round(noise *
    concept_size)`` images of neither class come last. Both classes are relevant.

    Returns (concepts (C, concept_size) int64 indices into ``labels``, partners (C,) int64)."""
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    n_classes = int(labels.max()) + 1
    if n_classes < (3 if noise > 0 else 2):
        raise ValueError(f"polysemous concepts need {3 if noise > 0 else 2} classes or more, got {n_classes}")
    n_noise = int(round(noise * concept_size))
    n_clean = concept_size - n_noise
    if n_clean < 2:
        raise ValueError(f"a two-class concept set needs >= 2 clean images, got {n_clean} of {concept_size}")
    shares = ((n_clean + 1) // 2, n_clean // 2)
    rows, partners = [], []
    for c in range(n_classes):
        partner = int(torch.randint(n_classes - 1, (1,), generator=generator))
        partner += partner >= c  # uniform over the other classes
        clean = []
        for cls, share in zip((c, partner), shares):
            own = (labels == cls).nonzero().flatten()
            if own.numel() <= share:
                raise ValueError(f"class {cls} has {own.numel()} images: a share of {share} leaves none to retrieve")
            clean.append(own[torch.randperm(own.numel(), generator=generator)[:share]])
        others = ((labels != c) & (labels != partner)).nonzero().flatten()
        noisy = others[torch.randperm(others.numel(), generator=generator)[:n_noise]]
        rows.append(torch.cat([*clean, noisy]))
        partners.append(partner)
    return torch.stack(rows), torch.tensor(partners, dtype=torch.int64)


@torch.no_grad()
def embed_all(model, images: Tensor, batch_size: int = 512, dtype: torch.dtype = torch.float32) -> Tensor:
    """Descriptors (M, D) of uint8 or float images (M, C, H, W), embedded in chunks."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].to(device)
        chunk = chunk.to(dtype) / 255.0 if chunk.dtype == torch.uint8 else chunk.to(dtype)
        out.append(model.embed_items(chunk))
    return torch.cat(out)


@torch.no_grad()
def retrieval_scores(scorer: SetScorer, desc: Tensor, concepts: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Scores (C, M) of every item of ``desc`` (M, D) against each concept set, given by
    its indices ``concepts`` (C, n) into ``desc``."""
    state = scorer.fit(desc[concepts], None, generator)
    return scorer.score_pool(state, desc)


def retrieval_ap(scores: Tensor, labels: Tensor, concepts: Tensor, partners: Optional[Tensor] = None) -> Tensor:
    """AP (C,) of each concept's ranking of all items outside its concept set; the relevant
    items are the other images of class c (row c), and of class ``partners[c]`` for
    polysemous concepts (:func:`sample_polysemous_concepts`)."""
    n_classes = concepts.shape[0]
    classes = torch.arange(n_classes, device=labels.device)
    relevant = labels.unsqueeze(0) == classes.unsqueeze(1)
    if partners is not None:
        relevant |= labels.unsqueeze(0) == partners.to(labels.device).unsqueeze(1)
    valid = torch.ones_like(relevant)
    valid.scatter_(1, concepts.to(labels.device), False)
    return average_precision(scores.to(labels.device), relevant, valid)
