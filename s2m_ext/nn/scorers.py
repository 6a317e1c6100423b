"""Set scorers: turn a concept set of descriptors into a model and score queries with it.

Every scorer has the same three methods, so Set2Model and the baselines are interchangeable
(and any scorer can be applied to any embedding, e.g. S2M-Gauss on AVG-FT descriptors):

* ``fit(desc (B, N, D), mask (B, N) bool or None, generators=None) -> state``
* ``score(state, queries (B, Q, D)) -> (B, Q)``   paired: row b against concept b
* ``score_pool(state, pool (M, D)) -> (B, M)``    every pool item against every concept

Higher scores mean "more likely to belong to the concept".
"""

from __future__ import annotations

import math

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..gmm import DiagGMM, fit_gmm
from ..implicit import ImplicitBackward

__all__ = [
    "SetScorer", "GMMScorer", "AvgScorer", "NNScorer", "SVMScorer", "make_scorer", "SCORER_NAMES",
    "EVAL_SCORER_NAMES", "display_name", "short_name", "MixtureDefaults", "MIXTURE_DEFAULTS", "SVM_DEFAULTS",
]

Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]

#: Gradients of the mixture fit (see :func:`s2m_ext.fit_gmm`).
BACKWARDS = ("unrolled", "implicit")



@dataclass(frozen=True)
class MixtureDefaults:
    """The mixture scorers' defaults, the one place they are written: :class:`GMMScorer`,
    :class:`~s2m_ext.nn.Set2Model`, :func:`make_scorer`, model specs in checkpoints and the
    programs' flags all read them.

    n_iter: EM iterations for K > 1. var_floor: the paper's floor for a fresh fit of
    L2-normalised descriptors. tol: 0, always n_iter iterations. backward: "unrolled".
    implicit_solver: the adjoint solver of backward="implicit" in trained models and
    ``s2m-train`` ("gmres": far fewer failed solves than "fixed_point" on converged fits).
    """

    n_iter: int = 10
    var_floor: float = 0.01
    tol: float = 0.0
    backward: str = "unrolled"
    implicit_solver: str = "gmres"


MIXTURE_DEFAULTS = MixtureDefaults()

#: Scorers that can be trained end to end (``s2m-train --scorer``).
SCORER_NAMES = ("gauss", "gmm2", "gmm3", "gmm4", "avg", "nn")

#: Scorers accepted by :func:`make_scorer` and ``s2m-eval --scorers``: the trainable ones and
#: the evaluation-time one-vs-rest linear SVM (:class:`SVMScorer`).
EVAL_SCORER_NAMES = SCORER_NAMES + ("svm",)


def _check_desc(desc: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
    if not isinstance(desc, Tensor) or desc.dim() != 3:
        raise ValueError(f"concept descriptors must be a (B, N, D) tensor, got {getattr(desc, 'shape', type(desc))}")
    if desc.shape[0] < 1 or desc.shape[1] < 1:
        raise ValueError(f"concept descriptors need B >= 1 sets of N >= 1 items, got shape {tuple(desc.shape)}")
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(desc.shape[:2]):
        raise ValueError(f"mask must be a bool tensor of shape (B, N) = {tuple(desc.shape[:2])}, got {getattr(mask, 'shape', mask)}")
    if mask.device != desc.device:
        raise ValueError(f"mask must be on the device of the descriptors ({desc.device}), got {mask.device}")
    if mask.is_meta:  # shapes only: nothing to check
        return mask
    empty = (~mask.any(1)).nonzero().flatten()
    if empty.numel() > 0:  # the same refusal for every scorer: a set needs an item
        raise ValueError(f"mask: every set needs at least one True entry, but set(s) {empty[:8].tolist()} have none")
    return mask


class SetScorer(nn.Module):
    """Base class: see the module docstring for the contract."""

    name: str = "?"

    def fit(self, desc: Tensor, mask: Optional[Tensor] = None, generators: Generators = None):
        raise NotImplementedError

    def score(self, state, queries: Tensor) -> Tensor:
        raise NotImplementedError

    def score_pool(self, state, pool: Tensor) -> Tensor:
        raise NotImplementedError


class GMMScorer(SetScorer):
    """Fit one diagonal Gaussian mixture per concept set (by :func:`s2m_ext.fit_gmm`) and score
    by log-density. K = 1 is S2M-Gauss: a closed-form weighted mean and variance.

    Args:
        n_components: K (default 1).
        n_iter: EM iterations for K > 1 (default 10); K = 1 needs a single M-step.
        var_floor: added to every fitted variance (default 0.01, the paper's floor for a
            fresh fit of L2-normalised descriptors).
        init: ``"kmeans++"`` (the only initialisation for a fresh fit).
        tol: stop each set's EM once its mean log-likelihood gains less than ``tol``
            (default 0: always ``n_iter`` iterations). See :func:`s2m_ext.fit_gmm`. K = 1
            ignores ``tol`` and ``backward``: its single M-step is the exact optimum.
        backward: ``"unrolled"`` (default), ``"implicit"`` (the gradient of the fitted
            optimum; use with a large ``n_iter`` and ``tol > 0``) or an
            :class:`s2m_ext.ImplicitBackward` with the solver's settings. See :func:`s2m_ext.fit_gmm`.

    ``fit`` takes ``generators``: None (torch's global RNG), one torch.Generator for the
    whole batch, or one per concept set. Per-set generators make each set's k-means++ draws
    independent of how sets are batched (data-parallel training relies on it).
    """

    def __init__(
        self,
        n_components: int = 1,
        n_iter: int = MIXTURE_DEFAULTS.n_iter,
        var_floor: float = MIXTURE_DEFAULTS.var_floor,
        init: str = "kmeans++",
        tol: float = MIXTURE_DEFAULTS.tol,
        backward: Union[str, ImplicitBackward] = MIXTURE_DEFAULTS.backward,
    ) -> None:
        super().__init__()
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be an int >= 1, got {n_components!r}")
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
        if isinstance(var_floor, bool) or not isinstance(var_floor, (int, float)) or not (0 < var_floor < math.inf):
            raise ValueError(f"var_floor must be a number > 0 and finite (log-densities need a floor), got {var_floor!r}")
        if init != "kmeans++":
            raise ValueError(f"init must be 'kmeans++', got {init!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            raise ValueError(f"tol must be a number >= 0 and finite, got {tol!r}")
        if not isinstance(backward, ImplicitBackward) and backward not in BACKWARDS:
            raise ValueError(
                f"backward must be one of {', '.join(map(repr, BACKWARDS))} or an s2m_ext.ImplicitBackward, got {backward!r}"
            )
        self.n_components = n_components
        self.n_iter = n_iter
        self.var_floor = float(var_floor)
        self.init = init
        self.tol = float(tol)
        self.backward = backward
        self.name = "gauss" if n_components == 1 else f"gmm{n_components}"

    def _initial(self, desc: Tensor, weights: Optional[Tensor], generators: Generators) -> Union[str, DiagGMM]:
        """Initial parameters: constants (no autograd history) built by fit_gmm itself."""
        batch, _, dims = desc.shape
        if self.n_components == 1:
            # The first M-step (responsibilities all 1) does not depend on the initial model:
            # any valid one will do, and no random draw is spent.
            zeros = desc.new_zeros(batch, 1, dims)
            return DiagGMM(zeros[:, :, 0], zeros, torch.ones_like(zeros))
        if generators is None or isinstance(generators, torch.Generator):
            return "kmeans++"
        if not isinstance(generators, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError(
                f"generators must be None, a torch.Generator or a list of them (one per set), got {type(generators).__name__}"
            )
        if len(generators) != batch:
            raise ValueError(f"generators must hold one torch.Generator per concept set ({batch}), got {len(generators)}")
        return "kmeans++"  # fit_gmm draws from the generator(s) itself, batched

    def fit(self, desc: Tensor, mask: Optional[Tensor] = None, generators: Generators = None) -> DiagGMM:
        mask = _check_desc(desc, mask)
        weights = None if mask is None else mask.to(desc.dtype)
        init = self._initial(desc, weights, generators)
        return fit_gmm(
            desc,
            weights,
            n_components=self.n_components,
            n_iter=1 if self.n_components == 1 else self.n_iter,
            init=init,
            var_floor=self.var_floor,
            generator=generators if generators is None or isinstance(generators, torch.Generator) else list(generators),
            # K = 1 is one closed-form M-step: already the optimum, nothing to iterate.
            tol=self.tol if self.n_components > 1 else 0.0,
            backward=self.backward if self.n_components > 1 else "unrolled",
        )

    def score(self, state: DiagGMM, queries: Tensor) -> Tensor:
        return state.log_prob(queries)

    def score_pool(self, state: DiagGMM, pool: Tensor) -> Tensor:
        return state.log_prob_pool(pool)

    def extra_repr(self) -> str:
        return (f"n_components={self.n_components}, n_iter={self.n_iter}, var_floor={self.var_floor}, init={self.init!r}, "
                f"tol={self.tol}, backward={self.backward!r}")


class AvgScorer(SetScorer):
    """AVG: similarity (dot product) to the mean descriptor of the concept set, i.e. a
    nearest-class-mean ranking (for unit descriptors it ranks like -||z - mean||^2)."""

    name = "avg"

    def fit(self, desc: Tensor, mask: Optional[Tensor] = None, generators: Generators = None) -> Tensor:
        mask = _check_desc(desc, mask)
        if mask is None:
            return desc.mean(1)
        w = mask.to(desc.dtype).unsqueeze(-1)
        return (w * desc).sum(1) / w.sum(1).clamp_min(1.0)

    def score(self, state: Tensor, queries: Tensor) -> Tensor:
        return torch.einsum("bqd,bd->bq", queries, state)

    def score_pool(self, state: Tensor, pool: Tensor) -> Tensor:
        return state @ pool.transpose(0, 1)


class NNScorer(SetScorer):
    """NN: the largest similarity (dot product) to any example of the concept set."""

    name = "nn"

    def fit(
        self, desc: Tensor, mask: Optional[Tensor] = None, generators: Generators = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        return desc, _check_desc(desc, mask)

    @staticmethod
    def _max(sims: Tensor, mask: Optional[Tensor]) -> Tensor:  # sims (B, N, Q)
        if mask is not None:
            sims = sims.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        return sims.amax(1)

    def score(self, state, queries: Tensor) -> Tensor:
        desc, mask = state
        return self._max(torch.einsum("bnd,bqd->bnq", desc, queries), mask)

    def score_pool(self, state, pool: Tensor) -> Tensor:
        desc, mask = state
        return self._max(torch.einsum("bnd,md->bnm", desc, pool), mask)


@dataclass(frozen=True)
class SVMDefaults:
    """The defaults of :class:`SVMScorer`, the one place they are written.

    C: the weight of the squared-hinge losses against ``0.5 ||w||^2`` (LinearSVC's ``C``).
    n_negatives: random descriptors of training images used as the negatives of every set.
    n_iter: Newton steps of the primal fit (the objective is piecewise quadratic: on
    descriptor sets of a few hundred items it is solved to rounding in well under 30).
    """

    C: float = 1.0
    n_negatives: int = 200
    n_iter: int = 30


SVM_DEFAULTS = SVMDefaults()


class SVMScorer(SetScorer):
    """SVM: a one-vs-rest linear SVM per concept set (the paper's SVM baseline). The set's
    descriptors are the positives, the fixed ``negatives`` (random descriptors of training
    images of other classes) the negatives; an item is scored by the decision value
    ``w . z + b``.

    Each set's SVM minimises LinearSVC's primal objective (``loss="squared_hinge"``,
    ``penalty="l2"``, ``intercept_scaling=1``, whose intercept is regularised like a weight)::

        0.5 * (||w||^2 + b^2) + C * sum_i max(0, 1 - y_i (w . x_i + b))^2

    with ``y = +1`` for the set's items and ``-1`` for the negatives. It is strictly convex
    with a piecewise-quadratic objective, solved by ``n_iter`` generalised Newton steps (the
    Hessian of the items that violate their margin) with a backtracking line search, all B
    sets at once and deterministically (no random draw). It is an evaluation-time scorer on
    fixed descriptors: the fit runs without autograd and the state carries no gradient.

    Args:
        negatives: (M, D) negative descriptors, M >= 1, finite, shared by every set.
        C: > 0 (default :data:`SVM_DEFAULTS`.C = 1).
        n_iter: Newton steps, >= 1 (default 30).

    ``fit(desc (B, N, D), mask (B, N) or None) -> (w (B, D), b (B,))``;
    ``score(state, (B, Q, D)) -> (B, Q)``; ``score_pool(state, (P, D)) -> (B, P)``.
    """

    name = "svm"

    def __init__(self, negatives: Tensor, C: float = SVM_DEFAULTS.C, n_iter: int = SVM_DEFAULTS.n_iter) -> None:
        super().__init__()
        if not isinstance(negatives, Tensor) or negatives.dim() != 2 or negatives.shape[0] < 1 or negatives.shape[1] < 1:
            raise ValueError(f"negatives must be an (M, D) tensor with M, D >= 1, got {getattr(negatives, 'shape', type(negatives))}")
        if not negatives.is_floating_point():
            raise ValueError(f"negatives must be floating point, got {negatives.dtype}")
        if not bool(torch.isfinite(negatives).all()):
            raise ValueError("negatives must be finite")
        if isinstance(C, bool) or not isinstance(C, (int, float)) or not (0 < C < math.inf):
            raise ValueError(f"C must be a number > 0 and finite, got {C!r}")
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
        self.negatives = negatives.detach()
        self.C = float(C)
        self.n_iter = n_iter

    def _objective(self, theta: Tensor, xa: Tensor, y: Tensor, weight: Tensor) -> Tensor:
        """Primal objective per set: theta (B, ..., D+1), xa (B, N, D+1) -> (B, ...)."""
        margins = torch.einsum("bnd,b...d->b...n", xa, theta)
        extra = theta.dim() - 2
        y_, w_ = (t.reshape(t.shape[0], *([1] * extra), t.shape[1]) for t in (y, weight))
        slack = (1 - y_ * margins).clamp_min(0)
        return 0.5 * theta.square().sum(-1) + self.C * (w_ * slack.square()).sum(-1)

    @torch.no_grad()
    def fit(self, desc: Tensor, mask: Optional[Tensor] = None, generators: Generators = None) -> Tuple[Tensor, Tensor]:
        mask = _check_desc(desc, mask)
        batch, n_pos, dims = desc.shape
        if self.negatives.shape[1] != dims:
            raise ValueError(f"negatives have D = {self.negatives.shape[1]}, the concept descriptors D = {dims}")
        neg = self.negatives.to(desc.device, desc.dtype)
        n_neg = neg.shape[0]
        x = torch.cat([desc.detach(), neg.expand(batch, n_neg, dims)], 1)
        xa = torch.cat([x, x.new_ones(batch, x.shape[1], 1)], -1)  # the intercept's constant feature
        y = torch.cat([desc.new_ones(batch, n_pos), desc.new_full((batch, n_neg), -1.0)], 1)
        weight = torch.ones_like(y)
        if mask is not None:
            weight[:, :n_pos] = mask.to(desc.dtype)
        theta = desc.new_zeros(batch, dims + 1)
        eye = torch.eye(dims + 1, dtype=desc.dtype, device=desc.device)
        steps = 0.5 ** torch.arange(20, dtype=desc.dtype, device=desc.device)  # 1, 1/2, ..., 2^-19
        for _ in range(self.n_iter):
            margins = torch.einsum("bnd,bd->bn", xa, theta)
            slack = (1 - y * margins).clamp_min(0)
            active = weight * (slack > 0).to(desc.dtype)
            grad = theta - 2 * self.C * torch.einsum("bn,bnd->bd", weight * y * slack, xa)
            hess = eye + 2 * self.C * torch.einsum("bn,bnd,bne->bde", active, xa, xa)
            direction = -torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)  # hess >= I: always solvable
            # Armijo backtracking: the largest step of 1, 1/2, ... that decreases enough (step
            # 0 when none does, i.e. at the optimum to rounding).
            current = self._objective(theta, xa, y, weight)
            trial = self._objective(theta.unsqueeze(1) + steps.view(1, -1, 1) * direction.unsqueeze(1), xa, y, weight)
            slope = (grad * direction).sum(-1)
            ok = trial <= current.unsqueeze(1) + 1e-4 * steps.unsqueeze(0) * slope.unsqueeze(1)
            first = torch.where(ok.any(1), ok.to(torch.int64).argmax(1), steps.numel())
            step = torch.cat([steps, steps.new_zeros(1)])[first]
            theta = theta + step.unsqueeze(1) * direction
        return theta[:, :dims], theta[:, dims]

    def score(self, state: Tuple[Tensor, Tensor], queries: Tensor) -> Tensor:
        w, b = state
        return torch.einsum("bqd,bd->bq", queries, w) + b.unsqueeze(1)

    def score_pool(self, state: Tuple[Tensor, Tensor], pool: Tensor) -> Tensor:
        w, b = state
        return w @ pool.transpose(0, 1) + b.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"n_negatives={self.negatives.shape[0]}, C={self.C}, n_iter={self.n_iter}"


def make_scorer(
    name: str,
    n_iter: int = MIXTURE_DEFAULTS.n_iter,
    var_floor: float = MIXTURE_DEFAULTS.var_floor,
    tol: float = MIXTURE_DEFAULTS.tol,
    backward: Union[str, ImplicitBackward] = MIXTURE_DEFAULTS.backward,
    negatives: Optional[Tensor] = None,
    svm_c: float = SVM_DEFAULTS.C,
) -> SetScorer:
    """A scorer by name: ``gauss`` (S2M-Gauss), ``gmm2``..``gmm4`` (S2M-GMMk, or any
    ``gmm<K>``), ``avg``, ``nn`` or ``svm``. ``n_iter``, ``var_floor``, ``tol`` and
    ``backward`` apply to the mixtures (see :class:`GMMScorer`); ``negatives`` (M, D), which
    ``svm`` requires, and ``svm_c`` to the SVM (see :class:`SVMScorer`)."""
    if name == "gauss":
        return GMMScorer(1, n_iter, var_floor, tol=tol, backward=backward)
    match = re.fullmatch(r"gmm([1-9][0-9]*)", name)
    if match:
        return GMMScorer(int(match.group(1)), n_iter, var_floor, tol=tol, backward=backward)
    if name == "avg":
        return AvgScorer()
    if name == "nn":
        return NNScorer()
    if name == "svm":
        if negatives is None:
            raise ValueError("scorer 'svm' needs negatives: an (M, D) tensor of descriptors of other classes' images")
        return SVMScorer(negatives, svm_c)
    raise ValueError(f"unknown scorer {name!r}: expected one of {', '.join(EVAL_SCORER_NAMES)} (or gmm<K>)")


def short_name(name: str) -> str:
    """A scorer's name in tables: Gauss, GMM2, AVG, NN, SVM."""
    return "Gauss" if name == "gauss" else name.upper()


def display_name(name: str) -> str:
    """The paper's name of a scorer trained end-to-end: S2M-Gauss, S2M-GMM2, AVG-FT, NN-FT."""
    if name == "gauss":
        return "S2M-Gauss"
    if name.startswith("gmm"):
        return "S2M-" + name.upper()
    return name.upper() + "-FT"
