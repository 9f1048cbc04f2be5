#!/usr/bin/env python3
"""What gallery diffusion does to each part of the results page: the first five results,
the rest of the page, and the whole ranking.

Diffusion (DBA + alpha query expansion, `sbir_core.gallery.diffusion`) ranks a query's
neighbourhood rather than the query alone. That raises precision down the list but can
push out a query's one correct match, so the first row gets worse for the queries that
had only one. Searches therefore keep the first `PLAIN_HEAD` (5) results plain and let
diffusion order what follows; this script measures that against plain search and pure
diffusion (no plain head) on the same embeddings.

    python experiments/bench_diffusion.py [--checkpoint default] [--json out.json]

Sets: `pacs`, `doodle` and `pacs --generalized` (as `eval` builds them) and the product
benchmark (as `bench_product.py`), each ranked with the checkpoint's seen-class calibration. Columns: hit@5, P@5, P@6-12 (precision over results 6-12, the rest
of the app's 12 results), P@13-24 (a second page) and mAP@all. A sweep on the
benchmarks, for documentation: the shipped k was chosen on held-out training classes
(the checkpoint's `retrieval.validation`).

Finding: diffusion after a plain first five keeps hit@5 and raises P@6-12 and mAP@all (pacs mAP@all 0.404 -> 0.465 at k=3).
Backs: docs/BENCHMARKS.md §3, "What each retrieval setting buys".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sbir_core.data.datasets import DATA_HELP, data_root, benchmark, image_folder, training_items
from sbir_core.eval.evaluate import embed_items
from sbir_core.eval.metrics import retrieval_report
from sbir_core.eval.product import DEFAULT_GALLERY, product_queries
from sbir_core.gallery.calibration import SeenCalibration
from sbir_core.gallery.index import PLAIN_HEAD, Gallery
from sbir_core.models.encoders import create_encoder

KS = (3, 5, 10, 20)


def precision_between(scores: np.ndarray, q_labels, g_labels, first: int, last: int) -> float:
    """Precision over ranks first..last (1-based, inclusive)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, first - 1:last]
    return float((np.asarray(g_labels)[order] == np.asarray(q_labels)[:, None]).mean())


def rows_for(q: np.ndarray, ql: list, g: np.ndarray, gl: list, calibration=None) -> list[dict]:
    out = []
    settings = [("plain", 0, PLAIN_HEAD)]
    settings += [(f"k={k}, first {PLAIN_HEAD} plain", k, PLAIN_HEAD) for k in KS]
    settings += [(f"k={k}, pure diffusion", k, 0) for k in KS]
    for name, k, head in settings:
        gal = Gallery.from_embeddings(g, labels=gl, diffusion_k=k, calibration=calibration)
        gal.plain_head = head
        s = gal.score_all(q)
        r = retrieval_report(s, ql, gl)
        out.append({"ranking": name, "hit@5": round(r["hit@5"], 3), "P@5": round(r["P@5"], 3),
                    "P@6-12": round(precision_between(s, ql, gl, 6, 12), 3),
                    "P@13-24": round(precision_between(s, ql, gl, 13, 24), 3),
                    "mAP@all": round(r["mAP@all"], 3)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.data = data_root(args.data)
    data = Path(args.data)
    enc = create_encoder(checkpoint=args.checkpoint)
    cal = SeenCalibration.from_encoder(enc)  # every row ranks with the checkpoint's calibration
    seen_photos = [i for i in training_items(data, hold_out_doodles=False) if i.modality == "photo"]
    result = {}
    for split in ("pacs", "doodle", "pacs --generalized"):
        queries, gallery = benchmark(data, split.split()[0])
        if split.endswith("--generalized"):
            gallery = gallery + seen_photos
        q, qok = embed_items(enc, queries, "sketch")
        g, gok = embed_items(enc, gallery, "photo")
        result[split] = rows_for(q[qok], [i.label for i, k in zip(queries, qok) if k],
                                 g[gok], [i.label for i, k in zip(gallery, gok) if k], cal)
    photos = image_folder(DEFAULT_GALLERY)
    g = enc.encode_photos([it.load() for it in photos]).normalized()
    for group, items in product_queries(data).items():
        q = enc.encode_sketches([it.load() for it in items]).normalized()
        result[f"product {group}"] = rows_for(q, [it.label for it in items], g, [it.label for it in photos], cal)
    print(f"{enc.encoder_id}; the checkpoint's diffusion k = {enc.retrieval.diffusion_k}; "
          f"seen-class calibration {cal.setting if cal else None}\n")
    print("| queries | ranking | hit@5 | P@5 | P@6-12 | P@13-24 | mAP@all |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in result.items():
        for r in rows:
            print(f"| {name} | {r['ranking']} | {r['hit@5']:.3f} | {r['P@5']:.3f} | {r['P@6-12']:.3f} | "
                  f"{r['P@13-24']:.3f} | {r['mAP@all']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
