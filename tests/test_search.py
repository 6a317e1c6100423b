"""Streamed top-k retrieval (s2m_ext.search) against the dense pool scores."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import DEVICES, DTYPES, RTOL

from s2m_ext import DiagGMM
from s2m_ext.search import _read_ahead, merge_topk, topk_pool

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gen(_seed):
    """A generator seeded from the per-test seed."""
    return torch.Generator().manual_seed(torch.initial_seed())


def random_gmm(gen, B, K, D, dtype, device):
    lw = torch.log_softmax(torch.randn(B, K, generator=gen, dtype=torch.float64), 1)
    means = torch.randn(B, K, D, generator=gen, dtype=torch.float64)
    var = torch.rand(B, K, D, generator=gen, dtype=torch.float64) + 0.2
    return DiagGMM(lw.to(dtype), means.to(dtype), var.to(dtype)).to(device)


def dense_reference(gmm, z, k):
    """torch.topk of the dense scores, ties ordered by index (a stable descending sort)."""
    full = gmm.log_prob_pool(z)
    values, indices = full.sort(dim=1, descending=True, stable=True)
    return full, values[:, :k], indices[:, :k]


def assert_topk(gmm, z, got, k, exact_indices):
    """``got`` is the top-k of log_prob_pool(z): the same sorted values to the dtype's
    rounding, and each returned index scores its returned value. In float64 (rounding ~1e-15,
    far below the gaps of random scores) the indices must be those of the reference."""
    values, indices = got
    full, want_v, want_i = dense_reference(gmm, z, k)
    kk = min(k, z.shape[0])
    assert values.shape == indices.shape == (gmm.batch_size, kk)
    assert indices.dtype == torch.long
    rtol = RTOL[z.dtype]
    torch.testing.assert_close(values, want_v, rtol=rtol, atol=rtol)
    torch.testing.assert_close(full.gather(1, indices), values, rtol=rtol, atol=rtol)
    assert all(len(set(row.tolist())) == kk for row in indices), "an index repeats in a row"
    assert bool((values[:, 1:] <= values[:, :-1]).all()), "values not descending"
    if exact_indices:
        assert torch.equal(indices, want_i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_topk_equals_dense_topk(gen, device, dtype, K):
    for B, D, M, k, chunk in [(5, 3, 101, 7, 10), (3, 8, 64, 64, 9), (4, 2, 30, 50, 7), (2, 5, 257, 1, 256), (1, 4, 13, 5, 1)]:
        gmm = random_gmm(gen, B, K, D, dtype, device)
        z = torch.randn(M, D, generator=gen, dtype=torch.float64).to(dtype).to(device)
        with torch.no_grad():
            got = gmm.topk_pool(z, k, chunk_size=chunk)
        assert_topk(gmm, z, got, k, exact_indices=dtype == torch.float64)
        with torch.no_grad():
            default = gmm.topk_pool(z, k)  # one chunk
        assert_topk(gmm, z, default, k, exact_indices=dtype == torch.float64)


def tied_problem(gen, K, dtype):
    """Integer items and means, power-of-two variances: every score of a repeated item is
    computed exactly, so repeats tie bit for bit whatever the chunk they fall in."""
    B, D = 4, 3
    means = torch.randint(-2, 3, (B, K, D), generator=gen).to(dtype)
    var = 2.0 ** torch.randint(-1, 2, (B, K, D), generator=gen).to(dtype)
    gmm = DiagGMM(torch.full((B, K), -math.log(K), dtype=dtype), means, var)
    base = torch.randint(-2, 3, (9, D), generator=gen).to(dtype)
    z = torch.cat([base, base.flip(0), base, base[:4]]).contiguous()
    return gmm, z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2])
def test_ties_are_broken_by_the_lower_index(gen, dtype, K):
    gmm, z = tied_problem(gen, K, dtype)
    full, want_v, want_i = dense_reference(gmm, z, z.shape[0])
    assert (full.unsqueeze(2) == full.unsqueeze(1)).sum() > full.numel(), "the problem has no ties"
    for k in (1, 5, 9, 10, 17, z.shape[0]):
        for chunk in (1, 4, 7, 100):
            with torch.no_grad():
                values, indices = gmm.topk_pool(z, k, chunk_size=chunk)
            assert torch.equal(values, want_v[:, :k]), (k, chunk)
            assert torch.equal(indices, want_i[:, :k]), (k, chunk)


def test_merge_topk_orders_ties_by_index():
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0]])
    indices = torch.tensor([[9, 8, 1, 4, 5, 2]])
    v, i = merge_topk(values, indices, 3)
    assert v.tolist() == [[3.0, 3.0, 3.0]] and i.tolist() == [[1, 2, 5]]
    v, i = merge_topk(values, indices, 10)
    assert i.tolist() == [[1, 2, 5, 8, 4, 9]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_memmap_shards_and_folder_equal_in_memory(gen, tmp_path, dtype):
    B, K, D, M, k = 6, 3, 5, 211, 12
    gmm = random_gmm(gen, B, K, D, dtype, "cpu")
    z = torch.randn(M, D, generator=gen, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        want = gmm.topk_pool(z, k, chunk_size=16)
    assert_topk(gmm, z, want, k, exact_indices=dtype == torch.float64)
    arr = z.numpy()
    mm = np.lib.format.open_memmap(tmp_path / "pool.npy", mode="w+", dtype=arr.dtype, shape=arr.shape)
    mm[:] = arr
    mm.flush()
    cuts = [0, 0, 40, 40, 97, 150, 211]  # empty shards at the front and in the middle
    shards = [arr[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    folder = tmp_path / "shards"
    folder.mkdir()
    for j, s in enumerate(shards):
        np.save(folder / f"part-{j:03d}.npy", s)
    pools = {
        "memmap": np.load(tmp_path / "pool.npy", mmap_mode="r"),
        "numpy shards": shards,
        "tensor shards": [torch.from_numpy(s) for s in shards],
        "folder": folder,
        "folder as str": str(folder),
    }
    for name, pool in pools.items():
        for read_ahead in (True, False):
            with torch.no_grad():
                got = gmm.topk_pool(pool, k, chunk_size=16, read_ahead=read_ahead)
            # Chunks follow shard boundaries, so the rounding may differ from the in-memory run.
            assert_topk(gmm, z, got, k, exact_indices=dtype == torch.float64)
            torch.testing.assert_close(got[0], want[0], rtol=RTOL[dtype], atol=RTOL[dtype], msg=name)


class _FailingShard(np.ndarray):
    """An array whose reads fail, like a shard on a disk that errors."""

    def __getitem__(self, index):
        raise OSError("read error")


def test_read_ahead_error_reaches_the_caller(gen):
    gmm = random_gmm(gen, 2, 1, 3, torch.float64, "cpu")
    failing = np.ones((5, 3)).view(_FailingShard)
    with pytest.raises(OSError, match="read error"), torch.no_grad():
        topk_pool(gmm, [np.ones((4, 3)), failing], 2, chunk_size=2, read_ahead=True)
    bad = np.ones((5, 3))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"), torch.no_grad():
        topk_pool(gmm, [np.ones((4, 3)), bad], 2, chunk_size=2)


def test_read_ahead_ends_when_the_consumer_stops_early():
    """The consumer stops (an error while scoring) once the reader has read everything and
    queued the last chunk: the reader must still end, not block on the full queue with its
    end marker, which would hang the caller."""
    exhausted = threading.Event()

    def source():
        yield from ((i, torch.zeros(1)) for i in range(2))
        exhausted.set()  # chunk 1 is queued by now: the queue (depth 1) is full

    chunks = _read_ahead(source(), depth=1)
    next(chunks)
    assert exhausted.wait(30)
    closer = threading.Thread(target=chunks.close, daemon=True)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "closing the read-ahead iterator hangs"


def test_bad_inputs(gen, tmp_path):
    gmm = random_gmm(gen, 2, 2, 3, torch.float64, "cpu")
    z = torch.randn(10, 3, dtype=torch.float64)
    with torch.no_grad():
        with pytest.raises(ValueError, match="k"):
            gmm.topk_pool(z, 0)
        with pytest.raises(ValueError, match="chunk_size"):
            gmm.topk_pool(z, 2, chunk_size=0)
        with pytest.raises(TypeError, match="dtype"):
            gmm.topk_pool(z.float(), 2)
        with pytest.raises(TypeError, match="dtype"):
            gmm.topk_pool(np.ones((4, 3), dtype=np.int64), 2)
        with pytest.raises(ValueError, match="D = 3"):
            gmm.topk_pool([z, torch.zeros(4, 2, dtype=torch.float64)], 2)
        with pytest.raises(ValueError, match="folder"):
            gmm.topk_pool(tmp_path / "missing", 2)
        with pytest.raises(ValueError, match="no .npy"):
            gmm.topk_pool(tmp_path, 2)
        with pytest.raises(TypeError, match="pool"):
            gmm.topk_pool([z, [1, 2, 3]], 2)
        with pytest.raises(ValueError, match="distributed"):
            gmm.topk_pool(z, 2, distributed=True)
    with pytest.raises(ValueError, match="no gradient"):
        gmm.topk_pool(z.requires_grad_(), 2)
    lw, mu, var = (t.clone().requires_grad_() for t in gmm.params())
    with pytest.raises(ValueError, match="no gradient"):
        DiagGMM(lw, mu, var).topk_pool(z.detach(), 2)


def _gloo_worker(rank, world, init, gmm_params, shards, k, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        gmm = DiagGMM(*gmm_params)
        with torch.no_grad():
            values, indices = gmm.topk_pool(shards[rank], k, chunk_size=7, distributed=True)
        torch.save((values, indices), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(gen, tmp_path):
    B, K, D, k = 5, 2, 4, 15
    gmm = random_gmm(gen, B, K, D, torch.float64, "cpu")
    z = torch.randn(50, D, generator=gen, dtype=torch.float64)
    # rank 0 holds fewer than k items, so its padding must not leak into the merge.
    shards = [z[:9].clone(), z[9:].clone()]
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_gloo_worker, args=(2, init, gmm.params(), shards, k, str(tmp_path / "out")),
                       nprocs=2, start_method="spawn", join=True)
    with torch.no_grad():
        want = gmm.topk_pool(z, k, chunk_size=7)
    assert_topk(gmm, z, want, k, exact_indices=True)
    for rank in range(2):
        values, indices = torch.load(tmp_path / f"out.{rank}")
        assert torch.equal(indices, want[1]), rank
        torch.testing.assert_close(values, want[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- programs
def _omniglot_zip():
    from s2m_ext.data.omniglot import SHARED_ZIP, default_omniglot_root

    root = default_omniglot_root()
    path = None if root is None else (root / SHARED_ZIP if root.is_dir() else root)
    if path is None or not path.exists():
        pytest.skip("needs the shared Omniglot zip")
    return path


def _run(module, *args):
    import os
    import subprocess
    import sys
    import tempfile

    import s2m_ext

    # The program imports the s2m_ext this process imported (installed or built in place), run
    # from a folder outside the source tree (python -m puts the working directory first).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(s2m_ext.__path__[0]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tempfile.gettempdir())


def test_index_and_search_programs_end_to_end(tmp_path):
    import json
    import zipfile
    from pathlib import PurePosixPath

    from PIL import Image
    from test_train import tiny

    from s2m_ext.train import train

    # A collection of 3 characters x 6 drawings from the shared zip, and a concept folder
    # holding 3 other drawings of the first character.
    collection, concept = tmp_path / "collection", tmp_path / "concept"
    with zipfile.ZipFile(_omniglot_zip()) as zf:
        by_char = {}
        for name in sorted(zf.namelist()):
            parts = PurePosixPath(name).parts
            if name.endswith(".png") and len(parts) >= 3:
                by_char.setdefault("/".join(parts[-3:-1]), []).append(name)
        chars = sorted(by_char)[:3]
        for c in chars:
            for j, name in enumerate(by_char[c][: 9 if c == chars[0] else 6]):
                dest = (concept if (c == chars[0] and j >= 6) else collection / c) / PurePosixPath(name).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(name))
    train(tiny(tmp_path, "run", scorer="gauss"))
    ckpt = tmp_path / "run" / "last.pt"
    index = tmp_path / "index"
    r = _run("s2m_ext.index", "--checkpoint", ckpt, "--images", collection, "--out", index, "--shard-size", 7, "--threads", 1)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["count"] == 18 and len(manifest["shards"]) == 3 and sorted(set(manifest["labels"])) == chars
    assert sum(np.load(index / s).shape[0] for s in manifest["shards"]) == 18

    out = tmp_path / "res" / "ranked.json"
    r = _run("s2m_ext.search_cli", "--index", index, "--concept", chars[1], "--concept", concept,
             "--k", 5, "--out", out, "--sheet", 4, "--thumb", 20)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert [c["concept"] for c in got["concepts"]] == [chars[1], str(concept)]
    # The ranking is topk_pool of the fitted models over the descriptors the index holds.
    from s2m_ext.index import load_model

    model = load_model(ckpt)
    desc = torch.from_numpy(np.concatenate([np.load(index / s) for s in manifest["shards"]]))
    labels = np.asarray(manifest["labels"])
    ex = desc[torch.from_numpy(labels == chars[1])].unsqueeze(0)
    with torch.no_grad():
        gmm = model.fit(ex, torch.ones(ex.shape[:2], dtype=torch.bool), torch.Generator().manual_seed(0))
        full = gmm.log_prob_pool(desc)[0]
    first = got["concepts"][0]["results"]
    assert [e["rank"] for e in first] == [1, 2, 3, 4, 5]
    assert [e["index"] for e in first] == full.topk(5).indices.tolist()
    torch.testing.assert_close(torch.tensor([e["score"] for e in first]), full.topk(5).values, rtol=1e-4, atol=1e-4)
    assert all(e["name"] == manifest["names"][e["index"]] and e["label"] == labels[e["index"]] for e in first)
    with Image.open(out.with_suffix(".png")) as sheet:
        assert sheet.size == (4 * 22 + 2, 2 * 22 + 2)

    # Bad flags are usage errors (exit status 2, the message names the flag).
    for args, flag in [(["--k", 0], "--k"), (["--concept", "no such label"], "--concept"), (["--sheet", -1], "--sheet")]:
        base = ["--index", index, "--out", out] + (["--concept", chars[0]] if "--concept" not in args else [])
        r = _run("s2m_ext.search_cli", *base, *args)
        assert r.returncode == 2 and flag in r.stderr, r.stderr
    r = _run("s2m_ext.index", "--checkpoint", ckpt, "--images", tmp_path / "missing", "--out", index)
    assert r.returncode == 2 and "--images" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- the CPU op
def _op_reference(z, gmm, values, indices, offset, k):
    """score_pool_topk by definition: the running entries and the chunk's scores, ordered by
    (score descending, index ascending), the first min(k, n + M)."""
    scores = gmm.log_prob_pool(z)
    ids = torch.arange(offset, offset + z.shape[0]).expand(gmm.batch_size, -1)
    all_v, all_i = torch.cat([values, scores], 1), torch.cat([indices, ids], 1)
    order = torch.argsort(all_i, dim=1)  # index ascending, then a stable sort by score
    all_v, all_i = all_v.gather(1, order), all_i.gather(1, order)
    by_value = all_v.argsort(dim=1, descending=True, stable=True)
    return all_v.gather(1, by_value)[:, :k], all_i.gather(1, by_value)[:, :k]


def dyadic_gmm(gen, B, K, D, dtype):
    """Integer means and power-of-2 variances, B * K a power of 2 (the centre of the means is
    then exact): with an integer pool every score is one rounding of an exact sum, the same
    bits in any block or chunk, so ties are exact and the ranking is fixed."""
    means = torch.randint(-2, 3, (B, K, D), generator=gen).to(dtype)
    var = 2.0 ** torch.randint(-1, 2, (B, K, D), generator=gen).to(dtype)
    return DiagGMM(torch.full((B, K), -math.log(K), dtype=dtype), means, var)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2])
def test_score_pool_topk_merges_a_chunk_into_any_running_state(gen, dtype, K):
    """The op's contract on its own: running entries with indices above, below and among the
    chunk's, exact ties between running and new entries, n < k, n + M < k, M = 0, and chunks
    longer than the op's internal blocks (B = 512: a block is 1024 / K rows)."""
    from s2m_ext import ops

    for B, M, n, k in ((4, 40, 0, 7), (4, 40, 7, 7), (4, 3, 2, 9), (4, 0, 4, 4), (512, 3000, 5, 5)):
        gmm = dyadic_gmm(gen, B, K, 3, dtype)
        z = torch.randint(-2, 3, (M, 3), generator=gen).to(dtype)
        # Running entries copy chunk scores (exact ties), with indices on both sides of it.
        pool_scores = gmm.log_prob_pool(z) if M else torch.zeros(B, 1, dtype=dtype)
        values = pool_scores[:, torch.randint(0, pool_scores.shape[1], (n,), generator=gen)]
        indices = torch.stack([torch.randperm(100, generator=gen)[:n] * 50 for _ in range(B)]).long()
        values, indices = merge_topk(values, indices, n)  # a valid running state: sorted
        got_v, got_i = ops.score_pool_topk(z, *gmm.params(), values, indices, 1000, k)
        want_v, want_i = _op_reference(z, gmm, values, indices, 1000, k)
        assert got_v.shape == got_i.shape == (B, min(k, n + M))
        assert torch.equal(got_v, want_v) and torch.equal(got_i, want_i), (B, M, n, k)


def test_score_pool_topk_does_not_depend_on_the_thread_count(gen):
    from s2m_ext import ops

    gmm = random_gmm(gen, 300, 1, 16, torch.float32, "cpu")
    z = torch.randn(5000, 16, generator=gen)
    empty_v, empty_i = torch.empty(300, 0), torch.empty(300, 0, dtype=torch.long)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.score_pool_topk(z, *gmm.params(), empty_v, empty_i, 0, 20)
        torch.set_num_threads(2)
        two = ops.score_pool_topk(z, *gmm.params(), empty_v, empty_i, 0, 20)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_score_pool_topk_refuses_a_bad_running_state():
    from s2m_ext import ops

    gmm = DiagGMM(torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, 1, 3, dtype=torch.float64),
                  torch.ones(2, 1, 3, dtype=torch.float64))
    z = torch.zeros(4, 3, dtype=torch.float64)
    v, i = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ops.score_pool_topk(z, *gmm.params(), v, i, 0, 0)
    with pytest.raises(ValueError, match="values must hold at most k = 1 columns"):
        ops.score_pool_topk(z, *gmm.params(), v, i, 0, 1)
    with pytest.raises(ValueError, match="batch size B"):
        ops.score_pool_topk(z, *gmm.params(), v[:1], i[:1], 0, 2)
    with pytest.raises(TypeError, match="indices must be int64"):
        ops.score_pool_topk(z, *gmm.params(), v, i.int(), 0, 2)
    with pytest.raises(ValueError, match="indices must have the shape of values"):
        ops.score_pool_topk(z, *gmm.params(), v, i[:, :1], 0, 2)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        ops.score_pool_topk(z, *gmm.params(), v, i, -1, 2)


def test_opcheck_score_pool_topk(gen):
    from s2m_ext import ops

    gmm = random_gmm(gen, 3, 2, 4, torch.float64, "cpu")
    z = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    v, i = merge_topk(torch.randn(3, 2, generator=gen, dtype=torch.float64), torch.tensor([[0, 1]] * 3), 2)
    torch.library.opcheck(ops.score_pool_topk.default, (z, *gmm.params(), v, i, 100, 4))


def test_one_component_scores_whose_expanded_terms_overflow_are_minus_inf():
    # One component at 1e140 with variance 1e-20: the item at 1e150 overflows the expanded
    # form (z . mu / v and z^2 / v); it is recomputed directly and scores -inf, in the dense
    # scores and in the top k, like the reference.
    from s2m_ext import reference

    lw = torch.zeros(1, 1, dtype=torch.float64)
    mu = torch.full((1, 1, 1), 1e140, dtype=torch.float64)
    var = torch.full((1, 1, 1), 1e-20, dtype=torch.float64)
    z = torch.tensor([[1e150], [1e140], [-1e150]], dtype=torch.float64)
    gmm = DiagGMM(lw, mu, var)
    want = reference.log_prob_pool(z, lw, mu, var)
    assert gmm.log_prob_pool(z).tolist() == want.tolist()
    assert want[0, 0] == want[0, 2] == -math.inf and math.isfinite(want[0, 1])
    with torch.no_grad():
        values, indices = gmm.topk_pool(z, 3)
    assert values.tolist() == [[want[0, 1].item(), -math.inf, -math.inf]] and indices.tolist() == [[1, 0, 2]]


def test_releasing_read_pages_never_drops_private_changes(tmp_path):
    """Only a read-only mapping of a whole file has its read rows released: a copy-on-write
    memmap keeps its in-memory changes, and a view's rows are left alone."""
    from s2m_ext.search import _release_mapped_rows

    path = tmp_path / "pool.npy"
    np.save(path, np.arange(200_000 * 4, dtype=np.float32).reshape(200_000, 4))
    cow = np.load(path, mmap_mode="c")
    cow[5:50_000] = -1.0
    _release_mapped_rows(cow, 0, 100_000)
    assert (cow[5:50_000] == -1.0).all()
    ro = np.load(path, mmap_mode="r")
    before = np.array(ro[100:150_000])
    _release_mapped_rows(ro, 100, 149_900)  # the data is read again from the file
    _release_mapped_rows(ro[10:], 0, 1000)  # a view: no-op
    assert np.array_equal(np.array(ro[100:150_000]), before)
