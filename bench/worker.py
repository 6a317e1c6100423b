"""One process per contender.

Every contender of a run lives in its own worker process (``multiprocessing`` spawn), which
builds the inputs itself (same seed: the same tensors), prepares the call, and times it or
measures its peak memory when the summary process asks. The summary process interleaves
the workers' samples, so timings stay side by side, while nothing a contender does to its
process (the heap and glibc's mmap threshold, dynamo/inductor state and the garbage
collector's load, thread pools, the CUDA caching allocator) changes another one's numbers:
each runs as it would in a user's program. (Measured before this separation: the eager
reference's fwd_bwd at the core shape cost 3.2 s of CPU time in its own process but 0.8 s
right after the torch loop's many small tensors had been freed in the same process.)
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import time
import traceback
from typing import Dict, Optional, Tuple

import torch

from .timing import release_free_heap, synchronize, time_calls, time_calls_cpu

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkerError(RuntimeError):
    """The contender raised, or its worker died or timed out."""


# ----------------------------------------------------------------------------- worker side
def _serve(conn, name: Optional[str], device: str, threads: Optional[int]) -> None:
    """Worker main loop: answers (request, args) messages with ("ok", result) or ("error", text)."""
    from .contenders import CONTENDERS

    level = getattr(CONTENDERS[name], "cpu_capability", None) if name else None
    if level:  # read once, at s2m_ext's first kernel call: before this worker makes any
        os.environ["S2M_CPU_CAPABILITY"] = level
    if threads:
        torch.set_num_threads(threads)
    from . import memory
    from .workloads import Shape, make_problem

    contender = CONTENDERS[name] if name else None
    prepared = problem = None
    while True:
        try:
            request, args = conn.recv()
        except EOFError:
            return
        try:
            if request == "stop":
                conn.send(("ok", None))
                return
            if request == "prepare":
                workload, shape, seed, smoke = args
                prepared = problem = None
                gc.enable()
                gc.collect()
                problem = make_problem(Shape(**shape), workload, device, seed=seed)
                prepared = contender.prepare(problem, workload)
                synchronize(device)
                t0 = time.perf_counter()
                raw = prepared.call()
                synchronize(device)
                first = time.perf_counter() - t0
                # A second, warm call sets the sample length (the first may compile or allocate).
                warm = first if smoke or not (prepared.compiles or first < 0.5) else time_calls(prepared.call, 1, device)
                output = prepared.extract(raw)
                del raw
                # The cyclic collector stays off while this cell is timed: after torch.compile
                # one collection takes ~1 s here, and it would be charged to whichever sample
                # it fell into.
                gc.collect()
                gc.disable()
                conn.send(("ok", {"first_call_s": first, "warm_s": warm, "compiles": prepared.compiles,
                                  "output": output}))
            elif request == "time":
                conn.send(("ok", time_calls_cpu(prepared.call, int(args), device)))
            elif request == "memory":
                if device == "cuda":
                    result = {"peak_bytes": memory.cuda_peak_bytes(prepared.call),
                              "method": "torch.cuda.max_memory_allocated - memory_allocated before"}
                else:
                    result = memory.rss_peak_of(prepared.call)
                    result["method"] = "peak RSS of the contender's process: " + result["method"]
                conn.send(("ok", result))
            elif request == "calibrate":
                n = int(args) * 2**20 // 4
                conn.send(("ok", memory.rss_peak_of(lambda: torch.ones(n))))
            elif request == "release":
                prepared = problem = None
                gc.enable()
                gc.collect()
                release_free_heap()
                if device == "cuda":
                    torch.cuda.empty_cache()
                conn.send(("ok", None))
            else:
                raise ValueError(f"unknown request {request!r}")
        except Exception as exc:  # report to the summary process and keep serving
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            conn.send(("error", f"{type(exc).__name__}: {first_line}\n{traceback.format_exc()}"))


# ----------------------------------------------------------------------------- summary side
class Worker:
    """Handle on one contender's process; started on first use."""

    def __init__(self, name: Optional[str], device: str, threads: Optional[int]) -> None:
        self.name, self.device, self.threads = name, device, threads
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.name, self.device, self.threads), daemon=True,
                                name=f"bench-{self.name}")
        self.proc.start()
        child.close()
        self.conn = parent

    def request(self, request: str, args=None, timeout_s: float = 3600.0):
        """Send a request and wait for its answer; WorkerError on error, death or timeout
        (a worker that died or timed out is killed and restarted on the next request)."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((request, args))
        if not self.conn.poll(timeout_s):
            self.kill()
            raise WorkerError(f"{self.name}: no answer to {request!r} within {timeout_s:.0f} s (worker killed)")
        try:
            status, value = self.conn.recv()
        except EOFError:
            code = self.proc.exitcode if self.proc else None
            self.kill()
            raise WorkerError(f"{self.name}: worker died during {request!r} (exit code {code})") from None
        if status != "ok":
            raise WorkerError(value)
        return value

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(5)
        self.proc = self.conn = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.request("stop", timeout_s=30)
            except WorkerError:
                pass
            self.proc.join(10)
        self.kill()


class Workers:
    """One worker per contender name, started lazily, stopped together."""

    def __init__(self, device: str, threads: Optional[int]) -> None:
        self.device, self.threads = device, threads
        self.workers: Dict[Optional[str], Worker] = {}

    def __getitem__(self, name: Optional[str]) -> Worker:
        if name not in self.workers:
            self.workers[name] = Worker(name, self.device, self.threads)
        return self.workers[name]

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def calibrate(mib: int = 256, threads: Optional[int] = None) -> Dict[str, object]:
    """Measure a known allocation of ``mib`` MiB with the CPU memory method, in a fresh worker."""
    worker = Worker(None, "cpu", threads)
    try:
        result = worker.request("calibrate", mib, timeout_s=300)
    finally:
        worker.stop()
    result["expected_bytes"] = mib * 2**20
    return result


def remote_sample(worker: Worker, timeout_s: float):
    """A function number -> (wall, cpu, sys) seconds per call, timed inside ``worker``."""

    def sample(number: int) -> Tuple[float, float, float]:
        return worker.request("time", number, timeout_s=timeout_s + 0.0)

    return sample
