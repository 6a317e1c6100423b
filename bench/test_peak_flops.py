"""The peak-FLOP benchmark builds for every level this CPU runs and reports each level's
vector width (a check of the flags, not of speed: timings are not asserted)."""

from __future__ import annotations

import math
import shutil

import pytest

from bench import peak_flops

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def test_every_available_level_builds_with_its_vector_width():
    levels = peak_flops.available_levels()
    assert levels[0] == "baseline"
    result = peak_flops.run(levels, seconds=0.02, threads=1)
    widths = {"baseline": 16, "avx2": 32, "avx512": 64}
    for level in levels:
        r = result["levels"][level]
        assert r["vector_bytes"] == widths[level]
        for key in ("float32_1t", "float64_1t", "float32_all", "float64_all"):
            assert math.isfinite(r[key]) and r[key] > 0
    assert "| baseline | 16 |" in peak_flops.format_table(result)
