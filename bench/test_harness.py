"""Tests of the measuring machinery itself: the side-by-side timer, the worker processes,
the peak-memory method, the agreement check, the plan, and the summary command end to end
(tiny, no timing claims)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from .contenders import CHECK_RTOL, CONTENDERS, compare, validity
from .run import main
from .timing import Budget, local_sampler, side_by_side
from .worker import WorkerError, Workers, calibrate
from .workloads import NAMED_SHAPES, SWEEP_FIELDS, SWEEPS_QUICK, WORKLOADS, Shape, flops, make_problem, parse_shape, plan


class FakeClock:
    """Stands in for the ``time`` module of bench.timing: the wall clock moves only when a fake
    call sleeps or computes, the CPU clock only when it computes."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def perf_counter(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu

    def sleep(self, seconds: float) -> None:
        self.wall += seconds

    def compute(self, seconds: float) -> None:
        self.wall += seconds
        self.cpu += seconds


def test_local_sampler_reports_per_call_wall_and_cpu_time(monkeypatch) -> None:
    import bench.timing as timing

    clock = FakeClock()
    monkeypatch.setattr(timing, "time", clock)

    def call() -> None:
        clock.sleep(0.02)
        clock.compute(0.01)

    wall, cpu, _ = local_sampler(call, "cpu")(5)
    # Per call, not per sample; waiting counts in the wall-clock column only.
    assert wall == pytest.approx(0.03) and cpu == pytest.approx(0.01)


def test_side_by_side_interleaves_rotates_and_sizes_samples() -> None:
    order = []

    def fake(name: str, seconds: float):
        def sample(number: int):
            order.append((name, number))
            return seconds, seconds / 2, 0.0
        return sample

    samplers = {"fast": fake("fast", 0.01), "slow": fake("slow", 0.03)}
    # Each sample must last >= 0.1 s: 10 calls of the fast one, 4 of the slow one; the budget
    # of 1.2 s buys 1.2 / (0.01 * 10) = 12 fast samples, capped at 6, and 1.2 / (0.03 * 4) = 10
    # slow ones, capped at 6; at least 2 each.
    budget = Budget(seconds=1.2, min_repeats=2, max_repeats=6, min_sample_s=0.1)
    timings = side_by_side(samplers, {"fast": 0.01, "slow": 0.03}, budget)
    assert timings["fast"].number == 10 and timings["slow"].number == 4
    assert [len(t.samples) for t in timings.values()] == [6, 6]
    assert all(n == timings[name].number for name, n in order)
    # Interleaved, in a rotating order: each round times both contenders once, and the
    # contender that goes first alternates.
    names = [name for name, _ in order]
    assert names == ["fast", "slow", "slow", "fast"] * 3
    assert timings["slow"].median / timings["fast"].median == pytest.approx(3.0)
    assert timings["fast"].cpu_median == pytest.approx(0.005)
    # Few repeats where the budget is short: the minimum holds.
    order.clear()
    short = side_by_side(samplers, {"fast": 0.01, "slow": 0.03}, Budget(seconds=0.0, min_repeats=2, max_repeats=6, min_sample_s=0.0))
    assert [(len(t.samples), t.number) for t in short.values()] == [(2, 1), (2, 1)]


def test_memory_method_measures_a_known_allocation() -> None:
    result = calibrate(64)
    # torch.ones(64 MiB) touches every page once, so the peak cannot be below it (the upper
    # side depends on the allocator and the machine: measured in the benchmark, not here).
    assert result["peak_bytes"] >= 64 * 2**20 and result["expected_bytes"] == 64 * 2**20, result


def test_workers_time_and_measure_contenders_in_their_own_processes() -> None:
    """The eager reference's backward keeps (B,N,K,D) tensors per iteration; s2m_ext keeps
    the (T+1,B,K,D) trajectory: at this shape the reference must need several times more.
    Each contender runs in its own process, which answers with its output and its timings."""
    shape = Shape(B=32, N=64, D=64, K=4, T=10, M=64)
    peaks, outputs = {}, {}
    with Workers("cpu", threads=1) as workers:
        for name in ("s2m_ext", "reference"):
            ready = workers[name].request("prepare", ("fwd_bwd", shape.as_dict(), 0, False), timeout_s=300)
            outputs[name] = ready["output"]
            wall, cpu, _ = workers[name].request("time", 2, timeout_s=300)
            assert wall > 0 and cpu > 0
            peaks[name] = workers[name].request("memory", timeout_s=300)["peak_bytes"]
            assert workers[name].proc.pid != os.getpid()
        assert workers["s2m_ext"].proc.pid != workers["reference"].proc.pid
    assert validity(CONTENDERS["reference"], outputs["s2m_ext"], outputs["reference"])[0]
    # reference: 11 iterations x 3 saved (B,N,K,D) float32 tensors = 69 MB must be resident at
    # its peak (a lower bound from the allocations; the comparison is the benchmark's job).
    assert peaks["reference"] > 30e6 and peaks["s2m_ext"] > 0, peaks


def test_a_forced_cpu_level_runs_in_its_worker_and_agrees() -> None:
    """s2m_ext@baseline sets S2M_CPU_CAPABILITY in its own worker before its first op (its
    prepare raises if the kernels run at another level) and agrees with s2m_ext."""
    shape = Shape(B=8, N=32, D=16, K=3, T=5, M=64)
    outputs = {}
    with Workers("cpu", threads=1) as workers:
        for name in ("s2m_ext", "s2m_ext@baseline"):
            outputs[name] = workers[name].request("prepare", ("fwd_bwd", shape.as_dict(), 0, True), timeout_s=300)["output"]
    ok, note, _ = validity(CONTENDERS["s2m_ext@baseline"], outputs["s2m_ext"], outputs["s2m_ext@baseline"])
    assert ok, note


def test_worker_reports_errors_and_survives() -> None:
    with Workers("cpu", threads=1) as workers:
        with pytest.raises(WorkerError, match="unknown request"):
            workers["s2m_ext"].request("no-such-request", timeout_s=120)
        with pytest.raises(WorkerError, match="sklearn has no workload"):
            workers["sklearn"].request("prepare", ("fwd_bwd", Shape(2, 4, 3, 2, 1, 4).as_dict(), 0, True), timeout_s=120)
        ready = workers["sklearn"].request("prepare", ("forward", Shape(2, 4, 3, 2, 1, 4).as_dict(), 0, True), timeout_s=120)
        assert set(ready["output"]) == {"log_weights", "means", "variances"}


def test_check_catches_other_work() -> None:
    """The agreement check passes the same fit and flags a fit with one iteration less."""
    shape = Shape(B=16, N=64, D=32, K=4, T=3, M=64)
    problem = make_problem(shape, "forward")
    s2m = CONTENDERS["s2m_ext"].prepare(problem, "forward")
    expected = s2m.extract(s2m.call())
    same = CONTENDERS["reference"].prepare(problem, "forward")
    assert validity(CONTENDERS["reference"], expected, same.extract(same.call()))[0]
    fewer = make_problem(shape.replace(T=2), "forward")
    short = CONTENDERS["reference"].prepare(fewer, "forward")
    ok, note, err = validity(CONTENDERS["reference"], expected, short.extract(short.call()))
    assert not ok and err > CHECK_RTOL and "differs" in note
    nan = {k: torch.full_like(v, float("nan")) for k, v in expected.items()}
    assert not validity(CONTENDERS["reference"], expected, nan)[0]
    assert compare(expected, {"means": expected["means"][:1]}) == float("inf")


def test_plan_covers_every_sweep_once_in_flop_order() -> None:
    cells = plan("cpu", quick=True)
    for workload, fields in SWEEP_FIELDS.items():
        mine = [c for c in cells if c.workload == workload]
        keys = [c.shape.key(workload) for c in mine]
        assert len(keys) == len(set(keys)), "a shape is measured twice"
        assert [flops(workload, c.shape) for c in mine] == sorted(flops(workload, c.shape) for c in mine)
        for field in fields:
            swept = sorted(getattr(c.shape, field) for c in mine if f"sweep:{field}" in c.tags)
            assert swept == sorted(SWEEPS_QUICK["cpu"][field]), (workload, field)
        for name in ("paper", "core", "large"):
            assert any(name in c.tags for c in mine)


def test_custom_shapes_parse_and_join_the_plan() -> None:
    shape = parse_shape("B4 N4096 D768 K16 T3")
    assert shape == Shape(B=4, N=4096, D=768, K=16, T=3)
    assert parse_shape(shape.label("forward")) == shape and parse_shape("B=4,N=9,D=2,K=1,Q=5").Q == 5
    for bad, says in (("B4 N9 D2", "lacks K"), ("B4 N9 D2 K1 X3", "'X3'"), ("B4 B5 N9 D2 K1", "'B5'"),
                      ("B0 N9 D2 K1", ">= 1")):
        with pytest.raises(ValueError, match=says):
            parse_shape(bad)
    cells = plan("cpu", quick=True, workloads=("fwd_bwd",), named=(), sweeps=False, extra=[shape])
    assert [(c.shape, c.tags) for c in cells] == [(shape, ("custom",))]


def test_summary_command_end_to_end(tmp_path, capsys) -> None:
    """A tiny run of `python -m bench`: the table has every contender, the JSON the metadata
    the suite promises, ratios relative to s2m_ext, and a stated reason for every skip."""
    argv = ["--smoke", "--shapes", "paper", "--no-sweeps", "--no-memory", "--out", str(tmp_path),
            "--contenders", "s2m_ext,reference,sklearn,torch_loop,gmm_gpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for title in ("s2m_ext", "reference", "sklearn loop", "torch loop", "gmm-gpu"):
        assert title in printed
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    assert path.startswith("cpu-")
    data = json.load(open(tmp_path / path))
    meta = data["meta"]
    for key in ("device_name", "cpu_model", "torch", "torch_cuda", "git", "load_average", "date"):
        assert key in meta
    assert meta["git"]["commit"]
    assert {c["workload"] for c in data["cells"]} == set(WORKLOADS)
    for cell in data["cells"]:
        entries = cell["contenders"]
        assert entries["s2m_ext"]["median_s"] > 0
        assert "skipped" in entries["gmm_gpu"] and "CUDA" in entries["gmm_gpu"]["skipped"]
        ref = entries["reference"]
        assert ref["check"]["ok"], ref["check"]
        assert ref["ratio_to_s2m_ext"] == pytest.approx(ref["median_s"] / entries["s2m_ext"]["median_s"])
    fwd_bwd = next(c for c in data["cells"] if c["workload"] == "fwd_bwd")
    assert "forward-only" in fwd_bwd["contenders"]["sklearn"]["skipped"]


def test_plots_are_written(tmp_path) -> None:
    from .plots import plot_sweeps

    base = NAMED_SHAPES["core"]
    records = []
    for b in (16, 256, 1024):
        shape = base.replace(B=b)
        records.append({"workload": "forward", "shape": shape.as_dict(), "tags": ["sweep:B"], "contenders": {
            "s2m_ext": {"median_s": 1e-4 * b, "peak_mem_bytes": 1e4 * b},
            "reference": {"median_s": 1e-2 * b}}})
    paths = plot_sweeps(records, ["s2m_ext", "reference"], str(tmp_path / "cpu-test"), "cpu")
    assert [os.path.basename(p) for p in paths] == ["cpu-test-forward.png"]
    assert 5_000 < os.path.getsize(paths[0]) < 200_000
