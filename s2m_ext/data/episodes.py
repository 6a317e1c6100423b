"""Meta-training episodes: (concept set, relevant set, irrelevant set) tuples.

Every tuple is a pure function of (seed, step, index): the sampler keeps no state, so a
resumed run sees exactly the tuples the interrupted one would have, and a data-parallel
run can give tuples [r * b, (r + 1) * b) of each step to rank r and see the same global
batch as one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import Tensor

from .base import ClassImages, mix_seed

__all__ = ["EpisodeSampler", "EpisodeBatch"]


@dataclass
class EpisodeBatch:
    """A batch of B tuples as index tensors into the data and, via :meth:`images`, images.

    Attributes:
        concept: (B, N) indices of the concept sets.
        relevant: (B, P) indices of the relevant items.
        irrelevant: (B, Q) indices of the irrelevant items.
        seeds: (B,) int64 per-tuple seeds for the model's random initialisations.
        polysemous: (B,) bool, tuples whose concept is the union of two classes.
        classes: (B, 2) int64, the concept's class and its second class (-1 for a concept
            of one class): the key of the training-time warm start (s2m_ext.nn.WarmStartCache).
    """

    concept: Tensor
    relevant: Tensor
    irrelevant: Tensor
    seeds: Tensor
    polysemous: Tensor
    classes: Tensor

    def images(self, data: ClassImages, dtype: torch.dtype = torch.float32, device=None):
        """(concept (B, N, C, H, W), queries (B, P + Q, C, H, W)) float images in [0, 1];
        the queries are the relevant items followed by the irrelevant ones."""
        concept = data.float_images(self.concept, dtype)
        queries = data.float_images(torch.cat([self.relevant, self.irrelevant], 1), dtype)
        return concept.to(device), queries.to(device)

    def generators(self, device="cpu") -> List[torch.Generator]:
        """One torch.Generator per tuple, seeded from ``seeds``."""
        return [torch.Generator(device=device).manual_seed(int(s)) for s in self.seeds]


class EpisodeSampler:
    """Samples meta-training tuples from the classes of ``data``.

    A tuple's concept is a random class c; its concept set holds ``concept_size`` images:
    ``round(noise * concept_size)`` of them uniformly drawn from other classes (like the
    outliers of raw web search results), the rest distinct images of c. The relevant set
    holds ``n_relevant`` further images of c (never in the concept set), the irrelevant
    set ``n_irrelevant`` images drawn uniformly from the other classes. With probability
    ``polysemy`` the concept is the union of two classes c1 != c2: the clean concept images
    and the relevant images are split between them (c1 gets the extra one of an odd count),
    and the irrelevant images avoid both.

    Args:
        data: the training classes (each needs enough images for its share of the
            clean concept set plus the relevant set).
        concept_size, n_relevant, n_irrelevant: N, P, Q (default 10 each, the paper's).
        noise: fraction of the concept set replaced by other classes, in [0, 1).
        polysemy: probability of a two-class concept, in [0, 1].
        seed: the sampler's seed.
    """

    def __init__(
        self,
        data: ClassImages,
        concept_size: int = 10,
        n_relevant: int = 10,
        n_irrelevant: int = 10,
        noise: float = 0.0,
        polysemy: float = 0.0,
        seed: int = 0,
    ) -> None:
        for value, name in ((concept_size, "concept_size"), (n_relevant, "n_relevant"), (n_irrelevant, "n_irrelevant")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {noise}")
        if not 0.0 <= polysemy <= 1.0:
            raise ValueError(f"polysemy must be in [0, 1], got {polysemy}")
        n_classes_needed = 3 if polysemy > 0 else 2
        if data.n_classes < n_classes_needed:
            raise ValueError(f"the sampler needs at least {n_classes_needed} classes, the data has {data.n_classes}")
        self.data = data
        self.concept_size, self.n_relevant, self.n_irrelevant = concept_size, n_relevant, n_irrelevant
        self.noise, self.polysemy, self.seed = float(noise), float(polysemy), int(seed)
        self.n_noise = int(round(noise * concept_size))
        n_clean = concept_size - self.n_noise
        need = n_clean + n_relevant
        if polysemy == 1.0:  # only pairs: the first class of a pair takes the larger halves
            need = (n_clean + 1) // 2 + (n_relevant + 1) // 2
        smallest = int(data.class_sizes().min())
        if smallest < need:
            raise ValueError(
                f"every class needs {need} images for a concept set of {n_clean} clean images and {n_relevant} "
                f"relevant ones, but the smallest class has {smallest}"
            )
        self._sizes = data.class_sizes()
        self._members = [data.indices_of(c) for c in range(data.n_classes)]

    def _others(self, exclude: List[int], count: int, gen: torch.Generator) -> Tensor:
        """``count`` images drawn uniformly (with replacement) from the classes not in ``exclude``."""
        total = len(self.data)
        excluded = sum(int(self._sizes[c]) for c in exclude)
        pos = torch.randint(0, total - excluded, (count,), generator=gen)
        # Map positions in the concatenation of the allowed classes back to image indices.
        allowed = torch.ones(self.data.n_classes, dtype=torch.bool)
        allowed[exclude] = False
        sizes = torch.where(allowed, self._sizes, torch.zeros_like(self._sizes))
        ends = sizes.cumsum(0)
        cls = torch.searchsorted(ends, pos, right=True)
        within = pos - (ends[cls] - sizes[cls])
        return torch.stack([self._members[int(c)][int(i)] for c, i in zip(cls, within)]) if count else torch.empty(0, dtype=torch.int64)

    def _own(self, c: int, count: int, gen: torch.Generator) -> Tensor:
        members = self._members[c]
        return members[torch.randperm(members.numel(), generator=gen)[:count]]

    def sample(self, step: int, index: int):
        """Tuple ``index`` of step ``step``: (concept (N,), relevant (P,), irrelevant (Q,),
        seed, polysemous, classes (the concept's one or two classes))."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, step, index))
        n_clean = self.concept_size - self.n_noise
        polysemous = self.polysemy > 0 and float(torch.rand(1, generator=gen)) < self.polysemy
        if polysemous:
            pair = torch.randperm(self.data.n_classes, generator=gen)[:2].tolist()
            splits = [((n_clean + 1) // 2, (self.n_relevant + 1) // 2), (n_clean // 2, self.n_relevant // 2)]
            concept_parts, relevant_parts = [], []
            for c, (n_c, n_r) in zip(pair, splits):
                own = self._own(c, n_c + n_r, gen)
                concept_parts.append(own[:n_c])
                relevant_parts.append(own[n_c:])
            clean, relevant, classes = torch.cat(concept_parts), torch.cat(relevant_parts), pair
        else:
            c = int(torch.randint(0, self.data.n_classes, (1,), generator=gen))
            own = self._own(c, n_clean + self.n_relevant, gen)
            clean, relevant, classes = own[:n_clean], own[n_clean:], [c]
        concept = torch.cat([clean, self._others(classes, self.n_noise, gen)])
        irrelevant = self._others(classes, self.n_irrelevant, gen)
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        return concept, relevant, irrelevant, seed, polysemous, classes

    def batch(self, step: int, start: int, stop: int) -> EpisodeBatch:
        """Tuples ``start .. stop-1`` of step ``step`` (a data-parallel shard when the global
        batch is split across ranks)."""
        if not 0 <= start < stop:
            raise ValueError(f"need 0 <= start < stop, got {start}, {stop}")
        tuples = [self.sample(step, i) for i in range(start, stop)]
        concept, relevant, irrelevant, seeds, poly, classes = zip(*tuples)
        return EpisodeBatch(
            torch.stack(concept),
            torch.stack(relevant),
            torch.stack(irrelevant),
            torch.tensor(seeds, dtype=torch.int64),
            torch.tensor(poly, dtype=torch.bool),
            torch.tensor([list(c) + [-1] * (2 - len(c)) for c in classes], dtype=torch.int64),
        )
