"""``python -m bench --targets core``: the core targets alone, at B=256, N=64, D=128, K=4,
T=10, float32, measured side by side, then a profile of where s2m_ext's time goes:

* the op split: em_fit without trajectory (forward), em_fit keeping the trajectory (the
  forward of a training step), em_fit_backward alone, and the public API's overhead
  (fit_gmm's validation) over the raw op;
* per-iteration cost: forward and backward op times at T = 1, 5, 10, 20 and their
  least-squares slope (seconds per EM iteration) and intercept;
* the reference's forward (graph recording) vs backward split;
* thread scaling: the same at 1 thread and at torch's default thread count.

The targets are measured like the summary (each contender in its own process, interleaved);
the profile runs in this process (s2m_ext's ops, then the reference's split).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Sequence

import torch

from . import env
from .run import (Projector, Settings, evaluate_targets, fmt_time, format_targets, log, memory_ratios,
                  render_table, result_path, run_cell)
from .timing import Budget, local_sampler, release_free_heap, side_by_side
from .worker import Workers
from .workloads import NAMED_SHAPES, Cell, flops, make_problem

PROFILE_T = (1, 5, 10, 20)


def _op_calls(problem, n_iter: int) -> Dict[str, object]:
    """Zero-argument calls of the raw ops at ``problem`` with T = n_iter."""
    import s2m_ext

    ops = s2m_ext.ops
    p = problem
    lw, mu, var = p.init
    args = (p.x, p.weights, lw, mu, var, n_iter, p.var_floor, 0.0)
    traj = ops.em_fit(*args, True)
    grads = tuple(torch.zeros_like(t) for t in traj[:3])
    for g, c in zip(grads, p.cotangents):
        g[-1] = c  # the linear loss of the fwd_bwd workload touches the final step only
    return {
        "em_fit": lambda: ops.em_fit(*args, False),
        "em_fit+trajectory": lambda: ops.em_fit(*args, True),
        "em_fit_backward": lambda: ops.em_fit_backward(*grads, p.x, p.weights, *traj[:3], traj[4], p.var_floor),
    }


def _reference_split(problem) -> Dict[str, object]:
    """Reference under autograd: the forward (recording the graph) and the backward alone."""
    from s2m_ext import reference

    p = problem
    x = p.x.detach().clone().requires_grad_(True)
    state = {}

    def forward():
        out = reference.em_fit(x, p.weights, *p.init, n_iter=p.shape.T, var_floor=p.var_floor)[:3]
        state["loss"] = sum((c * t).sum() for c, t in zip(p.cotangents, out))
        return state["loss"]

    def backward():  # needs a fresh graph: each call re-runs the forward outside the timer
        x.grad = None
        state["loss"].backward()

    return {"forward": forward, "backward": backward}


def profile(threads_list: Sequence[int], budget: Budget) -> Dict[str, object]:
    """Time the op split and the per-iteration costs; returns a JSON-able dict."""
    import s2m_ext

    shape = NAMED_SHAPES["core"]
    default_threads = torch.get_num_threads()
    result: Dict[str, object] = {"shape": shape.as_dict(), "threads": {}}
    for threads in threads_list:
        torch.set_num_threads(threads)
        log(f"  profile: {threads} thread(s)")
        rows: Dict[str, object] = {}
        problem = make_problem(shape, "fwd_bwd", "cpu")
        calls = _op_calls(problem, shape.T)
        init = s2m_ext.DiagGMM(*problem.init)
        calls["fit_gmm (API)"] = lambda: s2m_ext.fit_gmm(problem.x, problem.weights, init=init, n_iter=shape.T,
                                                          var_floor=problem.var_floor)
        first = {}
        for name, call in calls.items():
            call()
            t0 = time.perf_counter()
            call()
            first[name] = time.perf_counter() - t0
        timings = side_by_side({n: local_sampler(c, "cpu") for n, c in calls.items()}, first, budget)
        rows["ops_T10"] = {n: t.median for n, t in timings.items()}
        # Per-iteration cost: op times against T, least-squares line.
        per_t: Dict[int, Dict[str, float]] = {}
        for n_iter in PROFILE_T:
            c = _op_calls(problem, n_iter)
            c.pop("em_fit+trajectory")
            f = {}
            for name, call in c.items():
                call()
                t0 = time.perf_counter()
                call()
                f[name] = time.perf_counter() - t0
            samplers = {n: local_sampler(call, "cpu") for n, call in c.items()}
            per_t[n_iter] = {n: t.median for n, t in side_by_side(samplers, f, budget).items()}
        fits = {}
        for name in ("em_fit", "em_fit_backward"):
            ts = list(PROFILE_T)
            ys = [per_t[t][name] for t in ts]
            mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
            slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / sum((t - mt) ** 2 for t in ts)
            fits[name] = {"per_iteration_s": slope, "intercept_s": my - slope * mt}
        rows["ops_by_T"] = {str(k): v for k, v in per_t.items()}
        rows["per_iteration_fit"] = fits
        # Reference: forward (with graph) and backward, timed apart (one of each per sample).
        split = _reference_split(problem)
        fwd_s, bwd_s, cpu_s, sys_s = [], [], 0.0, 0.0
        for _ in range(max(3, budget.min_repeats)):
            release_free_heap()
            c0, t0 = os.times(), time.perf_counter()
            split["forward"]()
            t1 = time.perf_counter()
            split["backward"]()
            t2, c1 = time.perf_counter(), os.times()
            fwd_s.append(t1 - t0)
            bwd_s.append(t2 - t1)
            cpu_s += c1.user - c0.user + c1.system - c0.system
            sys_s += c1.system - c0.system
        rows["reference_split"] = {"forward_s": sorted(fwd_s)[len(fwd_s) // 2], "backward_s": sorted(bwd_s)[len(bwd_s) // 2],
                                   "sys_share": sys_s / cpu_s if cpu_s > 0 else None}
        result["threads"][str(threads)] = rows  # type: ignore[index]
    torch.set_num_threads(default_threads)
    return result


def format_profile(prof: Dict[str, object]) -> str:
    shape = NAMED_SHAPES["core"]
    f_fwd, f_all = flops("forward", shape), flops("fwd_bwd", shape)
    lines = []
    threads = prof["threads"]  # type: ignore[assignment]
    names = ["em_fit", "em_fit+trajectory", "em_fit_backward", "fit_gmm (API)"]
    rows = [[n] + [fmt_time(threads[t]["ops_T10"][n]) for t in threads] for n in names]  # type: ignore[index]
    rows.append(["reference forward (autograd)"] + [fmt_time(threads[t]["reference_split"]["forward_s"]) for t in threads])
    rows.append(["reference backward"] + [fmt_time(threads[t]["reference_split"]["backward_s"]) for t in threads])
    rows.append(["reference: kernel share of CPU time"] + [f"{100 * (threads[t]['reference_split']['sys_share'] or 0):.0f}%"
                                                          for t in threads])
    for name in ("em_fit", "em_fit_backward"):
        rows.append([f"{name}: per EM iteration"] + [fmt_time(threads[t]["per_iteration_fit"][name]["per_iteration_s"])
                                                    for t in threads])
        rows.append([f"{name}: fixed cost"] + [fmt_time(threads[t]["per_iteration_fit"][name]["intercept_s"])
                                              for t in threads])
    lines.append(render_table(["s2m_ext profile at " + shape.label("forward")] + [f"{t} thread(s)" for t in threads], rows))
    notes = []
    for t in threads:
        ops = threads[t]["ops_T10"]
        fwd_bwd = ops["em_fit+trajectory"] + ops["em_fit_backward"]
        notes.append(f"{t} thread(s): backward share of fwd+bwd {100 * ops['em_fit_backward'] / fwd_bwd:.0f}%; "
                     f"em_fit {f_fwd / ops['em_fit'] / 1e9:.3g} GFLOP/s, fwd+bwd {f_all / fwd_bwd / 1e9:.3g} GFLOP/s (model); "
                     f"API overhead {fmt_time(ops['fit_gmm (API)'] - ops['em_fit'])}")
    lines += notes
    return "\n".join(lines)


def run_core_targets(args: argparse.Namespace) -> int:
    args.quick = False
    s = Settings(args)
    s.forced_budget = Budget(seconds=10.0, min_repeats=7, max_repeats=40, min_sample_s=0.05)
    shape = NAMED_SHAPES["core"]
    meta = env.describe("cpu" if args.device == "cpu" else args.device)
    log(f"core targets at {shape.label('forward')} on {meta['device_name']}, {torch.get_num_threads()} threads, "
        f"load average {meta['load_average']}")
    records: List[Dict[str, object]] = []
    projector = Projector()
    with Workers(args.device, args.threads) as workers:
        for workload, names in (("forward", ["s2m_ext", "sklearn", "reference", "compiled"]),
                                ("fwd_bwd", ["s2m_ext", "reference", "compiled"]),
                                ("pool", ["s2m_ext", "compiled"]), ("paired", ["s2m_ext", "compiled"])):
            s.contenders = names
            log(f"[{workload}]")
            records.append(run_cell(Cell(workload, shape, ("core",)), s, projector, None, workers))
    memory_ratios(records)
    targets = [t for t in evaluate_targets(records) if t["shape"] == shape.label(str(t["workload"]))]
    prof = None
    if args.device == "cpu":
        threads = sorted({1, torch.get_num_threads()})
        prof = profile(threads, Budget(seconds=1.0, min_repeats=5, max_repeats=20, min_sample_s=0.05))
    meta["load_average_end"] = env.load_average()
    rows = []
    for rec in records:
        for name, e in rec["contenders"].items():  # type: ignore[union-attr]
            rows.append([rec["workload"], name, fmt_time(e.get("median_s")), fmt_time(e.get("cpu_median_s")),
                         f"{100 * e['sys_share']:.0f}%" if e.get("sys_share") is not None else "",
                         str(e.get("repeats", "")),
                         f"{e['ratio_to_s2m_ext']:.3g}x" if "ratio_to_s2m_ext" in e else "",
                         f"{e['cpu_ratio_to_s2m_ext']:.3g}x" if "cpu_ratio_to_s2m_ext" in e else "",
                         f"{e['peak_mem_bytes'] / 1e6:.3g} MB" if "peak_mem_bytes" in e else "-",
                         f"{e['mem_ratio_to_s2m_ext']:.3g}x" if "mem_ratio_to_s2m_ext" in e else ""])
    print(f"== core targets: {shape.label('forward')} float32, {torch.get_num_threads()} threads, "
          f"load average {meta['load_average']} -> {meta['load_average_end']}")
    print(render_table(["workload", "contender", "median", "CPU time", "of it kernel", "runs", "time ratio", "CPU-time ratio",
                        "peak memory", "memory ratio"], rows))
    print()
    print(format_targets(targets))
    if prof:
        print()
        print(format_profile(prof))
    os.makedirs(args.out, exist_ok=True)
    path = result_path(args.out, args.device, f"-core-{torch.get_num_threads()}t.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "cells": records, "targets": targets, "profile": prof}, f, indent=1, default=str)
    print(f"\nresults: {os.path.relpath(path)}")
    return 0

