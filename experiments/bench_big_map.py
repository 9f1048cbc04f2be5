#!/usr/bin/env python
"""The map and a clicked row's rank on a big gallery: what a visitor's first map and a map
click cost once the gallery is large (issue 33 follow-up).

Builds a synthetic IVF-PQ gallery of N clustered unit vectors (N/500 clusters, each a
class), saves it, and in a fresh process opens it memory-mapped as the app does, then
times: fitting the map (a class-stratified sample of `MAP_MAX_POINTS` rows), drawing it
with a result inside and one outside the sample, and `rank_of` for a row in the shortlist
and one far from the query; with the process's RSS after each step. With --diffusion, then
the gallery diffusion a build adds at the shipped k = 3 (every picture's neighbours through
the index), in a fresh process.

    nice -n 10 python experiments/bench_big_map.py --size 1M
    timeout 1800 python experiments/bench_big_map.py --size 1M --diffusion

Finding: at 1M pictures the sampled map fits once in ~12 s and the process stays under the
issue's 600 MB (433 MB at the end); a clicked row's rank reads the shortlist only (4-8 ms).
Backs: docs/BENCHMARKS.md, "The map and a map click on a million-picture gallery".
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sbir_core.gallery.index import Gallery


def rss_mb() -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024


def make(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, dim), class per row): clusters around unit centres, cosine ~0.8 to their centre."""
    rng = np.random.default_rng(seed)
    k = max(10, n // 500)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, k, n)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):  # in blocks: no (n, dim) float64 temporaries
        b = slice(s, min(n, s + 100_000))
        x[b] = centres[y[b]] + rng.standard_normal((len(x[b]), dim), dtype=np.float32) * np.float32(0.75 / np.sqrt(dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def child(folder: Path) -> dict:
    from sbir_core.explain.embedding_map import gallery_map

    out = {"rss_open_mb": 0.0}
    g = Gallery.load(folder)
    out.update(n=len(g), mmap=isinstance(g.raw_embeddings, np.memmap), rss_open_mb=round(rss_mb(), 1))
    t = time.perf_counter()
    m = gallery_map(g, cache=folder / "map")
    out.update(map_fit_s=round(time.perf_counter() - t, 1), map_points=len(m), rss_after_map_mb=round(rss_mb(), 1))
    t = time.perf_counter()
    gallery_map(g, cache=folder / "map")
    out.update(map_reload_s=round(time.perf_counter() - t, 2))
    q = np.asarray(g.raw_embeddings[int(m.rows[0]) + 1], np.float32)  # a row outside the sample as the query
    _, top = g.knn(q[None], 10)
    t = time.perf_counter()
    img = m.render(query_xy=m.place_by_results(top[0]), highlight=top[0], size=(640, 560), title="map")
    out.update(map_render_s=round(time.perf_counter() - t, 2), sample_rows_in_top10=int((m.points_of(top[0]) >= 0).sum()),
               rendered=list(img.size))
    for name, row in (("in_shortlist", int(top[0, 3])), ("far", int(np.argmin(g.raw_embeddings[:5000] @ q)))):
        t = time.perf_counter()
        r = g.rank_of(q, row)
        out[f"rank_of_{name}_ms"] = round((time.perf_counter() - t) * 1000, 1)
        out[f"rank_of_{name}"] = r
    out["rss_end_mb"] = round(rss_mb(), 1)
    return out


def child_diffusion(folder: Path) -> dict:
    """What `index` adds to a big build for gallery diffusion at the shipped k = 3: every
    picture's neighbours through the index (N searches in chunks, never N x N), on the
    memory-mapped gallery as `build_gallery` opens it."""
    g = Gallery.load(folder)
    t = time.perf_counter()
    g.set_diffusion(3)
    return {"diffusion_k3_build_s": round(time.perf_counter() - t, 1), "rss_after_diffusion_mb": round(rss_mb(), 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1M", help="gallery size (e.g. 100k, 1M)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--diffusion", action="store_true",
                   help="also time the gallery diffusion a build adds (over 28 min at 1M on 2 cores)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-diffusion", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child)))
        return 0
    if a.child_diffusion:
        print(json.dumps(child_diffusion(a.child_diffusion)))
        return 0
    s = a.size.lower()
    n = int(float(s.rstrip("km")) * {"k": 1_000, "m": 1_000_000}.get(s[-1], 1))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        x, y = make(n, a.dim, 0)
        g = Gallery.from_embeddings(x, labels=[f"class{c}" for c in y], index_type="ivfpq")
        g.save(Path(tmp) / "g")
        del g, x
        print(f"built {n:,} x {a.dim} IVF-PQ in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        for step in ("--child",) + (("--child-diffusion",) if a.diffusion else ()):
            res = subprocess.run([sys.executable, __file__, step, str(Path(tmp) / "g")], check=True,
                                 capture_output=True, text=True)
            print(res.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
