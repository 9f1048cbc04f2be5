#!/usr/bin/env python3
"""Does test-time augmentation of gallery pictures pay? Gallery embeddings are made once, at
index time, so averaging a picture with its mirror image (and with a padded copy, the
object smaller in the frame) would cost nothing per search.

    python experiments/bench_gallery_tta.py [--checkpoint PATH]

Product benchmark (as `bench_product.py`, no diffusion) and `pacs` (as `eval`), each with
the gallery embedded as is, flip-averaged, and flip+pad-averaged; queries unchanged.

Finding: flip or flip+pad averaging of gallery pictures stays within a few queries of doing nothing; not shipped.
Backs: docs/EXPERIMENTS.md §5, "Gallery test-time augmentation".
"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageOps

from sbir_core.data.datasets import DATA_HELP, data_root, benchmark, image_folder
from sbir_core.eval.evaluate import embed_items
from sbir_core.eval.metrics import retrieval_report
from sbir_core.eval.product import DEFAULT_GALLERY, product_queries
from sbir_core.gallery.index import Gallery
from sbir_core.models.encoders import create_encoder

KEYS = ("hit@1", "hit@5", "P@5", "mAP@all")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _padded(im: Image.Image, fill: float = 0.85) -> Image.Image:
    im = im.convert("RGB")
    side = int(max(im.size) / fill)
    out = Image.new("RGB", (side, side), (255, 255, 255))
    out.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return out


def gallery_variants(enc, images: list) -> dict[str, np.ndarray]:
    plain = enc.encode_photos(images).normalized()
    mirror = enc.encode_photos([ImageOps.mirror(i.convert("RGB")) for i in images]).normalized()
    pad = enc.encode_photos([_padded(i) for i in images]).normalized()
    return {"as is": plain, "flip": _unit(plain + mirror), "flip+pad": _unit(plain + mirror + pad)}


def _row(q: np.ndarray, ql: list, g: np.ndarray, gl: list) -> str:
    r = retrieval_report(Gallery.from_embeddings(g, labels=gl, diffusion_k=0).score_all(q), ql, gl)
    return " | ".join(f"{r[k]:.3f}" for k in KEYS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--checkpoint", default="default")
    args = ap.parse_args()
    args.data = data_root(args.data)
    enc = create_encoder(checkpoint=args.checkpoint)
    print("| queries | gallery | " + " | ".join(KEYS) + " |\n|---|---|" + "---|" * len(KEYS))
    photos = image_folder(DEFAULT_GALLERY)
    gl = [i.label for i in photos]
    variants = gallery_variants(enc, [i.load() for i in photos])
    for group, items in product_queries(args.data).items():
        q = enc.encode_sketches([i.load() for i in items]).normalized()
        for name, g in variants.items():
            print(f"| product {group} | {name} | {_row(q, [i.label for i in items], g, gl)} |")
    queries, gallery = benchmark(args.data, "pacs")
    q, _ = embed_items(enc, queries, "sketch")
    gl = [i.label for i in gallery]
    for name, g in gallery_variants(enc, [i.load() for i in gallery]).items():
        print(f"| pacs | {name} | {_row(q, [i.label for i in queries], g, gl)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
