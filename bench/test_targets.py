"""The core targets at B=256, N=64, D=128, K=4, T=10, float32, measured with
pytest-benchmark in one pytest run:

* time, forward+backward: reference under autograd / s2m_ext >= 20;
* time, forward: loop of scikit-learn GaussianMixture fits / s2m_ext >= 20;
* peak memory, forward+backward: reference / s2m_ext >= 10.

    pytest bench/test_targets.py              # prints the measured ratios against the targets
                                              # (marked slow: not in CI's `-m "not slow"` run)

Time ratios are printed, never asserted (a shared machine's load must not fail a test run);
`python -m bench --targets core` measures the same interleaved, with more repeats and a
profile. The memory ratio does not depend on load and is asserted, as is the agreement of
every contender's output with s2m_ext's.
"""

from __future__ import annotations

from typing import List

import pytest

from .conftest import MEDIANS, baseline_output, problem_for, record_median
from .contenders import BASELINE, CONTENDERS, validity
from .run import CORE_TARGETS
from .worker import Workers
from .workloads import NAMED_SHAPES

CORE = NAMED_SHAPES["core"]
GROUP = "core target {workload} ({label})"
#: (workload, contender) pairs timed; slow ones get fewer rounds so the file runs in ~1 min.
TIMED = [("forward", "s2m_ext", 10), ("forward", "sklearn", 5), ("fwd_bwd", "s2m_ext", 10), ("fwd_bwd", "reference", 3)]


@pytest.mark.slow  # a measurement (~1 min); CI's smoke run covers agreement in test_contenders.py
@pytest.mark.parametrize("workload,name,rounds", TIMED, ids=[f"{w}-{n}" for w, n, _ in TIMED])
def test_core_time(benchmark, workload: str, name: str, rounds: int) -> None:
    contender = CONTENDERS[name]
    reason = contender.skip_reason(workload, "cpu")
    if reason:
        pytest.skip(reason)
    prepared = contender.prepare(problem_for(CORE, workload), workload)
    group = GROUP.format(workload=workload, label=CORE.label(workload))
    benchmark.group = group
    raw = benchmark.pedantic(prepared.call, rounds=rounds, warmup_rounds=1)
    record_median(benchmark, group, name)
    if name != BASELINE:
        ok, note, _ = validity(contender, baseline_output(CORE, workload), prepared.extract(raw))
        assert ok, note


@pytest.mark.slow  # ~30 s; test_harness.py checks the same ordering at a smaller shape
def test_core_memory() -> None:
    """Peak RSS of forward+backward (each in its own worker process): reference >= 10x s2m_ext."""
    peaks = {}
    with Workers("cpu", threads=None) as workers:
        for name in (BASELINE, "reference"):
            workers[name].request("prepare", ("fwd_bwd", CORE.as_dict(), 0, True), timeout_s=600)
            peaks[name] = workers[name].request("memory", timeout_s=600)["peak_bytes"]
    ratio = peaks["reference"] / peaks[BASELINE]
    MEDIANS.setdefault("core memory", {}).update({n: float(b) for n, b in peaks.items()})
    assert ratio >= 10.0, f"fwd_bwd peak memory: reference {peaks['reference']} B / s2m_ext {peaks[BASELINE]} B = {ratio:.3g} < 10"


def target_lines() -> List[str]:
    """The targets against what this pytest run measured (for the terminal summary)."""
    lines = []
    for workload, what, name, threshold in CORE_TARGETS:
        if what == "time":
            medians = MEDIANS.get(GROUP.format(workload=workload, label=CORE.label(workload)), {})
        else:
            medians = MEDIANS.get("core memory", {})
        if BASELINE in medians and name in medians:
            ratio = medians[name] / medians[BASELINE]
            lines.append(f"core target {workload} {what}: {name} / s2m_ext = {ratio:.3g}x "
                         f"(target >= {threshold:g}x: {'MET' if ratio >= threshold else 'NOT MET'})")
    return lines
