"""Implicit against unrolled backward of s2m_ext.fit_gmm: time and peak memory of forward +
backward at a fixed number of EM iterations (default B=256, N=64, D=128, K=4, T=100).

Each variant runs in a fresh subprocess, so their memory cannot mix: the peak is the rise of
the process's resident set (Linux VmHWM, reset through /proc/self/clear_refs just before the
fit, minus VmRSS at that moment) over one forward + backward; the time is the median of
``--repeat`` further forward + backward runs in the same process. On CUDA (``--device cuda``)
the peak is torch.cuda.max_memory_allocated instead.

    python bench/test_implicit_memory.py                      # table for the default sizes
    python bench/test_implicit_memory.py --dtype float64 --json out.json
    pytest bench/test_implicit_memory.py                      # asserts implicit >= 10x lower

Self-contained (no fixtures from the rest of bench/). Timings on a shared machine are noisy:
compare the variants of one run, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Dict, List

#: (name, fit_gmm backward argument as source text)
VARIANTS = {
    "unrolled": '"unrolled"',
    "implicit": '"implicit"',
    "implicit-gmres": 's2m_ext.ImplicitBackward(solver="gmres")',
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _tensor_peak_mb(fn) -> float:
    """Peak of live CPU tensor memory (MiB) during fn() above its start, from the profiler's
    allocation timeline: blind to allocator caching and page residency, which make the RSS
    rise of small peaks noisy. (Uses torch.profiler's memory timeline, a private API.)"""
    import torch
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    live = [sum(s) for s in sizes]
    return (max(live) - live[0]) / 2**20


def child(args: argparse.Namespace) -> Dict[str, float]:
    """One variant in this (fresh) process; returns its measurements."""
    import gc
    import math

    import torch

    import s2m_ext

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    B, N, D, K = args.B, args.N, args.D, args.K
    # Embedding-like sets: K clusters per set, unit noise, random positive weights, and a
    # fixed k-means++ initialisation (the same for every variant, computed before measuring:
    # the bench is about EM, not about the initialisation's temporaries).
    g = torch.Generator().manual_seed(1)
    centres = 6.0 / math.sqrt(D) * torch.randn(B, K, D, generator=g)
    labels = torch.randint(0, K, (B, N), generator=g)
    x = centres.gather(1, labels.unsqueeze(-1).expand(B, N, D)) + torch.randn(B, N, D, generator=g)
    x = x.to(device=device, dtype=dtype).requires_grad_()
    w = (0.5 + torch.rand(B, N, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    z = torch.randn(B, 8, D, generator=g).to(device=device, dtype=dtype)
    seed = s2m_ext.fit_gmm(x.detach(), w.detach(), n_components=K, n_iter=0, generator=torch.Generator(device).manual_seed(2))
    init = s2m_ext.DiagGMM(*(t.clone() for t in seed.params()))
    del seed
    backward = eval(VARIANTS[args.variant], {"s2m_ext": s2m_ext})

    def run(x=x, w=w, z=z, init=init):
        gmm = s2m_ext.fit_gmm(x, w, n_iter=args.T, init=init, var_floor=1e-3, backward=backward)
        loss = gmm.log_prob(z).sum() + gmm.means.sum() + gmm.variances.sum() + gmm.log_weights.sum()
        return torch.autograd.grad(loss, (x, w))

    # Warm-up on a small problem: lazy initialisation (threads, dispatch) outside the measure.
    small = [t[:2].detach().clone().requires_grad_() for t in (x, w)]
    run(*small, z[:2], s2m_ext.DiagGMM(*(t[:2] for t in init.params())))
    del small
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        gx, gw = run()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        rss = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        gx, gw = run()
        peak_mb = (_status_kb("VmHWM") - rss) / 1024
    grad_abs_sum = float(gx.double().abs().sum() + gw.double().abs().sum())
    del gx, gw
    gc.collect()
    result = {"peak_mb": peak_mb, "grad_abs_sum": grad_abs_sum}
    if device.type == "cpu":
        try:
            result["tensor_peak_mb"] = _tensor_peak_mb(run)
        except Exception as exc:  # private profiler API: report, do not fail the bench
            print(f"tensor peak unavailable: {exc!r}", file=sys.stderr)
    if args.variant != "unrolled":  # how hard the adjoint solve was (outside the measures)
        from s2m_ext.adjoint import solve_adjoint

        with torch.no_grad():
            gmm = s2m_ext.fit_gmm(x, w, n_iter=args.T, init=init, var_floor=1e-3)
        params = [t.detach().requires_grad_() for t in gmm.params()]
        loss = s2m_ext.DiagGMM(*params).log_prob(z).sum() + sum(t.sum() for t in params)
        grads = torch.autograd.grad(loss, params)
        config = backward if not isinstance(backward, str) else s2m_ext.ImplicitBackward()
        sol = solve_adjoint(x.detach(), w.detach(), gmm.params(), grads, 1e-3, config)
        result["solve_iters_mean"] = float(sol.n_iter.double().mean())
        result["solve_iters_max"] = int(sol.n_iter.max())
        result["solve_converged"] = bool(sol.converged.all())
    times = []
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result["time_s"] = statistics.median(times)
    return result


def forward_stop(args: argparse.Namespace, tol: float = 1e-4) -> Dict[str, float]:
    """Forward only, no gradient: n_iter = T iterations with tol = 0 against the same fit
    with tol (each set stops on its own): mean iterations used and the time ratio, which shows
    that a converged set costs no more work (the per-set loops of the CPU kernel break)."""
    import math

    import torch

    import s2m_ext

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(1)
    B, N, D, K = args.B, args.N, args.D, args.K
    centres = 6.0 / math.sqrt(D) * torch.randn(B, K, D, generator=g)
    labels = torch.randint(0, K, (B, N), generator=g)
    x = (centres.gather(1, labels.unsqueeze(-1).expand(B, N, D)) + torch.randn(B, N, D, generator=g)).to(dtype)
    init = s2m_ext.fit_gmm(x, n_components=K, n_iter=0, generator=torch.Generator().manual_seed(2))
    out = {}
    for name, t in (("tol0", 0.0), ("tol", tol)):
        times = []
        for _ in range(max(args.repeat, 1)):
            t0 = time.perf_counter()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gmm = s2m_ext.fit_gmm(x, n_iter=args.T, init=init, var_floor=1e-3, tol=t)
            times.append(time.perf_counter() - t0)
        out[f"{name}_time_s"] = statistics.median(times)
        out[f"{name}_mean_iters"] = float(gmm.n_iter.double().mean())
    out["tol"] = tol
    return out


def measure(variants: List[str], runs: int = 3, **sizes) -> Dict[str, Dict[str, float]]:
    """Run each variant in ``runs`` fresh subprocesses, interleaved; returns {variant: the
    median of each measurement over the runs}."""
    samples: Dict[str, List[Dict[str, float]]] = {v: [] for v in variants}
    import s2m_ext

    # The children import the s2m_ext this process imported (installed or built in place).
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(s2m_ext.__path__[0]), env.get("PYTHONPATH", "")])
    for _ in range(runs):
        for variant in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--variant", variant]
            for key, value in sizes.items():
                cmd += [f"--{key}", str(value)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"{variant} failed:\n{out.stderr}")
            samples[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {v: {key: _median([r[key] for r in rs]) for key in rs[0]} for v, rs in samples.items()}


def _median(values: list):
    """Median of numbers; flags (the same in every run) pass through."""
    if isinstance(values[0], bool) or not isinstance(values[0], (int, float)):
        return values[0]
    return statistics.median(values)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--T", type=int, default=100, help="EM iterations (tol=0: exactly T)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per subprocess (median)")
    p.add_argument("--runs", type=int, default=3, help="subprocesses per variant (median of each measure)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    return p


def _sizes(args) -> Dict[str, object]:
    keys = ("B", "N", "D", "K", "T", "dtype", "device", "repeat")
    return {k: getattr(args, k) for k in keys}


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    variants = args.variants.split(",")
    results = measure(variants, runs=args.runs, **_sizes(args))
    base = results.get("unrolled")
    print(
        f"fit_gmm forward+backward, B={args.B} N={args.N} D={args.D} K={args.K} T={args.T} {args.dtype} {args.device}"
        f" (medians over {args.runs} subprocesses per variant)"
    )
    print(
        f"{'variant':16s} {'RSS peak MiB':>13s} {'ratio':>7s} {'tensor peak MiB':>16s} {'ratio':>7s} "
        f"{'time s':>8s} {'ratio':>7s} {'solve iters mean/max':>21s}"
    )
    nan = float("nan")
    for name, r in results.items():
        rss_ratio = base["peak_mb"] / r["peak_mb"] if base else nan
        tensor = r.get("tensor_peak_mb", nan)
        tensor_ratio = base.get("tensor_peak_mb", nan) / tensor if base else nan
        time_ratio = r["time_s"] / base["time_s"] if base else nan
        iters = f"{r['solve_iters_mean']:.1f}/{r['solve_iters_max']}" if "solve_iters_max" in r else "-"
        print(
            f"{name:16s} {r['peak_mb']:13.1f} {rss_ratio:6.1f}x {tensor:16.1f} {tensor_ratio:6.1f}x "
            f"{r['time_s']:8.3f} {time_ratio:6.2f}x {iters:>21s}"
        )
    print("RSS peak: rise of the process's resident set over one forward+backward (glibc malloc defaults);")
    print("tensor peak: rise of live tensor memory (profiler timeline); memory ratios: unrolled / variant;")
    print("time: median forward+backward; time ratio: variant / unrolled")
    stop = forward_stop(args) if args.device == "cpu" else None
    if stop:
        print(
            f"forward only, n_iter={args.T}: tol=0 runs {stop['tol0_mean_iters']:.0f} iterations per set in "
            f"{stop['tol0_time_s']:.3f} s; tol={stop['tol']:g} stops sets after {stop['tol_mean_iters']:.1f} on "
            f"average, in {stop['tol_time_s']:.3f} s ({stop['tol_time_s'] / stop['tol0_time_s']:.2f}x)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sizes": _sizes(args), "results": results, "forward_stop": stop}, f, indent=2)


def test_implicit_memory_at_least_10x_lower():
    """The memory target at these sizes: the implicit backward's peak memory is at least 10x
    below the unrolled backward's at 100 EM iterations, by the rise of the resident set and by
    live tensor memory, and both give the same gradient magnitude to within the float32
    accuracy of the fit (a sanity check that they computed the same thing)."""
    results = measure(
        ["unrolled", "implicit"], runs=3, B=256, N=64, D=128, K=4, T=100, dtype="float32", device="cpu", repeat=1
    )
    unrolled, implicit = results["unrolled"], results["implicit"]
    assert unrolled["peak_mb"] >= 10 * implicit["peak_mb"], results
    assert unrolled["tensor_peak_mb"] >= 10 * implicit["tensor_peak_mb"], results
    assert abs(unrolled["grad_abs_sum"] - implicit["grad_abs_sum"]) <= 1e-3 * unrolled["grad_abs_sum"], results


if __name__ == "__main__":
    main()
