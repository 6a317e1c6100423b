"""The contenders: what a user could run instead of s2m_ext, each at the same work.

A contender turns a :class:`~bench.workloads.Problem` into a :class:`Prepared` call: a
zero-argument function that does the work of one workload call (and is what gets timed),
plus a function that turns its raw output into float64 CPU tensors that the suite compares
with s2m_ext's output, so a contender that silently does less (or other) work is caught.

Outputs compared, per workload: ``forward`` and ``seed`` -> log_weights (B,K), means and
variances (B,K,D); ``fwd_bwd`` -> grad_x (B,N,D); ``pool`` -> scores (B,M); ``paired`` ->
scores (B,Q).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .workloads import SCORING_WORKLOADS, Problem, Shape

Output = Dict[str, Tensor]
LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class Prepared:
    """call(): one timed call, returning its raw output. extract(raw): the comparable
    output (float64 CPU tensors). compiles: the first call includes compilation."""

    call: Callable[[], Any]
    extract: Callable[[Any], Output]
    compiles: bool = False


def _linear_loss(params: Tuple[Tensor, Tensor, Tensor], cotangents: Tuple[Tensor, ...]) -> Tensor:
    """sum(c_lw*lw) + sum(c_mu*mu) + sum(c_var*var): its gradient through the fit is the
    vector-Jacobian product of the fit with a fixed random cotangent."""
    return sum((c * p).sum() for c, p in zip(cotangents, params))


def _params_output(lw: Tensor, mu: Tensor, var: Tensor, sets: Tensor) -> Output:
    pick = lambda t: t.detach()[sets.to(t.device)].double().cpu()  # noqa: E731
    return {"log_weights": pick(lw), "means": pick(mu), "variances": pick(var)}


def _grad_output(grad: Tensor, sets: Tensor) -> Output:
    return {"grad_x": grad.detach()[sets.to(grad.device)].double().cpu()}


def _scores_output(scores: Tensor, sets: Tensor) -> Output:
    return {"scores": scores.detach()[sets.to(scores.device)].double().cpu()}


def _seeding_call(fit_gmm: Callable, p: Problem) -> Prepared:
    """``seed``: fit_gmm(n_iter=0) (s2m_ext's or the reference's, same arguments) from a fresh
    generator of the problem's seeding seed, so every call draws the same uniforms."""

    def call() -> Tuple[Tensor, Tensor, Tensor]:
        gen = torch.Generator().manual_seed(p.seeding_seed)
        gmm = fit_gmm(p.x, p.weights, n_components=p.shape.K, n_iter=0, var_floor=p.var_floor, generator=gen)
        return gmm.params()

    return Prepared(call, lambda out: _params_output(*out, p.check_sets))


def _leaf(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(True)


def _backward_call(x: Tensor, fit: Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]],
                   cotangents: Tuple[Tensor, ...]) -> Callable[[], Tensor]:
    """One forward+backward: fit(x) -> params, then grad of the linear loss into x."""

    def call() -> Tensor:
        x.grad = None
        _linear_loss(fit(x), cotangents).backward()
        return x.grad

    return call


class Contender:
    """Base class. ``name`` is the id used on the command line and in the JSON; ``title``
    heads the table column; ``workloads`` lists what it can do; ``comparable``: its output is
    the same model as s2m_ext's, so it is checked against it."""

    name = ""
    title = ""
    workloads: Tuple[str, ...] = ("forward", "fwd_bwd", "pool", "paired")
    comparable = True
    #: runs on the CPU whatever --device says (timed and reported as such)
    cpu_only = False

    def skip_reason(self, workload: str, device: str) -> Optional[str]:
        """Why this contender cannot run ``workload`` on ``device`` (None if it can)."""
        if workload not in self.workloads:
            return f"{self.title} has no {workload} (it is forward-only)" if workload == "fwd_bwd" else (
                f"{self.title} does not do {workload}")
        return None

    def prepare(self, problem: Problem, workload: str) -> Prepared:
        raise NotImplementedError

    def memory_estimate(self, workload: str, s: Shape, itemsize: int = 4) -> float:
        """Rough upper bound (bytes) of what one call holds at its peak, beyond its inputs;
        used only to skip cells that would not fit in the machine's memory."""
        return 0.0


# ----------------------------------------------------------------------------- s2m_ext
class S2M(Contender):
    """s2m_ext's public API (fit_gmm with a DiagGMM warm start; DiagGMM.log_prob_pool and
    DiagGMM.log_prob), i.e. the C++/CUDA ops plus the input validation a user gets."""

    name = "s2m_ext"
    title = "s2m_ext"
    workloads = ("forward", "fwd_bwd", "pool", "paired", "seed")

    def prepare(self, problem: Problem, workload: str) -> Prepared:
        import s2m_ext

        s, p = problem.shape, problem
        if workload == "seed":
            return _seeding_call(s2m_ext.fit_gmm, p)
        if workload in SCORING_WORKLOADS:
            gmm = s2m_ext.DiagGMM(*p.fitted_model)
            score, z = (gmm.log_prob_pool if workload == "pool" else gmm.log_prob), p.queries(workload)
            return Prepared(lambda: score(z), lambda out: _scores_output(out, p.check_sets))
        init = s2m_ext.DiagGMM(*p.init)

        def fit(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
            return s2m_ext.fit_gmm(x, p.weights, init=init, n_iter=s.T, var_floor=p.var_floor).params()

        if workload == "forward":
            return Prepared(lambda: fit(p.x), lambda out: _params_output(*out, p.check_sets))
        return Prepared(_backward_call(_leaf(p.x), fit, p.cotangents), lambda g: _grad_output(g, p.check_sets))

    def memory_estimate(self, workload: str, s: Shape, itemsize: int = 4) -> float:
        params = s.B * s.K * (2 * s.D + 1)
        if workload == "forward":
            return itemsize * 2 * params
        if workload == "fwd_bwd":
            return itemsize * (3 * (s.T + 1) * params + 2 * s.B * s.N * (s.D + 1))
        if workload == "paired":
            return itemsize * (s.B * s.Q + 4 * params)
        if workload == "seed":
            return itemsize * (2 * s.B * s.N * s.D + 2 * params)
        return itemsize * (s.B * s.M + 4 * params + (1 << 24))


class S2MAtLevel(S2M):
    """s2m_ext with its CPU kernels forced to a lower instruction-set level than this CPU's
    best (S2M_CPU_CAPABILITY, set in the worker before its first op): the levels side by
    side in one run. Not in the default contender list."""

    cpu_only = True

    def __init__(self, level: str) -> None:
        self.cpu_capability = level
        self.name = f"s2m_ext@{level}"
        self.title = f"s2m_ext ({level})"

    def skip_reason(self, workload: str, device: str) -> Optional[str]:
        import s2m_ext

        if device != "cpu":
            return "a CPU instruction-set level"
        if self.cpu_capability not in s2m_ext.build_info()["cpu_capabilities"]:
            return f"this CPU cannot run the {self.cpu_capability} level"
        return super().skip_reason(workload, device)

    def prepare(self, problem: Problem, workload: str) -> Prepared:
        import s2m_ext

        level = s2m_ext.build_info()["cpu_capability"]
        if level != self.cpu_capability:
            raise RuntimeError(f"{self.name}: the kernels run at {level} (S2M_CPU_CAPABILITY set too late?)")
        return super().prepare(problem, workload)


# ----------------------------------------------------------------------------- reference
class Reference(Contender):
    """s2m_ext.reference (batched plain PyTorch), eager, differentiated by autograd."""

    name = "reference"
    title = "reference"
    workloads = ("forward", "fwd_bwd", "pool", "paired", "seed")

    compiles = False

    def wrap(self, fn: Callable) -> Callable:
        """The function that is timed: the reference itself (eager)."""
        return fn

    def prepare(self, problem: Problem, workload: str) -> Prepared:
        from s2m_ext import reference

        p = problem
        if workload == "seed":
            seeding = _seeding_call(self.wrap(reference.fit_gmm), p)
            return Prepared(seeding.call, seeding.extract, self.compiles)
        if workload in SCORING_WORKLOADS:
            score = self.wrap(reference.log_prob_pool if workload == "pool" else reference.log_prob)
            z = p.queries(workload)
            return Prepared(lambda: score(z, *p.fitted_model), lambda out: _scores_output(out, p.check_sets),
                            self.compiles)
        em = self.wrap(functools.partial(reference.em_fit, n_iter=p.shape.T, var_floor=p.var_floor))

        def fit(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
            return em(x, p.weights, *p.init)[:3]

        if workload == "forward":
            return Prepared(lambda: fit(p.x), lambda out: _params_output(*out, p.check_sets), self.compiles)
        return Prepared(_backward_call(_leaf(p.x), fit, p.cotangents), lambda g: _grad_output(g, p.check_sets),
                        self.compiles)

    def memory_estimate(self, workload: str, s: Shape, itemsize: int = 4) -> float:
        if workload == "pool":
            return itemsize * 3.0 * s.B * s.M * s.K * s.D
        if workload == "paired":
            return itemsize * 3.0 * s.B * s.Q * s.K * s.D
        bnkd = float(s.B) * s.N * s.K * s.D
        if workload in ("forward", "seed"):  # seed: the E-step of the log-likelihood dominates
            return itemsize * 3 * bnkd
        return itemsize * 3 * bnkd * (s.T + 1)


class Compiled(Reference):
    """torch.compile of s2m_ext.reference (inductor, static shapes); its first call, which
    compiles, is reported separately and never timed with the rest."""

    name = "compiled"
    title = "compiled ref"
    compiles = True

    def wrap(self, fn: Callable) -> Callable:
        # A fresh dynamo cache per prepared cell: compiling many shapes of one function would
        # otherwise hit dynamo's recompile limit and silently fall back to eager.
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)

    def memory_estimate(self, workload: str, s: Shape, itemsize: int = 4) -> float:
        # Inductor fuses the (B,N,K,D) temporaries away in the forward; the backward saves
        # per-iteration (B,N,K) and (B,N,D) terms. Keep the eager bound as a safe upper bound.
        return super().memory_estimate(workload, s, itemsize)


# ----------------------------------------------------------------------------- sklearn
class SklearnLoop(Contender):
    """A Python loop of scikit-learn GaussianMixture(covariance_type='diag') fits, one per
    set: reg_covar = var_floor, tol = 0, max_iter = T, and the shared initial parameters
    (weights_init, means_init, precisions_init = 1/variances). init_params='random_from_data'
    is its cheapest setting: sklearn computes an initialisation even when all three initial
    parameters are given, then discards it. Pool and paired scoring: a loop of score_samples
    over GaussianMixture objects holding the same fitted parameters. Always runs on the CPU."""

    name = "sklearn"
    title = "sklearn loop"
    workloads = ("forward", "pool", "paired")
    cpu_only = True

    def skip_reason(self, workload: str, device: str) -> Optional[str]:
        if importlib.util.find_spec("sklearn") is None:
            return "scikit-learn is not installed"
        return super().skip_reason(workload, device)

    @staticmethod
    def _numpy(t: Tensor):
        return t.detach().cpu().numpy()

    def prepare(self, problem: Problem, workload: str) -> Prepared:
        import numpy as np
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture

        s, p = problem.shape, problem
        if workload in SCORING_WORKLOADS:
            lw, mu, var = (self._numpy(t) for t in p.fitted_model)
            z = self._numpy(p.queries(workload))
            models: List[GaussianMixture] = []
            for b in range(s.B):
                gm = GaussianMixture(s.K, covariance_type="diag")
                gm.weights_ = np.exp(lw[b].astype(np.float64))
                gm.weights_ /= gm.weights_.sum()
                gm.means_, gm.covariances_ = mu[b], var[b]
                gm.precisions_cholesky_ = 1.0 / np.sqrt(var[b])
                models.append(gm)

            def score():
                if workload == "paired":
                    return np.stack([gm.score_samples(z[b]) for b, gm in enumerate(models)])
                return np.stack([gm.score_samples(z) for gm in models])

            return Prepared(score, lambda out: _scores_output(torch.from_numpy(out), p.check_sets))
        if workload != "forward":
            raise ValueError(f"{self.name} has no workload {workload!r}")
        x = self._numpy(p.x)
        lw0, mu0, var0 = (self._numpy(t) for t in p.init)
        # float64 weights summing to 1 exactly (sklearn checks the sum to 1e-8); means and
        # precisions keep the points' dtype so that the heavy work stays in float32.
        w0 = np.exp(lw0.astype(np.float64))
        w0 /= w0.sum(axis=1, keepdims=True)
        prec0 = 1.0 / var0

        def fit_all():
            fitted = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0 never "converges"
                for b in range(s.B):
                    gm = GaussianMixture(
                        s.K, covariance_type="diag", tol=0.0, reg_covar=p.var_floor, max_iter=s.T,
                        init_params="random_from_data", weights_init=w0[b], means_init=mu0[b],
                        precisions_init=prec0[b], random_state=0,
                    )
                    fitted.append(gm.fit(x[b]))
            return fitted

        def extract(fitted) -> Output:
            chosen = [fitted[i] for i in p.check_sets.tolist()]
            t = lambda a: torch.from_numpy(np.stack(a)).double()  # noqa: E731
            return {"log_weights": t([g.weights_ for g in chosen]).log(), "means": t([g.means_ for g in chosen]),
                    "variances": t([g.covariances_ for g in chosen])}

        return Prepared(fit_all, extract)

    def memory_estimate(self, workload: str, s: Shape, itemsize: int = 8) -> float:
        if workload == "pool":
            return itemsize * (4.0 * s.M * s.K + s.B * s.M)
        if workload == "paired":
            return itemsize * (4.0 * s.Q * s.K + s.B * s.Q)
        return itemsize * 6.0 * s.N * (s.K + s.D)


# ----------------------------------------------------------------------------- plain loop
def loop_em(x: Tensor, w: Tensor, lw: Tensor, mu: Tensor, var: Tensor, n_iter: int,
            var_floor: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """EM for ONE set, written the way a PyTorch user writes it first (no batching, no
    guards for dead components): x (N,D), w (N,), lw (K,), mu and var (K,D). Returns the
    fitted (lw, mu, var) and the mean log-likelihood under them, like the other contenders."""

    def log_joint(lw: Tensor, mu: Tensor, var: Tensor) -> Tensor:  # (N,K)
        maha = ((x[:, None, :] - mu) ** 2 / var).sum(-1)
        return lw - 0.5 * (x.shape[1] * LOG_2PI + var.log().sum(-1)) - 0.5 * maha

    for _ in range(n_iter):
        r = torch.softmax(log_joint(lw, mu, var), dim=1) * w[:, None]
        nk = r.sum(0)
        mu = (r.T @ x) / nk[:, None]
        var = (r[:, :, None] * (x[:, None, :] - mu) ** 2).sum(0) / nk[:, None] + var_floor
        lw = torch.log(nk / w.sum())
    loglik = (w * torch.logsumexp(log_joint(lw, mu, var), dim=1)).sum() / w.sum()
    return lw, mu, var, loglik


class TorchLoop(Contender):
    """A plain PyTorch loop over sets: :func:`loop_em` per set (autograd for the backward),
    and a torch.distributions.MixtureSameFamily per set for pool and paired scoring."""

    name = "torch_loop"
    title = "torch loop"

    def prepare(self, problem: Problem, workload: str) -> Prepared:
        s, p = problem.shape, problem
        if workload in SCORING_WORKLOADS:
            D = torch.distributions
            lw, mu, var = p.fitted_model
            queries = p.queries(workload)

            def score() -> Tensor:
                rows = []
                for b in range(s.B):
                    comp = D.Independent(D.Normal(mu[b], var[b].sqrt()), 1)
                    z = queries if workload == "pool" else queries[b]
                    rows.append(D.MixtureSameFamily(D.Categorical(logits=lw[b]), comp).log_prob(z))
                return torch.stack(rows)

            return Prepared(score, lambda out: _scores_output(out, p.check_sets))

        def fit(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
            per_set = [loop_em(x[b], p.weights[b], *(t[b] for t in p.init), s.T, p.var_floor) for b in range(s.B)]
            return tuple(torch.stack([f[i] for f in per_set]) for i in range(3))

        if workload == "forward":
            return Prepared(lambda: fit(p.x), lambda out: _params_output(*out, p.check_sets))
        return Prepared(_backward_call(_leaf(p.x), fit, p.cotangents), lambda g: _grad_output(g, p.check_sets))

    def memory_estimate(self, workload: str, s: Shape, itemsize: int = 4) -> float:
        if workload == "pool":
            return itemsize * (4.0 * s.M * s.K * s.D + s.B * s.M)
        if workload == "paired":
            return itemsize * (4.0 * s.Q * s.K * s.D + s.B * s.Q)
        per_set = 4.0 * s.N * s.K * s.D
        if workload == "forward":
            return itemsize * per_set
        return itemsize * per_set * (s.T + 1) * s.B


# ----------------------------------------------------------------------------- gmm-gpu
class GmmGpu(Contender):
    """gmm-gpu 0.2.8 (PyPI): batched full-covariance EM in PyTorch, forward only, CUDA.

    Not the same model (full covariance, started from the diagonal initial parameters), so
    its output is not compared with s2m_ext's; instead the suite checks that its EM did the
    work: its E-step multiplies densities instead of adding log-densities, and in float32 these
    underflow to 0 for points far from every component. Such a point gets NaN
    responsibilities and is silently left out of the M-step; a set with fewer than 2 points
    left per component is frozen after one iteration. Measured on the CPU (its device='cpu'
    mode), B=64 N=64 K=4: 3 % of sets affected at D=16, 59 % at D=32, all at D=64 and 128.
    Its fit() always runs its own k-means initialisation first (it cannot be turned off),
    which is part of its time."""

    name = "gmm_gpu"
    title = "gmm-gpu"
    workloads = ("forward",)
    comparable = False

    def skip_reason(self, workload: str, device: str) -> Optional[str]:
        if device != "cuda":
            return "gmm-gpu is a CUDA package (and pins numpy<2, which this venv does not have): GPU runs only"
        if workload not in self.workloads:
            return "gmm-gpu does only the forward fit"
        if importlib.util.find_spec("gmm_gpu") is None:
            return "gmm-gpu is not installed (see bench/README.md: bring its wheel to the GPU machine)"
        return None

    def prepare(self, problem: Problem, workload: str) -> Prepared:
        from gmm_gpu.gmm import GMM

        s, p = problem.shape, problem
        lw0, mu0, var0 = p.init
        w0 = lw0.exp()
        prec0 = torch.diag_embed(1.0 / var0)  # (B,K,D,D)
        device = str(p.x.device)

        def fit() -> Any:
            # GMM keeps views of means_init/weights_init and updates them in place: pass copies.
            gmm = GMM(s.K, max_iter=s.T, device=device, tol=0.0, reg_covar=p.var_floor, means_init=mu0.clone(),
                      weights_init=w0.clone(), precisions_init=prec0, dtype=p.dtype, random_seed=1)
            gmm.fit(p.x)
            return gmm

        def extract(gmm: Any) -> Output:
            weights = torch.stack(gmm._pi, 1)
            means = torch.stack(gmm.means, 1)
            # -inf where a point's densities underflowed under every component
            finite = torch.isfinite(gmm.score_samples(p.x, force_cpu_result=False)).all(1)
            iterated = (weights != w0).any(1)
            sets = p.check_sets.to(weights.device)
            return {"weights": weights[sets].double().cpu(), "means": means[sets].double().cpu(),
                    "valid": (finite & iterated & torch.isfinite(means).all(2).all(1)).cpu()}

        return Prepared(fit, extract)

    def memory_estimate(self, workload: str, s: Shape, itemsize: int = 4) -> float:
        return itemsize * (3.0 * s.B * s.K * s.D * s.D + 4.0 * s.B * s.N * s.K * s.D)


CONTENDERS: Dict[str, Contender] = {
    c.name: c for c in (S2M(), Reference(), Compiled(), SklearnLoop(), TorchLoop(), GmmGpu(),
                        S2MAtLevel("avx2"), S2MAtLevel("baseline"))
}
#: What a run compares unless --contenders says otherwise (the forced levels are opt-in).
DEFAULT_CONTENDERS = [n for n, c in CONTENDERS.items() if not isinstance(c, S2MAtLevel)]
BASELINE = "s2m_ext"

#: Relative tolerance of the agreement check (normwise: max|a-b| / max|b| per output). All
#: contenders compute in float32 with their own summation orders and formulas (scikit-learn:
#: E[x^2]-mu^2 variances and expanded quadratic forms). Measured against the same fits in
#: float64 at the core shape, each float32 implementation (s2m_ext included) is off by up to
#: 1.1e-3 (gradients: a few sets with nearly tied responsibilities amplify rounding through
#: the T iterations; the median set is off by 1e-5) and up to 9e-4 (fitted parameters, at
#: B=1024), so two float32 contenders can differ by ~2e-3. A fit one EM iteration short
#: differs by 0.11 (core shape) to 0.39 (a small T=3 shape). 1e-2 sits between the two.
#: (At the paper shape EM has converged by T=10: there no check can see an iteration less.)
CHECK_RTOL = 1e-2


def compare(expected: Output, got: Output) -> float:
    """Largest normwise relative difference over the outputs both hold."""
    worst = 0.0
    for key, ref in expected.items():
        if key not in got:
            continue
        out = got[key]
        if out.shape != ref.shape:
            return math.inf
        if ref.numel() == 0:
            continue
        if not bool(torch.isfinite(out).all()):
            return math.inf
        scale = ref.abs().max().item()
        diff = (out - ref).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def validity(contender: Contender, expected: Optional[Output], got: Output) -> Tuple[bool, str, Optional[float]]:
    """(ok, note, error): does the contender's output show it did the work?"""
    if contender.comparable:
        if expected is None:
            return True, "", None
        err = compare(expected, got)
        if not err <= CHECK_RTOL:  # also catches NaN
            return False, f"output differs from s2m_ext (rel. err {err:.1e} > {CHECK_RTOL:.0e})", err
        return True, "", err
    if "valid" in got:
        frac = float(got["valid"].double().mean())
        if frac < 1.0:
            return False, (f"float32 density underflow in {100 * (1 - frac):.0f}% of sets: points with NaN "
                           f"responsibilities are dropped, or the set stops after one iteration"), None
    return True, "", None
