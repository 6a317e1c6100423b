"""The implicit backward of :func:`s2m_ext.fit_gmm`: differentiate the optimum EM reached.

``s2m_ext.fit_gmm(x, ..., n_iter=max_iter, tol=tol, backward="implicit")`` (or
``backward=ImplicitBackward(tol=..., max_iter=..., solver="gmres")``) keeps only the final
parameters theta* and, in the backward, solves the adjoint equation u = g + (dF/dtheta)^T u at
theta* (F = one EM step): the gradient is exact for the optimum, does not depend on the path
EM took, and needs memory O(B*K*D) whatever the number of iterations. Fit to convergence
first. The math, the solvers and what a set whose solve fails gets instead are in
:mod:`s2m_ext.adjoint`; the op ``s2m::em_fit_implicit`` is registered in :mod:`s2m_ext._ops`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_SOLVE_TOL",
    "SOLVERS",
    "ImplicitBackward",
    "ImplicitGradientWarning",
    "fit_implicit",
    "resolve_backward",
]

#: Default relative residual of the adjoint solve per dtype. The gradient's relative error is
#: about tol / (1 - rho), rho EM's rate of convergence. float32: 1e-6 (8 unit roundoffs; the
#: solvers reach 1e-7 or below, so this rarely stops them short) matches the accuracy of the
#: unrolled float32 backward; float64: 1e-12, far above its floor (~1e-15) at a few more
#: iterations. float16/bfloat16 (CUDA only): about 10 unit roundoffs.
DEFAULT_SOLVE_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}

SOLVERS = ("fixed_point", "gmres")


class ImplicitGradientWarning(UserWarning):
    """The adjoint solve of the implicit backward failed for some sets (tolerance not met
    within max_iter products, or an ill-conditioned solution); those sets got the fallback
    gradient described in :mod:`s2m_ext.adjoint`."""


@dataclass(frozen=True)
class ImplicitBackward:
    """Settings of the implicit backward of :func:`s2m_ext.fit_gmm`.

    ``fit_gmm(..., backward="implicit")`` uses ``ImplicitBackward()``; pass an instance to
    change the settings: ``fit_gmm(..., backward=ImplicitBackward(solver="gmres"))``.

    Attributes:
        tol: the solve stops for a set once ``||g + J^T u - u|| <= tol * ||g||`` (2-norms
            over the set's log weights, means and variances; J = dF/dtheta at the fit).
            None (default): :data:`DEFAULT_SOLVE_TOL` of the dtype (1e-12 for float64,
            1e-6 for float32, 1e-2 for float16, 5e-2 for bfloat16).
        max_iter: most products with J^T per set (each costs about one EM iteration);
            default 1000. A set that has not met ``tol`` by then fails (an
            :class:`ImplicitGradientWarning`; see :mod:`s2m_ext.adjoint`).
        solver: ``"fixed_point"`` (default): u <- g + J^T u, about ten parameter-sized
            (B, K + 2KD) buffers, converges at EM's own linear rate. ``"gmres"``: restarted GMRES per set
            on (I - J^T) u = g, far fewer products when EM converges slowly, at the cost of
            ``restart + 1`` more parameter-sized buffers.
        restart: GMRES restart length (default 20); ignored by the fixed-point solver.
    """

    tol: Optional[float] = None
    max_iter: int = 1000
    solver: str = "fixed_point"
    restart: int = 20

    def __post_init__(self) -> None:
        if self.tol is not None:
            if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real):
                raise TypeError(f"ImplicitBackward.tol must be a real number or None, got {type(self.tol).__name__}")
            if not (math.isfinite(self.tol) and self.tol > 0):
                raise ValueError(f"ImplicitBackward.tol must be a finite number > 0, got {self.tol}")
        for name in ("max_iter", "restart"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"ImplicitBackward.{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"ImplicitBackward.{name} must be >= 1, got {value}")
        if self.solver not in SOLVERS:
            raise ValueError(f"ImplicitBackward.solver must be 'fixed_point' or 'gmres', got {self.solver!r}")

    def tol_for(self, dtype: torch.dtype) -> float:
        """The residual tolerance used for inputs of ``dtype``."""
        return float(self.tol) if self.tol is not None else DEFAULT_SOLVE_TOL[dtype]


def resolve_backward(backward: Union[str, ImplicitBackward]) -> Optional[ImplicitBackward]:
    """Validate :func:`s2m_ext.fit_gmm`'s ``backward``: None for ``"unrolled"``, the settings
    for ``"implicit"`` or an :class:`ImplicitBackward`."""
    if isinstance(backward, ImplicitBackward):
        return backward
    if isinstance(backward, str):
        if backward == "unrolled":
            return None
        if backward == "implicit":
            return ImplicitBackward()
        raise ValueError(f"backward must be 'unrolled' or 'implicit' (or an ImplicitBackward), got {backward!r}")
    raise TypeError(
        f"backward must be 'unrolled', 'implicit' or an s2m_ext.ImplicitBackward, got {type(backward).__name__}"
    )


def fit_implicit(
    x: Tensor,
    weights: Tensor,
    init_params: Tuple[Tensor, Tensor, Tensor],
    n_iter: int,
    var_floor: float,
    tol: float,
    config: ImplicitBackward,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EM for :func:`s2m_ext.fit_gmm` with ``backward="implicit"``: the final
    (log_weights, means, variances, loglik, n_iter_used, converged), no trajectory kept."""
    return torch.ops.s2m.em_fit_implicit(
        x, weights, *init_params, n_iter, var_floor, tol, config.tol_for(x.dtype), config.max_iter, config.solver, config.restart
    )
