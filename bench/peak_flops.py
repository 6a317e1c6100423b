"""Peak floating-point throughput of this CPU per instruction-set level, the yardstick for
every CPU figure in bench/ (a time quoted as a fraction of what the machine can do).

    python -m bench.peak_flops [--seconds 1] [--threads N] [--out bench/results/peak-flops-<date>.json]

Compiles bench/peak_flops.cpp (independent multiply-add chains in vector registers) once per
level this CPU runs: baseline (SSE2, 16-byte vectors, no FMA), avx2 (+FMA, 32 bytes) and
avx512 (64 bytes), with g++, and measures float32 and float64 on one thread and on
``--threads`` threads. Needs only g++.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional

from .env import describe

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "peak_flops.cpp")

#: level -> (g++ flags, /proc/cpuinfo flags it needs)
LEVELS: Dict[str, tuple] = {
    "baseline": ([], []),
    "avx2": (["-mavx2", "-mfma"], ["avx2", "fma"]),
    "avx512": (["-mavx512f", "-mfma", "-mprefer-vector-width=512"], ["avx512f", "fma"]),
}


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def available_levels() -> List[str]:
    flags = cpu_flags()
    return [name for name, (_, need) in LEVELS.items() if all(f in flags for f in need)]


def measure(level: str, seconds: float, threads: int, build_dir: str) -> Dict[str, float]:
    """One level's figures in FLOP/s: float32_1t, float64_1t, float32_all, float64_all."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"{cxx} not found: the peak-FLOP benchmark compiles bench/peak_flops.cpp")
    exe = os.path.join(build_dir, f"peak_flops_{level}")
    subprocess.run([cxx, "-O2", "-std=c++17", "-pthread", *LEVELS[level][0], SOURCE, "-o", exe], check=True)
    out = subprocess.run([exe, str(seconds), str(threads)], check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout)


def run(levels: Optional[List[str]] = None, seconds: float = 1.0, threads: int = 0) -> Dict[str, object]:
    threads = threads or len(os.sched_getaffinity(0))
    levels = levels or available_levels()
    with tempfile.TemporaryDirectory() as build_dir:
        results = {level: measure(level, seconds, threads, build_dir) for level in levels}
    return {"env": describe("cpu"), "seconds": seconds, "threads": threads, "levels": results}


def format_table(result: Dict[str, object]) -> str:
    lines = ["| level | vector bytes | float32, 1 thread | float64, 1 thread | float32, all | float64, all |",
             "|---|---|---|---|---|---|"]
    for level, r in result["levels"].items():
        lines.append(f"| {level} | {r['vector_bytes']} | {r['float32_1t'] / 1e9:.1f} GFLOP/s | "
                     f"{r['float64_1t'] / 1e9:.1f} GFLOP/s | {r['float32_all'] / 1e9:.1f} GFLOP/s | "
                     f"{r['float64_all'] / 1e9:.1f} GFLOP/s |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="measuring time per figure")
    ap.add_argument("--threads", type=int, default=0, help="threads of the all-core figures (default: usable cores)")
    ap.add_argument("--levels", nargs="+", choices=list(LEVELS), default=None, help="default: every level this CPU runs")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/peak-flops-<date>.json)")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.threads < 0:
        ap.error("--seconds must be > 0 and --threads >= 0")
    result = run(args.levels, args.seconds, args.threads)
    print(format_table(result))
    out = args.out or os.path.join(HERE, "results", f"peak-flops-{_dt.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
