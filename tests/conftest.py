"""Shared test fixtures: one list of devices, dtype tolerances, and seeded generators."""

from __future__ import annotations

import pytest
import torch

import s2m_ext

#: Devices every op test runs on; CUDA tests skip (not fail) without a GPU or a CUDA build.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not s2m_ext.build_info()["cuda_available"], reason="needs a CUDA device and a CUDA build of s2m_ext"
        ),
    ),
]

DTYPES = [torch.float32, torch.float64]

#: Relative tolerances against the float64 reference. float64: the ops and the reference
#: differ only in summation order (~1e-15 per op), with headroom for the conditioning of a
#: few EM iterations. float32: a unit roundoff of 6e-8 grown by reductions over N and D.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
