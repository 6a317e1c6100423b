"""Set2Model and its baselines: an embedding network followed by a set scorer."""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..implicit import ImplicitBackward
from .scorers import MIXTURE_DEFAULTS, AvgScorer, Generators, GMMScorer, NNScorer, SetScorer

__all__ = ["ConceptModel", "Set2Model", "AvgModel", "NNModel", "build_model", "model_from_spec"]


def _check_items(x: Tensor, name: str, ndim_min: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimensions, got shape {tuple(x.shape)}")


class ConceptModel(nn.Module):
    """An embedding network ``embed`` (items (n, ...) -> (n, D)) whose L2-normalised outputs
    are modelled per concept set by ``scorer`` (see :mod:`s2m_ext.nn.scorers`).

    ``model(concept (B, N, ...), queries (B, Q, ...), concept_mask=None)`` -> (B, Q) scores
    of each query against its own concept set. The concept sets and the queries are
    embedded in one call of ``embed``. For retrieval against a shared pool, use
    ``embed_items``, ``fit`` and ``score_pool``:

        desc = model.embed_items(concept)            # (B, N, D)
        state = model.fit(desc, mask)
        scores = model.score_pool(state, model.embed_items(pool))   # (B, M)

    ``item_dims`` is the number of trailing dimensions of one item: 3 for images (C, H, W,
    the default), 1 for vectors. ``concept_mask`` (B, N) bool marks the real items of ragged (padded) concept sets.
    ``generators`` (None, a torch.Generator, or one per set) drive random initialisations.
    With a :class:`s2m_ext.nn.WarmStartCache` as ``warm_start`` (mixture scorers, K >= 2),
    ``model(..., warm_keys=keys)`` fits each concept set from the cached mixture of its key
    (B, 2) when there is one, and caches the new fits; without ``warm_keys`` every fit is fresh.
    """

    def __init__(self, embed: nn.Module, scorer: SetScorer, item_dims: int = 3) -> None:
        super().__init__()
        if isinstance(item_dims, bool) or not isinstance(item_dims, int) or item_dims < 1:
            raise ValueError(f"item_dims must be an int >= 1, got {item_dims!r}")
        if not isinstance(embed, nn.Module):
            raise TypeError(f"embed must be a torch.nn.Module, got {type(embed).__name__}")
        if not isinstance(scorer, SetScorer):
            raise TypeError(f"scorer must be a SetScorer, got {type(scorer).__name__}")
        self.embed = embed
        self.scorer = scorer
        self.item_dims = item_dims
        self.warm_start = None  # a WarmStartCache, set by the training run that uses one

    @property
    def scorer_name(self) -> str:
        return self.scorer.name

    def embed_items(self, items: Tensor) -> Tensor:
        """L2-normalised descriptors: items (*lead, ...) -> (*lead, D), where the trailing
        dimensions are those ``embed`` takes for one item (e.g. (C, H, W))."""
        _check_items(items, "items", self.item_dims)
        lead = items.shape[: items.dim() - self.item_dims]
        desc = self.embed(items.reshape(-1, *items.shape[len(lead):]))
        return F.normalize(desc, dim=-1).reshape(*lead, desc.shape[-1])

    def fit(self, desc: Tensor, mask: Optional[Tensor] = None, generators: Generators = None):
        """The scorer's model of each concept set: desc (B, N, D) -> state."""
        return self.scorer.fit(desc, mask, generators)

    def score(self, state, queries: Tensor) -> Tensor:
        """Paired scores: queries (B, Q, D) -> (B, Q)."""
        return self.scorer.score(state, queries)

    def score_pool(self, state, pool: Tensor) -> Tensor:
        """Pool scores: pool (M, D) -> (B, M)."""
        return self.scorer.score_pool(state, pool)

    def forward(
        self,
        concept: Tensor,
        queries: Tensor,
        concept_mask: Optional[Tensor] = None,
        generators: Generators = None,
        warm_keys: Optional[Tensor] = None,
    ) -> Tensor:
        item_dims = self.item_dims
        _check_items(concept, "concept", item_dims + 2)
        _check_items(queries, "queries", item_dims + 2)
        if concept.dim() != item_dims + 2 or queries.dim() != item_dims + 2:
            raise ValueError(
                f"concept and queries must be (B, N, *item) and (B, Q, *item) with {item_dims} item dimensions, "
                f"got {tuple(concept.shape)} and {tuple(queries.shape)}"
            )
        if queries.shape[0] != concept.shape[0] or queries.shape[2:] != concept.shape[2:]:
            raise ValueError(
                f"queries {tuple(queries.shape)} must have the batch size and item shape of concept {tuple(concept.shape)}"
            )
        batch, n_concept = concept.shape[:2]
        if batch < 1 or n_concept < 1:
            raise ValueError(f"concept must hold B >= 1 sets of N >= 1 items, got shape {tuple(concept.shape)}")
        items = torch.cat([concept.flatten(0, 1), queries.flatten(0, 1)])
        desc = self.embed_items(items)
        dims = desc.shape[-1]  # explicit: with Q = 0 a -1 would be ambiguous
        concept_desc = desc[: batch * n_concept].reshape(batch, n_concept, dims)
        query_desc = desc[batch * n_concept :].reshape(batch, queries.shape[1], dims)
        if warm_keys is None:
            state = self.fit(concept_desc, concept_mask, generators)
        elif self.warm_start is None:
            raise ValueError("warm_keys needs a WarmStartCache as the model's warm_start")
        else:
            state = self.warm_start.fit(self.scorer, concept_desc, concept_mask, generators, warm_keys)
        return self.score(state, query_desc)


class Set2Model(ConceptModel):
    """Set2Model (Vakhitov, Kuzmin, Lempitsky 2018): L2-normalised descriptors of each concept
    set are fitted with a diagonal Gaussian mixture (K = 1: S2M-Gauss; K = 2..4: S2M-GMMk)
    by :func:`s2m_ext.fit_gmm`, and queries are scored by their log-density. Gradients flow
    through the fit into the concept images and through the scores into the query images.

    Args:
        embed: the embedding network, items (n, ...) -> (n, D).
        n_components: K (default 1).
        n_iter: EM iterations for K > 1 (default 10).
        var_floor: variance floor (default 0.01).
        init: ``"kmeans++"``.
        tol: per-set EM stopping tolerance (default 0: always ``n_iter`` iterations).
        backward: ``"unrolled"`` (default), ``"implicit"`` (the gradient of the fitted
            optimum; use a large ``n_iter`` with ``tol > 0``) or an
            :class:`s2m_ext.ImplicitBackward`. See :func:`s2m_ext.fit_gmm`.
        item_dims: trailing dimensions of one item (3 for images, 1 for vectors).
    """

    def __init__(
        self,
        embed: nn.Module,
        n_components: int = 1,
        n_iter: int = MIXTURE_DEFAULTS.n_iter,
        var_floor: float = MIXTURE_DEFAULTS.var_floor,
        init: str = "kmeans++",
        tol: float = MIXTURE_DEFAULTS.tol,
        backward: Union[str, ImplicitBackward] = MIXTURE_DEFAULTS.backward,
        item_dims: int = 3,
    ) -> None:
        super().__init__(embed, GMMScorer(n_components, n_iter, var_floor, init, tol, backward), item_dims)


class AvgModel(ConceptModel):
    """Baseline AVG: rank by similarity to the mean descriptor of the concept set."""

    def __init__(self, embed: nn.Module, item_dims: int = 3) -> None:
        super().__init__(embed, AvgScorer(), item_dims)


class NNModel(ConceptModel):
    """Baseline NN: rank by the largest similarity to any example of the concept set."""

    def __init__(self, embed: nn.Module, item_dims: int = 3) -> None:
        super().__init__(embed, NNScorer(), item_dims)


def build_model(
    scorer: str,
    embedding: dict,
    n_iter: int = MIXTURE_DEFAULTS.n_iter,
    var_floor: float = MIXTURE_DEFAULTS.var_floor,
    tol: float = MIXTURE_DEFAULTS.tol,
    backward: Union[str, ImplicitBackward] = MIXTURE_DEFAULTS.backward,
) -> ConceptModel:
    """A :class:`ConceptModel` with a :class:`~s2m_ext.nn.ConvEmbedding` built from the
    ``embedding`` keyword arguments and the scorer named ``scorer`` (see
    :func:`~s2m_ext.nn.make_scorer`). This is how checkpoints rebuild their model."""
    from .embedding import ConvEmbedding
    from .scorers import make_scorer

    return ConceptModel(ConvEmbedding(**embedding), make_scorer(scorer, n_iter, var_floor, tol, backward))


def model_from_spec(spec: Dict[str, Any]) -> ConceptModel:
    """:func:`build_model` from the model description s2m-train writes into its checkpoints:
    ``scorer``, ``embedding`` and optionally ``n_iter``, ``var_floor``, ``tol``, ``backward``
    and ``implicit_solver`` (defaults: :data:`~s2m_ext.nn.scorers.MIXTURE_DEFAULTS`)."""
    d = MIXTURE_DEFAULTS
    backward = spec.get("backward", d.backward)
    if backward == "implicit":
        backward = ImplicitBackward(solver=spec.get("implicit_solver", d.implicit_solver))
    return build_model(spec["scorer"], spec["embedding"], spec.get("n_iter", d.n_iter), spec.get("var_floor", d.var_floor),
                       spec.get("tol", d.tol), backward)
