#!/usr/bin/env python
"""Benchmark the gallery index types: search latency and recall@10 against exact search.

Synthetic data: a Gaussian mixture of L2-normalised vectors (D=256 by default), one
cluster per ~1000 points, each cluster spread along its own low-dimensional
subspace plus a little isotropic noise. Real embeddings are clustered by class and
have a low intrinsic dimension; uniform random vectors would make every neighbour
equally far and recall meaningless.

Queries are fresh draws from the same mixture (not gallery items), searched one at
a time (batch of 1, as the app and CLI do) through `Gallery.search`, so the timings
include the whole search path. Speed-ups are against flat in the same process.

`--as-searched` ranks as galleries built with a checkpoint search: seen-class calibration
and gallery diffusion with the checkpoint's settings (`--checkpoint`, default the shipped
one). Its training-class prototypes stand in as the centres of half the mixture's
clusters (those are the "seen" pictures), and recall is against the exact calibrated,
diffused ranking.

    python scripts/bench_index.py --sizes 10k,100k --out docs/index_benchmark.md
    python scripts/bench_index.py --sizes 10k,100k --as-searched
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


from sbir_core.gallery.index import DEFAULT_EF_SEARCH, DEFAULT_NPROBE, HNSW_EF_CONSTRUCTION, HNSW_M, Gallery, auto_nlist  # noqa: E402


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "km" else s) * mult)


def mixture(n: int, n_queries: int, dim: int, seed: int, intrinsic: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery (n, dim), queries (n_queries, dim), cluster centres (k, dim)), float32, the
    vectors unit norm, same mixture."""
    rng = np.random.default_rng(seed)
    k = max(10, n // 1000)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    # Per-cluster subspace: a random (intrinsic, dim) basis shared by the cluster.
    bases = rng.standard_normal((k, intrinsic, dim)).astype(np.float32) * (0.6 / np.sqrt(intrinsic))

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        step = 50_000  # chunks keep the temporaries small at 1M
        for s in range(0, m, step):
            e = min(m, s + step)
            c = rng.integers(0, k, e - s)
            z = rng.standard_normal((e - s, intrinsic)).astype(np.float32)
            x = centres[c] * (1.0 / np.sqrt(dim)) + np.einsum("ni,nid->nd", z, bases[c])
            x += rng.standard_normal(x.shape).astype(np.float32) * (0.05 / np.sqrt(dim))
            out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(n_queries), centres


def retrieval_settings(args: argparse.Namespace, centres: np.ndarray) -> dict:
    """Gallery options that rank as the checkpoint prescribes (empty without --as-searched)."""
    if not args.as_searched:
        return {}
    from sbir_core.gallery.calibration import SeenCalibration
    from sbir_core.models.checkpoint import read_metadata
    from sbir_core.paths import checkpoint_path, list_checkpoints

    path = checkpoint_path(args.checkpoint) if args.checkpoint in list_checkpoints() else Path(args.checkpoint)
    retrieval = read_metadata(path).get("retrieval") or {}
    setting = retrieval.get("seen_calibration")
    cal = SeenCalibration(centres[::2], float(setting["tau"]), float(setting["beta"])) if setting else None
    return {"calibration": cal, "diffusion_k": int(retrieval.get("diffusion_k") or 0)}


def median_ms(gallery: Gallery, queries: np.ndarray, k: int, warmup: int = 5) -> float:
    for q in queries[:warmup]:
        gallery.search(q, k)
    times = []
    for q in queries:
        t = time.perf_counter()
        gallery.search(q, k)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def recall(gallery: Gallery, queries: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    _, ids = gallery.knn(queries, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_ids)]))


def run_size(n: int, args: argparse.Namespace) -> list[dict]:
    import faiss

    t = time.perf_counter()
    x, q, centres = mixture(n, args.queries, args.dim, args.seed)
    print(f"[{n:,}] data in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    rows = []
    ranking = retrieval_settings(args, centres)
    flat = Gallery.from_embeddings(x, **ranking)
    _, exact = flat.knn(q, args.k)
    faiss.omp_set_num_threads(args.threads)
    flat_ms = median_ms(flat, q, args.k)
    rows.append({"n": n, "index": "flat", "params": "exact", "build_s": 0.0, "ms": flat_ms, "recall": 1.0})
    print(f"[{n:,}] flat {flat_ms:.3f} ms", file=sys.stderr, flush=True)
    del flat
    gc.collect()
    for kind in ("hnsw", "ivf"):
        faiss.omp_set_num_threads(args.build_threads)
        t = time.perf_counter()
        if kind == "hnsw":
            g = Gallery.from_embeddings(x, index_type="hnsw", ef_search=args.ef_search, **ranking)
            params = f"M={HNSW_M}, efC={HNSW_EF_CONSTRUCTION}, efSearch={args.ef_search}"
        else:
            g = Gallery.from_embeddings(x, index_type="ivf", nprobe=args.nprobe, **ranking)
            params = f"nlist={auto_nlist(n)}, nprobe={args.nprobe}"
        build = time.perf_counter() - t
        faiss.omp_set_num_threads(args.threads)
        if g.index_type != kind:  # ivf on a tiny set falls back to flat
            params = f"fell back to {g.index_type}"
        ms = median_ms(g, q, args.k)
        r = recall(g, q, exact, args.k)
        rows.append({"n": n, "index": kind, "params": params, "build_s": build, "ms": ms, "recall": r})
        print(f"[{n:,}] {kind} build {build:.1f} s, {ms:.3f} ms, recall {r:.3f}", file=sys.stderr, flush=True)
        del g
        gc.collect()
    for row in rows:
        row["speedup"] = flat_ms / row["ms"]
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    import faiss

    try:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    ranking = "plain cosine search"
    if args.as_searched:
        r = retrieval_settings(args, np.eye(4, args.dim, dtype=np.float32))  # only the settings are read
        ranking = (f"as {args.checkpoint} searches (seen-class calibration "
                   f"{r['calibration'].setting if r['calibration'] else 'off'}, diffusion k={r['diffusion_k']})")
    lines = [
        f"Gallery index benchmark, {ranking}: D={args.dim}, k={args.k}, {args.queries} single queries per size "
        f"(median), Gaussian-mixture data, faiss {faiss.__version__}, search on {args.threads} thread(s), "
        f"build on {args.build_threads}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average {load}.",
        "",
        "| N | index | parameters | build (s) | median latency (ms) | speed-up vs flat | recall@10 |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        build = "-" if r["index"] == "flat" else f"{r['build_s']:.1f}"
        lines.append(f"| {r['n']:,} | {r['index']} | {r['params']} | {build} | {r['ms']:.3f} | "
                     f"{r['speedup']:.1f}x | {r['recall']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10k,100k,1M", help="comma-separated gallery sizes (default 10k,100k,1M)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=200, help="single queries timed per size")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ef-search", type=int, default=DEFAULT_EF_SEARCH)
    p.add_argument("--nprobe", type=int, default=DEFAULT_NPROBE)
    p.add_argument("--threads", type=int, default=1,
                   help="faiss threads while searching (default 1: a single query gains little from "
                        "more, and on a busy machine OpenMP contention makes it many times slower)")
    p.add_argument("--build-threads", type=int, default=0, help="faiss threads while building (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--as-searched", action="store_true",
                   help="rank with the checkpoint's seen-class calibration and gallery diffusion")
    p.add_argument("--checkpoint", default="default", help="whose retrieval settings --as-searched uses")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)

    import faiss

    args.threads = max(1, args.threads)
    args.build_threads = args.build_threads if args.build_threads > 0 else faiss.omp_get_max_threads()
    rows = []
    for n in [parse_size(s) for s in args.sizes.split(",") if s.strip()]:
        rows.extend(run_size(n, args))
    table = markdown(rows, args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
