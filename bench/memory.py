"""Peak memory of one call.

CUDA: ``torch.cuda.max_memory_allocated`` during the call, minus what was allocated before
it (so the inputs, shared by all contenders, are not counted; the outputs are).

CPU: peak resident set size (RSS) of a fresh subprocess (``python -m bench.memprobe``, one per
workload) that imports, builds the inputs, prepares the contender and warms it up on a tiny shape (so that
one-time costs such as thread pools and lazily loaded code are not charged to the call), then
releases freed heap pages (``malloc_trim``), resets the kernel's RSS high-water mark
(``/proc/self/clear_refs``), and runs one call: peak = VmHWM after the call - VmRSS before it.
This counts every allocation the call makes, torch's, numpy's and the Python heap's alike.
Where the high-water mark cannot be reset (not Linux), the probe runs one shape per process
and reports ``ru_maxrss`` after the call minus ``ru_maxrss`` before it, which undercounts
when setting up peaked higher than the call's baseline (the JSON says which method was used).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Callable, Dict, List, Optional

import torch

from .timing import release_free_heap

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- CUDA
def cuda_peak_bytes(call: Callable[[], object]) -> int:
    """Bytes allocated at the peak of ``call`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


# ----------------------------------------------------------------------------- CPU (in the probe)
def _status_bytes() -> Dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, rest = line.split(":", 1)
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_of(call: Callable[[], object]) -> Dict[str, object]:
    """Run ``call`` once in this process and report its peak RSS above the RSS before it."""
    import gc

    gc.collect()
    release_free_heap()
    if reset_peak_rss():
        before = _status_bytes()["VmRSS"]
        out = call()
        peak = _status_bytes()["VmHWM"]
        method = "VmHWM after - VmRSS before (high-water mark reset)"
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = call()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method = "ru_maxrss after - ru_maxrss before (no reset: may undercount)"
    del out
    return {"peak_bytes": max(0, peak - before), "baseline_bytes": before, "method": method}


# ----------------------------------------------------------------------------- CPU (the runner's side)
def probe(spec: Dict[str, object], timeout_s: float) -> List[Dict[str, object]]:
    """Run ``python -m bench.memprobe`` on ``spec`` in a fresh subprocess; one result per item
    (a dict with ``error`` where the probe failed or timed out)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    items = spec.get("items", [None])
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.memprobe", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout_s, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return [{"error": f"memory probe timed out after {timeout_s:.0f} s"} for _ in items]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(results) < len(items):
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        results += [{"error": f"memory probe failed: {err}"} for _ in range(len(items) - len(results))]
    return results


def calibrate(mib: int = 256, timeout_s: float = 120.0) -> Optional[Dict[str, object]]:
    """Measure a known allocation of ``mib`` MiB with the probe: a check of the method."""
    result = probe({"calibrate_mib": mib}, timeout_s)[0]
    if "peak_bytes" in result:
        result["expected_bytes"] = mib * 2**20
    return result
