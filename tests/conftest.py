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

from problems import RTOL  # noqa: E402,F401  (re-exported for the tests)

#: Fresh random inputs every test run; replay a failure with S2M_TEST_SEED=<seed from the header>.
SESSION_SEED = int(os.environ.get("S2M_TEST_SEED", random.SystemRandom().randrange(2**31)))


#: The repository root: with S2M_TEST_INSTALLED=1 (CI) the suite refuses to run against the
#: source tree instead of the installed package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    package_dir = os.path.dirname(os.path.abspath(s2m_ext.__file__))
    if os.environ.get("S2M_TEST_INSTALLED") == "1" and package_dir == os.path.join(REPO_ROOT, "s2m_ext"):
        raise pytest.UsageError(f"S2M_TEST_INSTALLED=1 but s2m_ext was imported from the source tree ({package_dir})")


def pytest_report_header(config):
    return (f"s2m_ext test seed: S2M_TEST_SEED={SESSION_SEED}; s2m_ext from {os.path.dirname(s2m_ext.__file__)}; "
            f"build: {s2m_ext.build_info()}")


def pytest_terminal_summary(terminalreporter):
    # -q hides the header: repeat the seed where a failure is read.
    terminalreporter.write_line(f"s2m_ext test seed: S2M_TEST_SEED={SESSION_SEED}")


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch per test from the session seed and the test's id (independent of order)."""
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: on a small CPU,
    multi-threaded dispatch costs ~10x there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
