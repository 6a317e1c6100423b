"""Shared inputs of bench/'s tests per (shape, workload), and s2m_ext's output for the
agreement checks.

    pytest bench -m "not slow" -q             # CI smoke: every contender runs once and is checked
"""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch

from .contenders import BASELINE, CONTENDERS, Output
from .workloads import Problem, Shape, make_problem

_PROBLEMS: Dict[Tuple[Shape, str], Problem] = {}
_BASELINE: Dict[Tuple[Shape, str], Output] = {}


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


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.manual_seed(0)
    yield
