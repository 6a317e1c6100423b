"""The training-time warm start of Set2Model (the paper's per-class cache): the mixture fitted
to a class's concept set is kept, and the next concept set of that class starts EM from it
instead of from k-means++, with a smaller variance floor (1e-6 against a fresh fit's 0.01).

    cache = WarmStartCache(var_floor=1e-6)
    model.warm_start = cache                   # a Set2Model with K >= 2 components
    scores = model(concept, queries, generators=gens, warm_keys=batch.classes)

The cached parameters are constants (no autograd history): a warm fit is differentiated
through its own EM iterations from them, as a fresh fit is from its k-means++ start.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..gmm import DiagGMM, fit_gmm
from .scorers import GMMScorer, Generators

__all__ = ["WarmStartCache"]

Key = Tuple[int, int]
Entry = Tuple[Tensor, Tensor, Tensor]  # log_weights (K,), means (K,D), variances (K,D)


class WarmStartCache:
    """Fitted mixtures by concept key, used to warm-start EM when the key comes back.

    Args:
        var_floor: the variance floor of a warm fit (default 1e-6, the paper's); fresh fits
            keep the scorer's own.

    A key is a row of :attr:`s2m_ext.data.EpisodeBatch.classes`: (class, second class or -1).
    Entries live on the device of the fits that made them.
    """

    def __init__(self, var_floor: float = 1e-6) -> None:
        if isinstance(var_floor, bool) or not isinstance(var_floor, (int, float)) or not 0 < var_floor < math.inf:
            raise ValueError(f"var_floor must be a number > 0 and finite, got {var_floor!r}")
        self.var_floor = float(var_floor)
        self._entries: Dict[Key, Entry] = {}
        self.warm_fits = 0
        self.fresh_fits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return tuple(key) in self._entries

    @staticmethod
    def _keys(keys: Tensor, batch: int) -> List[Key]:
        if not isinstance(keys, Tensor) or keys.dtype != torch.int64 or tuple(keys.shape) != (batch, 2):
            raise ValueError(
                f"warm_keys must be an int64 tensor of shape (B, 2) = ({batch}, 2), got "
                f"{getattr(keys, 'dtype', type(keys).__name__)} {tuple(getattr(keys, 'shape', ()))}"
            )
        return [(int(a), int(b)) for a, b in keys.tolist()]

    def fit(
        self, scorer: GMMScorer, desc: Tensor, mask: Optional[Tensor], generators: Generators, keys: Tensor
    ) -> DiagGMM:
        """Fits desc (B,N,D) (mask (B,N) or None) with ``scorer``: sets whose key is cached start
        from the cached mixture (floor ``var_floor``), the others are fitted fresh by
        ``scorer.fit`` (their generators only). Then caches every set's fit under its key.
        Returns the B mixtures in the order of desc."""
        if not isinstance(scorer, GMMScorer) or scorer.n_components < 2:
            raise ValueError(
                "the warm start needs a mixture scorer of K >= 2 components (K = 1 is one closed-form M-step, "
                f"which no initial model changes), got {getattr(scorer, 'name', type(scorer).__name__)}"
            )
        batch, _, dims = desc.shape
        key_list = self._keys(keys, batch)
        for key in key_list:
            entry = self._entries.get(key)
            if entry is not None and (entry[1].shape != (scorer.n_components, dims) or entry[1].dtype != desc.dtype):
                raise ValueError(
                    f"the cached mixture of concept {key} has means {tuple(entry[1].shape)} {entry[1].dtype}, but the "
                    f"scorer fits K = {scorer.n_components} components to {dims}-dimensional {desc.dtype} descriptors"
                )
        warm = [i for i, k in enumerate(key_list) if k in self._entries]
        fresh = [i for i, k in enumerate(key_list) if k not in self._entries]
        parts: List[Tuple[List[int], DiagGMM]] = []
        if fresh:
            rows = torch.tensor(fresh, device=desc.device)
            gens = generators if generators is None or isinstance(generators, torch.Generator) else [generators[i] for i in fresh]
            parts.append((fresh, scorer.fit(desc[rows], None if mask is None else mask[rows], gens)))
        if warm:
            rows = torch.tensor(warm, device=desc.device)
            cached = [self._entries[key_list[i]] for i in warm]
            init = DiagGMM(*(torch.stack(t).to(desc.device) for t in zip(*cached)))
            weights = None if mask is None else mask[rows].to(desc.dtype)
            parts.append((warm, fit_gmm(desc[rows], weights, init=init, n_iter=scorer.n_iter, var_floor=self.var_floor,
                                        tol=scorer.tol, backward=scorer.backward)))
        self.warm_fits += len(warm)
        self.fresh_fits += len(fresh)
        order = torch.tensor([i for idx, _ in parts for i in idx], device=desc.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(batch, device=desc.device)
        merged = [torch.cat([getattr(g, name) for _, g in parts])[inverse] for name in ("log_weights", "means", "variances")]
        cached_rows = zip(*(t.detach().clone().unbind(0) for t in merged))  # one copy a tensor, not a row
        for key, entry in zip(key_list, cached_rows):
            self._entries[key] = entry  # type: ignore[assignment]
        return DiagGMM(*merged)

    def state_dict(self) -> Dict[str, object]:
        """The entries (on the CPU) and counters, for a checkpoint."""
        return {
            "var_floor": self.var_floor,
            "keys": list(self._entries),
            "entries": [tuple(t.cpu() for t in e) for e in self._entries.values()],
            "warm_fits": self.warm_fits,
            "fresh_fits": self.fresh_fits,
        }

    def load_state_dict(self, state: Dict[str, object], device=None) -> None:
        """Restores :meth:`state_dict`'s output, entries moved to ``device``."""
        if float(state["var_floor"]) != self.var_floor:
            raise ValueError(f"the saved cache has var_floor {state['var_floor']}, this one {self.var_floor}")
        self._entries = {
            tuple(k): tuple(t.to(device) for t in e)  # type: ignore[misc]
            for k, e in zip(state["keys"], state["entries"])  # type: ignore[arg-type]
        }
        self.warm_fits, self.fresh_fits = int(state["warm_fits"]), int(state["fresh_fits"])
