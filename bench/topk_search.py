"""Top-k retrieval: DiagGMM.topk_pool against dense log_prob_pool + torch.topk and faiss.

Each contender runs in its own spawned process (so one's heap or thread pools never change
another's numbers), builds the same seeded problem, runs once to warm up, then once under
the peak-RSS probe of bench/memory.py (peak above the RSS before the call, the problem
itself excluded) and ``--repeats`` times for the time (median reported).

Contenders (B concept models, M items, D dims, top k):
  topk_pool       DiagGMM.topk_pool on the in-memory pool (float32)
  dense           log_prob_pool (the (B, M) matrix) + torch.topk
  faiss           IndexFlatIP over augmented items [z*z, z, 1] against [-1/(2v), mu/v, c]
                  per component; K = 1 exact up to rounding, K > 1 merged by logsumexp of
                  the per-component scores over the union of each model's candidates
                  (components missing from a candidate's list are recomputed exactly)
  topk_memmap     topk_pool on the pool read from a .npy memmap on disk (--memmap-m items)

Usage: python -m bench.topk_search --B 1000 --M 1000000 --threads 1 --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import time
from typing import Dict, List, Optional

import numpy as np
import torch


def problem(B: int, K: int, M: int, D: int, seed: int = 0):
    from s2m_ext import DiagGMM

    g = torch.Generator().manual_seed(seed)
    lw = torch.log_softmax(torch.randn(B, K, generator=g), 1)
    means = torch.randn(B, K, D, generator=g) * 0.5
    var = torch.rand(B, K, D, generator=g) * 0.5 + 0.5
    z = torch.randn(M, D, generator=g)
    return DiagGMM(lw, means, var), z


def faiss_topk(gmm, z, k: int):
    """faiss brute-force inner product on augmented vectors, merged over components."""
    import faiss

    lw, mu, var = (t.double() for t in gmm.params())
    B, K, D = mu.shape
    q = torch.cat([-0.5 / var, mu / var], 2)  # (B, K, 2D)
    c = lw - 0.5 * (D * math.log(2 * math.pi) + var.log().sum(2) + (mu * mu / var).sum(2))
    queries = torch.cat([q, c.unsqueeze(2)], 2).reshape(B * K, 2 * D + 1).float().numpy()
    items = torch.cat([z * z, z, torch.ones(z.shape[0], 1)], 1).numpy()
    index = faiss.IndexFlatIP(2 * D + 1)
    index.add(items)
    scores, ids = index.search(queries, k)  # (B*K, k)
    if K == 1:
        return torch.from_numpy(scores), torch.from_numpy(ids)
    # Union of the K lists per model, rescored exactly (all components) and re-ranked.
    ids = torch.from_numpy(ids).view(B, K * k)
    out_v, out_i = [], []
    for b in range(B):
        cand = torch.unique(ids[b])
        s = gmm[b].log_prob_pool(z[cand])[0]
        v, p = s.topk(min(k, cand.numel()))
        out_v.append(v)
        out_i.append(cand[p])
    return torch.stack(out_v), torch.stack(out_i)


def run_contender(name: str, args: Dict, conn) -> None:
    torch.set_num_threads(args["threads"])
    import faiss

    faiss.omp_set_num_threads(args["threads"])
    from bench.memory import rss_peak_of

    B, K, M, D, k = args["B"], args["K"], args["M"], args["D"], args["k"]
    gmm, z = problem(B, K, M, D)
    if name == "topk_pool":
        call = lambda: gmm.topk_pool(z, k)
    elif name == "dense":
        call = lambda: gmm.log_prob_pool(z).topk(k, dim=1)
    elif name == "faiss":
        call = lambda: faiss_topk(gmm, z, k)
    elif name == "topk_memmap":
        pool = np.load(args["memmap"], mmap_mode="r")
        del z
        call = lambda: gmm.topk_pool(pool, k)
    else:
        raise ValueError(name)
    with torch.no_grad():
        times: List[float] = []
        if name != "topk_memmap":
            call()  # warm-up
        mem = rss_peak_of(call)
        for _ in range(args["repeats"]):
            t0 = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t0)
        values, indices = out
    conn.send({"time_s": statistics.median(times), "times_s": times, "peak_bytes": mem["peak_bytes"],
               "memory_method": mem["method"], "indices": indices.numpy(), "values": values.numpy()})


def spawn(name: str, args: Dict) -> Dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=run_contender, args=(name, args, child))
    p.start()
    out = parent.recv()
    p.join()
    return out


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of the top-k set of ``a`` found in that of ``b``, over rows."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist())]))


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=1000)
    ap.add_argument("--M", type=int, default=10**6)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--K", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--memmap-m", type=int, default=0, help="items of the on-disk memmap run (0: skip)")
    ap.add_argument("--memmap-path", default="/tmp/s2m_topk_pool.npy")
    ap.add_argument("--skip", nargs="*", default=[], help="contenders to leave out")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from bench.env import describe

    result = {"env": describe("cpu"), "args": vars(a), "runs": []}
    for K in a.K:
        base = dict(B=a.B, K=K, M=a.M, D=a.D, k=a.k, threads=a.threads, repeats=a.repeats)
        got = {n: spawn(n, base) for n in ("topk_pool", "dense", "faiss") if n not in a.skip}
        if not got:  # every in-memory contender skipped (e.g. a memmap-only run)
            continue
        ref = got.get("dense", got["topk_pool"])["indices"]
        run = {"K": K, **{kk: v for kk, v in base.items() if kk != "repeats"}, "contenders": {}}
        for n, r in got.items():
            run["contenders"][n] = {"time_s": r["time_s"], "times_s": r["times_s"], "peak_MiB": r["peak_bytes"] / 2**20,
                                    "recall_vs_dense": overlap(ref, r["indices"])}
        print(json.dumps(run, indent=1))
        result["runs"].append(run)
    if a.memmap_m:
        _, z = problem(1, 1, 0, a.D)
        mm = np.lib.format.open_memmap(a.memmap_path, mode="w+", dtype=np.float32, shape=(a.memmap_m, a.D))
        g = np.random.default_rng(1)
        for r0 in range(0, a.memmap_m, 1 << 18):
            n = min(1 << 18, a.memmap_m - r0)
            mm[r0:r0 + n] = g.standard_normal((n, a.D), dtype=np.float32)
        mm.flush()
        del mm
        try:
            base = dict(B=a.B, K=1, M=0, D=a.D, k=a.k, threads=a.threads, repeats=1, memmap=a.memmap_path)
            r = spawn("topk_memmap", base)
            run = {"memmap_M": a.memmap_m, "K": 1, "B": a.B, "time_s": r["time_s"], "peak_MiB": r["peak_bytes"] / 2**20,
                   "pool_MiB": a.memmap_m * a.D * 4 / 2**20}
            print(json.dumps(run, indent=1))
            result["memmap"] = run
        finally:
            os.remove(a.memmap_path)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
