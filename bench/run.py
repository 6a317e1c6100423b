"""The summary command: every contender side by side on every workload, one table of median
times and ratios to s2m_ext per workload, peak memory, throughput, JSON results and plots.

    python -m bench --device cpu --quick       # < 10 min on a 2-core CPU
    python -m bench --device cuda              # the full suite on a GPU
    python -m bench --targets core             # only the core speed/memory targets (+ profile)

See bench/README.md for what is measured and how, bench/NOTES.md for the FLOP/byte models.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import env
from .contenders import BASELINE, CONTENDERS, DEFAULT_CONTENDERS, validity
from .timing import Budget, side_by_side
from .worker import WorkerError, Workers, calibrate, remote_sample
from .workloads import NAMED_SHAPES, WORKLOADS, Cell, compulsory_bytes, describe_flops, flops, parse_shape, plan

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: Tags of the cells always measured for every contender that can run them (never skipped
#: by the time projection, only for memory): the paper's scale, the target shapes, and the
#: shapes asked for one by one (--shape).
FORCED = ("paper", "core", "bigset", "custom")

#: Seconds a contender may take to build its inputs, compile and run its first call.
PREPARE_TIMEOUT_S = 1800.0

#: Targets: (named shape, workload, what, numerator contender, threshold): the contender's
#: time (or peak memory) over s2m_ext's must reach the threshold. A target whose cell was not
#: measured is reported as such.
TARGETS = (
    ("core", "fwd_bwd", "time", "reference", 20.0),
    ("core", "forward", "time", "sklearn", 20.0),
    ("core", "fwd_bwd", "peak memory", "reference", 10.0),
    ("core", "forward", "time", "compiled", 2.0),
    ("core", "fwd_bwd", "time", "compiled", 15.0),
    ("core", "pool", "time", "compiled", 2.0),
    ("core", "paired", "time", "compiled", 2.0),
    ("bigset", "fwd_bwd", "time", "compiled", 5.0),
    ("bigset", "fwd_bwd", "peak memory", "compiled", 10.0),
)


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr, stamped with the seconds since the start."""
    print(f"{time.perf_counter() - _T0:6.0f}s {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- formatting
def fmt_time(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1.0:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None or not math.isfinite(b):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def fmt_ratio(r: Optional[float]) -> str:
    if r is None or not math.isfinite(r):
        return ""
    return f"{r:.3g}x" if r < 100 else f"{r:.0f}x"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def tag_text(tags: Iterable[str]) -> str:
    named = [t for t in tags if not t.startswith("sweep:")]
    swept = [t.split(":", 1)[1] for t in tags if t.startswith("sweep:")]
    parts = named + (["sweep " + ",".join(swept)] if swept else [])
    return "; ".join(parts)


# ----------------------------------------------------------------------------- measuring
class Settings:
    """Budgets and policies of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device: str = args.device
        self.quick: bool = args.quick
        self.cap_s: float = args.cap_seconds if args.cap_seconds else (4.0 if args.quick else 60.0)
        if args.quick:
            self.budget = Budget(seconds=1.0, min_repeats=3, max_repeats=15, min_sample_s=0.02)
            self.forced_budget = Budget(seconds=2.0, min_repeats=3, max_repeats=25, min_sample_s=0.02)
        else:
            self.budget = Budget(seconds=4.0, min_repeats=5, max_repeats=50, min_sample_s=0.05)
            self.forced_budget = Budget(seconds=8.0, min_repeats=7, max_repeats=50, min_sample_s=0.05)
        if args.smoke:  # one timed call per contender: checks the pipeline, not the speed
            self.budget = self.forced_budget = Budget(seconds=0.0, min_repeats=1, max_repeats=1, min_sample_s=0.0)
        self.smoke: bool = args.smoke
        self.memory: bool = not args.no_memory
        self.seed: int = args.seed
        self.contenders: List[str] = args.contenders


def policy_skip(name: str, cell: Cell, s: Settings) -> Optional[str]:
    """Skips decided by the run's scope rather than by the contender itself."""
    if s.device == "cpu" and "large" in cell.tags:
        if s.quick:
            return "GPU-scale shape: on the CPU measured only without --quick, and only for s2m_ext"
        if name != BASELINE:
            return "GPU-scale shape: on the CPU only s2m_ext runs it (the others would take minutes to hours)"
    if name == "compiled" and s.quick and "core" not in cell.tags:
        return "--quick: compiled only at the core shape (each new shape recompiles: 10 s to minutes here)"
    return None


def memory_skip(name: str, cell: Cell, s: Settings) -> Optional[str]:
    """Skip a cell whose estimated footprint would not fit in the free memory."""
    c = CONTENDERS[name]
    need = c.memory_estimate(cell.workload, cell.shape) + compulsory_bytes(cell.workload, cell.shape)
    if s.device == "cuda" and not c.cpu_only:
        free, _ = torch.cuda.mem_get_info()
        if need > 0.8 * free:
            return f"needs ~{fmt_bytes(need)} of GPU memory, {fmt_bytes(free)} free"
    else:
        avail = env.mem_available_bytes()
        if avail is not None and need > 0.5 * avail:
            return f"needs ~{fmt_bytes(need)}, {fmt_bytes(avail)} available (shared machine: at most half)"
    return None


class Projector:
    """Projects a contender's time at a cell from its last measured cell of the same
    workload: in proportion to the model FLOPs (cells run in increasing FLOP order), times
    ``SAFETY`` because eager PyTorch grows faster than its FLOPs once its (B,N,K,D)
    temporaries stop fitting in cache (measured here: 9x the time for 2x the FLOPs).
    A measured time under ``RELIABLE`` x the cap is mostly fixed overhead (Python, kernel
    launches) that does not grow with the FLOPs: no projection is made from it."""

    SAFETY = 1.5
    RELIABLE = 0.05

    def __init__(self) -> None:
        self.last: Dict[Tuple[str, str], Tuple[float, float]] = {}

    def project(self, name: str, cell: Cell, cap_s: float) -> Optional[float]:
        prev = self.last.get((cell.workload, name))
        if prev is None or prev[1] < self.RELIABLE * cap_s:
            return None
        prev_flops, prev_s = prev
        return self.SAFETY * prev_s * flops(cell.workload, cell.shape) / prev_flops

    def record(self, name: str, cell: Cell, seconds: float) -> None:
        self.last[(cell.workload, name)] = (flops(cell.workload, cell.shape), seconds)


def memory_wanted(name: str, cell: Cell, s: Settings) -> Optional[str]:
    """None if the peak memory of (cell, contender) is measured, else why not."""
    if not s.memory:
        return "--no-memory"
    if CONTENDERS[name].cpu_only and s.device != "cpu":
        return "runs on the CPU: no GPU memory"
    if name == "compiled" and s.quick and "core" not in cell.tags:
        return "--quick: compiled memory measured at the core shape only"
    return None


def run_cell(cell: Cell, s: Settings, projector: Projector, peaks: Optional[Tuple[float, float]],
             workers: Workers) -> Dict[str, object]:
    """Measure every contender at one cell, each in its own worker process; returns the
    cell's JSON record."""
    shape, workload = cell.shape, cell.workload
    record: Dict[str, object] = {
        "workload": workload, "shape": shape.as_dict(), "label": shape.label(workload), "tags": list(cell.tags),
        "flops": flops(workload, shape), "bytes": compulsory_bytes(workload, shape), "contenders": {},
    }
    entries: Dict[str, Dict[str, object]] = record["contenders"]  # type: ignore[assignment]
    forced = any(t in FORCED for t in cell.tags)
    todo = []
    for name in s.contenders:
        c = CONTENDERS[name]
        reason = c.skip_reason(workload, s.device) or policy_skip(name, cell, s) or memory_skip(name, cell, s)
        projected = projector.project(name, cell, s.cap_s)
        if reason is None and not forced and projected is not None and projected > s.cap_s:
            reason = (f"projected {fmt_time(projected)} per call > {fmt_time(s.cap_s)} cap "
                      f"({'run without --quick' if s.quick else 'raise --cap-seconds'})")
        if reason:
            entries[name] = {"skipped": reason}
        else:
            todo.append(name)
    if not todo:
        return record

    started = time.perf_counter()
    samplers, warm_s, expected = {}, {}, None
    try:
        for name in todo:
            entry: Dict[str, object] = {}
            entries[name] = entry
            try:
                ready = workers[name].request("prepare", (workload, shape.as_dict(), s.seed, s.smoke),
                                              timeout_s=PREPARE_TIMEOUT_S)
            except WorkerError as exc:  # an error in one contender must not end the run
                entry["error"] = str(exc).splitlines()[0]
                log(f"    {name}: ERROR {entry['error']}")
                continue
            entry["first_call_s"] = ready["first_call_s"]
            if ready["compiles"]:
                entry["compile_s"] = ready["first_call_s"]
            out = ready["output"]
            if name == BASELINE:
                expected = out
            ok, note, err = validity(CONTENDERS[name], expected if name != BASELINE else None, out)
            entry["check"] = {"ok": ok, "rel_err_vs_s2m_ext": err, "note": note}
            warm_s[name] = ready["warm_s"]
            samplers[name] = remote_sample(workers[name], timeout_s=60.0 + 50.0 * max(ready["warm_s"], s.cap_s))
        budget = s.forced_budget if forced else s.budget
        try:
            timings = side_by_side(samplers, warm_s, budget)
        except WorkerError as exc:
            for name in samplers:
                entries[name]["error"] = f"timing failed: {str(exc).splitlines()[0]}"
            log(f"    ERROR {exc}")
            return record
        base = timings.get(BASELINE)
        for name, timing in timings.items():
            entry = entries[name]
            entry.update(timing.as_dict())
            projector.record(name, cell, timing.median)
            if base is not None and name != BASELINE:
                entry["ratio_to_s2m_ext"] = timing.median / base.median
                if s.device == "cpu" and base.cpu_median > 0:
                    entry["cpu_ratio_to_s2m_ext"] = timing.cpu_median / base.cpu_median
            entry["gflops"] = record["flops"] / timing.median / 1e9
            entry["gbytes_per_s"] = record["bytes"] / timing.median / 1e9
            if peaks and not CONTENDERS[name].cpu_only:
                entry["flop_share"] = record["flops"] / timing.median / peaks[0]
                entry["bandwidth_share"] = record["bytes"] / timing.median / peaks[1]
            if CONTENDERS[name].cpu_only and s.device != "cpu":
                entry["ran_on"] = "cpu"
            why_not = memory_wanted(name, cell, s)
            if why_not:
                entry["peak_mem_note"] = why_not
                continue
            try:
                result = workers[name].request("memory", timeout_s=120.0 + 20.0 * timing.median)
                entry["peak_mem_bytes"] = result["peak_bytes"]
                entry["mem_method"] = result["method"]
            except WorkerError as exc:
                entry["peak_mem_note"] = f"failed: {str(exc).splitlines()[0]}"
    finally:
        for name in todo:
            try:
                workers[name].request("release", timeout_s=120.0)
            except WorkerError:
                workers[name].kill()
    record["wall_s"] = time.perf_counter() - started
    log("    " + ", ".join(f"{n} {fmt_time(timings[n].median)}" for n in timings))
    return record


def memory_ratios(records: List[Dict[str, object]]) -> None:
    for rec in records:
        entries = rec["contenders"]
        base = entries.get(BASELINE, {}).get("peak_mem_bytes")  # type: ignore[union-attr]
        for name, entry in entries.items():  # type: ignore[union-attr]
            if name != BASELINE and base and "peak_mem_bytes" in entry:
                entry["mem_ratio_to_s2m_ext"] = entry["peak_mem_bytes"] / base


# ----------------------------------------------------------------------------- reporting
def evaluate_targets(records: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """The targets, from the measured ratios."""
    out = []
    for shape_name, workload, what, name, threshold in TARGETS:
        shape = NAMED_SHAPES[shape_name]
        rec = next((r for r in records if r["workload"] == workload and r["shape"] == shape.as_dict()), None)
        entry = rec["contenders"].get(name, {}) if rec else {}  # type: ignore[union-attr]
        ratio = entry.get("ratio_to_s2m_ext" if what == "time" else "mem_ratio_to_s2m_ext")
        out.append({"workload": workload, "what": what, "contender": name, "threshold": threshold,
                    "shape": shape.label(workload), "ratio": ratio,
                    "cpu_time_ratio": entry.get("cpu_ratio_to_s2m_ext") if what == "time" else None,
                    "met": None if ratio is None else bool(ratio >= threshold)})
    return out


def format_targets(targets: List[Dict[str, object]]) -> str:
    rows = []
    for t in targets:
        status = "not measured" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        rows.append([t["workload"], t["shape"], t["what"], f"{t['contender']} / s2m_ext", fmt_ratio(t["ratio"]),
                     fmt_ratio(t.get("cpu_time_ratio")), f">= {t['threshold']:g}x", status])
    return render_table(["workload", "shape", "measure", "ratio", "measured", "(CPU-time ratio)", "target", "status"],
                        rows)


def format_tables(records: List[Dict[str, object]], contenders: Sequence[str], device: str) -> str:
    """Per workload: median times with ratios to s2m_ext, peak memory, s2m_ext throughput."""
    blurbs = {
        "forward": "T EM iterations from the same initial parameters (+ final log-likelihood)",
        "fwd_bwd": "the same under autograd + gradient of a fixed random linear loss w.r.t. x",
        "pool": "log-density of M pool items under each of B fitted mixtures -> (B, M)",
        "paired": "log-density of Q queries per set under that set's fitted mixture -> (B, Q)",
        "seed": "fit_gmm(n_iter=0): k-means++ means, initial variances and their log-likelihood",
    }
    text: List[str] = []
    for workload in WORKLOADS:
        recs = [r for r in records if r["workload"] == workload]
        if not recs:
            continue
        names = [n for n in contenders if any(n in r["contenders"] for r in recs)]
        notes: Dict[str, str] = {}

        def note(reason: str) -> str:
            if reason not in notes:
                notes[reason] = chr(ord("a") + len(notes)) if len(notes) < 26 else str(len(notes))
            return notes[reason]

        def cell_text(entry: Dict[str, object], name: str, kind: str) -> str:
            if "skipped" in entry:
                return f"skip[{note(str(entry['skipped']))}]"
            if "error" in entry:
                return f"error[{note(name + ': ' + str(entry['error']))}]"
            if kind == "time":
                txt = fmt_time(entry.get("median_s"))  # type: ignore[arg-type]
                ratio = entry.get("ratio_to_s2m_ext")
            else:
                if "peak_mem_bytes" not in entry:
                    return "-"
                txt = fmt_bytes(entry["peak_mem_bytes"])  # type: ignore[arg-type]
                ratio = entry.get("mem_ratio_to_s2m_ext")
            if ratio is not None:
                txt += f" ({fmt_ratio(ratio)})"  # type: ignore[arg-type]
            check = entry.get("check", {})
            if check and not check.get("ok", True):  # type: ignore[union-attr]
                txt += f" !{note(name + ': ' + str(check['note']))}"  # type: ignore[index]
            if entry.get("ran_on") == "cpu" and kind == "time":
                txt += " (cpu)"
            return txt

        titles = [CONTENDERS[n].title for n in names]
        rows = [[r["label"], tag_text(r["tags"])] + [cell_text(r["contenders"].get(n, {"skipped": "not selected"}), n, "time")
                                                      for n in names] for r in recs]
        text.append(f"== {workload}: {blurbs[workload]}\n   median time per call; (ratio) = contender time / s2m_ext time, same run")
        text.append(render_table(["shape", "cells"] + titles, rows))
        mem_rows = [[r["label"], tag_text(r["tags"])] + [cell_text(r["contenders"].get(n, {"skipped": "not selected"}), n, "mem")
                                                          for n in names]
                    for r in recs if any("peak_mem_bytes" in e for e in r["contenders"].values())]
        if mem_rows:
            what = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS of the contender's own process"
            text.append(f"\n   peak memory of one call beyond its inputs ({what}); (ratio) = contender / s2m_ext")
            text.append(render_table(["shape", "cells"] + titles, mem_rows))
        thr_rows = []
        for r in recs:
            e = r["contenders"].get(BASELINE, {})
            if "median_s" in e:
                row = [r["label"], f"{r['flops'] / 1e9:.3g}", f"{e['gflops']:.3g}", f"{e['gbytes_per_s']:.3g}"]
                if "flop_share" in e:
                    row += [f"{100 * e['flop_share']:.2g}%", f"{100 * e['bandwidth_share']:.2g}%"]
                thr_rows.append(row)
        if thr_rows:
            hdr = ["shape", "GFLOP (model)", "s2m_ext GFLOP/s", "GB/s (compulsory)"]
            if len(thr_rows[0]) > 4:
                hdr += ["% fp32 peak", "% bandwidth"]
            text.append("\n   s2m_ext throughput (FLOP and byte models: bench/NOTES.md)")
            text.append(render_table(hdr, thr_rows))
        compiles = [f"{r['label']}: {fmt_time(r['contenders']['compiled']['compile_s'])}"
                    for r in recs if "compile_s" in r["contenders"].get("compiled", {})]
        if compiles:
            text.append("\n   compiled ref, first call (compilation, not in the times above): " + "; ".join(compiles))
        if notes:
            text.append("\n   " + "\n   ".join(f"[{k}] {reason}" for reason, k in notes.items()))
        text.append("")
    return "\n".join(text)


def result_path(out_dir: str, device: str, suffix: str) -> str:
    date = _dt.date.today().isoformat()
    return os.path.join(out_dir, f"{device}-{date}{suffix}")


# ----------------------------------------------------------------------------- entry points
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer sweep points, repeats and contenders per cell")
    ap.add_argument("--smoke", action="store_true", help="implies --quick; one call per contender and cell: "
                    "checks that everything runs and agrees, times nothing worth quoting")
    ap.add_argument("--targets", choices=("core",), help="only the core targets at B256 N64 D128 K4 T10, "
                    "with a profile of where s2m_ext's time goes")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of %(default)s")
    ap.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                    help="comma list of %(default)s (also: " + ", ".join(sorted(set(CONTENDERS) - set(DEFAULT_CONTENDERS)))
                    + ", s2m_ext with its CPU kernels forced to a lower level)")
    ap.add_argument("--shapes", default="paper,core,medium,large", help="named shapes (comma list)")
    ap.add_argument("--shape", action="append", default=[], metavar="SPEC",
                    help="also this shape, written as its label: --shape 'B4 N4096 D768 K16 T3' (repeatable)")
    ap.add_argument("--no-sweeps", action="store_true", help="only the named shapes (and --shape)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--cap-seconds", type=float, default=None,
                    help="skip a contender whose projected time per call exceeds this (default 4 with --quick, else 60)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=RESULTS_DIR, help="directory of the JSON results and plots (default %(default)s)")
    args = ap.parse_args(argv)
    args.quick = args.quick or args.smoke
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.contenders = [c for c in args.contenders.split(",") if c]
    args.shapes = [n for n in args.shapes.split(",") if n]
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for c in args.contenders:
        if c not in CONTENDERS:
            ap.error(f"unknown contender {c!r}; choose from {', '.join(CONTENDERS)}")
    for n in args.shapes:
        if n not in NAMED_SHAPES:
            ap.error(f"unknown shape {n!r}; choose from {', '.join(NAMED_SHAPES)}")
    try:
        args.shape = [parse_shape(spec) for spec in args.shape]
    except ValueError as exc:
        ap.error(f"--shape: {exc}")
    if BASELINE in args.contenders:  # the baseline runs first: its output is what others are checked against
        args.contenders.remove(BASELINE)
    args.contenders.insert(0, BASELINE)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch")
    if args.device == "cuda":
        import s2m_ext

        if not s2m_ext.build_info()["cuda"]:
            ap.error("--device cuda: this build of s2m_ext has no CUDA kernels (rebuild with a CUDA toolkit)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.targets == "core":
        from .core_targets import run_core_targets

        return run_core_targets(args)
    s = Settings(args)
    started = time.perf_counter()
    meta = env.describe(args.device)
    peaks = meta.get("gpu_peaks") if args.device == "cuda" else None
    cells = plan(args.device, args.quick, args.workloads, args.shapes, sweeps=not args.no_sweeps, extra=args.shape)
    log(f"s2m_ext benchmark: {len(cells)} cells on {meta['device_name']} ({'quick' if args.quick else 'full'}), "
        f"load average {meta['load_average']}")
    projector = Projector()
    records = []
    calibration = calibrate(threads=args.threads) if s.memory and args.device == "cpu" else None
    with Workers(args.device, args.threads) as workers:
        for i, cell in enumerate(cells):
            log(f"[{i + 1}/{len(cells)}] {cell.workload} {cell.shape.label(cell.workload)} ({tag_text(cell.tags)})")
            records.append(run_cell(cell, s, projector, peaks, workers))  # type: ignore[arg-type]
    memory_ratios(records)
    targets = evaluate_targets(records)
    meta.update({
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full", "argv": sys.argv[1:] if argv is None else list(argv),
        "flop_model": describe_flops(), "load_average_end": env.load_average(),
        "wall_s": time.perf_counter() - started, "memory_calibration": calibration,
        "budget": vars(s.budget), "forced_budget": vars(s.forced_budget), "cap_s": s.cap_s,
    })
    report = format_tables(records, args.contenders, args.device)
    print(report)
    if any(t["met"] is not None for t in targets):
        print("== targets (float32, same run)")
        print(format_targets(targets))
    os.makedirs(args.out, exist_ok=True)
    path = result_path(args.out, args.device, "-smoke.json" if args.smoke else "-quick.json" if args.quick else ".json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "cells": records, "targets": targets}, f, indent=1, default=str)
    print(f"\nresults: {os.path.relpath(path)}  ({meta['wall_s']:.0f} s, load average "
          f"{meta['load_average']} -> {meta['load_average_end']})")
    if not args.no_plots and not args.no_sweeps:
        from .plots import plot_sweeps

        for png in plot_sweeps(records, args.contenders, path[: -len(".json")], args.device):
            print(f"plot: {os.path.relpath(png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
