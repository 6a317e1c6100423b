"""CUDA kernels: equal to the CPU op and the reference over the core shapes plus large ones,
float64 gradcheck, float16/bfloat16 computed in float32, determinism, torch.compile, CUDA graph
capture and the current stream.

Tests marked ``requires_gpu`` skip without a GPU; the others run wherever the extension was
built (with FORCE_CUDA=1 on a GPU-less machine too). The kernels' logic is also checked
without a GPU by the CPU emulator (tests/test_cuda_emu.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, RTOL
from problems import (
    FIELDS,
    SHAPES,
    assert_grads_rel,
    assert_matches_reference,
    assert_rel,
    make_problem,
    reference_steps,
    rel_err,
    step_problems,
)

import s2m_ext
from s2m_ext import DiagGMM, reference

ops = s2m_ext.ops
BUILD = s2m_ext.build_info()

requires_cuda_build = pytest.mark.skipif(not BUILD["cuda"], reason="extension built without CUDA")
requires_gpu = pytest.mark.skipif(not BUILD["cuda_available"], reason="needs a CUDA device and a CUDA build")

OPS = (
    "em_fit", "em_fit_backward", "score_paired", "score_paired_backward", "score_pool", "score_pool_backward",
    "kmeanspp", "kmeanspp_init",
)

#: The core shapes plus a large one (N=1024, D=2048, K=16).
CUDA_SHAPES = SHAPES + [("large", 2, 1024, 2048, 16, {})]
T_ITER = 5


def _cuda(ts):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in ts]


def _mixture(B, D, K, dtype, device="cpu", offset=0.0):
    lw = torch.log_softmax(torch.randn(B, K, dtype=torch.float64), 1)
    mu = offset + 2.0 * torch.randn(B, K, D, dtype=torch.float64)
    var = 0.3 + torch.rand(B, K, D, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (lw, mu, var)]


# ----------------------------------------------------------------------------- without a GPU
@requires_cuda_build
def test_every_op_has_a_cuda_kernel():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"s2m::{op}", "CUDA"), op


@requires_cuda_build
def test_cuda_build_runs_the_cpu_ops():
    """The FORCE_CUDA build keeps the CPU kernels (and runs them without a GPU)."""
    p = make_problem(3, 20, 4, 2)
    out = ops.em_fit(p.x, p.weights, *p.init, 4, p.var_floor, 0.0, False)
    ref = reference.em_fit(p.x, p.weights, *p.init, 4, p.var_floor)
    for got, want in zip(out[:3], ref[:3]):
        assert_rel(got[0], want, 1e-10)


@requires_cuda_build
def test_em_placement_moves_state_off_chip_as_shared_memory_shrinks():
    """0: the set and its state in shared memory, 1: x read from global memory, 2: everything in
    global memory. The target shapes of bench/NOTES.md land where the notes say."""
    placement = torch.ops.s2m._cuda_em_placement
    for backward in (False, True):
        seen = [placement(300, 40, 3, False, backward, cap) for cap in (227 * 1024, 60 * 1024, 1024)]
        assert seen == [0, 1, 2], (backward, seen)
    assert placement(64, 128, 4, False, False, 227 * 1024) == 0  # fwd_bwd target: on chip
    assert placement(64, 128, 4, False, True, 227 * 1024) == 0
    assert placement(256, 256, 8, False, False, 227 * 1024) == 1  # roofline target: 256 KiB of x


def test_fake_em_fit_keeps_a_float32_trajectory_for_half_inputs():
    """Tracing sees what the CUDA kernels return: float16/bfloat16 fits keep their trajectory
    and log-likelihood in float32; gradients come back in the inputs' dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype, fit in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        with FakeTensorMode():
            x, w = torch.empty(2, 5, 3, dtype=dtype), torch.empty(2, 5, dtype=dtype)
            init = (torch.empty(2, 4, dtype=dtype), torch.empty(2, 4, 3, dtype=dtype), torch.empty(2, 4, 3, dtype=dtype))
            lw, mu, var, ll, used, conv = ops.em_fit(x, w, *init, 3, 1e-3, 0.0, True)
            assert (lw.dtype, mu.dtype, var.dtype, ll.dtype) == (fit,) * 4
            assert mu.shape == (4, 2, 4, 3) and used.dtype == torch.long and conv.dtype == torch.bool
            grads = ops.em_fit_backward(None, mu, None, x, w, lw, mu, var, used, 1e-3)
            assert [g.dtype for g in grads] == [dtype] * 5
            assert [g.shape for g in grads] == [x.shape, w.shape, init[0].shape, init[1].shape, init[2].shape]


# ----------------------------------------------------------------------------- EM against CPU
def _upstream(out, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    return [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in out[:3]]


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,B,N,D,K,opts", CUDA_SHAPES, ids=[s[0] for s in CUDA_SHAPES])
def test_em_fit_cuda_equals_cpu_and_reference(name, B, N, D, K, opts, dtype):
    p = make_problem(B, N, D, K, **opts).to(dtype)
    args = (p.x, p.weights, *p.init)
    cpu = ops.em_fit(*args, T_ITER, p.var_floor, 0.0, True)
    gpu = ops.em_fit(*_cuda(args), T_ITER, p.var_floor, 0.0, True)
    assert all(t.dtype == dtype and t.is_cuda for t in gpu[:4])
    if dtype == torch.float64:
        for got, want, what in zip(gpu, cpu, FIELDS):
            assert_rel(got.cpu(), want, RTOL[dtype], f"{what} vs CPU")
    else:
        # float32 runs drift apart over T steps (see assert_matches_reference), so each GPU
        # step is compared with the CPU op's step from the same state, as closely as the CPU
        # op's step is to the float64 reference's (or 1e-4).
        def cpu_step(*args):
            return [t[-1] for t in ops.em_fit(*args, 0.0, False)[:3]]

        gpu_traj = [t.cpu() for t in gpu[:3]]
        cpu_steps = reference_steps(gpu_traj, p, "cpu", dtype, cpu_step)
        exact = reference_steps(gpu_traj, p, "cpu")
        for got, want, truth, what in zip(gpu_traj, cpu_steps, exact, FIELDS):
            bar = max(RTOL[dtype], 2 * rel_err(want, truth))
            assert_rel(got[1:], want, bar, f"{what}: one step vs the CPU op's from the same state")
    assert_matches_reference(gpu, p, "cuda", T_ITER, dtype)
    assert torch.equal(gpu[4].cpu(), cpu[4]) and torch.equal(gpu[5].cpu(), cpu[5])


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,B,N,D,K,opts", CUDA_SHAPES, ids=[s[0] for s in CUDA_SHAPES])
def test_em_fit_backward_cuda_equals_cpu(name, B, N, D, K, opts, dtype):
    """Gradients for x, w and the initial parameters from gradients on the whole trajectory.
    float64: the 4-step backward, 1e-10 against the CPU op. float32: each step's
    vector-Jacobian product from the GPU's own states (the adjoint of several steps amplifies
    rounding, see test_core_em), against the CPU op in float64; the bar is the CPU op's own
    float32 accuracy (twice its error), at least 1e-4."""
    p = make_problem(B, N, D, K, **opts).to(dtype)  # inputs rounded to dtype, for every run below
    n_iter = 4
    inputs = [p.x, p.weights, *p.init]
    if dtype == torch.float32:
        traj = ops.em_fit(*_cuda(inputs), n_iter, p.var_floor, 0.0, True)[:3]
        inputs = step_problems([t.cpu() for t in traj], p, "cpu", dtype)
        n_iter = 1

    def grads(dtype, device):
        x, w, *init = [t.to(dtype=dtype, device=device) for t in inputs]
        out = ops.em_fit(x, w, *init, n_iter, p.var_floor, 0.0, True)
        up = [u.to(p.x.dtype).to(dtype=dtype, device=device) for u in _upstream(out)]
        return ops.em_fit_backward(*up, x, w, out[0], out[1], out[2], out[4], p.var_floor)

    names = ("x", "weights", "log_weights0", "means0", "variances0")
    exact = grads(torch.float64, "cpu")
    gpu = [g.cpu() for g in grads(dtype, "cuda")]
    assert all(g.dtype == dtype for g in gpu)
    if dtype == torch.float64:
        assert_grads_rel(gpu, exact, RTOL[dtype], names)
        return
    cpu32 = grads(torch.float32, "cpu")
    scale = max(e.abs().max().item() for e in exact)
    for got, plain, want, what in zip(gpu, cpu32, exact, names):
        bar = max(RTOL[dtype], 2 * rel_err(plain, want, scale))
        assert_rel(got, want, bar, f"d/d{what}", scale)


@requires_gpu
def test_em_placements_give_identical_bits(monkeypatch):
    """The three layouts (forced with S2M_CUDA_MAX_SMEM) run the same arithmetic in the same order."""
    p = make_problem(4, 300, 40, 3).to(torch.float32, "cuda")
    results = []
    for cap in (None, 60 * 1024, 1024):
        if cap is None:
            monkeypatch.delenv("S2M_CUDA_MAX_SMEM", raising=False)
        else:
            monkeypatch.setenv("S2M_CUDA_MAX_SMEM", str(cap))
        out = ops.em_fit(p.x, p.weights, *p.init, 4, p.var_floor, 0.0, True)
        up = [torch.ones_like(t) for t in out[:3]]
        grads = ops.em_fit_backward(*up, p.x, p.weights, out[0], out[1], out[2], out[4], p.var_floor)
        results.append((*out[:4], *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@requires_gpu
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_tol_stops_the_same_sets_as_the_cpu(tol):
    p = make_problem(16, 40, 6, 3)
    cpu = ops.em_fit(p.x, p.weights, *p.init, 50, p.var_floor, tol, True)
    gpu = ops.em_fit(*_cuda((p.x, p.weights, *p.init)), 50, p.var_floor, tol, True)
    assert torch.equal(gpu[4].cpu(), cpu[4]) and torch.equal(gpu[5].cpu(), cpu[5])
    assert_rel(gpu[1].cpu(), cpu[1], 1e-10, "means trajectory")


@requires_gpu
def test_gradcheck_cuda_float64():
    """float64 gradcheck of the CUDA EM (K not a multiple of the kernel's component tile, D on
    its vector path) and of both scorings."""
    p = make_problem(2, 9, 4, 5, pad=True).to(torch.float64, "cuda")
    inputs = [t.clone().requires_grad_() for t in (p.x, p.weights, *p.init)]
    fit = lambda *a: ops.em_fit(*a, 3, p.var_floor, 0.0, True)[:3]  # noqa: E731
    assert torch.autograd.gradcheck(fit, inputs)
    params = [t.requires_grad_() for t in _mixture(2, 4, 3, torch.float64, "cuda")]
    z = torch.randn(2, 6, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(ops.score_paired, (z, *params))
    zp = torch.randn(7, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(ops.score_pool, (zp, *params))


# ----------------------------------------------------------------------------- scoring
SCORE_SHAPES = [(3, 17, 5, 3), (2, 40, 1, 1), (4, 33, 16, 11), (2, 1024, 2048, 16)]  # (B, Q|M, D, K)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Q,D,K", SCORE_SHAPES)
@pytest.mark.parametrize("kind", ["paired", "pool"])
def test_scoring_cuda_equals_cpu_and_reference(kind, B, Q, D, K, dtype):
    """Scores against the CPU op and the float64 reference; gradients against the reference
    (and, in float64, the CPU op: in float32 the CPU's pool gradients come from the
    matrix-product expansion, whose own error is the core tests' business)."""
    params = _mixture(B, D, K, dtype, offset=3.0)
    z = (3.0 + 2.0 * torch.randn((B, Q, D) if kind == "paired" else (Q, D), dtype=torch.float64)).to(dtype)
    op, back = (ops.score_paired, ops.score_paired_backward) if kind == "paired" else (ops.score_pool, ops.score_pool_backward)
    ref_fn = reference.log_prob if kind == "paired" else reference.log_prob_pool
    cpu, gpu = op(z, *params), op(*_cuda((z, *params)))
    leaves = [t.double().cuda().requires_grad_() for t in (z, *params)]
    ref = ref_fn(*leaves)
    assert_rel(gpu.cpu(), cpu, RTOL[dtype], "scores vs CPU")
    assert_rel(gpu, ref, RTOL[dtype], "scores vs reference")
    g = torch.randn(cpu.shape, dtype=torch.float64).to(dtype)
    g_gpu = [t.cpu() for t in back(*_cuda((g, z, *params)))]
    g_ref = [t.cpu() for t in torch.autograd.grad(ref, leaves, g.double().cuda())]
    names = ("z", "log_weights", "means", "variances")
    assert_grads_rel(g_gpu, g_ref, RTOL[dtype], names)
    if dtype == torch.float64:
        assert_grads_rel(g_gpu, back(g, z, *params), RTOL[dtype], names)


@requires_gpu
def test_pool_scoring_is_unaffected_by_tf32():
    """The fused pool kernel uses no tensor cores: allowing TF32 must not change a bit."""
    params = _mixture(50, 64, 4, torch.float32, "cuda", offset=10.0)
    z = 10.0 + torch.randn(3000, 64, device="cuda")
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        strict = ops.score_pool(z, *params)
        torch.backends.cuda.matmul.allow_tf32 = True
        loose = ops.score_pool(z, *params)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert torch.equal(strict, loose)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kmeanspp_cuda_equals_cpu(dtype):
    x = torch.randn(16, 500, 8, dtype=dtype)
    w = torch.rand(16, 500, dtype=dtype) * (torch.rand(16, 500) > 0.2)
    u = torch.rand(16, 5, dtype=torch.float64)
    assert torch.equal(ops.kmeanspp(*_cuda((x, w, u))).cpu(), ops.kmeanspp(x, w, u))
    w[3] = 0.0  # a set of zero weight
    lw, mu, var = ops.kmeanspp_init(*_cuda((x, w, u)), 1e-3)
    want = ops.kmeanspp_init(x, w, u, 1e-3)
    assert torch.equal(lw.cpu(), want[0]) and torch.equal(mu.cpu(), want[1])
    assert_rel(var.cpu(), want[2], RTOL[dtype], "variances")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kmeanspp_init_of_half_inputs_is_the_float32_one_cast(dtype):
    """Computed in float32, held in x's dtype, never below that dtype's eps**2."""
    x = (torch.randn(6, 40, 5, device="cuda") * 1e-4).to(dtype)  # spreads below eps**2 of dtype
    w = torch.rand(6, 40, device="cuda").to(dtype)
    u = torch.rand(6, 3, dtype=torch.float64, device="cuda")
    low = ops.kmeanspp_init(x, w, u, 0.0)
    high = ops.kmeanspp_init(x.float(), w.float(), u, 0.0)
    var_min = torch.finfo(dtype).eps ** 2
    assert all(t.dtype == dtype for t in low)
    assert torch.equal(low[1], high[1].to(dtype))
    assert torch.equal(low[2], high[2].to(dtype).clamp_min(var_min))
    assert float(low[2].min()) >= var_min


@requires_gpu
def test_fit_gmm_cuda_equals_cpu_for_the_same_generator():
    p = make_problem(8, 50, 6, 3)
    fits = [
        s2m_ext.fit_gmm(p.x.to(dev), p.weights.to(dev), n_components=3, n_iter=6, generator=torch.Generator().manual_seed(5))
        for dev in ("cpu", "cuda")
    ]
    for a, b in zip(fits[0].params(), fits[1].params()):
        assert_rel(b.cpu(), a, 1e-10)


# ----------------------------------------------------------------------------- reduced precision
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_are_computed_in_float32(dtype):
    """float16/bfloat16 give exactly the float32 computation on the same (rounded) inputs, cast
    back: parameters, gradients and scores."""
    p = make_problem(4, 40, 16, 3).to(torch.float32, "cuda")
    low = [t.to(dtype) for t in (p.x, p.weights, *p.init)]
    high = [t.float() for t in low]
    coef = [torch.randn(4, 3, device="cuda").to(dtype), torch.randn(4, 3, 16, device="cuda").to(dtype)]
    results = []
    for inputs in (low, high):
        x = inputs[0].clone().requires_grad_()
        gmm = s2m_ext.fit_gmm(x, inputs[1], init=DiagGMM(*inputs[2:]), n_iter=5, var_floor=p.var_floor)
        loss = (gmm.log_weights * coef[0].to(x.dtype)).sum() + (gmm.means * coef[1].to(x.dtype)).sum()
        (g_x,) = torch.autograd.grad(loss, x)
        results.append((gmm.detach().params(), g_x))
    (p_low, g_low), (p_high, g_high) = results
    for a, b in zip(p_low, p_high):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype))
    assert g_low.dtype == dtype and torch.equal(g_low, g_high.to(dtype))
    # Scores of the low-precision mixture, and of the same values in float32.
    z = low[0][:, :7]
    mix_low, mix_high = DiagGMM(*p_low), DiagGMM(*(t.float() for t in p_low))
    for a, b in ((mix_low.log_prob(z), mix_high.log_prob(z.float())), (mix_low.log_prob_pool(z[0]), mix_high.log_prob_pool(z[0].float()))):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype))


# ----------------------------------------------------------------------------- execution model
def _pipeline(x, w, init, z, upstream, u):
    """Fit, backward, both scorings and seeding: every CUDA kernel once."""
    lw, mu, var, ll, used, conv = ops.em_fit(x, w, *init, 5, 1e-3, 0.0, True)
    grads = ops.em_fit_backward(*upstream, x, w, lw, mu, var, used, 1e-3)
    pool = ops.score_pool(z, lw[-1], mu[-1], var[-1])
    pool_grads = ops.score_pool_backward(torch.ones_like(pool), z, lw[-1], mu[-1], var[-1])
    paired = ops.score_paired(x, lw[-1], mu[-1], var[-1])
    idx = ops.kmeanspp(x, w, u)
    return (lw, mu, var, ll, *grads, pool, *pool_grads, paired, idx)


def _pipeline_inputs(B=64, N=100, D=32, K=4, M=5000):
    p = make_problem(B, N, D, K).to(torch.float32, "cuda")
    out = ops.em_fit(p.x, p.weights, *p.init, 5, 1e-3, 0.0, True)
    upstream = [torch.randn_like(t) for t in out[:3]]
    z = torch.randn(M, D, device="cuda")
    u = torch.rand(B, K, dtype=torch.float64, device="cuda")
    return p.x, p.weights, p.init, z, upstream, u


@requires_gpu
def test_cuda_results_are_deterministic():
    inputs = _pipeline_inputs()
    first, second = _pipeline(*inputs), _pipeline(*inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_gpu
def test_cuda_graph_capture_and_replay():
    """Every op is capturable (no host sync, no allocation outside torch's allocator) and a
    replay on new inputs equals eager execution."""
    x, w, init, z, upstream, u = _pipeline_inputs(B=16, M=700)
    static = [t.clone() for t in (x, w, *init, z, *upstream, u)]
    unpack = lambda s: (s[0], s[1], tuple(s[2:5]), s[5], s[6:9], s[9])  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _pipeline(*unpack(static))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _pipeline(*unpack(static))
    fresh = _pipeline_inputs(B=16, M=700)
    new = [fresh[0], fresh[1], *fresh[2], fresh[3], *fresh[4], fresh[5]]
    for s, n in zip(static, new):
        s.copy_(n)
    graph.replay()
    expected = _pipeline(*unpack(new))
    torch.cuda.synchronize()
    for a, b in zip(captured, expected):
        assert torch.equal(a, b)


@requires_gpu
def test_ops_run_on_the_current_stream():
    """Inputs written on a side stream after a long GPU sleep: an op on that stream sees the
    new values only if it is enqueued on it (not on the default stream)."""
    x, w, init, z, upstream, u = _pipeline_inputs(B=8, M=300)
    new_x, new_z = x + 0.25, z - 0.5
    expected = _pipeline(new_x, w, init, new_z, upstream, u)
    torch.cuda.synchronize()
    xs, zs = x.clone(), z.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time, then the writes
        xs.copy_(new_x)
        zs.copy_(new_z)
        got = _pipeline(xs, w, init, zs, upstream, u)
    side.synchronize()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@requires_gpu
def test_torch_compile_fullgraph_on_cuda():
    p = make_problem(6, 30, 8, 3).to(torch.float32, "cuda")
    z = torch.randn(50, 8, device="cuda")
    init = DiagGMM(*p.init)

    def fit_and_score(x, w, z):
        gmm = s2m_ext.fit_gmm(x, w, init=init, n_iter=4, var_floor=p.var_floor)
        return gmm.log_prob_pool(z).sum() + gmm.log_prob(x).sum()

    compiled = torch.compile(fit_and_score, fullgraph=True)
    results = []
    for fn in (fit_and_score, compiled):
        x = p.x.clone().requires_grad_()
        out = fn(x, p.weights, z)
        (g,) = torch.autograd.grad(out, x)
        results.append((out.detach(), g))
    assert_rel(results[1][0], results[0][0], 1e-6, "compiled value")
    assert_rel(results[1][1], results[0][1], 1e-6, "compiled gradient")
