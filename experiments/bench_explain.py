"""Timings of the explanation and re-ranking paths (median of repeated runs).

    python experiments/bench_explain.py [--sketch S --photo P] [--repeats 15] [--threads 1]

Reports, per step, the median wall time and the median CPU time of this process
(on a shared, busy CPU the wall time includes waiting for a core; the CPU time is
what the step costs):

- encode: preprocessing both images + one backbone pass over the pair;
- explain (tokens given): similarity, matching, heatmap, synthesis assignment;
- render correspondences + synthesis (the two PNG images, as PIL);
- correspondences + synthesis total (explain + both renders; target < 300 ms);
- explain with the relation model's cross-attended tokens;
- re-rank top-50: relation scores for one query against 50 candidates + mixing
  (target < 150 ms).

Without --sketch/--photo a synthetic drawing and photo are used (no data needed).

Finding: a timing, no finding: correspondences + synthesis 92-107 ms, re-rank top 50 58-90 ms (targets 300 / 150).
Backs: docs/BENCHMARKS.md B5 "Speed (previous release)".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


from sbir_core.explain import correspondence as E
from sbir_core.data.images import load_image
from sbir_core.models import relation as R
from sbir_core.models.encoders import create_encoder


def timed(fn, repeats: int, warmup: int = 2):
    for _ in range(warmup):
        out = fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return out, 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def synthetic_pair():
    sk = Image.new("RGB", (300, 300), "white")
    d = ImageDraw.Draw(sk)
    d.rectangle([60, 120, 240, 260], outline="black", width=5)
    d.line([(50, 125), (150, 40), (250, 125)], fill="black", width=5)
    d.ellipse([100, 160, 140, 200], outline="black", width=4)
    rng = np.random.default_rng(0)
    ph = np.zeros((260, 320, 3), np.uint8)
    ph[:] = (90, 140, 200)
    ph[130:] = (60, 150, 70)
    ph[80:200, 60:200] = (180, 60, 40)
    ph = np.clip(ph.astype(int) + rng.integers(-20, 20, size=ph.shape), 0, 255).astype(np.uint8)
    return sk, Image.fromarray(ph)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sketch")
    ap.add_argument("--photo")
    ap.add_argument("--relation", default=None, help="relation model (default checkpoints/relation.safetensors "
                                                     "if present, else an untrained one: same cost)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    enc = create_encoder(checkpoint="none")
    if args.sketch and args.photo:
        sketch, photo = load_image(args.sketch), load_image(args.photo)
    else:
        sketch, photo = synthetic_pair()
    rel_path = Path(args.relation) if args.relation else R.DEFAULT_RELATION
    if rel_path.is_file():
        relation, rel_name = R.load_relation(rel_path), str(rel_path)
    else:
        relation, rel_name = R.RelationModel(enc.backbone.token_dim, grid=(14, 14)).eval(), "untrained (same cost)"

    rows = []

    def add(name, wall, cpu, target=None):
        rows.append({"step": name, "wall_ms": round(wall, 1), "cpu_ms": round(cpu, 1), "target_ms": target})

    def encode():
        sk, ph = E.prepare_pair(enc, sketch, photo)
        return (sk, ph) + E.encode_pair_tokens(enc, sk, ph)

    (sk, ph, st, pt, grid), w, c = timed(encode, args.repeats)
    add("encode pair (preprocess + backbone)", w, c)
    ink = R.ink_cells(sk, grid).reshape(-1)

    ex, w1, c1 = timed(lambda: E.explain_tokens(sk, ph, st, pt, grid, sketch_ink=ink), args.repeats)
    add("explain (tokens given)", w1, c1)
    _, w2, c2 = timed(lambda: (ex.render_correspondences(), ex.render_synthesis()), args.repeats)
    add("render correspondences + synthesis", w2, c2)

    def total():
        e = E.explain_tokens(sk, ph, st, pt, grid, sketch_ink=ink)
        return e.render_correspondences(), e.render_synthesis()

    _, w3, c3 = timed(total, args.repeats)
    add("correspondences + synthesis total (tokens given)", w3, c3, 300)
    _, w4, c4 = timed(lambda: ex.render_heatmap(), args.repeats)
    add("render heatmap", w4, c4)
    _, w5, c5 = timed(lambda: E.explain_tokens(sk, ph, st, pt, grid, sketch_ink=ink, relation=relation), args.repeats)
    add("explain with relation tokens (tokens given)", w5, c5)

    rng = np.random.default_rng(0)
    cand = (pt.numpy()[None] + 0.1 * rng.normal(size=(args.k,) + tuple(pt.shape))).astype(np.float16)
    base = np.sort(rng.random(args.k).astype(np.float32))[::-1]
    q = st.numpy()
    _, w6, c6 = timed(lambda: R.rerank(relation, q, ink, cand, base, alpha=0.5), args.repeats)
    add(f"re-rank top-{args.k} (relation scores + mixing)", w6, c6, 150)

    print(f"torch threads {torch.get_num_threads()}, relation model: {rel_name}, inked cells {int(ink.sum())}/{ink.size}")
    print(f"{'step':52s} {'wall ms':>9s} {'cpu ms':>9s} {'target':>7s}")
    for r in rows:
        tgt = f"<{r['target_ms']}" if r["target_ms"] else ""
        print(f"{r['step']:52s} {r['wall_ms']:9.1f} {r['cpu_ms']:9.1f} {tgt:>7s}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
