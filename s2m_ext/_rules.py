"""Constants of the EM rules shared by the kernels' Python layer and the reference
(the C++ kernels hold the same rules in ``csrc/common/gmm_math.h``)."""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def limits(dtype: torch.dtype) -> Tuple[float, float, float, float]:
    """(eps, tiny, var_min, log_weight_min) of the EM rules for ``dtype``: a component whose
    mass falls below ``eps`` of its set's weight is dead, variances never go below
    ``var_min = eps**2``, log weights never below ``log_weight_min = log(tiny)``."""
    fi = torch.finfo(dtype)
    return fi.eps, fi.tiny, fi.eps**2, math.log(fi.tiny)


def weighted(w: Tensor, f: Tensor) -> Tensor:
    """w * f, exactly 0 where w == 0 even where f is +-inf (the kernels' rule for weight 0).
    Differentiable as w * f wherever f is finite (d/dw = f also at w = 0)."""
    return w * torch.where((w != 0) | torch.isfinite(f), f, torch.zeros_like(f))
