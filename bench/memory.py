"""Peak memory of one call, measured in the contender's own worker process (bench/worker.py),
right after its timing: the call has run warm at that shape several times.

CUDA: ``torch.cuda.max_memory_allocated`` during the call, minus what was allocated before
it (so the inputs, shared by all contenders, are not counted; the outputs are).

CPU: peak resident set size (RSS) of the process: ``gc.collect()``, ``malloc_trim(0)`` (freed
heap pages go back to the kernel, so the call cannot hide in pages that are resident but
free), reset of the kernel's RSS high-water mark (``/proc/self/clear_refs``), one call;
peak = VmHWM after - VmRSS before. This counts every allocation the call makes, torch's,
numpy's and the Python heap's alike. Where the high-water mark cannot be reset (not Linux),
``ru_maxrss`` after minus before is reported instead, which undercounts when the process
peaked higher earlier (each result names its method).
"""

from __future__ import annotations

import resource
from typing import Callable, Dict

import torch

from .timing import release_free_heap


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


# ----------------------------------------------------------------------------- CPU
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
