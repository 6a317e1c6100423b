"""pytest-benchmark plumbing for bench/: shared inputs per (shape, workload), s2m_ext's output
for the agreement checks, and a terminal summary of median ratios to s2m_ext per group.

    pytest bench                              # timed (pytest-benchmark), then the ratio summary
    pytest bench --benchmark-disable -q       # CI smoke: every contender runs once and is checked
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import pytest
import torch

from .contenders import BASELINE, CONTENDERS, Output
from .workloads import Problem, Shape, make_problem

_PROBLEMS: Dict[Tuple[Shape, str], Problem] = {}
_BASELINE: Dict[Tuple[Shape, str], Output] = {}
#: group -> contender -> median seconds (filled by tests that ran with timing enabled), or
#: peak bytes for groups whose name ends in "memory"
MEDIANS: Dict[str, Dict[str, float]] = {}


def problem_for(shape: Shape, workload: str) -> Problem:
    """Inputs of (shape, workload), built once per session (cpu, float32, seed 0)."""
    key = (shape, workload)
    if key not in _PROBLEMS:
        _PROBLEMS[key] = make_problem(shape, workload, "cpu")
    return _PROBLEMS[key]


def baseline_output(shape: Shape, workload: str) -> Output:
    """s2m_ext's output at (shape, workload), the yardstick of the agreement checks."""
    key = (shape, workload)
    if key not in _BASELINE:
        prepared = CONTENDERS[BASELINE].prepare(problem_for(shape, workload), workload)
        _BASELINE[key] = prepared.extract(prepared.call())
    return _BASELINE[key]


def record_median(benchmark, group: str, name: str) -> None:
    """Keep the median of a timed benchmark for the ratio summary (nothing when disabled)."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        MEDIANS.setdefault(group, {})[name] = stats.stats.median


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not MEDIANS:
        return
    tr = terminalreporter
    tr.section("s2m_ext ratios (median time of contender / median time of s2m_ext, same pytest run)")
    for group, medians in sorted(MEDIANS.items()):
        base = medians.get(BASELINE)
        parts = []
        for name, value in medians.items():
            ratio = "" if base is None or name == BASELINE or not math.isfinite(value) else f" ({value / base:.3g}x)"
            shown = f"{value / 1e6:.3g} MB" if group.endswith("memory") else f"{value * 1e3:.3g} ms"
            parts.append(f"{name} {shown}{ratio}")
        tr.write_line(f"{group}: " + ", ".join(parts))
    from .test_targets import target_lines

    for line in target_lines():
        tr.write_line(line)
