"""Encoder speed on this CPU: batch throughput (images/s) and single-sketch latency.

    python experiments/bench_encoder.py [--encoder efficientnet-lite0] [--checkpoint default] [--repeats 7]

Reports medians over repeats; the baseline is the raw backbone in the same process,
so the ratio shows what the trained heads (and photo edge fusion) cost.

Finding: a timing, no finding: the table in §6 is its output on a quiet machine.
Backs: docs/BENCHMARKS.md §6 "Speed" and B5 (encoder throughput and single-sketch latency).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from sbir_core.models.encoders import create_encoder

STROKES = [[[20, 200, 200, 20, 20], [40, 40, 200, 200, 40]], [[20, 110, 200], [40, -40, 40]]]


def photos(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
        ImageDraw.Draw(img).ellipse((60, 40, 260, 200), fill=(200, 40, 40))
        out.append(img)
    return out


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the app serves with 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    imgs = photos(args.batch)
    rows = []
    for label, ckpt in (("raw backbone (baseline)", "none"), (f"checkpoint {args.checkpoint}", args.checkpoint)):
        enc = create_encoder(args.encoder, checkpoint=ckpt)
        t_batch = median_time(lambda: enc.encode_photos(imgs, batch_size=args.batch), args.repeats)
        t_sketch = median_time(lambda: enc.encode_sketches([STROKES]), args.repeats * 3)
        rows.append((label, args.batch / t_batch, t_sketch * 1000))
    base = rows[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, medians of {args.repeats}")
    print("| encoder | photos/s (batch) | single sketch latency (ms) | latency vs baseline |")
    print("|---|---|---|---|")
    for label, ips, ms in rows:
        print(f"| {label} | {ips:.1f} | {ms:.1f} | {ms / base[2]:.2f}x |")


if __name__ == "__main__":
    main()
