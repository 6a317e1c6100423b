"""Every CUDA op of s2m_ext, forward and backward, once on small shapes, in every EM placement
(forced with S2M_CUDA_MAX_SMEM) and dtype: the workload that bench/gpu_check.sh runs under
compute-sanitizer (memcheck, racecheck, synccheck, initcheck), small because the sanitizers
slow kernels 10-100x.

    python -m bench.gpu_check_ops                        # prints "gpu_check_ops: ok", exits 0
    python -m bench.gpu_check_ops --profile-em-forward   # one em_forward at the large shape
"""

from __future__ import annotations

import os
import sys

import torch

import s2m_ext

from .cuda_targets import ROOFLINE
from .workloads import Shape, make_problem

ops = s2m_ext.ops

#: (B, N, D, K): vector path, scalar path (odd D), K = 1, K above one component tile.
SHAPES = [(2, 40, 8, 3), (2, 33, 5, 5), (3, 20, 4, 1), (2, 70, 12, 9)]


def placement_caps(N: int, D: int, K: int, dtype: torch.dtype) -> dict:
    """S2M_CUDA_MAX_SMEM values (bytes) giving each distinct (forward, backward) EM placement
    (0 shared, 1 x global, 2 all global) of this shape, found by lowering the limit."""
    caps = {}
    for cap in range(228 * 1024, 0, -256):
        key = tuple(
            torch.ops.s2m._cuda_em_placement(N, D, K, dtype == torch.float64, backward, cap)
            for backward in (False, True)
        )
        caps.setdefault(key, cap)
    return caps


def run_all(dtype: torch.dtype) -> set:
    """Every op on every shape, in every placement; returns the placements seen."""
    seen = set()
    for B, N, D, K in SHAPES:
        problem = make_problem(Shape(B=B, N=N, D=D, K=K), "forward", "cuda", dtype=torch.float64, draw_on="cuda")
        # Weights other than all ones, so the weighted sums are exercised.
        w = 0.5 + torch.rand(B, N, device="cuda", dtype=torch.float64)
        x, w, init = problem.x.to(dtype), w.to(dtype), [t.to(dtype) for t in problem.init]
        fit_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        for key, cap in placement_caps(N, D, K, fit_dtype).items():
            os.environ["S2M_CUDA_MAX_SMEM"] = str(cap)
            seen.update((("forward", key[0]), ("backward", key[1])))
            lw, mu, var, _ll, used, _conv = ops.em_fit(x, w, *init, 4, 1e-3, 1e-9, True)
            up = [torch.randn_like(t) for t in (lw, mu, var)]
            ops.em_fit_backward(*up, x, w, lw, mu, var, used, 1e-3)
            ops.em_fit_backward(None, up[1], None, x, w, lw, mu, var, used, 1e-3)
            ops.em_fit(x, w, *init, 3, 1e-3, 0.0, False)
        os.environ.pop("S2M_CUDA_MAX_SMEM", None)
        params = init
        paired = ops.score_paired(x, *params)
        ops.score_paired_backward(torch.randn_like(paired), x, *params)
        z = x.reshape(-1, D)[: 3 * N]
        pool = ops.score_pool(z, *params)
        ops.score_pool_backward(torch.randn_like(pool), z, *params)
        u = torch.rand(B, K, dtype=torch.float64, device="cuda")
        ops.kmeanspp(x, w, u)
        ops.kmeanspp_init(x, w, u, 1e-3)
    return seen


def profile_em_forward() -> int:
    """One em_forward at the large benchmark shape (float32, B=16384 N=256 D=256 K=8, T=10, no
    trajectory): the launch that bench/gpu_check.sh profiles with Nsight Compute."""
    problem = make_problem(ROOFLINE, "forward", "cuda", draw_on="cuda")
    x, w, init = problem.x, problem.weights, problem.init
    torch.cuda.synchronize()
    ops.em_fit(x, w, *init, 10, 1e-3, 0.0, False)
    torch.cuda.synchronize()
    print("gpu_check_ops: em_forward B=16384 N=256 D=256 K=8 T=10 done")
    return 0


def main() -> int:
    if sys.argv[1:] == ["--profile-em-forward"]:
        return profile_em_forward()
    torch.manual_seed(0)
    seen = set()
    for dtype in (torch.float32, torch.float64, torch.float16):
        seen |= run_all(dtype)
    torch.cuda.synchronize()
    missing = {(d, p) for d in ("forward", "backward") for p in (0, 1, 2)} - seen
    if missing:
        print(f"gpu_check_ops: placements not exercised: {sorted(missing)}", file=sys.stderr)
        return 1
    print("gpu_check_ops: ok (every op, every EM placement, float32/float64/float16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
