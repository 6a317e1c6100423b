"""s2m_ext: fast, batched, differentiable fitting of diagonal Gaussian mixtures.

    import s2m_ext
    gmm = s2m_ext.fit_gmm(x, weights=None, n_components=2, n_iter=10)   # x (B, N, D)
    gmm.log_prob(z)          # z (B, Q, D) -> (B, Q)
    gmm.log_prob_pool(z)     # z (M, D)    -> (B, M)

``s2m_ext.reference`` computes the same in plain PyTorch (the correctness oracle).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from . import reference
from ._ops import _C, ops
from ._validation import set_validation
from .gmm import ConvergenceWarning, DiagGMM, fit_gmm
from .implicit import ImplicitBackward, ImplicitGradientWarning

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "DiagGMM",
    "ImplicitBackward",
    "ImplicitGradientWarning",
    "build_info",
    "fit_gmm",
    "ops",
    "reference",
    "set_validation",
]


def build_info() -> Dict[str, Any]:
    """How the extension was built and what it runs with.

    Keys: ``cuda`` (CUDA kernels compiled in), ``cuda_version`` (CUDA runtime it was built
    with, or None), ``openmp`` (CPU kernels parallel), ``cpu_capability`` (the instruction-set
    level the CPU kernels run at: "baseline", "avx2" (AVX2 + FMA) or "avx512"; the best this
    CPU has unless the environment variable ``S2M_CPU_CAPABILITY`` names a lower one),
    ``cpu_capabilities`` (every level this CPU and build can run), ``torch_version`` (torch
    it was built against), ``torch_runtime`` (torch imported now), ``cuda_available`` (a GPU
    is usable now).
    """
    info = dict(_C.build_info())
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = bool(info["cuda"] and torch.cuda.is_available())
    return info
