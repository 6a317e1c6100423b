"""Shared test fixtures: one list of devices, dtype tolerances, and seeded generators."""

from __future__ import annotations

import os
import random
import zlib

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


#: Fresh random inputs every session; replay a failure with S2M_TEST_SEED=<seed from the header>.
SESSION_SEED = int(os.environ.get("S2M_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"s2m_ext test seed: S2M_TEST_SEED={SESSION_SEED}; build: {s2m_ext.build_info()}"


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch per test from the session seed and the test's id (independent of order)."""
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
