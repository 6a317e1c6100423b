"""Child process of the CPU peak-memory measurement (see bench/memory.py).

    python -m bench.memprobe '{"workload": "fwd_bwd", "threads": 2, "seed": 0, "items": [
        {"contender": "reference", "shape": {"B": 256, "N": 64, "D": 128, "K": 4, "T": 10, "M": 1024}}]}'
    python -m bench.memprobe '{"calibrate_mib": 256}'

Prints one JSON line per item: peak_bytes (peak RSS of the call above the RSS before it),
baseline_bytes, method; or error. Items run in turn in this one process: before each call,
freed heap pages go back to the kernel and the high-water mark is reset, so what an earlier
item allocated and freed is not lent to a later one.
"""

from __future__ import annotations

import json
import sys
import traceback


def _tiny(shape):
    """A shape small enough to warm a contender up in a few milliseconds."""
    return shape.replace(B=2, N=8, D=4, K=min(shape.K, 2), T=2, M=8)


def main(argv) -> int:
    spec = json.loads(argv[1])
    import torch

    from .memory import rss_peak_of

    if "calibrate_mib" in spec:
        n = int(spec["calibrate_mib"]) * 2**20 // 4
        print(json.dumps(rss_peak_of(lambda: torch.ones(n))), flush=True)
        return 0

    from .contenders import CONTENDERS
    from .workloads import Shape, make_problem

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    workload = spec["workload"]
    for item in spec["items"]:
        contender, shape = CONTENDERS[item["contender"]], Shape(**item["shape"])
        try:
            problem = make_problem(shape, workload, "cpu", seed=int(spec.get("seed", 0)))
            prepared = contender.prepare(problem, workload)
            if prepared.compiles:
                prepared.call()  # compiles for this very shape
            else:
                warm = contender.prepare(make_problem(_tiny(shape), workload, "cpu"), workload)
                warm.call()
                del warm
            result = rss_peak_of(prepared.call)
            del prepared, problem
        except Exception as exc:  # report and go on with the next item
            traceback.print_exc(file=sys.stderr)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result.update(item)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
