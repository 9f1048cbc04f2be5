"""Embedding throughput of the two `index` engines against the encoder's own ceiling, in one run.

The same N Caltech photos (evenly spaced over the sorted list, given to both engines as a
CSV manifest of absolute paths; nothing is copied) are embedded three ways:
  ceiling  `encoder.encode` over pre-decoded, preprocessed tensors, batches of --batch-size
           (before and after the engines; the higher counts, as the load of a shared machine drifts)
  default  `build_gallery` end to end (decode, encode, write the gallery), same batch size
  ray      `build_gallery_ray` end to end on a local Ray (start and stop of Ray included), or
           on the running cluster at --address
and the Ray gallery is compared with the default engine's: paths and labels, embeddings,
and the top 10 of --queries PACS sketches searched as the app searches (calibration, diffusion). Last, the
default engine's loop (in turns, as on a CPU, and overlapped, as on a GPU) and the ceiling
alternate --rounds times over 192 of the photos: on a shared machine that ratio is the one to trust.

    nice -n 10 python scripts/bench_embed.py                 # 2,000 photos, every row
    nice -n 10 python scripts/bench_embed.py --check 200     # done-when check only (no ceiling)
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sbir_core.data.datasets import data_root
from sbir_core.data.images import load_image
from sbir_core.gallery.index import build_gallery
from sbir_core.gallery.embed_ray import build_gallery_ray
from sbir_core.gallery.encode import encode_batches
from sbir_core.models.encoders import create_encoder


def pick_photos(data: Path, n: int) -> list[Path]:
    photos = sorted((data / "caltech101").glob("*/*.jpg"))
    if len(photos) < n:
        raise SystemExit(f"only {len(photos)} Caltech photos under {data}")
    return [photos[i * len(photos) // n] for i in range(n)]


def model_inputs(encoder, photos: list[Path]) -> tuple:
    """The photos decoded and preprocessed as the engines do it (and their edge maps if used)."""
    x = torch.stack([encoder.photo_transform(load_image(p)) for p in photos])
    edges = torch.stack([encoder.edge_transform(load_image(p)) for p in photos]) if encoder.photo_uses_edges else None
    return x, edges


def ceiling(encoder, inputs: tuple, batch_size: int) -> float:
    """img/s of the encoder alone over pre-decoded tensors, the engines' batch size."""
    x, edges = inputs
    for i in range(3):  # warm-up: the first batches after a pause run slower (allocation, caches)
        encoder.encode(x[i * batch_size:(i + 1) * batch_size], "photo",
                       edges=None if edges is None else edges[i * batch_size:(i + 1) * batch_size])
    t = time.perf_counter()
    for i in range(0, len(x), batch_size):
        out = encoder.encode(x[i:i + batch_size], "photo", edges=None if edges is None else edges[i:i + batch_size])
        out.normalized()
    return len(x) / (time.perf_counter() - t)


def big_jpeg_decode_ms(encoder, photo: Path, tmp: Path, repeats: int = 7) -> dict:
    """Decode and preprocess time of one 12-megapixel JPEG (a Caltech photo enlarged to
    4000 x 3000, quality 90, written to `tmp`), in full and at the reduced scale the engines
    use for photos (`load_image(at_least=...)`): medians of `repeats`."""
    from PIL import Image

    big = tmp / "12mp.jpg"
    load_image(photo).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(big, quality=90)
    out = {}
    for name, at_least in (("full", None), ("reduced", encoder.image_size)):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            encoder.photo_transform(load_image(big, at_least=at_least))
            times.append((time.perf_counter() - t) * 1000)
        out[name] = round(float(np.median(times)), 1)
    return out


def gflop_per_photo(encoder, inputs: tuple) -> float:
    """The encoder's arithmetic per photo (a multiply-add counts 2), the basis of SCALING.md's
    per-GPU estimate."""
    from torch.utils.flop_counter import FlopCounterMode

    x, edges = inputs
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder.encode(x[:8], "photo", edges=None if edges is None else edges[:8])
    return counter.get_total_flops() / 8 / 1e9


def alternating(encoder, photos: list[Path], batch_size: int, rounds: int) -> dict:
    """The default engine's loop (`encode_batches`: decode, preprocess, encode) and the ceiling
    over the same photos, alternated `rounds` times: a drifting load hits both alike. Both of
    the loop's ways are timed: in turns (what a CPU encoder gets) and overlapped (a thread
    decodes the next batch while torch encodes: what a GPU encoder gets)."""
    from sbir_core.gallery.build import _Candidate

    todo = [_Candidate(p.name, p, p.parent.name, 0, 0) for p in photos]
    inputs = model_inputs(encoder, photos)
    ratios: dict[str, list[float]] = {"turns": [], "overlap": []}
    for _ in range(rounds):
        c = ceiling(encoder, inputs, batch_size)
        for way in ratios:
            t = time.perf_counter()
            n = sum(len(b) for b, _ in encode_batches(encoder, "photo", todo, batch_size, [],
                                                      overlap=way == "overlap"))
            ratios[way].append((n / (time.perf_counter() - t)) / c)
    out: dict = {"photos": len(photos), "rounds": rounds}
    for way, r in ratios.items():
        out[f"{way}_vs_ceiling"] = [round(x, 3) for x in r]
        out[f"{way}_vs_ceiling_median"] = round(float(np.median(r)), 3)
    return out


def ray_start_stop_s() -> float:
    """Seconds to start a local Ray and stop it again, with no work: what every build on a
    fresh local Ray pays before and after its embedding."""
    import logging

    import ray

    t = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray.shutdown()
    return time.perf_counter() - t


def compare(a, b, queries: list[np.ndarray]) -> dict:
    top = [[r.path for r in a.search(q, 10)] == [r.path for r in b.search(q, 10)] for q in queries]
    return {"paths_identical": a.paths == b.paths, "labels_identical": a.labels == b.labels,
            "max_abs_embedding_diff": float(np.abs(a.raw_embeddings - b.raw_embeddings).max()),
            "embeddings_within_1e-4": bool(np.abs(a.raw_embeddings - b.raw_embeddings).max() <= 1e-4),
            "queries": len(queries), "top10_identical": int(sum(top))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="the shared data folder (default $SBIR_DATA or ../shared/data)")
    ap.add_argument("--n", type=int, default=2000, help="photos (default 2000)")
    ap.add_argument("--check", type=int, default=None, metavar="N",
                    help="only the done-when check on N photos: default against Ray, no ceiling")
    ap.add_argument("--queries", type=int, default=50, help="PACS sketches searched in both galleries")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="Ray actors (default: the engine's, one per CPU)")
    ap.add_argument("--address", default=None,
                    help="a running Ray cluster (`ray start --head` first): Ray's start and stop are then not timed")
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternate the ceiling and the default engine's loop over 192 of the photos this often")
    args = ap.parse_args()
    data = data_root(args.data)
    n = args.check or args.n
    photos = pick_photos(data, n)
    encoder = create_encoder(checkpoint=args.checkpoint)
    encoder.backbone.fuse_for_inference()  # as `index` does: the ceiling and both engines run the same model
    out: dict = {"photos": n, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
                 "ray": args.address or "started and stopped by each build",
                 "checkpoint": args.checkpoint, "batch_norm_folded": encoder.backbone.fused}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = tmp / "photos.csv"
        manifest.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in photos))
        t = time.perf_counter()
        inputs = None if args.check else model_inputs(encoder, photos)
        if inputs:  # decoding and preprocessing alone, in this one thread: what a GPU node must feed
            out["decode_ms_per_photo"] = round((time.perf_counter() - t) / n * 1000, 2)
            out["decode_ms_12mp_jpeg"] = big_jpeg_decode_ms(encoder, photos[0], tmp)
        ceilings = [ceiling(encoder, inputs, args.batch_size)] if inputs else []
        t = time.perf_counter()
        local, report = build_gallery(manifest, tmp / "local", encoder, batch_size=args.batch_size, progress=False,
                                      checkpoint=args.checkpoint)
        wall_local = time.perf_counter() - t
        t = time.perf_counter()
        ray_g, _, engine = build_gallery_ray(manifest, tmp / "ray", encoder, batch_size=args.batch_size,
                                             progress=False, checkpoint=args.checkpoint, workers=args.workers,
                                             address=args.address)
        wall_ray = time.perf_counter() - t
        if inputs:  # measured again after the engines: the machine's load drifts; the higher one counts
            ceilings.append(ceiling(encoder, inputs, args.batch_size))
            out["ceiling_img_s_before_after"] = [round(c, 2) for c in ceilings]
            out["ceiling_img_s"] = round(max(ceilings), 2)
        out.update({"embedded": report.total, "skipped": len(report.skipped),
                    "default_wall_s": round(wall_local, 2), "default_img_s": round(report.total / wall_local, 2),
                    "ray_workers": engine.workers, "ray_wall_s": round(wall_ray, 2),
                    "ray_img_s": round(report.total / wall_ray, 2),
                    "ray_wall_ratio": round(wall_ray / wall_local, 3)})
        if not args.address:
            out["ray_start_stop_s"] = round(ray_start_stop_s(), 2)
        if "ceiling_img_s" in out:
            out["default_vs_ceiling"] = round(out["default_img_s"] / out["ceiling_img_s"], 3)
            out["gflop_per_photo"] = round(gflop_per_photo(encoder, inputs), 3)
            out["ceiling_gflop_s"] = round(out["gflop_per_photo"] * out["ceiling_img_s"], 1)
        sketches = sorted((data / "pacs" / "sketch").glob("*/*.png"))
        sketches = [sketches[i * len(sketches) // args.queries] for i in range(args.queries)]
        queries = [encoder.encode_sketch(load_image(p)) for p in sketches]
        out["equality"] = compare(local, ray_g, queries)
    if not args.check and args.rounds:
        out["alternating"] = alternating(encoder, photos[::max(1, n // 192)][:192], args.batch_size, args.rounds)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
