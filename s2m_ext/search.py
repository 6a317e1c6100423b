"""Top-k retrieval of a large pool by a batch of mixtures: scoring fused with a running top-k.

:func:`topk_pool` ranks every item of a pool under every mixture of a :class:`DiagGMM` and
keeps, per mixture, the ``k`` best items, without ever holding the dense (B, M) score matrix:
the pool is streamed in chunks of ``chunk_size`` rows, each chunk is scored with the pool
scoring op (the op behind ``DiagGMM.log_prob_pool``) and merged into a running (B, k) top-k.
Memory is O(B * k + B * K * chunk_size) whatever M.

The pool may be a tensor, a numpy array or memmap, a sequence of shards (tensors or numpy
arrays, any of them empty) or a folder of ``.npy`` shards (read in file-name order, memory
mapped). Chunks that do not live in memory already are read by a background thread one chunk
ahead, so reading overlaps scoring. With ``distributed=True`` each process of a
``torch.distributed`` group passes its own shard; shards follow each other in rank order in
the global numbering, and the per-rank top-k are merged with an all_gather.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._ops import ops
from . import _validation as V

__all__ = ["topk_pool", "merge_topk", "pool_shards"]

PoolLike = Union[Tensor, np.ndarray, str, os.PathLike, Sequence[Union[Tensor, np.ndarray]]]

# Elements of the (chunk, B*K) log-density intermediate a default chunk holds.
_CHUNK_ELEMENTS = 1 << 23


def merge_topk(values: Tensor, indices: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k best candidates of each row, by value descending, ties by the lower index.

    Args:
        values: (B, N) candidate scores.
        indices: (B, N) int64 global item indices of the candidates (distinct within a row).
        k: how many to keep; min(k, N) columns are returned.

    Returns:
        (values, indices), each (B, min(k, N)), sorted by (value descending, index ascending).
    """
    n = values.shape[1]
    k = min(k, n)
    if k < n:
        top, pos = values.topk(k, dim=1, sorted=False)
        # topk picks arbitrarily among items tied with the k-th value; rows where such a tie
        # straddles the cut are redone with the full (value, index) order.
        kth = top.min(dim=1, keepdim=True).values
        straddle = (values >= kth).sum(dim=1) > k
        values_k, indices_k = top, indices.gather(1, pos)
        if bool(straddle.any()):
            rows = straddle.nonzero().squeeze(1)
            v_r, i_r = _sort_rows(values[rows], indices[rows])
            values_k, indices_k = values_k.clone(), indices_k.clone()
            values_k[rows], indices_k[rows] = v_r[:, :k], i_r[:, :k]
        values, indices = values_k, indices_k
    return _sort_rows(values, indices)


def _sort_rows(values: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
    """Sort each row by value descending, ties by index ascending (two stable sorts)."""
    indices, order = indices.sort(dim=1, stable=True)
    values = values.gather(1, order)
    values, order = values.sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, order)


# ---------------------------------------------------------------------------- pool sources
def pool_shards(pool: PoolLike) -> List[Union[Tensor, np.ndarray]]:
    """The shards of a pool, in the order of the global item numbering.

    A tensor or numpy array is one shard; a sequence gives its items; a folder gives its
    ``*.npy`` files in name order, memory mapped (nothing is read until it is scored)."""
    if isinstance(pool, (Tensor, np.ndarray)):
        return [pool]
    if isinstance(pool, (str, os.PathLike)):
        folder = Path(pool)
        if not folder.is_dir():
            raise ValueError(f"pool {str(folder)!r} is not a folder of .npy shards")
        files = sorted(folder.glob("*.npy"))
        if not files:
            raise ValueError(f"pool folder {str(folder)!r} holds no .npy shards")
        return [np.load(f, mmap_mode="r") for f in files]
    if isinstance(pool, Sequence):
        shards = list(pool)
        for i, s in enumerate(shards):
            if not isinstance(s, (Tensor, np.ndarray)):
                raise TypeError(f"pool[{i}] must be a tensor or a numpy array, got {type(s).__name__}")
        return shards
    raise TypeError(
        f"pool must be a tensor, a numpy array or memmap, a sequence of them, or a folder of .npy shards; got {type(pool).__name__}"
    )


def _check_shard(s: Union[Tensor, np.ndarray], i: int, dtype: torch.dtype, dim: int) -> None:
    name = f"pool shard {i}"
    if s.ndim != 2:
        raise ValueError(f"{name} must be 2-D (M, D), got shape {tuple(s.shape)}")
    if s.shape[1] != dim:
        raise ValueError(f"{name}.shape[1] must equal the mixture dimension D = {dim}, got {s.shape[1]}")
    got = s.dtype if isinstance(s, Tensor) else _numpy_to_torch_dtype(s.dtype, name)
    if got != dtype:
        raise TypeError(f"{name} must have the dtype of the mixture ({dtype}), got {s.dtype}")


def _numpy_to_torch_dtype(dtype: np.dtype, name: str) -> torch.dtype:
    table = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
    if np.dtype(dtype) not in table:
        raise TypeError(f"{name} must be a floating-point array, got dtype {dtype}")
    return table[np.dtype(dtype)]


def _chunks(shards: Sequence[Union[Tensor, np.ndarray]], rows: int, device: torch.device) -> Iterator[Tuple[int, Tensor]]:
    """(global offset, chunk on device) for every chunk of every non-empty shard, in order."""
    offset = 0
    for s in shards:
        for r0 in range(0, s.shape[0], rows):
            part = s[r0:r0 + rows]
            # np.array copies a memmap slice into memory: this is where the disk is read.
            t = part if isinstance(part, Tensor) else torch.from_numpy(np.array(part))
            if isinstance(s, np.memmap):
                _release_mapped_rows(s, r0, part.shape[0])
            yield offset + r0, t.to(device)
        offset += s.shape[0]


def _release_mapped_rows(s: np.memmap, r0: int, n: int) -> None:
    """Drop the pages of rows [r0, r0 + n) of a memory-mapped shard from this process once
    they are copied (madvise MADV_DONTNEED; they stay in the page cache): otherwise every page
    read stays mapped, and a pool larger than memory counts in full in the process's RSS.
    Only for a read-only mapping of a whole file (mode "r", the array itself, not a view of
    it): a copy-on-write mapping would lose its private changes. A no-op elsewhere."""
    mapping = getattr(s, "_mmap", None)
    if (mapping is None or s.base is not mapping or getattr(s, "mode", None) != "r"
            or not hasattr(mmap, "MADV_DONTNEED") or not s.flags.c_contiguous):
        return
    row_bytes = s.strides[0]
    start = s.offset % mmap.ALLOCATIONGRANULARITY + r0 * row_bytes  # within the mapping
    aligned = start - start % mmap.PAGESIZE
    length = min(start + n * row_bytes, len(mapping)) - aligned
    if length > 0:
        mapping.madvise(mmap.MADV_DONTNEED, aligned, length)


def _read_ahead(chunks: Iterator[Tuple[int, Tensor]], depth: int = 1) -> Iterator[Tuple[int, Tensor]]:
    """Iterate ``chunks`` while a background thread produces the next ``depth`` of them."""
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        # Every put gives up once the consumer has gone (stop set): a put that blocked on a
        # full queue after the consumer stopped reading would hang its worker.join().
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in chunks:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # re-raised in the consumer
            put(exc)

    worker = threading.Thread(target=produce, daemon=True, name="s2m-pool-read-ahead")
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


# ---------------------------------------------------------------------------- search
def topk_pool(
    gmm,
    pool: PoolLike,
    k: int,
    chunk_size: Optional[int] = None,
    read_ahead: bool = True,
    distributed: bool = False,
    group=None,
) -> Tuple[Tensor, Tensor]:
    """The k best items of a pool under every mixture, streaming the pool in chunks.

    Args:
        gmm: a :class:`~s2m_ext.DiagGMM` of B mixtures in D dimensions.
        pool: the items, (M, D) in all: a tensor, a numpy array or memmap, a sequence of
            shards (tensors or numpy arrays, each (M_i, D), empty ones allowed), or a folder
            of ``.npy`` shards. The dtype must be the mixture's; chunks are moved to the
            mixture's device as they are scored.
        k: how many items to keep per mixture, >= 1. A pool of fewer than k items returns
            all of them: min(k, M) columns.
        chunk_size: pool rows read and scored at a time (default: 2^23 / D on the CPU,
            about 2^23 / (B * K) on CUDA); memory is O(B * k + D * chunk_size) on the CPU (the
            op scores blocks of about 2^19 scores at a time) and O(B * k + B * K * chunk_size)
            on CUDA.
        read_ahead: read the next chunk in a background thread while the current one is
            scored (for pools that are not tensors already in memory).
        distributed: each process of ``group`` (default: the world) passes its own shard of
            the pool; shard r's items are numbered after those of ranks 0..r-1, and every
            process returns the merged global result. Works with gloo and NCCL (the mixture
            then lives on the process's GPU).

    Returns:
        (values, indices), each (B, min(k, M)): values are ``log_prob_pool`` scores, sorted
        descending, ties broken by the lower index; indices (int64) number the items of the
        whole pool. Chunks are scored by the expansion of ``log_prob_pool`` (on the CPU fused
        with the top k: ``s2m::score_pool_topk``), so scores and ranking are those of
        ``torch.topk(gmm.log_prob_pool(pool), k)`` (with ties ordered by index), up to the
        matrix products' rounding differing between block shapes.

    There is no gradient: this is a search, not a training op. Inputs that require grad
    while grad mode is on raise a ValueError; call it under ``torch.no_grad()``.
    """
    k = V.check_int(k, "k", 1)
    if chunk_size is not None:
        chunk_size = V.check_int(chunk_size, "chunk_size", 1)
    shards = pool_shards(pool)
    params = gmm.params()
    if torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (*params, *shards)
    ):
        raise ValueError(
            "topk_pool has no gradient: call it under torch.no_grad() or pass detached tensors (gmm.detach())"
        )
    B, K, D = gmm.batch_size, gmm.n_components, gmm.dim
    for i, s in enumerate(shards):
        _check_shard(s, i, gmm.dtype, D)
        if isinstance(s, Tensor):
            V.check_same_device(s, f"pool shard {i}", gmm.means, "the mixture")
    device = gmm.device
    # The CPU op scores a chunk in cache-sized blocks, holding no (B, rows) matrix: its
    # chunk is bounded by the pool rows alone (and its per-call setup is amortised).
    default_rows = _CHUNK_ELEMENTS // max(1, D) if device.type == "cpu" else _CHUNK_ELEMENTS // max(1, B * K)
    rows = chunk_size or max(1, default_rows)

    values = torch.empty(B, 0, dtype=gmm.dtype, device=device)
    indices = torch.empty(B, 0, dtype=torch.long, device=device)
    in_memory = all(isinstance(s, Tensor) for s in shards)
    chunks = _chunks(shards, rows, device)
    if read_ahead and not in_memory:
        chunks = _read_ahead(chunks)
    # closing(): an error while scoring stops the read-ahead thread now, not when the
    # generator happens to be collected.
    with torch.no_grad(), contextlib.closing(chunks):
        for offset, z in chunks:
            V.check_finite(z, "pool")
            if device.type == "cpu":
                # Scoring fused with the running top k, block by block (csrc/cpu/score_pool_cpu.cpp).
                values, indices = ops.score_pool_topk(z, *params, values, indices, offset, k)
                continue
            scores = ops.score_pool(z, *params)  # (B, rows)
            ids = torch.arange(offset, offset + z.shape[0], device=device).expand(B, -1)
            # The chunk's own top k first, then the merge with the running one: the
            # concatenation is (B, 2k), not (B, k + rows).
            chunk_v, chunk_i = merge_topk(scores, ids, k)
            values, indices = merge_topk(torch.cat([values, chunk_v], 1), torch.cat([indices, chunk_i], 1), k)
        if distributed:
            values, indices = _merge_across_ranks(values, indices, sum(s.shape[0] for s in shards), k, group)
    return values, indices


def _merge_across_ranks(values: Tensor, indices: Tensor, local_m: int, k: int, group) -> Tuple[Tensor, Tensor]:
    """Merge the per-rank top-k into the global one; local indices become global."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    world = dist.get_world_size(group)
    device = values.device
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local_m], dtype=torch.long, device=device), group=group)
    sizes_l = [int(s) for s in sizes]
    offsets = np.concatenate([[0], np.cumsum(sizes_l)[:-1]]).tolist()
    rank = dist.get_rank(group)
    B, n = values.shape
    # Every rank sends k columns (padding after its min(k, M_r) real ones): all_gather
    # needs equal shapes.
    pad_v = torch.zeros(B, k, dtype=values.dtype, device=device)
    pad_i = torch.zeros(B, k, dtype=torch.long, device=device)
    pad_v[:, :n], pad_i[:, :n] = values, indices + offsets[rank]
    all_v = [torch.empty_like(pad_v) for _ in range(world)]
    all_i = [torch.empty_like(pad_i) for _ in range(world)]
    dist.all_gather(all_v, pad_v.contiguous(), group=group)
    dist.all_gather(all_i, pad_i.contiguous(), group=group)
    keep = [min(k, m) for m in sizes_l]
    cand_v = torch.cat([v[:, :c] for v, c in zip(all_v, keep)], 1)
    cand_i = torch.cat([i[:, :c] for i, c in zip(all_i, keep)], 1)
    return merge_topk(cand_v, cand_i, k)
