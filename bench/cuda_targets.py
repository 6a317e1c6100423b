"""The CUDA speed targets, timed with CUDA events (median of many), side by side.

    python bench/cuda_targets.py [--out results.json] [--quick] [--budget-s 240]

1. fwd_bwd   B=1024 N=64 D=128 K=4 T=10 float32, forward + backward to x:
             s2m_ext vs the reference under autograd (>= 50x) and torch.compile of the
             reference (>= 10x). Contenders are timed in interleaved rounds.
2. roofline  B=16384 N=256 D=256 K=8 T=10 float32 forward: time against the roofline bound
             max(FLOPs / FMA peak, bytes / copy bandwidth) (>= 50% of the bound's speed);
             formulas in bench/NOTES.md (CUDA section), measured copy bandwidth, FMA peak from
             the SM count and the maximum SM clock.
3. pool      M=1,000,000 items x B=1000 mixtures, D=128, K=4, float32: < 50 ms and within 1e-4
             relative error of the direct float64 form (on a sample of rows).

Prints a table and writes JSON with the device, torch version, date and every sample. Value
checks of the public API are off while timing (they cost a host sync per call).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import s2m_ext
from s2m_ext import DiagGMM, reference

try:  # the suite's FLOP and byte models (bench/NOTES.md), as a package or run as a script
    from .workloads import Shape, compulsory_bytes
    from .workloads import flops as model_flops
except ImportError:
    from workloads import Shape, compulsory_bytes
    from workloads import flops as model_flops

ops = s2m_ext.ops


def cuda_time_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def side_by_side(calls: Dict[str, Callable[[], object]], reps: Dict[str, int], warmup: int = 2) -> Dict[str, List[float]]:
    """Per-call milliseconds of each contender, timed in interleaved rounds (a rotating order)
    after ``warmup`` calls each."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    names = list(calls)
    for rnd in range(max(reps.values())):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for name in order:
            if len(samples[name]) < reps[name]:
                samples[name].append(cuda_time_ms(calls[name]))
    return samples


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else math.nan


# ----------------------------------------------------------------------------- device ceilings
def copy_bandwidth_gbs(n_bytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy, counting bytes read plus bytes written, median of reps."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    times = side_by_side({"copy": lambda: dst.copy_(src)}, {"copy": reps})["copy"]
    return 2 * n_bytes / (median(times) * 1e-3) / 1e9


def fp32_fma_peak_tflops() -> Dict[str, float]:
    """SMs x 128 FP32 lanes x 2 FLOP x the maximum SM clock (nvidia-smi); Hopper and Ampere
    data-centre parts have 128 FP32 lanes per SM (A100: 64)."""
    props = torch.cuda.get_device_properties(0)
    lanes = 64 if (props.major, props.minor) == (8, 0) else 128
    clock_mhz = math.nan
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
        clock_mhz = float(out.splitlines()[0])
    except Exception:  # noqa: BLE001 - reported as NaN in the table
        pass
    return {
        "sm_count": props.multi_processor_count,
        "fp32_lanes_per_sm": lanes,
        "max_sm_clock_mhz": clock_mhz,
        "tflops": props.multi_processor_count * lanes * 2 * clock_mhz * 1e6 / 1e12,
    }


# ----------------------------------------------------------------------------- problems
def em_problem(B: int, N: int, D: int, K: int, dtype=torch.float32, seed: int = 0):
    """Clustered points, positive weights, means at data points, the set's variance."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    centres = 3.0 * torch.randn(B, K, D, generator=g, device="cuda", dtype=dtype)
    labels = torch.randint(0, K, (B, N), generator=g, device="cuda")
    x = centres.gather(1, labels.unsqueeze(-1).expand(B, N, D))
    x += torch.randn(B, N, D, generator=g, device="cuda", dtype=dtype)
    w = 0.5 + torch.rand(B, N, generator=g, device="cuda", dtype=dtype)
    idx = torch.randint(0, N, (B, K), generator=g, device="cuda")
    means = x.gather(1, idx.unsqueeze(-1).expand(B, K, D)).clone()
    variances = (x.var(1, keepdim=True) + 1e-3).expand(B, K, D).contiguous()
    log_weights = torch.full((B, K), -math.log(K), device="cuda", dtype=dtype)
    return x, w, (log_weights, means, variances)


# ----------------------------------------------------------------------------- targets
def target_fwd_bwd(quick: bool, log) -> Dict[str, object]:
    B, N, D, K, T = 1024, 64, 128, 4, 10
    x, w, init = em_problem(B, N, D, K)
    floor = 1e-3
    gen = torch.Generator(device="cuda").manual_seed(1)
    up = [torch.randn(t.shape, generator=gen, device="cuda") for t in init]

    def loss_of(lw, mu, var):
        return (lw * up[0]).sum() + (mu * up[1]).sum() + (var * up[2]).sum()

    def s2m_step():
        xr = x.detach().requires_grad_()
        gmm = s2m_ext.fit_gmm(xr, w, init=DiagGMM(*init), n_iter=T, var_floor=floor)
        loss_of(*gmm.params()).backward()

    def ref_fit(xr, w, lw, mu, var):
        return reference.em_fit(xr, w, lw, mu, var, T, floor)[:3]

    compiled_fit = torch.compile(ref_fit)

    def ref_step(fit=ref_fit):
        xr = x.detach().requires_grad_()
        loss_of(*fit(xr, w, *init)).backward()

    # Correctness of what is timed: the same gradient from all three (float32).
    grads = {}
    for name, fn in (("s2m", None), ("reference", ref_fit)):
        xr = x.detach().requires_grad_()
        out = s2m_ext.fit_gmm(xr, w, init=DiagGMM(*init), n_iter=T, var_floor=floor).params() if fn is None else fn(xr, w, *init)
        loss_of(*out).backward()
        grads[name] = xr.grad
    agree = ((grads["s2m"] - grads["reference"]).abs().max() / grads["reference"].abs().max()).item()
    calls = {"s2m_ext": s2m_step, "reference": ref_step}
    t0 = time.perf_counter()
    try:
        ref_step(compiled_fit)  # compile outside the timing
        calls["reference_compiled"] = lambda: ref_step(compiled_fit)
        log(f"fwd_bwd: torch.compile of the reference took {time.perf_counter() - t0:.0f} s")
    except Exception as exc:  # noqa: BLE001 - reported
        log(f"fwd_bwd: torch.compile of the reference failed: {exc!r}")
    reps = {"s2m_ext": 10 if quick else 50, "reference": 5 if quick else 15, "reference_compiled": 5 if quick else 25}
    samples = side_by_side(calls, {k: reps[k] for k in calls})
    med = {k: median(v) for k, v in samples.items()}
    res = {
        "shape": dict(B=B, N=N, D=D, K=K, T=T, dtype="float32"),
        "median_ms": med,
        "samples_ms": samples,
        "grad_rel_diff_s2m_vs_reference": agree,
        "speedup_vs_reference": med["reference"] / med["s2m_ext"],
        "speedup_vs_compiled": med.get("reference_compiled", math.nan) / med["s2m_ext"],
    }
    res["pass"] = bool(res["speedup_vs_reference"] >= 50 and res["speedup_vs_compiled"] >= 10)
    return res


def target_roofline(quick: bool, log, copy_gbs: float, peak: Dict[str, float]) -> Dict[str, object]:
    B, N, D, K, T = (4096 if quick else 16384), 256, 256, 8, 10
    x, w, init = em_problem(B, N, D, K)
    floor = 1e-3

    def forward():
        ops.em_fit(x, w, *init, T, floor, 0.0, False)

    samples = side_by_side({"s2m_ext": forward}, {"s2m_ext": 5 if quick else 15}, warmup=1)["s2m_ext"]
    t = median(samples) * 1e-3
    shape = Shape(B=B, N=N, D=D, K=K, T=T)
    flops, n_bytes = model_flops("forward", shape), compulsory_bytes("forward", shape)
    t_flop = flops / (peak["tflops"] * 1e12)
    t_byte = n_bytes / (copy_gbs * 1e9)
    bound = max(t_flop, t_byte)
    res = {
        "shape": dict(B=B, N=N, D=D, K=K, T=T, dtype="float32"),
        "median_ms": t * 1e3,
        "samples_ms": samples,
        "flops": flops,
        "bytes": n_bytes,
        "bound_ms": bound * 1e3,
        "bound_by": "FMA peak" if t_flop >= t_byte else "copy bandwidth",
        "achieved_tflops": flops / t / 1e12,
        "fraction_of_bound": bound / t,
    }
    res["pass"] = bool(res["fraction_of_bound"] >= 0.5 and not quick)
    return res


def target_pool(quick: bool, log) -> Dict[str, object]:
    M, B, D, K = (200_000 if quick else 1_000_000), 1000, 128, 4
    g = torch.Generator(device="cuda").manual_seed(2)
    lw = torch.log_softmax(torch.randn(B, K, generator=g, device="cuda"), 1)
    mu = 2.0 * torch.randn(B, K, D, generator=g, device="cuda")
    var = 0.5 + torch.rand(B, K, D, generator=g, device="cuda")
    # Pool items near the components (small Mahalanobis distances: the hard case for accuracy).
    pick = torch.randint(0, B * K, (M,), generator=g, device="cuda")
    z = mu.reshape(B * K, D)[pick] + var.reshape(B * K, D)[pick].sqrt() * torch.randn(M, D, generator=g, device="cuda")
    out = ops.score_pool(z, lw, mu, var)
    rows = torch.randperm(M, generator=g, device="cuda")[:2000]
    ref = reference.log_prob_pool(z[rows].double(), lw.double(), mu.double(), var.double())
    rel = ((out[:, rows].double() - ref).abs().max() / ref.abs().max()).item()
    del out
    samples = side_by_side({"s2m_ext": lambda: ops.score_pool(z, lw, mu, var)}, {"s2m_ext": 5 if quick else 20}, warmup=1)["s2m_ext"]
    res = {
        "shape": dict(M=M, B=B, D=D, K=K, dtype="float32"),
        "median_ms": median(samples),
        "samples_ms": samples,
        "rel_error_vs_float64_direct": rel,
        "flops": 4.0 * M * B * K * D,
        "achieved_tflops": 4.0 * M * B * K * D / (median(samples) * 1e-3) / 1e12,
    }
    res["pass"] = bool(res["median_ms"] < 50 and rel <= 1e-4 and not quick)
    return res


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (no pass/fail)")
    parser.add_argument("--only", nargs="*", default=["fwd_bwd", "roofline", "pool"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not s2m_ext.build_info()["cuda"]:
        print("cuda_targets: needs a GPU and a CUDA build of s2m_ext", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    log = lambda msg: print(f"{time.perf_counter() - t_start:6.0f}s {msg}", file=sys.stderr, flush=True)  # noqa: E731
    s2m_ext.set_validation(False)
    props = torch.cuda.get_device_properties(0)
    results: Dict[str, object] = {
        "device": props.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build": s2m_ext.build_info(),
        "quick": args.quick,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    copy_gbs = copy_bandwidth_gbs()
    peak = fp32_fma_peak_tflops()
    results["copy_bandwidth_gbs"] = copy_gbs
    results["fp32_fma_peak"] = peak
    log(f"copy bandwidth {copy_gbs:.0f} GB/s (read + write); FP32 FMA peak {peak['tflops']:.1f} TFLOP/s")
    def save() -> None:  # after every target: a run stopped by a time limit keeps what it has
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1, default=str)

    save()
    for name in args.only:
        log(f"{name} ...")
        try:
            if name == "fwd_bwd":
                results[name] = target_fwd_bwd(args.quick, log)
            elif name == "roofline":
                results[name] = target_roofline(args.quick, log, copy_gbs, peak)
            elif name == "pool":
                results[name] = target_pool(args.quick, log)
        except Exception as exc:  # noqa: BLE001 - one failed target must not hide the others
            results[name] = {"error": repr(exc), "pass": False}
            log(f"{name} failed: {exc!r}")
        torch.cuda.empty_cache()
        save()
    rows = []
    if "fwd_bwd" in results and "median_ms" in results["fwd_bwd"]:
        r = results["fwd_bwd"]
        m = r["median_ms"]
        rows.append(("fwd+bwd B=1024 N=64 D=128 K=4 T=10", f"{m['s2m_ext']:.3f} ms",
                     f"ref {m['reference']:.2f} ms ({r['speedup_vs_reference']:.1f}x, need 50x); "
                     f"compiled {m.get('reference_compiled', math.nan):.2f} ms ({r['speedup_vs_compiled']:.1f}x, need 10x)",
                     "PASS" if r["pass"] else "FAIL"))
    if "roofline" in results and "median_ms" in results["roofline"]:
        r = results["roofline"]
        rows.append((f"forward B={r['shape']['B']} N=256 D=256 K=8 T=10", f"{r['median_ms']:.2f} ms",
                     f"bound {r['bound_ms']:.2f} ms ({r['bound_by']}), {100 * r['fraction_of_bound']:.0f}% of it (need 50%)",
                     "PASS" if r["pass"] else "FAIL"))
    if "pool" in results and "median_ms" in results["pool"]:
        r = results["pool"]
        rows.append((f"pool M={r['shape']['M']} B=1000 D=128 K=4", f"{r['median_ms']:.2f} ms",
                     f"need < 50 ms; rel. error {r['rel_error_vs_float64_direct']:.1e} (need <= 1e-4)",
                     "PASS" if r["pass"] else "FAIL"))
    for name in args.only:
        if "error" in results.get(name, {}):
            rows.append((name, "-", results[name]["error"][:100], "ERROR"))
    width = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    print(f"\nCUDA targets on {props.name}, torch {torch.__version__}, {results['date']}"
          f"{' (QUICK: sizes reduced, no pass/fail)' if args.quick else ''}")
    for r in rows:
        print("  ".join(c.ljust(wd) for c, wd in zip(r, width)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
