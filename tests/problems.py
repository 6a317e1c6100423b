"""Random EM problems for the tests: clustered points, weights, and initial parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from s2m_ext import reference


@dataclass
class Problem:
    x: Tensor  # (B, N, D)
    weights: Tensor  # (B, N)
    init: Tuple[Tensor, Tensor, Tensor]  # log_weights (B,K), means (B,K,D), variances (B,K,D)
    var_floor: float

    def to(self, dtype: torch.dtype, device="cpu") -> "Problem":
        cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
        return Problem(cast(self.x), cast(self.weights), tuple(cast(t) for t in self.init), self.var_floor)


def make_problem(
    B: int,
    N: int,
    D: int,
    K: int,
    *,
    scale: float = 1.0,
    pad: bool = False,
    duplicate: bool = False,
    var_floor: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Problem:
    """A float64 problem: K well-separated clusters per set (so EM has real work), positive
    weights in [0.5, 1.5), optional zero-weight padding at the end of each set and
    duplicated points, and k-means++ initial parameters drawn by the reference."""
    g = generator if generator is not None else torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    f64 = torch.float64
    centres = 3.0 * torch.randn(B, K, D, generator=g, dtype=f64)
    labels = torch.randint(0, K, (B, N), generator=g)
    x = centres.gather(1, labels.unsqueeze(-1).expand(B, N, D)) + torch.randn(B, N, D, generator=g, dtype=f64)
    if duplicate:
        x[:, 1::2] = x[:, 0::2][:, : x[:, 1::2].shape[1]]
    x = x * scale
    w = 0.5 + torch.rand(B, N, generator=g, dtype=f64)
    if pad and N > 1:
        valid = torch.randint(1, N, (B,), generator=g)
        w = torch.where(torch.arange(N).unsqueeze(0) < valid.unsqueeze(1), w, torch.zeros_like(w))
    floor = 1e-3 * scale**2 if var_floor is None else var_floor
    u = torch.rand(B, K, generator=g, dtype=f64)
    return Problem(x, w, reference.kmeanspp_init(x, w, u, floor), floor)


def rel_err(actual: Tensor, expected: Tensor, scale: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, scale): the inf-norm relative error, in
    float64. ``scale`` sets a floor for tensors that may vanish (see assert_grads_rel)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    if e.numel() == 0:
        return 0.0
    denom = max(e.abs().max().item(), scale)
    return (a - e).abs().max().item() / (denom if denom > 0 else 1.0)


def assert_rel(actual: Tensor, expected: Tensor, rtol: float, what: str = "", scale: float = 0.0) -> None:
    err = rel_err(actual, expected, scale)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"


def assert_grads_rel(actual, expected, rtol: float, names) -> None:
    """Gradients compared relative to the largest gradient of the problem: a single one can
    vanish by symmetry (e.g. the weights of a one-point set, since the fit is invariant to
    scaling all weights), and then only its absolute rounding error is meaningful."""
    scale = max((e.detach().abs().max().item() for e in expected if e.numel()), default=0.0)
    for got, want, name in zip(actual, expected, names):
        assert got.dtype == actual[0].dtype
        assert_rel(got, want, rtol, f"d/d{name}", scale)


#: Relative tolerances against the float64 reference. float64: the ops and the reference
#: differ only in summation order (~1e-15 per op), with headroom for the conditioning of a
#: few EM iterations. float32: a unit roundoff of 6e-8 grown by reductions over N and D.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def float32_bar(plain_error: float) -> float:
    """The bar of a float32 step checked against float64: 8 times the error of the same step
    taken plainly in float32 by the reference (same rules, different summation orders:
    measured ratios up to ~6.5 for the log-likelihood), and at least 32 float32 ulps (3.8e-6)
    where the plain step happens to be near exact (e.g. K = 1 log weights). An exp one
    polynomial term short (relative error 2.9e-5) fails it; a fixed 1e-4 floor would not."""
    return max(8.0 * plain_error, 32.0 * torch.finfo(torch.float32).eps)


FIELDS = ("log_weights", "means", "variances", "loglik")


def reference_loglik(p, device, params, dtype=torch.float64):
    """The reference's mean weighted log-likelihood of p's points under params (B,), in ``dtype``."""
    q = p.to(dtype, device)
    return reference.em_fit(q.x, q.weights, *(t.to(dtype) for t in params), 0, q.var_floor)[3]


def step_problems(traj, p, device, dtype):
    """The T one-step problems of a trajectory (log_weights, means, variances), each
    (T+1, B, ...), as one batch of T*B sets: (x, weights, log_weights, means, variances) with
    set t*B + b starting from state t of set b, in ``dtype`` on ``device``."""
    T, B = traj[0].shape[0] - 1, traj[0].shape[1]
    q = p.to(dtype, device)
    starts = [s[:-1].to(dtype=dtype, device=device).reshape(T * B, *s.shape[2:]) for s in traj]
    return [q.x.repeat(T, 1, 1), q.weights.repeat(T, 1), *starts]


def reference_steps(traj, p, device, dtype=torch.float64, em_fit=reference.em_fit):
    """One EM step from every state 0..T-1 of a trajectory: the (T, B, ...) states that
    ``em_fit`` (the reference's signature and outputs) reaches, computed in ``dtype``."""
    T = traj[0].shape[0] - 1
    stepped = em_fit(*step_problems(traj, p, device, dtype), 1, p.var_floor)[:3]
    return [s.reshape(T, -1, *s.shape[1:]) for s in stepped]


def assert_matches_reference(out, p, device, n_iter, dtype):
    """``out`` is the op's em_fit output with its trajectory.

    float64: every state of the trajectory equals the reference run for as many iterations to
    1e-10, and the log-likelihood equals the reference's under the op's final parameters (a
    component collapsed onto a point, var_floor = 0, has variance eps**2, so the likelihood
    moves by O(0.1) when its mean moves by one ulp; the parameters are held to 1e-10 instead).

    float32: each step separately. T EM iterations can amplify a relative perturbation of
    1e-7 into 1e-3 (measured on fresh random problems: a component on the edge of splitting),
    so two float32 runs, ours and the reference's, legitimately drift apart at the end. What
    the op owes is that every step it took is an accurate EM step: state t+1 equals one
    float64 reference step from the op's own state t within float32_bar of the error of the
    same step taken plainly in float32 (the same dtype rules: clamps, dead thresholds,
    underflow, where float32 and float64 differ by design)."""
    traj, loglik = out[:3], out[3]
    assert traj[0].shape[0] == n_iter + 1
    if dtype == torch.float64:
        q = p.to(dtype, device)
        exact = q.init
        for t in range(1, n_iter + 1):  # the reference's trajectory, one iteration at a time
            exact = reference.em_fit(q.x, q.weights, *exact, 1, q.var_floor)[:3]
            for got, want, name in zip(traj, exact, FIELDS):
                assert_rel(got[t], want, RTOL[dtype], f"{name} after {t} iterations")
        final = [s[-1] for s in traj]
        assert_rel(loglik, reference_loglik(p, device, final), RTOL[dtype], "loglik")
        return
    exact = reference_steps(traj, p, device)
    plain = reference_steps(traj, p, device, dtype)
    for got, pl, want, name in zip(traj, plain, exact, FIELDS):
        bar = float32_bar(rel_err(pl, want))
        assert_rel(got[1:], want, bar, f"{name}: one step from the op's previous state")
    final = [s[-1] for s in traj]
    want, pl = reference_loglik(p, device, final), reference_loglik(p, device, final, dtype)
    assert_rel(loglik, want, float32_bar(rel_err(pl, want)), "loglik of the op's final parameters")


#: (B, N, D, K, options) covering the shapes the standards ask for.
SHAPES = [
    ("generic", 3, 17, 5, 3, {}),
    ("odd-large", 2, 61, 13, 4, {}),
    ("N<K", 3, 3, 4, 5, {}),
    ("K=1", 4, 20, 6, 1, {}),
    ("D=1", 3, 15, 1, 2, {}),
    ("N=1", 2, 1, 3, 2, {}),
    ("padded", 5, 33, 7, 4, {"pad": True}),
    ("duplicates", 3, 16, 4, 3, {"duplicate": True}),
    ("tiny-scale", 3, 25, 5, 2, {"scale": 1e-4}),
    ("huge-scale", 3, 25, 5, 2, {"scale": 1e4}),
    ("no-floor", 3, 25, 5, 3, {"var_floor": 0.0}),
    ("chunks", 2, 1100, 3, 3, {}),  # three point chunks of the CPU kernels, the last one partial
]
