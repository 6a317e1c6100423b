"""Adjoint solvers of the implicit backward: the gradient of EM's fixed point.

With F the one-step EM map (E-step then M-step), a converged fit satisfies
theta* = F(theta*; x, w). For a loss L(theta*) with g = dL/dtheta*, the implicit function
theorem gives

    u = g + (dF/dtheta)^T u,        dL/dx = (dF/dx)^T u,        dL/dw = (dF/dw)^T u,

all Jacobians at theta*. This gradient is exact for the optimum, does not depend on the
path EM took, and needs memory O(B*K*D) whatever the number of EM iterations: the forward
keeps only the final parameters, and every product with (dF/dtheta)^T is one call of the
analytic one-step backward ``torch.ops.s2m.em_fit_backward`` on the two-step trajectory
[theta*, F(theta*)]. Nothing here is device specific: it runs wherever the s2m ops have
kernels.

Parametrisation (per set, a vector of P = K + 2*K*D numbers: log weights, means, variances).
The M-step normalises the weights, so shifting all log weights by a constant does not change
F: dF/dtheta has the eigenvalue 0 there, which is harmless for I - (dF/dtheta)^T. At a strict
local maximum of the likelihood (var_floor = 0) the other eigenvalues are real and lie in
[0, 1): their largest is EM's linear rate of convergence rho, so the fixed-point iteration
converges at EM's own rate and GMRES, on a spectrum of I - J^T in (0, 1], much faster when rho
is close to 1. A floor perturbs F only slightly.

Solvers (:class:`ImplicitBackward`): ``"fixed_point"`` (default; u <- g + J^T u, about ten
parameter-sized (B, P) buffers) or ``"gmres"`` (restarted GMRES, batched per set; restart + 1
more buffers). Each set stops on its own tolerance; finished sets leave the batch.

Failed solves. A set fails when its residual does not reach the tolerance within max_iter
products, or when its solution is ill-conditioned (||u|| > ||g|| / sqrt(eps): fewer than half
the digits are meaningful, e.g. at a singular optimum where GMRES finds a huge solution of a
system that is singular up to rounding). It gets an :class:`ImplicitGradientWarning` and,
instead of the implicit gradient, the fixed-point iterate u_m = sum_{i<m} (J^T)^i g of
smallest residual among m <= max_iter (for GMRES, from a fixed-point run after it): exactly
the adjoint of m EM steps unrolled at the fit, finite, and bounded where the series diverges
(at a fit that is not a stable fixed point).

Parameters the fixed-point equation does not determine are treated like the unrolled
backward treats them, exactly:

* a dead component (Nk <= W * eps at theta*: it keeps its previous mean and variance, so
  F is the identity there) passes the gradient of its mean and variance to the initial
  parameters and none to x or w;
* a set without weight (W = 0, reachable only with value checks off) keeps all its
  parameters: its whole gradient goes to the initial parameters.

Alive components get a zero gradient for the initial parameters: the optimum does not
depend on where EM started. Clamped variances have no gradient, as in the unrolled backward
(the one-step backward zeroes them).

Used through ``s2m_ext.fit_gmm(..., backward="implicit")`` (:mod:`s2m_ext.implicit`); the
functions here are for callers that hold a fit and want the adjoint itself.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .implicit import ImplicitBackward, ImplicitGradientWarning

__all__ = ["AdjointSolution", "implicit_vjp", "one_step_trajectory", "solve_adjoint"]

ops = torch.ops.s2m


# ----------------------------------------------------------------------------- parameters
def _pack(log_weights: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """(B,K), (B,K,D), (B,K,D) -> (B, P) with P = K + 2KD."""
    return torch.cat((log_weights, means.flatten(1), variances.flatten(1)), dim=1)


def _unpack(v: Tensor, k: int, d: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(B, P) -> (B,K), (B,K,D), (B,K,D) (views)."""
    lw, mu, var = torch.split(v, (k, k * d, k * d), dim=1)
    return lw, mu.unflatten(1, (k, d)), var.unflatten(1, (k, d))


def _norm(v: Tensor) -> Tensor:
    """Per-set 2-norm of (b, P), accumulated in float64."""
    return torch.linalg.vector_norm(v, dim=1, dtype=torch.float64)


def _frozen(weights: Tensor, lw_next: Tensor, d: int) -> Tensor:
    """(B, P) bool: the entries the fixed-point equation leaves undetermined (F is the
    identity there). Dead components are read off F's log weight log(Nk / W): the kernels
    kill a component when Nk <= W * eps(dtype), i.e. when log(Nk / W) <= log(eps)."""
    b, k = lw_next.shape
    no_weight = (weights.sum(1) <= 0).unsqueeze(1)  # (B,1)
    dead = lw_next <= math.log(torch.finfo(lw_next.dtype).eps)  # (B,K)
    dead_kd = (dead | no_weight).unsqueeze(-1).expand(b, k, d).flatten(1)
    return torch.cat((no_weight.expand(b, k), dead_kd, dead_kd), dim=1)


#: On the CPU the solve's products with J^T run over chunks of sets whose (dF/dx)^T
#: temporaries (which the solve discards) hold about as many elements as one parameter
#: vector of the batch, and at least this many; a subset of the sets gathers its points chunk
#: by chunk. The solve then never holds an x-sized buffer. GPUs take the whole batch at once
#: (a subset is copied out once).
CPU_CHUNK_ELEMENTS = 1 << 18


class _OneStepVJP:
    """Products with the transposed Jacobians of F at theta* for a batch of sets, each one call
    of ``em_fit_backward`` per chunk of sets on the trajectory [theta*, F(theta*)] with upstream
    gradients [0, v] (kept in one reused buffer).

    ``x``, ``weights`` and ``traj`` hold the sets of ``rows`` (indices into them; None: all, in
    order); ``free`` (b, P) and the products are for the batch's b sets in that order."""

    def __init__(
        self, x: Tensor, weights: Tensor, traj: Tuple[Tensor, Tensor, Tensor], free: Tensor, var_floor: float,
        rows: Optional[Tensor] = None,
    ):
        self.x, self.weights, self.traj, self.free, self.var_floor, self.rows = x, weights, traj, free, var_floor, rows
        batch, (n, d) = free.shape[0], x.shape[1:]
        self.k, self.d = traj[1].shape[2], d
        self.used = torch.ones(batch, dtype=torch.long, device=x.device)
        self.upstream = [x.new_zeros((2, batch, *t.shape[2:]), dtype=t.dtype) for t in traj]  # step 0 stays zero
        if x.device.type == "cpu":
            budget = max(CPU_CHUNK_ELEMENTS, batch * free.shape[1])
            self.chunk = min(batch, max(torch.get_num_threads(), budget // max(n * d, 1)))
        else:
            self.chunk = max(batch, 1)

    def subset(self, keep: Tensor) -> "_OneStepVJP":
        """The same products for the sets ``keep`` (bool (b,)) of this batch."""
        if self.x.device.type == "cpu":  # gather chunk by chunk: no copy of x
            positions = keep.nonzero().flatten()
            rows = positions if self.rows is None else self.rows[positions]
            return _OneStepVJP(self.x, self.weights, self.traj, self.free[keep], self.var_floor, rows)
        return _OneStepVJP(
            self.x[keep], self.weights[keep], tuple(t[:, keep] for t in self.traj), self.free[keep], self.var_floor
        )

    def _backward(self, positions: slice):
        if self.rows is None:
            x, w, traj = self.x[positions], self.weights[positions], [t[:, positions] for t in self.traj]
        else:
            rows = self.rows[positions]
            x, w = self.x.index_select(0, rows), self.weights.index_select(0, rows)
            traj = [t.index_select(1, rows) for t in self.traj]
        upstream = [t[:, positions] for t in self.upstream]
        return ops.em_fit_backward(*upstream, x, w, *traj, self.used[positions], self.var_floor)

    def __call__(self, v: Tensor, data_grads: bool = False) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]:
        """v (b, P) -> ((dF/dx)^T v (b,N,D), (dF/dw)^T v (b,N), (dF/dtheta)^T v (b,P)), the
        last one zero on the frozen entries; with ``data_grads`` only the first two (the
        last is None), else only the last (the first two are None)."""
        for buf, part in zip(self.upstream, _unpack(v, self.k, self.d)):
            buf[1].copy_(part)
        batch = v.shape[0]
        if data_grads:  # the x-sized result is wanted: one call, no (dF/dtheta)^T v
            g_x, g_w, *_ = self._backward(slice(None))
            return g_x, g_w, None
        if self.chunk >= batch:
            jtv = _pack(*self._backward(slice(None))[2:]).to(v.dtype)  # (float16/bfloat16 x: from x.dtype)
        else:
            jtv = torch.empty_like(v)
            for start in range(0, batch, self.chunk):
                positions = slice(start, start + self.chunk)
                jtv[positions] = _pack(*self._backward(positions)[2:])
        return None, None, jtv.masked_fill_(~self.free, 0)

    def jt(self, v: Tensor) -> Tensor:
        return self(v)[2]


class AdjointSolution(NamedTuple):
    """Result of :func:`solve_adjoint` for B sets.

    u: (B, P) solution of u = g + J^T u (zero on frozen entries), P = K + 2KD packed as
        (log_weights, means flattened, variances flattened); for a failed set, the
        fallback of the module docstring ("Failed solves").
    n_iter: (B,) int64 products with J^T each set used.
    residual: (B,) float64 ``||g + J^T u - u|| / ||g||`` of the returned u (0 where g = 0,
        inf where the next iterate overflowed).
    converged: (B,) bool: residual <= tol and the solution is well conditioned
        (``||u|| <= ||g|| / sqrt(eps)``).
    """

    u: Tensor
    n_iter: Tensor
    residual: Tensor
    converged: Tensor


class _Batch:
    """The sets a solver is still working on, and the best (smallest-residual) iterate of
    each. Finished sets stay in the batch (their rows are zeroed so that their wasted products
    stay finite) until at most half the rows are alive; then the batch is compacted, which
    bounds the wasted work by 2x (and, on GPUs, the copies of x to half of x)."""

    def __init__(self, step: _OneStepVJP, g: Tensor, gnorm: Tensor, tol: float, out: AdjointSolution):
        self.step, self.g, self.gnorm, self.tol, self.out = step, g, gnorm, tol, out
        self.index = torch.arange(g.shape[0], device=g.device)  # rows of `out`
        self.alive = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
        self.best = torch.full_like(gnorm, math.inf)
        self.best_u = torch.zeros_like(g)

    def record(self, u: Tensor, res: Tensor, n_iter: int, give_up: bool) -> Tensor:
        """Note the relative residual ``res`` of the iterate ``u`` after ``n_iter`` products.
        Rows that met tol finish with u; rows whose residual is not finite (an overflow) or,
        with ``give_up``, all alive rows finish with their best iterate. Returns the rows that
        are still alive."""
        res = torch.where(torch.isfinite(res), res, torch.full_like(res, math.inf))
        better = self.alive & (res < self.best)
        if bool(better.any()):
            self.best_u[better] = u[better]
            self.best[better] = res[better]
        ok = res <= self.tol
        stop = self.alive & (ok | torch.isinf(res) | give_up)
        self.out.n_iter[self.index[self.alive]] = n_iter
        if bool(stop.any()):
            rows = self.index[stop]
            self.out.u[rows] = self.best_u[stop]  # = u where ok: the residual just fell below all others
            self.out.residual[rows] = self.best[stop]
            self.out.converged[rows] = ok[stop]
            self.alive = self.alive & ~stop
        return self.alive

    def compact(self, *per_row: Tensor) -> Tuple[Tensor, ...]:
        """Drop finished rows if at most half are alive; returns ``per_row`` tensors
        (leading dim = batch rows) restricted the same way."""
        alive = self.alive
        if 2 * int(alive.sum()) > alive.numel():
            return per_row
        self.step, self.g, self.gnorm, self.index = self.step.subset(alive), self.g[alive], self.gnorm[alive], self.index[alive]
        self.best, self.best_u, self.alive = self.best[alive], self.best_u[alive], self.alive[alive]
        return tuple(t[alive] for t in per_row)


def _fixed_point(batch: _Batch, max_iter: int) -> None:
    """u_1 = g, u_{m+1} = g + J^T u_m per set until the residual u_{m+1} - u_m of u_m meets
    tol, keeping each set's iterate of smallest residual (the fallback of a failed solve)."""
    u = batch.g.clone()
    for it in range(1, max_iter + 1):
        u_next = batch.step.jt(u).add_(batch.g)
        res = _norm(torch.sub(u_next, u)) / batch.gnorm
        alive = batch.record(u, res, it, give_up=it == max_iter)
        if not bool(alive.any()):
            return
        (u,) = batch.compact(u_next.masked_fill_(~alive.unsqueeze(1), 0))


def _gmres(batch: _Batch, max_iter: int, restart: int) -> None:
    """Restarted GMRES on (I - J^T) u = g, batched: every set has its own Krylov basis,
    Hessenberg matrix and Givens rotations (kept in float64) and finishes at the end of the
    cycle in which its true residual meets tol. Starts from u = 0 (residual g)."""
    f64 = torch.float64
    g = batch.g
    dtype, device = g.dtype, g.device
    tiny = torch.finfo(f64).tiny
    u = torch.zeros_like(g)
    r = g.clone()
    used = 0
    while True:
        m = min(restart, max_iter - used - 1)  # one product is kept for the true residual
        if m < 1:  # max_iter = 1: no room for a cycle
            batch.record(u, _norm(r) / batch.gnorm, used, give_up=True)
            return
        g, alive = batch.g, batch.alive
        b, p = g.shape
        beta = _norm(r)
        basis = g.new_zeros(m + 1, b, p)
        basis[0] = r / beta.clamp_min(tiny).to(dtype).unsqueeze(1)
        h = torch.zeros(b, m + 1, m, dtype=f64, device=device)
        cs = torch.zeros(b, m, dtype=f64, device=device)
        sn = torch.zeros_like(cs)
        s = torch.zeros(b, m + 1, dtype=f64, device=device)
        s[:, 0] = beta
        length = torch.full((b,), m, dtype=torch.long, device=device)
        extending = alive.clone()  # still growing its basis in this cycle
        steps = 0
        for j in range(m):
            w = basis[j] - batch.step.jt(basis[j])
            steps += 1
            before = _norm(w)
            for _ in range(2):  # classical Gram-Schmidt applied twice (CGS2): orthogonal to rounding
                coeff = torch.einsum("jbp,bp->bj", basis[: j + 1], w)
                h[:, : j + 1, j] += coeff.to(f64)
                w = w - torch.einsum("jbp,bj->bp", basis[: j + 1], coeff)
            hn = _norm(w)
            h[:, j + 1, j] = hn
            lucky = hn <= torch.finfo(dtype).eps * before  # the Krylov space is invariant
            basis[j + 1] = torch.where(
                lucky.unsqueeze(1), torch.zeros_like(w), w / hn.clamp_min(tiny).to(dtype).unsqueeze(1)
            )
            for i in range(j):  # the previous rotations on the new column
                a, c = h[:, i, j].clone(), h[:, i + 1, j].clone()
                h[:, i, j] = cs[:, i] * a + sn[:, i] * c
                h[:, i + 1, j] = -sn[:, i] * a + cs[:, i] * c
            a, c = h[:, j, j], h[:, j + 1, j]
            d = torch.hypot(a, c)
            singular = ~(d > 0)
            safe_d = torch.where(singular, torch.ones_like(d), d)
            cs[:, j] = torch.where(singular, torch.ones_like(d), a / safe_d)
            sn[:, j] = torch.where(singular, torch.zeros_like(d), c / safe_d)
            h[:, j, j], h[:, j + 1, j] = d, 0.0
            s[:, j + 1] = -sn[:, j] * s[:, j]
            s[:, j] = cs[:, j] * s[:, j]
            estimate = s[:, j + 1].abs() / batch.gnorm
            # Column j enters the solution unless it is singular (or non-finite); the basis
            # stops growing once the estimate meets tol or on a lucky breakdown.
            drop = extending & (singular | ~torch.isfinite(d) | ~torch.isfinite(estimate))
            length = torch.where(drop, torch.full_like(length, j), length)
            done = extending & ~drop & ((estimate <= batch.tol) | lucky)
            length = torch.where(done, torch.full_like(length, j + 1), length)
            extending = extending & ~(drop | done)
            if not bool(extending.any()):
                break
        # y = R^-1 s on each set's first `length` columns (identity beyond them).
        inside = torch.arange(steps, device=device).unsqueeze(0) < length.unsqueeze(1)  # (b, steps)
        zero = torch.zeros((), dtype=f64, device=device)
        rmat = torch.where(inside.unsqueeze(2) & inside.unsqueeze(1), h[:, :steps, :steps], zero)
        rmat = rmat + torch.diag_embed((~inside).to(f64))
        rhs = torch.where(inside, s[:, :steps], zero)
        y = torch.linalg.solve_triangular(rmat, rhs.unsqueeze(2), upper=True).squeeze(2)
        y = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
        u = u + torch.einsum("jbp,bj->bp", basis[:steps], y.to(dtype))
        del basis
        r = g + batch.step.jt(u) - u
        used += steps + 1
        alive = batch.record(u, _norm(r) / batch.gnorm, used, give_up=max_iter - used < 2)
        if not bool(alive.any()):
            return
        finished = ~alive.unsqueeze(1)
        u, r = batch.compact(u.masked_fill_(finished, 0), r.masked_fill_(finished, 0))


def one_step_trajectory(
    x: Tensor, weights: Tensor, log_weights: Tensor, means: Tensor, variances: Tensor, var_floor: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """[theta, F(theta)]: (2,B,K), (2,B,K,D), (2,B,K,D), one EM step from theta."""
    lw, mu, var, *_ = ops.em_fit(x, weights, log_weights, means, variances, 1, var_floor, 0.0, True)
    return lw, mu, var


def solve_adjoint(
    x: Tensor,
    weights: Tensor,
    params: Tuple[Tensor, Tensor, Tensor],
    grads: Tuple[Tensor, Tensor, Tensor],
    var_floor: float,
    config: ImplicitBackward = ImplicitBackward(),
    _step: Optional[_OneStepVJP] = None,
) -> AdjointSolution:
    """Solve u = g + (dF/dtheta)^T u at theta = ``params`` for every set.

    Args:
        x: (B, N, D) points; weights: (B, N) point weights.
        params: the fit theta* = (log_weights (B,K), means (B,K,D), variances (B,K,D)).
        grads: g = dL/dtheta*, shaped like ``params``.
        var_floor: the fit's variance floor.
        config: tolerance, iteration cap and solver.

    Frozen entries (dead components, sets without weight) are excluded: u is zero there.
    A failed set (see "Failed solves" in the module docstring) gets the fallback iterate and
    ``converged`` False. Does not warn; see :func:`implicit_vjp`.
    """
    step = _step if _step is not None else _make_step(x, weights, params, var_floor)
    g = _pack(*grads).masked_fill_(~step.free, 0)
    n_sets = g.shape[0]
    out = AdjointSolution(
        u=torch.zeros_like(g),
        n_iter=torch.zeros(n_sets, dtype=torch.long, device=g.device),
        residual=torch.zeros(n_sets, dtype=torch.float64, device=g.device),
        converged=torch.ones(n_sets, dtype=torch.bool, device=g.device),
    )
    gnorm = _norm(g)
    tol = config.tol_for(x.dtype)
    max_amplification = torch.finfo(g.dtype).eps ** -0.5
    solvers = [config.solver] if config.solver == "fixed_point" else [config.solver, "fixed_point"]
    todo = gnorm > 0  # g = 0: u = 0 exactly
    for solver in solvers:
        if not bool(todo.any()):
            break
        everything = bool(todo.all())
        sub = out if everything else AdjointSolution(*(t[todo] for t in out))
        used_before = sub.n_iter.clone()
        batch = _Batch(step if everything else step.subset(todo), g if everything else g[todo], gnorm[todo], tol, sub)
        if solver == "fixed_point":
            _fixed_point(batch, config.max_iter)
        else:
            _gmres(batch, config.max_iter, config.restart)
        sub.n_iter.add_(used_before)
        amplification = _norm(sub.u) / gnorm[todo]
        sub.converged.logical_and_(amplification <= max_amplification)
        if not everything:
            for full, part in zip(out, sub):
                full[todo] = part
        todo = todo & ~out.converged
    return out


def _make_step(x: Tensor, weights: Tensor, params: Tuple[Tensor, Tensor, Tensor], var_floor: float) -> _OneStepVJP:
    traj = one_step_trajectory(x, weights, *params, var_floor)
    free = ~_frozen(weights, traj[0][1], x.shape[2])
    return _OneStepVJP(x, weights, traj, free, var_floor)


def implicit_vjp(
    x: Tensor,
    weights: Tensor,
    params: Tuple[Tensor, Tensor, Tensor],
    grads: Tuple[Tensor, Tensor, Tensor],
    var_floor: float,
    config: ImplicitBackward = ImplicitBackward(),
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, AdjointSolution]:
    """Gradients of L(theta*) for x, weights and the initial parameters, theta* = ``params``
    the converged fit: (g_x (B,N,D), g_w (B,N), g_lw0 (B,K), g_mu0 (B,K,D), g_var0 (B,K,D),
    the adjoint solution). ``params`` and ``grads`` come in em_fit's dtype
    (:func:`s2m_ext._ops.fit_dtype`: float32 for float16/bfloat16 x), the gradients in the
    dtypes of x, weights and the initial parameters (x's). Warns (:class:`ImplicitGradientWarning`) for sets whose solve
    failed (see "Failed solves" above); their gradients stay finite."""
    k, d = params[1].shape[1], params[1].shape[2]
    step = _make_step(x, weights, params, var_floor)
    # Frozen entries pass their gradient to the initial parameters, as in the unrolled backward.
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    g_init = [torch.where(free, zero, g).to(x.dtype) for free, g in zip(_unpack(step.free, k, d), grads)]
    sol = solve_adjoint(x, weights, params, grads, var_floor, config, _step=step)
    g_x, g_w, _ = step(sol.u, data_grads=True)
    failed = ~sol.converged
    if bool(failed.any()):
        warnings.warn(
            f"implicit backward: the adjoint solve u = g + (dF/dtheta)^T u failed for {int(failed.sum())} of "
            f"{x.shape[0]} sets (relative residual up to {float(sol.residual[failed].max()):.1e}, tol="
            f"{config.tol_for(x.dtype):.1e}, or a solution more than 1/sqrt(eps) times larger than g; "
            f"{int(sol.n_iter[failed].max())} products at most, solver={config.solver!r}). The fit is not "
            "at a strict local optimum (e.g. duplicated points, coinciding or dying components) or has not "
            "converged. These sets get instead the gradient of m <= max_iter EM steps unrolled at the "
            "fit, m the iterate of smallest residual (finite, approximate). Fit to convergence, raise ImplicitBackward(max_iter=...), try "
            "solver='gmres', or use backward='unrolled'.",
            ImplicitGradientWarning,
            stacklevel=2,
        )
    return g_x, g_w, *g_init, sol
