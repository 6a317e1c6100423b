"""The core memory target at B=256, N=64, D=128, K=4, T=10, float32: peak memory of
forward+backward, reference / s2m_ext >= 10, each contender in a worker process of its own.

    pytest bench/test_targets.py              # marked slow: not in CI's `-m "not slow"` run

The time targets are measured by ``python -m bench --targets core`` (interleaved rounds,
every contender in its own process, with a profile); a shared machine's load must not fail
a test run, so no test asserts a time. The memory ratio does not depend on load.
"""

from __future__ import annotations

import pytest

from .contenders import BASELINE
from .worker import Workers
from .workloads import NAMED_SHAPES

CORE = NAMED_SHAPES["core"]


@pytest.mark.slow  # ~30 s; test_harness.py checks the same ordering at a smaller shape
def test_core_memory() -> None:
    """Peak RSS of forward+backward (each in its own worker process): reference >= 10x s2m_ext."""
    peaks = {}
    with Workers("cpu", threads=None) as workers:
        for name in (BASELINE, "reference"):
            workers[name].request("prepare", ("fwd_bwd", CORE.as_dict(), 0, True), timeout_s=600)
            peaks[name] = workers[name].request("memory", timeout_s=600)["peak_bytes"]
    ratio = peaks["reference"] / peaks[BASELINE]
    print(f"core target fwd_bwd peak memory: reference {peaks['reference']} B / s2m_ext {peaks[BASELINE]} B = {ratio:.3g}x")
    assert ratio >= 10.0, f"fwd_bwd peak memory: reference {peaks['reference']} B / s2m_ext {peaks[BASELINE]} B = {ratio:.3g} < 10"
