"""The CPU kernels' instruction-set levels (csrc/cpu/dispatch.cpp): each level this machine
can execute gives the same results within float rounding, and S2M_CPU_CAPABILITY chooses
the level or fails naming itself.

The level is chosen once per process, so every level runs in a subprocess of its own (with
the same s2m_ext as this process). The whole suite also runs at each level in CI (.ci/run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import s2m_ext
from problems import RTOL, assert_grads_rel, assert_rel, make_problem

LEVELS = s2m_ext.build_info()["cpu_capabilities"]
ALL_LEVELS = ["baseline", "avx2", "avx512"]
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(s2m_ext.__file__)))

#: Shapes with the cases where vector code has remainders or nothing to vectorise: odd
#: sizes, N < K, K = 1, D = 1, padding and duplicated points, huge and tiny scales.
SHAPES = [
    dict(B=3, N=37, D=13, K=3),
    dict(B=2, N=3, D=5, K=4),
    dict(B=2, N=21, D=1, K=2),
    dict(B=2, N=19, D=35, K=1),
    dict(B=3, N=50, D=17, K=5, pad=True),
    dict(B=2, N=24, D=9, K=3, duplicate=True),
    dict(B=2, N=33, D=6, K=2, scale=1e6),
    dict(B=2, N=33, D=6, K=2, scale=1e-6),
    dict(B=1, N=1100, D=6, K=3),  # three point chunks
]

CHILD = textwrap.dedent(
    """
    import sys, torch, s2m_ext
    level, path = sys.argv[1], sys.argv[2]
    assert s2m_ext.build_info()["cpu_capability"] == level, s2m_ext.build_info()
    torch.set_num_threads(1)
    out = []
    for case in torch.load(path):
        x, w, lw, mu, var, floor = case["x"], case["w"], case["lw"], case["mu"], case["var"], case["floor"]
        fit = torch.ops.s2m.em_fit(x, w, lw, mu, var, 4, floor, 0.0, True)
        g = [torch.ones_like(t) * s for t, s in zip(fit[:3], (0.3, -0.7, 1.1))]
        bwd = torch.ops.s2m.em_fit_backward(*g, x, w, *fit[:3], fit[4], floor)
        final = [t[-1] for t in fit[:3]]
        z = x.flip(1)  # queries other than the fitted points
        paired = torch.ops.s2m.score_paired(z, *final)
        pgrad = torch.ops.s2m.score_paired_backward(torch.ones_like(paired), z, *final)
        u = torch.rand(x.shape[0], lw.shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        seeds = torch.ops.s2m.kmeanspp(x, w, u)
        init = torch.ops.s2m.kmeanspp_init(x, w, u, floor)
        out.append(dict(fit=fit[:4], iters=fit[4], bwd=bwd, paired=paired, pgrad=pgrad, seeds=seeds, init=init))
    torch.save(out, path + "." + level)
    """
)


def run_level(level: str, cases_path: str, cwd: str) -> None:
    """Runs CHILD at ``level`` (outside the source tree, so it imports this s2m_ext)."""
    env = dict(os.environ, S2M_CPU_CAPABILITY=level, PYTHONPATH=PACKAGE_PARENT)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, level, cases_path], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_default_level_is_the_best_this_cpu_runs():
    info = s2m_ext.build_info()
    assert info["cpu_capabilities"][0] == "baseline"
    assert info["cpu_capabilities"] == ALL_LEVELS[: len(info["cpu_capabilities"])]
    forced = os.environ.get("S2M_CPU_CAPABILITY", "")  # empty counts as unset
    assert info["cpu_capability"] == (forced or info["cpu_capabilities"][-1])


@pytest.mark.skipif(len(LEVELS) < 2, reason="this CPU runs the baseline level only")
def test_every_level_gives_the_same_results_within_rounding(tmp_path):
    """float64, every op with a CPU kernel of its own, on fresh random problems: each level
    against the baseline within the suite's float64 tolerance (1e-10; orders of summation
    differ by vector width, about 1e-15 per sum before EM's amplification). k-means++
    indices are equal: a draw changes only if its uniform falls within rounding of a CDF step.
    """
    cases = []
    for shape in SHAPES:
        p = make_problem(**shape)
        lw, mu, var = p.init
        cases.append(dict(x=p.x, w=p.weights, lw=lw, mu=mu, var=var, floor=p.var_floor))
    path = str(tmp_path / "cases.pt")
    torch.save(cases, path)
    for level in LEVELS:
        run_level(level, path, str(tmp_path))
    want = torch.load(path + ".baseline")
    for level in LEVELS[1:]:
        got = torch.load(path + "." + level)
        for shape, g, e in zip(SHAPES, got, want):
            what = f"{level} vs baseline, {shape}"
            assert torch.equal(g["iters"], e["iters"]), what
            for a, b, name in zip(g["fit"], e["fit"], ("log_weights", "means", "variances", "loglik")):
                assert_rel(a, b, RTOL[torch.float64], f"{what}: {name}")
            assert_grads_rel(g["bwd"], e["bwd"], RTOL[torch.float64], ("x", "w", "lw0", "mu0", "var0"))
            assert_rel(g["paired"], e["paired"], RTOL[torch.float64], f"{what}: score_paired")
            assert_grads_rel(g["pgrad"], e["pgrad"], RTOL[torch.float64], ("z", "lw", "mu", "var"))
            assert torch.equal(g["seeds"], e["seeds"]), f"{what}: kmeanspp"
            assert torch.equal(g["init"][1], e["init"][1]), f"{what}: kmeanspp_init means"
            assert_rel(g["init"][2], e["init"][2], RTOL[torch.float64], f"{what}: kmeanspp_init variances")


def _first_op_error(level: str) -> str:
    code = (
        "import torch, s2m_ext\n"
        "torch.ops.s2m.kmeanspp(torch.zeros(1, 2, 1), torch.ones(1, 2), torch.zeros(1, 1, dtype=torch.float64))\n"
    )
    env = dict(os.environ, S2M_CPU_CAPABILITY=level, PYTHONPATH=PACKAGE_PARENT)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, f"S2M_CPU_CAPABILITY={level} was accepted"
    return proc.stderr


def test_an_unknown_level_fails_naming_the_variable():
    err = _first_op_error("avx9")
    assert "S2M_CPU_CAPABILITY must be one of baseline, avx2, avx512" in err and "'avx9'" in err, err[-2000:]


@pytest.mark.skipif(LEVELS == ALL_LEVELS, reason="this CPU runs every level")
def test_a_level_above_this_cpu_fails_naming_the_variable():
    above = ALL_LEVELS[len(LEVELS)]
    err = _first_op_error(above)
    assert f"S2M_CPU_CAPABILITY={above} asks for instruction sets this CPU" in err, err[-2000:]


def test_the_backward_leaves_the_threads_subnormal_handling_as_it_found_it(one_thread):
    """em_fit_backward flushes subnormals inside its kernel (csrc/cpu/kernels_impl.h) and
    must restore the calling thread's floating-point state: with one thread the kernel runs
    on this thread, so a subnormal product here must still be subnormal afterwards."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0
    p = make_problem(B=2, N=9, D=3, K=2)
    fit = torch.ops.s2m.em_fit(p.x, p.weights, *p.init, 3, p.var_floor, 0.0, True)
    grads = [torch.ones_like(t) for t in fit[:3]]
    torch.ops.s2m.em_fit_backward(*grads, p.x, p.weights, *fit[:3], fit[4], p.var_floor)
    assert (tiny * 1.0).item() != 0.0, "the thread now flushes subnormals to zero"
