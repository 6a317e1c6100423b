"""Public API: :class:`DiagGMM` (a batch of diagonal Gaussian mixtures) and :func:`fit_gmm`
(batched weighted EM with an analytic backward), backed by the ``torch.ops.s2m`` ops."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _validation as V
from . import implicit
from ._ops import ops
from ._rules import limits

__all__ = ["DiagGMM", "fit_gmm", "ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """Some sets did not meet ``tol`` within ``n_iter`` EM iterations."""


class DiagGMM:
    """A batch of B diagonal Gaussian mixtures with K components in D dimensions.

    Attributes:
        log_weights: (B, K) log mixture weights, normalised over K.
        means: (B, K, D) component means.
        variances: (B, K, D) component variances, > 0.
        loglik: (B,) mean weighted log-likelihood of the fitted data (set by
            :func:`fit_gmm`, else None). A diagnostic: no gradient flows through it.
        n_iter: (B,) int64 EM iterations each set ran (set by :func:`fit_gmm`, else None).
        converged: (B,) bool, whether each set met ``tol`` (set by :func:`fit_gmm`, else None).

    The constructor checks shapes, dtypes and devices, and, while value checks are on (see
    :func:`s2m_ext.set_validation`), that the parameters are finite, the variances positive
    and the weights normalised (logsumexp over K within sqrt(eps) + K eps of 0, the
    rounding a K-term normalisation can leave in the dtype). Everything is differentiable with respect to the parameters
    and the scored points.
    """

    __slots__ = ("log_weights", "means", "variances", "loglik", "n_iter", "converged")

    def __init__(self, log_weights: Tensor, means: Tensor, variances: Tensor) -> None:
        V.check_tensor(means, "means", 3, "(B, K, D)")
        V.check_tensor(log_weights, "log_weights", 2, "(B, K)")
        V.check_tensor(variances, "variances", 3, "(B, K, D)")
        V.check_float_dtype(means, "means")
        for t, name in ((log_weights, "log_weights"), (variances, "variances")):
            if t.dtype != means.dtype:
                raise TypeError(f"{name} must have the dtype of means ({means.dtype}), got {t.dtype}")
            V.check_same_device(t, name, means, "means")
        b, k, d = means.shape
        if k < 1 or d < 1:
            raise ValueError(f"means must have K >= 1 components and D >= 1 dimensions, got shape {tuple(means.shape)}")
        if tuple(log_weights.shape) != (b, k):
            raise ValueError(f"log_weights must have shape (B, K) = {(b, k)} to match means, got {tuple(log_weights.shape)}")
        if variances.shape != means.shape:
            raise ValueError(f"variances must have the shape of means {tuple(means.shape)}, got {tuple(variances.shape)}")
        if V.value_checks_enabled() and not means.is_meta:
            V.check_finite(means, "means", dims=d)
            V.check_finite(log_weights, "log_weights")
            V.check_finite(variances, "variances")
            if variances.numel() and float(variances.detach().min()) <= 0:
                raise ValueError("variances must be finite and > 0")
            # Evaluated in float64, against what rounding leaves of a K-term normalisation in
            # the dtype (up to K eps, summed in sequence): a fit or log_softmax of K = 4e6
            # float32 components is off by 1e-3, unnormalised logits by O(1).
            eps = torch.finfo(means.dtype).eps
            tol = math.sqrt(eps) + k * eps
            lse = torch.logsumexp(log_weights.detach().double(), dim=1)
            if b > 0 and bool((lse.abs() > tol).any()):
                raise ValueError(
                    f"log_weights must be normalised (logsumexp over K equal to 0 within {tol:.2g}), got up to "
                    f"{float(lse.abs().max()):.3g} away; pass log_softmax(logits, dim=1)"
                )
        self.log_weights, self.means, self.variances = log_weights, means, variances
        self.loglik: Optional[Tensor] = None
        self.n_iter: Optional[Tensor] = None
        self.converged: Optional[Tensor] = None

    @classmethod
    def _from_fit(cls, log_weights, means, variances, loglik, n_iter, converged) -> "DiagGMM":
        """Wrap the output of EM without re-validating it."""
        gmm = cls.__new__(cls)
        gmm.log_weights, gmm.means, gmm.variances = log_weights, means, variances
        gmm.loglik, gmm.n_iter, gmm.converged = loglik, n_iter, converged
        return gmm

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def n_components(self) -> int:
        return self.means.shape[1]

    @property
    def dim(self) -> int:
        return self.means.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    def params(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(log_weights, means, variances)."""
        return self.log_weights, self.means, self.variances

    # ------------------------------------------------------------------ scoring
    def _check_points(self, z, name: str, ndim: int, shape: str) -> Tensor:
        """The checks of queries made before scoring them; their values are checked after
        (:func:`~s2m_ext._validation.check_scored_queries`)."""
        V.check_tensor(z, name, ndim, shape)
        if z.dtype != self.dtype:
            raise TypeError(f"{name} must have the dtype of the mixture ({self.dtype}), got {z.dtype}")
        V.check_same_device(z, name, self.means, "the mixture")
        if z.shape[-1] != self.dim:
            raise ValueError(f"{name}.shape[-1] must equal the mixture dimension D = {self.dim}, got {z.shape[-1]}")
        return z

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density of paired queries: z (B, Q, D), row b scored by mixture b -> (B, Q)."""
        self._check_points(z, "z", 3, "(B, Q, D)")
        if z.shape[0] != self.batch_size:
            raise ValueError(f"z.shape[0] must equal the number of mixtures B = {self.batch_size}, got {z.shape[0]}")
        scores = ops.score_paired(z, *self.params())
        V.check_scored_queries(z, scores, "z", self.dim)
        return scores

    def log_prob_pool(self, z: Tensor) -> Tensor:
        """Log-density of every item of a shared pool z (M, D) under every mixture -> (B, M).

        On the CPU computed as matrix products over the pool (``csrc/cpu/score_pool_cpu.cpp``):
        in float32 its rounding error grows with the spread of z and the means around their
        centre divided by the variances. On CUDA a fused kernel evaluates the quadratic form
        directly."""
        self._check_points(z, "z", 2, "(M, D)")
        scores = ops.score_pool(z, *self.params())
        V.check_scored_queries(z, scores, "z", self.dim)
        return scores

    def topk_pool(self, pool, k: int, chunk_size: Optional[int] = None, **kwargs) -> Tuple[Tensor, Tensor]:
        """The k best items of a pool under every mixture -> (values, indices), each (B, min(k, M)),
        descending, ties by the lower index; the pool is streamed in chunks, no gradient.
        See :func:`s2m_ext.search.topk_pool` for the pool kinds and options."""
        from .search import topk_pool

        return topk_pool(self, pool, k, chunk_size=chunk_size, **kwargs)

    def to_distribution(self) -> torch.distributions.MixtureSameFamily:
        """The same mixtures as a ``torch.distributions.MixtureSameFamily`` with batch shape
        (B,) and event shape (D,): its ``log_prob(z)`` takes z of shape (..., B, D)."""
        D = torch.distributions
        components = D.Independent(D.Normal(self.means, self.variances.sqrt()), 1)
        return D.MixtureSameFamily(D.Categorical(logits=self.log_weights), components)

    # ------------------------------------------------------------------ conveniences
    def detach(self) -> "DiagGMM":
        """A copy whose parameters are detached from the autograd graph (e.g. for a cache)."""
        return DiagGMM._from_fit(
            self.log_weights.detach(), self.means.detach(), self.variances.detach(),
            self.loglik, self.n_iter, self.converged,
        )

    def to(self, *args, **kwargs) -> "DiagGMM":
        """Move or cast the parameters like ``Tensor.to``; fit diagnostics move along."""
        move = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        dev_only = lambda t: None if t is None else t.to(device=move(self.means).device)  # noqa: E731
        return DiagGMM._from_fit(
            move(self.log_weights), move(self.means), move(self.variances),
            move(self.loglik), dev_only(self.n_iter), dev_only(self.converged),
        )

    def __getitem__(self, index) -> "DiagGMM":
        """Select mixtures along the batch dimension (int, slice, index or mask tensor)."""
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"mixture index {index} is out of range for B = {self.batch_size}")
            index %= self.batch_size
            index = slice(index, index + 1)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return DiagGMM._from_fit(
            self.log_weights[index], self.means[index], self.variances[index],
            pick(self.loglik), pick(self.n_iter), pick(self.converged),
        )

    def __repr__(self) -> str:
        return (
            f"DiagGMM(batch_size={self.batch_size}, n_components={self.n_components}, dim={self.dim}, "
            f"dtype={self.dtype}, device={self.device})"
        )


InitParams = Tuple[Tensor, Tensor, Tensor]
#: The initial parameters of a k-means++ fit from x (B,N,D), weights (B,N), uniforms (B,K) and
#: var_floor: ``ops.kmeanspp_init`` or :func:`s2m_ext.reference.kmeanspp_init`.
Initialiser = Callable[[Tensor, Tensor, Tensor, float], InitParams]
#: k-means++ randomness: torch's global RNG (None), one generator for the batch, or one per set.
GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


def _check_generator(generator, batch: int) -> GeneratorArg:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(
                f"generator must hold one torch.Generator per set (B = {batch}), got a {type(generator).__name__} of "
                f"{len(generator)}: {sorted({type(g).__name__ for g in generator})}"
            )
        return tuple(generator)
    raise TypeError(
        f"generator must be a torch.Generator, a list of B torch.Generators or None, got {type(generator).__name__}"
    )


def _uniforms(generator: GeneratorArg, batch: int, k: int, device: torch.device) -> Tensor:
    """(B, k) float64 uniforms for the k-means++ draws. Per-set generators give each set the
    draws it would get fitted alone, whatever the batch it is in."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.rand((batch, k), generator=generator, dtype=torch.float64, device=gen_device).to(device)
    return torch.cat([torch.rand((1, k), generator=g, dtype=torch.float64, device=g.device).to(device) for g in generator])


def _kmeanspp_init(
    x: Tensor, weights: Tensor, k: int, var_floor: float, generator: GeneratorArg, initialiser: Initialiser
) -> InitParams:
    """k-means++ means, the set's weighted per-dimension variance + var_floor for every
    component, and uniform weights. Constants for autograd (computed without history)."""
    with torch.no_grad():
        uniforms = _uniforms(generator, x.shape[0], k, x.device)
        return initialiser(x.detach(), weights.detach(), uniforms, var_floor)


def prepare_fit(
    x,
    weights,
    n_components,
    n_iter,
    init,
    var_floor,
    generator,
    tol,
    initialiser: Initialiser,
) -> Tuple[Tensor, Tensor, InitParams, Dict[str, float]]:
    """Validate :func:`fit_gmm`'s arguments and build the initial parameters."""
    V.check_tensor(x, "x", 3, "(B, N, D)")
    V.check_float_dtype(x, "x")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"x must hold N >= 1 points of D >= 1 dimensions per set, got shape {tuple(x.shape)}")
    n_iter = V.check_int(n_iter, "n_iter", 0)
    var_floor = V.check_nonnegative_float(var_floor, "var_floor")
    tol = V.check_nonnegative_float(tol, "tol")
    if n_components is not None:
        n_components = V.check_int(n_components, "n_components", 1)
    generator = _check_generator(generator, x.shape[0])
    V.check_var_floor(var_floor, x.dtype)
    largest_x = V.check_finite(x, "x", dims=x.shape[2])
    weights = V.normalise_weights(weights, x)
    V.check_fit_scale(weights, largest_x, x.shape[2])

    if isinstance(init, DiagGMM):
        batch, _, dims = x.shape
        if init.batch_size != batch or init.dim != dims:
            raise ValueError(
                f"init must hold B = {batch} mixtures in D = {dims} dimensions to match x, got "
                f"B = {init.batch_size}, D = {init.dim}"
            )
        if init.dtype != x.dtype:
            raise TypeError(f"init must have the dtype of x ({x.dtype}), got {init.dtype}")
        V.check_same_device(init.means, "init", x, "x")
        if n_components is not None and n_components != init.n_components:
            raise ValueError(
                f"n_components = {n_components} contradicts init, which has {init.n_components} components"
            )
        params = init.params()
        var_min = limits(x.dtype)[2]
        if V.value_checks_enabled() and not init.variances.is_meta and float(init.variances.detach().min()) < var_min:
            raise ValueError(
                f"init.variances must be >= eps**2 = {var_min:.3g} for {str(x.dtype).replace('torch.', '')} "
                f"(the least variance a fit can hold), got {float(init.variances.detach().min()):.3g}"
            )
    elif isinstance(init, str):
        if init != "kmeans++":
            raise ValueError(f"init must be 'kmeans++' or a DiagGMM, got {init!r}")
        params = _kmeanspp_init(x, weights, 2 if n_components is None else n_components, var_floor, generator, initialiser)
    else:
        raise TypeError(f"init must be 'kmeans++' or a DiagGMM, got {type(init).__name__}")
    return x, weights, params, {"n_iter": n_iter, "var_floor": var_floor, "tol": tol}


def fit_gmm(
    x: Tensor,
    weights: Optional[Tensor] = None,
    n_components: Optional[int] = None,
    n_iter: int = 10,
    init: Union[str, DiagGMM] = "kmeans++",
    var_floor: float = 1e-3,
    generator: GeneratorArg = None,
    tol: float = 0.0,
    backward: Union[str, implicit.ImplicitBackward] = "unrolled",
) -> DiagGMM:
    """Fit one diagonal Gaussian mixture to each of B weighted point sets by EM.

    Args:
        x: (B, N, D) points; float32 or float64 (also float16/bfloat16 on CUDA).
        weights: (B, N) point weights >= 0 (0 marks padding; a bool mask works too).
            Default: all ones. Integer weights act like repeated points.
        n_components: K. Default 2, or the K of ``init`` when it is a DiagGMM.
        n_iter: EM iterations T (>= 0); T = 0 returns the initial parameters.
        init: ``"kmeans++"`` (batched D^2 seeding drawn from ``generator``; variances the
            set's weighted variance + var_floor; uniform weights) or a :class:`DiagGMM` to
            warm-start from (e.g. a per-class cache).
        var_floor: added to every fitted variance (>= 0).
        generator: torch.Generator for the k-means++ draws (default: torch's global RNG on
            x's device), or a list of B generators, one per set: each set then gets the
            draws it would get fitted alone (independent of batching). The same seeds give
            the same fit.
        tol: stop a set early once its mean log-likelihood changes by less than tol between
            iterations (scikit-learn's rule); 0 (default) runs exactly n_iter iterations.
        backward: ``"unrolled"`` (default): differentiate the iterations that ran, keeping
            every iterate (memory O(T*B*K*D)). ``"implicit"``: differentiate the fixed point
            theta* = F(theta*) the fit converged to (memory O(B*K*D) whatever T; fit to
            convergence, e.g. a large n_iter with tol > 0); an
            :class:`s2m_ext.ImplicitBackward` sets its solver, tolerance and iteration cap.
            See :mod:`s2m_ext.implicit`.

    Returns:
        DiagGMM with (B, K) log_weights, (B, K, D) means and variances, differentiable with
        respect to x and weights (and a warm-start init's tensors) through an analytic
        backward over the T iterations (or implicitly); plus loglik, n_iter and converged
        diagnostics.
    """
    implicit_config = implicit.resolve_backward(backward)
    x, weights, init_params, cfg = prepare_fit(
        x, weights, n_components, n_iter, init, var_floor, generator, tol, initialiser=ops.kmeanspp_init
    )
    if implicit_config is not None:
        lw, mu, var, loglik, used, converged = implicit.fit_implicit(
            x, weights, init_params, cfg["n_iter"], cfg["var_floor"], cfg["tol"], implicit_config
        )
    else:
        keep_trajectory = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, *init_params))
        lw, mu, var, loglik, used, converged = ops.em_fit(
            x, weights, *init_params, cfg["n_iter"], cfg["var_floor"], cfg["tol"], keep_trajectory
        )
        lw, mu, var = lw[-1], mu[-1], var[-1]
    # float16/bfloat16 are fitted in float32 (see _ops.fit_dtype); the parameters come back in x.dtype.
    gmm = DiagGMM._from_fit(lw.to(x.dtype), mu.to(x.dtype), var.to(x.dtype), loglik, used, converged)
    if cfg["tol"] > 0 and V.value_checks_enabled() and not converged.is_meta:
        stalled = int((~converged).sum())
        if stalled:
            warnings.warn(
                f"{stalled} of {x.shape[0]} sets did not converge within n_iter={cfg['n_iter']} "
                f"iterations (tol={cfg['tol']})",
                ConvergenceWarning,
                stacklevel=2,
            )
    return gmm
