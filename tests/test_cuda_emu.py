"""The CUDA kernels' logic, checked on the CPU: csrc/cuda/emu/run_emu_tests.sh compiles
csrc/cuda/*.cu with g++ against a CPU emulator of the CUDA features they use (one fiber per
thread, barriers and warp shuffles honoured) and compares every kernel with the CPU kernels
of csrc/cpu (EM) or direct float64 formulas (scoring) on random problems: float64 to 1e-10,
float32 to 1e-4 (EM gradients: within max(1e-4, twice the float32 CPU backward's own error) of
float64, the bar of the core tests), every output written, bit-identical results under two
thread schedules (a missing barrier shows up there) and across the three EM placements.
Needs g++ only: runs without a GPU (about 40 s here, most of it compiling)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "csrc", "cuda", "emu", "run_emu_tests.sh")


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs a C++ compiler")
def test_emulated_cuda_kernels_match_the_cpu_kernels():
    env = dict(os.environ, BUILD_DIR=os.path.join(ROOT, "build", "emu"))
    run = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=1200, env=env)
    report = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, report
    last = run.stdout.strip().splitlines()[-1]
    checks, failed = int(last.split()[0]), int(last.split()[2])
    assert failed == 0 and checks > 800, report  # about 930 checks
