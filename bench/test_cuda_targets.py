"""The CUDA targets' code path, run on the CPU at small shapes (the harness, inputs, output
checks and result records are the same; only the clock differs), so that a run on a GPU is
not the first to execute it."""

from __future__ import annotations

import math

import pytest

from .cuda_targets import target_fwd_bwd, target_pool, target_roofline
from .timing import Budget, time_in_process
from .workloads import Shape

SMALL = Shape(B=6, N=20, D=8, K=3, T=4, M=300)


def test_fwd_bwd_record_compares_and_times_every_contender():
    res = target_fwd_bwd(True, lambda msg: None, device="cpu", shape=SMALL, compiled=False)
    assert set(res["median_ms"]) == {"s2m_ext", "reference"}
    assert res["checks"]["reference"]["ok"], res["checks"]
    # float32 gradients of the same fit: far below the suite's 1e-2 agreement bar.
    assert res["grad_rel_diff_s2m_vs_reference"] < 1e-3
    assert all(len(v) >= 5 and all(t > 0 for t in v) for v in res["samples_ms"].values())
    assert res["speedup_vs_reference"] == pytest.approx(res["median_ms"]["reference"] / res["median_ms"]["s2m_ext"])
    assert math.isnan(res["speedup_vs_compiled"]) and res["pass"] is False


def test_roofline_record_uses_the_flop_and_byte_models():
    peak = {"tflops": 1e-3}  # 1 GFLOP/s: the FLOP bound dominates at any bandwidth below
    res = target_roofline(True, lambda msg: None, copy_gbs=1e6, peak=peak, device="cpu", shape=SMALL)
    assert res["bound_by"] == "FMA peak"
    assert res["bound_ms"] == pytest.approx(res["flops"] / 1e9 * 1e3)
    assert res["fraction_of_bound"] == pytest.approx(res["bound_ms"] / res["median_ms"])
    assert len(res["samples_ms"]) == 5 and res["pass"] is False  # quick: never a pass


def test_pool_record_checks_against_float64():
    res = target_pool(True, lambda msg: None, device="cpu", shape=SMALL)
    # float32 scores of well-scaled inputs against the float64 direct form.
    assert 0 < res["rel_error_vs_float64_direct"] <= 1e-5
    assert res["shape"]["M"] == SMALL.M and res["median_ms"] > 0


def test_time_in_process_interleaves_and_counts_calls():
    calls = {"a": 0, "b": 0}
    fns = {name: (lambda name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls}
    timings = time_in_process(fns, Budget(0.0, 4, 4, 0.0), "cpu", warmup=2)
    # warmup 2 + the first timed call + 4 samples of one call each
    assert calls == {"a": 7, "b": 7}
    assert all(t.number == 1 and len(t.samples) == 4 for t in timings.values())
