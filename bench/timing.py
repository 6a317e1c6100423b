"""Side-by-side timing: the contenders of one cell are timed in interleaved rounds (each
round times every contender once, in a rotating order), so a change of machine load during a
run hits all of them alike and the ratios stay meaningful on a shared machine. Each sample
runs a call ``number`` times, chosen so a sample lasts at least ``min_sample_s``; the
reported time is the median per-call time over the samples. The process CPU time of each
sample is kept beside it (see :func:`time_calls_cpu`)."""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch


def release_free_heap() -> None:
    """Return the heap's free pages to the kernel (glibc ``malloc_trim``; a no-op elsewhere).

    Used before a peak-memory measurement, and between cells: a call must not hide in pages
    that are resident but free. (Timed samples run on the heap as the contender's own
    earlier calls left it, as in a user's loop; each contender has a process of its own.)"""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:
        pass


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def synchronize(device: str) -> None:
    """Wait for queued device work, so that a timer read afterwards includes it."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(call: Callable[[], object], number: int, device: str) -> float:
    """Seconds per call of ``number`` back-to-back calls."""
    return time_calls_cpu(call, number, device)[0]


def time_calls_cpu(call: Callable[[], object], number: int, device: str) -> Tuple[float, float, float]:
    """(wall-clock, process CPU, of which system) seconds per call of ``number`` back-to-back
    calls. The CPU time (user + system, all threads of this process) is what the call cost
    the machine: on a shared CPU it is far less sensitive to other processes' load than the
    wall-clock time. System time is mostly page faults: eager PyTorch's large temporaries
    are fresh mmapped pages that the kernel zeroes on first touch."""
    synchronize(device)
    start, start_cpu, t0 = time.perf_counter(), time.process_time(), os.times()
    for _ in range(number):
        call()
    synchronize(device)
    wall, cpu, t1 = time.perf_counter() - start, time.process_time() - start_cpu, os.times()
    # os.times ticks in 10 ms steps: good for the system share summed over samples only.
    return wall / number, cpu / number, (t1.system - t0.system) / number


@dataclass
class Timing:
    """Per-call seconds of each sample; ``number`` calls per sample."""

    samples: List[float] = field(default_factory=list)
    cpu_samples: List[float] = field(default_factory=list)
    sys_samples: List[float] = field(default_factory=list)
    number: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_samples) if self.cpu_samples else math.nan

    @property
    def sys_share(self) -> float:
        """Share of the CPU time spent in the kernel, over all samples (coarse: the system
        time is counted in 10 ms ticks, so it means little below ~0.1 s of samples)."""
        total = sum(c * self.number for c in self.cpu_samples)
        system = sum(c * self.number for c in self.sys_samples)
        return min(1.0, system / total) if total >= 0.1 else math.nan

    @property
    def spread(self) -> float:
        """(max - min) / median over the samples: how noisy this cell was."""
        if len(self.samples) < 2:
            return math.nan
        return (max(self.samples) - min(self.samples)) / self.median

    def as_dict(self) -> Dict[str, object]:
        """JSON-ready (NaN, where a statistic is undefined, becomes None)."""
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        return {k: clean(v) for k, v in self._fields().items()}

    def _fields(self) -> Dict[str, object]:
        return {"median_s": self.median, "samples_s": self.samples, "cpu_median_s": self.cpu_median,
                "cpu_samples_s": self.cpu_samples, "sys_share": self.sys_share, "number": self.number,
                "repeats": len(self.samples),
                "spread": self.spread}


@dataclass
class Budget:
    """How long to time each contender of a cell: as many samples as fit in ``seconds``,
    at least ``min_repeats`` and at most ``max_repeats``, each at least ``min_sample_s`` long."""

    seconds: float
    min_repeats: int
    max_repeats: int
    min_sample_s: float


Sampler = Callable[[int], Tuple[float, float, float]]


def local_sampler(call: Callable[[], object], device: str) -> Sampler:
    """Time ``call`` in this process (see :func:`time_calls_cpu`)."""
    return lambda number: time_calls_cpu(call, number, device)


def cuda_event_sampler(call: Callable[[], object]) -> Sampler:
    """Time ``call`` in this process by the GPU's clock: the elapsed time between CUDA events
    recorded before and after ``number`` back-to-back calls (no host-side launch gaps between
    samples are counted). CPU and system times are not meaningful here: NaN."""

    def sample(number: int) -> Tuple[float, float, float]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / number, math.nan, math.nan

    return sample


def time_in_process(calls: Dict[str, Callable[[], object]], budget: Budget, device: str,
                    warmup: int = 2) -> Dict[str, Timing]:
    """Time every call side by side in this process (:func:`side_by_side`), after ``warmup``
    calls each: by CUDA events on a GPU, by the wall clock elsewhere. The first timed call
    of each sets its number of calls per sample and its repeats."""
    make = cuda_event_sampler if device == "cuda" else (lambda call: local_sampler(call, device))
    samplers = {name: make(call) for name, call in calls.items()}
    first_call_s = {}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        first_call_s[name] = samplers[name](1)[0]
    return side_by_side(samplers, first_call_s, budget)


def side_by_side(samplers: Dict[str, Sampler], first_call_s: Dict[str, float], budget: Budget) -> Dict[str, Timing]:
    """Time every contender in interleaved rounds. ``samplers[name](number)`` runs ``number``
    calls and returns per-call (wall, CPU, system) seconds, here or in the contender's own
    process; ``first_call_s`` (a warm call's time) sets each one's ``number`` and repeats."""
    timings: Dict[str, Timing] = {}
    wanted: Dict[str, int] = {}
    for name in samplers:
        t = max(first_call_s[name], 1e-7)
        number = max(1, min(10_000, math.ceil(budget.min_sample_s / t)))
        timings[name] = Timing(number=number)
        wanted[name] = int(min(budget.max_repeats, max(budget.min_repeats, budget.seconds // (t * number))))
    names = list(samplers)
    rnd = 0
    # One full collection before, none during: after torch.compile a collection takes ~1 s
    # here, and the cyclic collector firing inside a sample would be charged to a contender.
    gc.collect()
    gc.disable()
    try:
        while any(len(timings[n].samples) < wanted[n] for n in names):
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for name in order:
                timing = timings[name]
                if len(timing.samples) < wanted[name]:
                    wall, cpu, system = samplers[name](timing.number)
                    timing.samples.append(wall)
                    timing.cpu_samples.append(cpu)
                    timing.sys_samples.append(system)
            rnd += 1
    finally:
        gc.enable()
    return timings
