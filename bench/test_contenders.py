"""Every contender, every workload, at the paper's scale and at a small shape, on the CPU:
each runs once and must do the same work as s2m_ext (same fitted parameters, gradients or
scores to float32 rounding, CHECK_RTOL). Timing is the summary command's job
(``python -m bench``: each contender in a process of its own, interleaved rounds)."""

from __future__ import annotations

import pytest
import torch

from .conftest import baseline_output, problem_for
from .contenders import BASELINE, CONTENDERS, DEFAULT_CONTENDERS, validity
from .workloads import NAMED_SHAPES, WORKLOADS, Shape

SHAPES = {"paper": NAMED_SHAPES["paper"], "small": Shape(B=16, N=32, D=16, K=3, T=5, M=64, Q=7)}


def _slow_compile(name: str, workload: str, shape_name: str):
    # A cold inductor compile of the EM loop takes 15 s to minutes on a small CPU: the
    # `-m "not slow"` run keeps the compiled contender only at the cheap paper-shape pool
    # scoring; `pytest bench` (no -m) runs them all. The summary command checks every
    # compiled cell it times against s2m_ext anyway.
    if name == "compiled" and (workload != "pool" or shape_name != "paper"):
        return [pytest.mark.slow]
    return []


CASES = [
    pytest.param(name, workload, shape_name, marks=_slow_compile(name, workload, shape_name),
                 id=f"{workload}-{shape_name}-{name}")
    for workload in WORKLOADS for shape_name in SHAPES for name in DEFAULT_CONTENDERS
]  # the forced CPU levels need a process of their own: test_harness.py


@pytest.mark.parametrize("name,workload,shape_name", CASES)
def test_contender(name: str, workload: str, shape_name: str) -> None:
    contender = CONTENDERS[name]
    reason = contender.skip_reason(workload, "cpu")
    if reason:
        pytest.skip(reason)
    shape = SHAPES[shape_name]
    prepared = contender.prepare(problem_for(shape, workload), workload)
    out = prepared.extract(prepared.call())
    assert all(bool(torch.isfinite(t).all()) for t in out.values()), f"{name} gave NaN or Inf"
    if name != BASELINE:
        ok, note, _ = validity(contender, baseline_output(shape, workload), out)
        assert ok, f"{name} on {workload} {shape.label(workload)}: {note}"
