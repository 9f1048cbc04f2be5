#!/usr/bin/env python
"""Benchmark the gallery index types side by side: exact, HNSW and IVF-PQ + exact re-scoring.

For each size and index: build time, bytes on disk, time to open the saved gallery in a
fresh process, p50/p95 single-query search time (one query at a time through
`Gallery.search`, as the app searches), recall@10 against exact search ranked as the app
ranks, and the RSS of the searching process.

Data: synthetic unit vectors of the encoder's dimension (D=256), a Gaussian mixture of
N/500 clusters (2,000 at 1M) around unit centres, each spread along its own 16-dimensional
subspace plus a little isotropic noise, so that a vector's cosine to its centre is ~0.8 as
in the shipped default gallery (median 0.83 to its class mean). Real embeddings are
clustered by class with a low intrinsic dimension; uniform random vectors would make every
neighbour equally far and recall meaningless. Queries are fresh draws from the same
mixture, not gallery items.

Ranking: seen-class calibration with the checkpoint's tau and beta (`--checkpoint`, the
shipped one by default), its prototypes played by the centres of half the clusters (those
are the "seen" pictures); gallery diffusion with the checkpoint's k unless `--diffusion-k`
says otherwise. Exact ground truth with diffusion needs every picture's exact neighbours
(N^2 work), so the 1M run uses `--diffusion-k 0` and diffusion is measured at 100k.

    python scripts/bench_index.py --sizes 100k
    nice python scripts/bench_index.py --sizes 1M --diffusion-k 0 [--kinds flat,ivfpq]
    python scripts/bench_index.py --project 1M,10M,100M,1B     # docs/SCALING.md's table

`--project` prints memory and disk per index type from the bytes per picture measured here
at 1M (`MEASURED`), scaled linearly (no data is made).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sbir_core.gallery import ann
from sbir_core.gallery.calibration import SeenCalibration
from sbir_core.gallery.index import Gallery

KINDS = ("flat", "hnsw", "ivfpq")
SPREAD = 0.75


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "kmb" else s) * mult)


def mixture(n: int, n_queries: int, dim: int, seed: int, intrinsic: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery (n, dim), queries (n_queries, dim), cluster centres (k, dim)), float32 unit rows."""
    rng = np.random.default_rng(seed)
    k = max(10, n // 500)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # spread |z B| ~ 0.75 around a unit centre: a picture's cosine to its cluster centre is ~0.8,
    # as in the shipped default gallery (median 0.83 to its class mean)
    bases = rng.standard_normal((k, intrinsic, dim)).astype(np.float32) * np.float32(SPREAD / np.sqrt(intrinsic * dim))

    def draw(m: int) -> np.ndarray:
        c = rng.integers(0, k, m)
        out = rng.standard_normal((m, dim), dtype=np.float32) * np.float32(0.05 / np.sqrt(dim))
        z = rng.standard_normal((m, intrinsic), dtype=np.float32)
        order = np.argsort(c, kind="stable")
        bounds = np.searchsorted(c[order], np.arange(k + 1))
        for j in range(k):  # one small matmul per cluster
            rows = order[bounds[j]:bounds[j + 1]]
            out[rows] += centres[j] + z[rows] @ bases[j]
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    return draw(n), draw(n_queries), centres


def ranking(args: argparse.Namespace, centres: np.ndarray) -> dict:
    """Gallery options that rank as the checkpoint prescribes (empty with --plain)."""
    if args.plain:
        return {}
    from sbir_core.models.checkpoint import read_metadata
    from sbir_core.paths import checkpoint_path, list_checkpoints

    path = checkpoint_path(args.checkpoint) if args.checkpoint in list_checkpoints() else Path(args.checkpoint)
    retrieval = read_metadata(path).get("retrieval") or {}
    setting = retrieval.get("seen_calibration")
    cal = SeenCalibration(centres[::2], float(setting["tau"]), float(setting["beta"])) if setting else None
    k = int(retrieval.get("diffusion_k") or 0) if args.diffusion_k is None else args.diffusion_k
    return {"calibration": cal, "diffusion_k": k}


def folder_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def child(args: argparse.Namespace) -> int:
    """In a fresh process: open a saved gallery, search one query at a time, report as JSON."""
    import faiss

    faiss.omp_set_num_threads(args.threads)
    t = time.perf_counter()
    g = Gallery.load(args.child)
    open_s = time.perf_counter() - t
    q = np.load(args.child_queries)
    truth = np.load(args.child_truth)
    for v in q[:5]:
        g.search(v, 10)
    times, got = [], []
    for v in q:
        t = time.perf_counter()
        hits = g.search(v, 10)
        times.append(time.perf_counter() - t)
        got.append([h.index for h in hits])
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    mb = lambda key: int(status.get(key, "0 kB").split()[0]) / 1024  # noqa: E731
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth.tolist())]))
    print(json.dumps({"open_s": open_s, "p50_ms": float(np.percentile(times, 50) * 1000),
                      "p95_ms": float(np.percentile(times, 95) * 1000), "recall@10": recall,
                      "rss_mb": mb("VmRSS"), "rss_anon_mb": mb("RssAnon"), "rss_file_mb": mb("RssFile"),
                      "peak_rss_mb": mb("VmHWM"), "mmap": isinstance(g.raw_embeddings, np.memmap)}))
    return 0


def run_size(n: int, args: argparse.Namespace, work: Path) -> list[dict]:
    import faiss

    t = time.perf_counter()
    x, q, centres = mixture(n, args.queries, args.dim, args.seed)
    opts = ranking(args, centres)
    print(f"[{n:,}] data in {time.perf_counter() - t:.1f} s; ranking {describe(opts)}", file=sys.stderr, flush=True)
    faiss.omp_set_num_threads(args.build_threads)
    exact = Gallery.from_embeddings(x, **opts)
    truth = np.concatenate([exact.knn(q[s:s + 20], 10)[1] for s in range(0, len(q), 20)])
    del exact
    np.save(work / "queries.npy", q)
    np.save(work / "truth.npy", truth)
    rows = []
    for kind in KINDS:
        if kind not in args.kinds.split(","):
            continue
        faiss.omp_set_num_threads(args.build_threads)
        t = time.perf_counter()
        params = {"ef_search": args.ef_search} if kind == "hnsw" else {}
        if kind == "ivfpq":
            params = {"nprobe": args.nprobe, "shortlist": args.shortlist, "opq": args.opq,
                      **({"pq_m": args.pq_m} if args.pq_m else {})}
        g = Gallery.from_embeddings(x, index_type=kind, **opts, **params)
        build_s = time.perf_counter() - t  # the index, and for approximate galleries the diffused vectors
        out = g.save(work / kind)
        meta = dict(g.meta.get("index_params") or {})
        del g
        disk = folder_bytes(out)
        cmd = [sys.executable, __file__, "--child", str(out), "--child-queries", str(work / "queries.npy"),
               "--child-truth", str(work / "truth.npy"), "--threads", str(args.threads)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        row = {"n": n, "index": kind, "params": meta, "build_s": round(build_s, 1), "disk_mb": round(disk / 2**20, 1),
               "disk_bytes_per_vector": round(disk / n, 1), **{k: round(v, 3) if isinstance(v, float) else v
                                                               for k, v in res.items()}}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def describe(opts: dict) -> str:
    cal = opts.get("calibration")
    return (f"calibration {'tau=%g beta=%g' % (cal.tau, cal.beta) if cal else 'off'}, "
            f"diffusion k={opts.get('diffusion_k', 0)}")


# ----------------------------------------------------------------------------- projection
# Bytes per picture at D=256, measured by this script at 1M (docs/BENCHMARKS.md I33b): RAM is the
# searching process's anonymous memory less the ~75 MB of an empty one (Python, numpy, faiss);
# disk is the saved gallery folder. Memory-mapped files (the embeddings of hnsw and ivfpq
# galleries, their item file) are not counted as RAM: only the rows a search reads are cached.
MEASURED = {"flat": {"ram": 1009, "disk": 1039}, "hnsw": {"ram": 1213, "disk": 2347},
            "ivfpq": {"ram": 104, "disk": 1117}}


def project(sizes: list[int]) -> list[dict]:
    return [{"n": n, "index": kind, "ram_gb": round(n * b["ram"] / 1e9, 2), "disk_gb": round(n * b["disk"] / 1e9, 2)}
            for n in sizes for kind, b in MEASURED.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100k", help="comma-separated gallery sizes (default 100k)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=200, help="single queries timed per index")
    p.add_argument("--ef-search", type=int, default=ann.DEFAULT_EF_SEARCH)
    p.add_argument("--nprobe", type=int, default=ann.DEFAULT_NPROBE)
    p.add_argument("--shortlist", type=int, default=ann.DEFAULT_SHORTLIST, help="IVF-PQ candidates re-scored exactly")
    p.add_argument("--pq-m", type=int, default=0, help="IVF-PQ code bytes per vector (0: one per 4 dimensions)")
    p.add_argument("--opq", action="store_true", help="rotate with OPQ before IVF-PQ")
    p.add_argument("--threads", type=int, default=1, help="faiss threads while searching (default 1, as the app)")
    p.add_argument("--build-threads", type=int, default=0, help="faiss threads while building (0: all cores)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="which indexes (default all; HNSW at 1M takes ~6 min to build on a quiet 2-core machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain", action="store_true", help="rank by plain cosine (no calibration, no diffusion)")
    p.add_argument("--as-searched", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--diffusion-k", type=int, default=None, help="override the checkpoint's diffusion k (0: off)")
    p.add_argument("--checkpoint", default="default", help="whose retrieval settings to rank with")
    p.add_argument("--project", default=None, help="print memory and disk for these sizes (e.g. 1M,10M,100M,1B)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-queries", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-truth", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    print("command: " + " ".join(["python", "scripts/bench_index.py", *(argv if argv is not None else sys.argv[1:])]))
    if args.project:
        rows = project([parse_size(s) for s in args.project.split(",")])
        print("| pictures | index | RAM (GB) | disk (GB) |\n|---:|---|---:|---:|")
        for r in rows:
            print(f"| {r['n']:,} | {r['index']} | {r['ram_gb']:,} | {r['disk_gb']:,} |")
        return 0
    import faiss

    args.build_threads = args.build_threads if args.build_threads > 0 else faiss.omp_get_max_threads()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_index-") as tmp:
        for n in [parse_size(s) for s in args.sizes.split(",") if s.strip()]:
            rows.extend(run_size(n, args, Path(tmp)))
    try:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    print(json.dumps({"faiss": faiss.__version__, "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                      "load_average": load, "dim": args.dim, "queries": args.queries, "search_threads": args.threads,
                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
