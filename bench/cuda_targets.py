"""The CUDA speed targets, side by side, timed by CUDA events.

    python -m bench.cuda_targets [--out results.json] [--quick] [--only fwd_bwd roofline pool]

1. fwd_bwd   B=1024 N=64 D=128 K=4 T=10 float32, forward + backward to x:
             s2m_ext vs the reference under autograd (>= 50x) and torch.compile of the
             reference (>= 10x).
2. roofline  B=16384 N=256 D=256 K=8 T=10 float32 forward: time against the roofline bound
             max(FLOPs / FMA peak, bytes / copy bandwidth) (>= 50% of the bound's speed);
             formulas in bench/NOTES.md (CUDA section), measured copy bandwidth, FMA peak from
             the SM count and the maximum SM clock.
3. pool      M=1,000,000 items x B=1000 mixtures, D=128, K=4, float32: < 50 ms and within 1e-4
             relative error of the direct float64 form (on a sample of rows).

The suite's one harness: inputs from ``workloads.make_problem`` (drawn on the GPU), the
contenders of ``contenders.py`` with their output checks, and ``timing.side_by_side``'s
interleaved rounds, here in one process with CUDA events as the clock (``python -m bench
--device cuda`` runs every contender in a process of its own instead). Prints a table and
writes JSON with the device, torch version, date and every sample. Value checks of the public
API are off while timing (they cost a host sync per call).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import s2m_ext
from s2m_ext import reference

from .contenders import BASELINE, CONTENDERS, validity
from .timing import Budget, Timing, time_in_process
from .workloads import Shape, compulsory_bytes, make_problem
from .workloads import flops as model_flops

FWD_BWD = Shape(B=1024, N=64, D=128, K=4, T=10)
ROOFLINE = Shape(B=16384, N=256, D=256, K=8, T=10)
ROOFLINE_QUICK = ROOFLINE.replace(B=4096)
POOL = Shape(B=1000, N=64, D=128, K=4, T=10, M=1_000_000)
POOL_QUICK = POOL.replace(M=200_000)


def _ms(timing: Timing) -> float:
    return timing.median * 1e3


def _samples_ms(timing: Timing) -> List[float]:
    return [t * 1e3 for t in timing.samples]


# ----------------------------------------------------------------------------- device ceilings
def copy_bandwidth_gbs(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy, counting bytes read plus bytes written, median of the samples."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    timing = time_in_process({"copy": lambda: dst.copy_(src)}, Budget(2.0, 10, 20, 0.0), "cuda")["copy"]
    return 2 * n_bytes / timing.median / 1e9


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


# ----------------------------------------------------------------------------- targets
def target_fwd_bwd(quick: bool, log: Callable[[str], None], device: str = "cuda",
                   shape: Shape = FWD_BWD, compiled: bool = True) -> Dict[str, object]:
    """s2m_ext's forward + backward against the reference, eager and (``compiled``) compiled."""
    problem = make_problem(shape, "fwd_bwd", device, draw_on=device)
    prepared = {name: CONTENDERS[name].prepare(problem, "fwd_bwd") for name in (BASELINE, "reference")}
    compiled_out = None
    t0 = time.perf_counter()
    try:
        if compiled:
            prepared["reference_compiled"] = CONTENDERS["compiled"].prepare(problem, "fwd_bwd")
            compiled_out = prepared["reference_compiled"].call()  # compiles, outside the timing
            log(f"fwd_bwd: torch.compile of the reference took {time.perf_counter() - t0:.0f} s")
    except Exception as exc:  # noqa: BLE001 - reported
        prepared.pop("reference_compiled", None)
        log(f"fwd_bwd: torch.compile of the reference failed: {exc!r}")
    # What is timed computes the same gradient (the suite's output check, float32).
    expected = prepared[BASELINE].extract(prepared[BASELINE].call())
    checks = {}
    for name, p in prepared.items():
        if name != BASELINE:
            raw = compiled_out if name == "reference_compiled" else p.call()
            ok, note, err = validity(CONTENDERS["compiled" if name == "reference_compiled" else name], expected, p.extract(raw))
            checks[name] = {"ok": ok, "rel_err_vs_s2m_ext": err, "note": note}
    budget = Budget(3.0, 5, 10, 0.0) if quick else Budget(10.0, 15, 50, 0.0)
    timings = time_in_process({name: p.call for name, p in prepared.items()}, budget, device)
    med = {name: _ms(t) for name, t in timings.items()}
    res = {
        "shape": dict(shape.as_dict(), dtype="float32"),
        "median_ms": med,
        "samples_ms": {name: _samples_ms(t) for name, t in timings.items()},
        "checks": checks,
        "grad_rel_diff_s2m_vs_reference": checks["reference"]["rel_err_vs_s2m_ext"],
        "speedup_vs_reference": med["reference"] / med[BASELINE],
        "speedup_vs_compiled": med.get("reference_compiled", math.nan) / med[BASELINE],
    }
    res["pass"] = bool(res["speedup_vs_reference"] >= 50 and res["speedup_vs_compiled"] >= 10
                       and all(c["ok"] for c in checks.values()))
    return res


def target_roofline(quick: bool, log: Callable[[str], None], copy_gbs: float, peak: Dict[str, float],
                    device: str = "cuda", shape: Optional[Shape] = None) -> Dict[str, object]:
    """s2m_ext's forward at GPU scale against the roofline bound of its FLOP and byte models."""
    shape = shape or (ROOFLINE_QUICK if quick else ROOFLINE)
    problem = make_problem(shape, "forward", device, draw_on=device)
    forward = CONTENDERS[BASELINE].prepare(problem, "forward")
    repeats = 5 if quick else 15
    timing = time_in_process({BASELINE: forward.call}, Budget(3.0, repeats, repeats, 0.0), device, warmup=1)[BASELINE]
    t = timing.median
    flops, n_bytes = model_flops("forward", shape), compulsory_bytes("forward", shape)
    t_flop = flops / (peak["tflops"] * 1e12)
    t_byte = n_bytes / (copy_gbs * 1e9)
    bound = max(t_flop, t_byte)
    res = {
        "shape": dict(shape.as_dict(), dtype="float32"),
        "median_ms": t * 1e3,
        "samples_ms": _samples_ms(timing),
        "flops": flops,
        "bytes": n_bytes,
        "bound_ms": bound * 1e3,
        "bound_by": "FMA peak" if t_flop >= t_byte else "copy bandwidth",
        "achieved_tflops": flops / t / 1e12,
        "fraction_of_bound": bound / t,
    }
    res["pass"] = bool(res["fraction_of_bound"] >= 0.5 and not quick)
    return res


def target_pool(quick: bool, log: Callable[[str], None], device: str = "cuda",
                shape: Optional[Shape] = None) -> Dict[str, object]:
    """Pool scoring of M items by B fitted mixtures: time, and accuracy against float64."""
    shape = shape or (POOL_QUICK if quick else POOL)
    problem = make_problem(shape, "pool", device, draw_on=device)
    score = CONTENDERS[BASELINE].prepare(problem, "pool")
    out = score.call()
    rows = torch.randperm(shape.M, generator=torch.Generator().manual_seed(2))[:2000].to(device)
    model64 = [t.double() for t in problem.fitted_model]
    ref = reference.log_prob_pool(problem.pool_z[rows].double(), *model64)
    rel = ((out[:, rows].double() - ref).abs().max() / ref.abs().max()).item()
    del out
    repeats = 5 if quick else 20
    timing = time_in_process({BASELINE: score.call}, Budget(3.0, repeats, repeats, 0.0), device, warmup=1)[BASELINE]
    pool_flops = model_flops("pool", shape)
    res = {
        "shape": dict(shape.as_dict(), dtype="float32"),
        "median_ms": _ms(timing),
        "samples_ms": _samples_ms(timing),
        "rel_error_vs_float64_direct": rel,
        "flops": pool_flops,
        "achieved_tflops": pool_flops / timing.median / 1e12,
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
