"""Embedding throughput of the two `index` engines against the encoder's own ceiling, in one run.

The same N Caltech photos (evenly spaced over the sorted list, given to both engines as a
CSV manifest of absolute paths; nothing is copied) are embedded three ways:
  ceiling  `encoder.encode` over pre-decoded, preprocessed tensors, batches of --batch-size,
           the better of one batch at a time and two streams (see `ceilings`); measured
           before and after the engines, the higher counts (a shared machine's load drifts)
  default  `build_gallery` end to end (decode, encode, write the gallery), same batch size
  ray      `build_gallery_ray` end to end on a local Ray (start and stop of Ray included), or
           on the running cluster at --address
and the Ray gallery is compared with the default engine's: paths and labels, embeddings,
and the top 10 of --queries PACS sketches searched as the app searches (calibration,
diffusion). First, before any engine, the default engine's loop (in turns and in two
streams, for a CPU, and overlapped, for a GPU) and the ceiling alternate --rounds times over
--alt-photos of the photos: on a shared machine that ratio is the one to trust.

    nice -n 10 python scripts/bench_embed.py                 # 2,000 photos, every row
    nice -n 10 python scripts/bench_embed.py --check 200     # done-when check only (no ceiling)
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sbir_core.data.datasets import data_root
from sbir_core.data.images import load_image
from sbir_core.gallery.index import build_gallery
from sbir_core.gallery.embed_ray import build_gallery_ray
from sbir_core.gallery.encode import encode_all, encode_batches, streams_pool
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


def ceilings(encoder, inputs: tuple, batch_size: int) -> dict:
    """img/s of the encoder alone over pre-decoded tensors, the engines' batch size, two
    ways: torch's threads on one batch at a time ("one") and two streams of batches with half
    of them each ("two": the way the default engine encodes on a CPU). The ceiling is the better."""
    x, edges = inputs
    chunks = [(x[i:i + batch_size], None if edges is None else edges[i:i + batch_size])
              for i in range(0, len(x), batch_size)]

    def run(chunk: tuple) -> None:
        encoder.encode(chunk[0], "photo", edges=chunk[1]).normalized()

    for chunk in chunks[:3]:  # warm-up: the first batches after a pause run slower (allocation, caches)
        run(chunk)
    t = time.perf_counter()
    for chunk in chunks:
        run(chunk)
    one = len(x) / (time.perf_counter() - t)
    with streams_pool() as pool:
        list(pool.map(run, chunks[:4]))
        t = time.perf_counter()
        list(pool.map(run, chunks))
        two = len(x) / (time.perf_counter() - t)
    return {"one": one, "two": two}


def ceiling(encoder, inputs: tuple, batch_size: int) -> float:
    return max(ceilings(encoder, inputs, batch_size).values())


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
    over the same photos, alternated `rounds` times: a drifting load hits both alike. Each of
    the loop's ways is timed: in turns and in two streams (for a CPU), overlapped (for a GPU)."""
    from sbir_core.gallery.build import _Candidate
    from sbir_core.gallery.encode import WAYS, default_way

    todo = [_Candidate(p.name, p, p.parent.name, 0, 0) for p in photos]
    inputs = model_inputs(encoder, photos)
    ratios: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(rounds):
        c = ceiling(encoder, inputs, batch_size)
        for way in ratios:
            t = time.perf_counter()
            n = sum(len(b) for b, _ in encode_batches(encoder, "photo", todo, batch_size, [], way=way))
            ratios[way].append((n / (time.perf_counter() - t)) / c)
    out: dict = {"photos": len(photos), "rounds": rounds, "default_way": default_way(encoder)}
    for way, r in ratios.items():
        out[f"{way}_vs_ceiling"] = [round(x, 3) for x in r]
        out[f"{way}_vs_ceiling_median"] = round(float(np.median(r)), 3)
    return out


def busy_cpu_s() -> float:
    """CPU seconds spent so far by every process on this machine (Linux /proc/stat): what
    Ray's own processes cost, which no per-process timer sees."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def ray_fixed_costs(encoder, checkpoint: str, workers: int) -> dict:
    """What a build on a fresh local Ray pays whatever its size, in wall and all-process CPU
    seconds: starting Ray; starting `workers` actors that load the encoder as the engine's
    actors do (a new process each: Python, torch and the model); stopping Ray."""
    import logging

    import ray

    from sbir_core.gallery.embed_ray import _ShardActor
    from sbir_core.gallery.identity import _encoder_name

    out = {}
    t, c = time.perf_counter(), busy_cpu_s()

    def lap(name: str) -> None:
        nonlocal t, c
        out[name] = {"wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(busy_cpu_s() - c, 2)}
        t, c = time.perf_counter(), busy_cpu_s()

    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    lap("start_ray")
    actor = ray.remote(num_cpus=1)(_ShardActor)
    kwargs = dict(encoder_name=_encoder_name(encoder), checkpoint=checkpoint, encoder_id=str(encoder.encoder_id),
                  device="cpu", threads=1, fused=encoder.backbone.fused, modality="photo", store_tokens=True,
                  batch_size=16, folder=tempfile.gettempdir())
    actors = [actor.remote(**kwargs) for _ in range(workers)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    lap("start_actors")
    ray.shutdown()
    lap("stop_ray")
    out["total_wall_s"] = round(sum(v["wall_s"] for v in out.values()), 2)
    return out


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
                    help="alternate the ceiling and the default engine's loop over --alt-photos photos this often")
    ap.add_argument("--alt-photos", type=int, default=480,
                    help="photos in each alternated round (default 480: 30 batches, so that the two streams' "
                         "start and finish are a small part)")
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
        seen = [ceilings(encoder, inputs, args.batch_size)] if inputs else []
        if inputs and args.rounds:  # before any Ray starts in this process
            out["alternating"] = alternating(encoder, photos[::max(1, n // args.alt_photos)][:args.alt_photos],
                                            args.batch_size, args.rounds)
        phase: dict = {}

        def timed_encode_all(*a, **k):  # the default engine itself, apart from writing the gallery
            t0 = time.perf_counter()
            try:
                return encode_all(*a, **k)
            finally:
                phase["embed_s"] = time.perf_counter() - t0

        t = time.perf_counter()
        local, report = build_gallery(manifest, tmp / "local", encoder, batch_size=args.batch_size, progress=False,
                                      checkpoint=args.checkpoint, embed=timed_encode_all)
        wall_local = time.perf_counter() - t
        t = time.perf_counter()
        ray_g, _, engine = build_gallery_ray(manifest, tmp / "ray", encoder, batch_size=args.batch_size,
                                             progress=False, checkpoint=args.checkpoint, workers=args.workers,
                                             address=args.address)
        wall_ray = time.perf_counter() - t
        if inputs:  # measured again after the engines: the machine's load drifts; the higher one counts
            seen.append(ceilings(encoder, inputs, args.batch_size))
            out["ceiling_img_s_before_after"] = [{k: round(v, 1) for k, v in c.items()} for c in seen]
            out["ceiling_img_s"] = round(max(max(c.values()) for c in seen), 2)
        out.update({"embedded": report.total, "skipped": len(report.skipped),
                    "default_wall_s": round(wall_local, 2), "default_img_s": round(report.total / wall_local, 2),
                    "default_embed_s": round(phase["embed_s"], 2),
                    "default_embed_img_s": round(report.total / phase["embed_s"], 2),
                    "ray_workers": engine.workers, "ray_wall_s": round(wall_ray, 2),
                    "ray_img_s": round(report.total / wall_ray, 2),
                    "ray_wall_ratio": round(wall_ray / wall_local, 3)})
        if not args.address:
            out["ray_fixed_costs"] = ray_fixed_costs(encoder, args.checkpoint, engine.workers)
            # the most Ray may add to the default engine's wall time under the 1.3x bar
            out["ray_budget_at_1.3x_s"] = round(0.3 * wall_local, 2)
        if "ceiling_img_s" in out:
            out["default_vs_ceiling"] = round(out["default_img_s"] / out["ceiling_img_s"], 3)  # gallery written too
            out["default_embed_vs_ceiling"] = round(out["default_embed_img_s"] / out["ceiling_img_s"], 3)
            out["gflop_per_photo"] = round(gflop_per_photo(encoder, inputs), 3)
            out["ceiling_gflop_s"] = round(out["gflop_per_photo"] * out["ceiling_img_s"], 1)
        sketches = sorted((data / "pacs" / "sketch").glob("*/*.png"))
        sketches = [sketches[i * len(sketches) // args.queries] for i in range(args.queries)]
        queries = [encoder.encode_sketch(load_image(p)) for p in sketches]
        out["equality"] = compare(local, ray_g, queries)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
