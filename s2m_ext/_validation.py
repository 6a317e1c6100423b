"""Argument checking shared by the public API.

Two kinds of checks:

* structural (type, ndim, shape, dtype, device, scalar ranges): always on, free, and
  traceable, so they run under torch.compile too;
* value checks (finite x, weights >= 0, no all-zero set, valid mixture parameters): they
  read tensor values, which costs a device sync on CUDA and is impossible inside
  torch.compile or CUDA graph capture, so they are skipped there and can be switched off
  with :func:`set_validation` (like ``torch.distributions``' ``validate_args``).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

_VALIDATE = True

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def set_validation(enabled: bool) -> None:
    """Turn the value checks of the public API on (default) or off.

    Off saves a device sync per call on CUDA; invalid input (NaN, negative weights, sets
    with zero total weight) then gives undefined, though finite where the input is finite,
    results."""
    global _VALIDATE
    _VALIDATE = bool(enabled)


def value_checks_enabled() -> bool:
    """True when value checks run: enabled, and not tracing or capturing a CUDA graph."""
    if not _VALIDATE or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_tensor(value, name: str, ndim: int, shape: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape}, got a {value.dim()}-D tensor of shape {tuple(value.shape)}")
    return value


def check_float_dtype(t: Tensor, name: str) -> None:
    allowed = CUDA_DTYPES if t.device.type == "cuda" else CPU_DTYPES
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have a floating dtype ({names} on {t.device.type}), got {t.dtype}")


def check_same_device(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


INT_MAX = 2**31 - 1  # counts (components, iterations) the kernels index with


def check_int(value, name: str, minimum: int, maximum: int = INT_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_nonnegative_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _extremes(t: Tensor):
    """(min, max) in one pass without a boolean temporary: NaN and +-Inf propagate to them,
    so both are finite iff every element is (isfinite().all() costs several times more)."""
    lo, hi = torch.aminmax(t.detach())
    return float(lo), float(hi)


def magnitude_bound(dtype: torch.dtype, dims: int) -> float:
    """Largest |value| of points and means in D = ``dims`` dimensions for which every squared
    distance sum_d (a_d - b_d)^2 between two of them is finite in ``dtype``:
    sqrt(max / D) / 2 (about 1.8e19 / sqrt(D) in float32, 6.7e153 / sqrt(D) in float64)."""
    return math.sqrt(torch.finfo(dtype).max / max(int(dims), 1)) / 2


def _checks_values(t: Tensor) -> bool:
    """Whether the value checks read t: enabled, not empty, and holding values (meta
    tensors carry shapes only: they pass through to the ops' fake implementations)."""
    return value_checks_enabled() and t.numel() > 0 and not t.is_meta


def check_scored_queries(z: Tensor, scores: Tensor, name: str, dims: int) -> None:
    """:func:`check_finite` of the queries ``z`` (..., D), made after scoring them, on the
    queries whose score is NaN or +-Inf only. Each score sums over all D coordinates of its
    query, so a NaN or +-Inf in a query, or a squared distance that overflows, leaves its
    score NaN or -inf: the queries that score finitely need no reading, and the check costs a
    pass over the (..., n) scores instead of one over z. ``scores`` is (B, n) for z (n, D)
    (pool scoring) or has z's leading shape (paired scoring)."""
    if not _checks_values(z):
        return
    suspect = ~torch.isfinite(scores.detach())
    if z.dim() == 2:
        suspect = suspect.any(0)
    if bool(suspect.any()):
        check_finite(z.detach()[suspect], name, dims=dims)


def check_finite(t: Tensor, name: str, dims: Optional[int] = None) -> float:
    """Refuse NaN/Inf in t and, with ``dims``, values beyond :func:`magnitude_bound`.
    Returns max |t| (0 when the check is skipped or t is empty)."""
    if not _checks_values(t):
        return 0.0
    lo, hi = _extremes(t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite: it holds NaN or Inf")
    largest = max(abs(lo), abs(hi))
    if dims is not None:
        bound = magnitude_bound(t.dtype, dims)
        if largest > bound:
            dtype = str(t.dtype).replace("torch.", "")
            raise ValueError(
                f"{name} must satisfy |{name}| <= {bound:.3g} in {dtype} with D = {dims} (squared distances "
                f"beyond the largest {dtype}, {torch.finfo(t.dtype).max:.3g}, overflow), got a value of "
                f"magnitude {largest:.3g}; rescale {name} or use float64"
            )
    return largest


def check_fit_scale(weights: Tensor, largest_x: float, dims: int) -> None:
    """Refuse weighted moments that overflow the dtype: per set, the total weight W and
    W * D * (2 max|x|)^2 (a bound on the weighted second moment) must be <= the dtype's max."""
    if not _checks_values(weights):
        return
    fmax = torch.finfo(weights.dtype).max
    total = float(weights.detach().double().sum(-1).max())
    moment = total * dims * (2.0 * largest_x) ** 2
    if not (total <= fmax and moment <= fmax):
        dtype = str(weights.dtype).replace("torch.", "")
        raise ValueError(
            f"weights: a set's total weight W = {total:.3g} with max|x| = {largest_x:.3g} and D = {dims} gives "
            f"weighted moments W * D * (2 max|x|)^2 = {moment:.3g} beyond the largest {dtype} ({fmax:.3g}); "
            f"scale the weights down (the fit depends only on their ratios) or use float64"
        )


def check_var_floor(var_floor: float, dtype: torch.dtype) -> None:
    """var_floor enters every variance: it must be finite in the dtype of x."""
    fmax = torch.finfo(dtype).max
    if var_floor > fmax:
        dtype_name = str(dtype).replace("torch.", "")
        raise ValueError(f"var_floor must be <= {fmax:.3g} (finite in {dtype_name}, the dtype of x), got {var_floor:.3g}")


def check_weight_values(weights: Tensor, name: str = "weights") -> None:
    if not _checks_values(weights):
        return
    lo, hi = _extremes(weights)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite: it holds NaN or Inf")
    if lo < 0:
        raise ValueError(f"{name} must be >= 0 (0 marks padding), got a negative weight ({lo})")
    empty = (weights.sum(-1) <= 0).nonzero().flatten()
    if empty.numel() > 0:
        raise ValueError(
            f"{name}: every set needs a positive total weight, but set(s) {empty[:8].tolist()} have all weights 0"
        )


def normalise_weights(weights: Optional[Tensor], x: Tensor) -> Tensor:
    """(B,N) weights in x's dtype; None means all ones, a bool mask becomes 0/1."""
    if weights is None:
        return torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    check_tensor(weights, "weights", 2, "(B, N)")
    if tuple(weights.shape) != tuple(x.shape[:2]):
        raise ValueError(f"weights must have shape (B, N) = {tuple(x.shape[:2])} to match x, got {tuple(weights.shape)}")
    check_same_device(weights, "weights", x, "x")
    if weights.dtype == torch.bool:
        weights = weights.to(x.dtype)
    elif not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point or bool tensor, got {weights.dtype}")
    weights = weights.to(x.dtype)
    check_weight_values(weights)
    return weights
