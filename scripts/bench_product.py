"""Product benchmark: doodles the model never trained on, searched against the shipped
default gallery exactly as the app searches it.

Queries (QuickDraw strokes from ../shared/data):
- zero-shot: every doodle of the gallery classes reserved by the `pacs`/`doodle` splits
  (no training run may use these classes on any side);
- seen: the held-out doodles (the last 5 of each class, `data.HELDOUT_DOODLES`) of the
  other gallery classes; training never sees them.

Gallery: galleries/default/images (399 clip-art pictures, 68 classes), embedded with the
encoder under test and searched with `Gallery` (the class the app and `search` use):
as the app searches (the checkpoint's gallery diffusion and seen-class calibration),
without diffusion, and by the embedding alone (neither).

    python scripts/bench_product.py --data ../shared/data --json
    python scripts/bench_product.py --data ../shared/data --checkpoint none   # raw backbone
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent

from sbir_core.data.datasets import image_folder  # noqa: E402
from sbir_core.eval.product import DEFAULT_GALLERY, product_queries  # noqa: E402
from sbir_core.models.encoders import create_encoder  # noqa: E402
from sbir_core.gallery.calibration import SeenCalibration  # noqa: E402
from sbir_core.gallery.index import Gallery  # noqa: E402
from sbir_core.eval.metrics import retrieval_report  # noqa: E402

GALLERY = DEFAULT_GALLERY
KEYS = ("hit@1", "hit@5", "P@5", "mAP@all")
# (name, gallery diffusion, seen-class calibration), each as the checkpoint prescribes
RANKINGS = (("as the app searches", True, True), ("no diffusion", False, True), ("embedding alone", False, False))


def run(data: Path, checkpoint: str) -> dict:
    return run_encoder(create_encoder(checkpoint=checkpoint), data)


def run_encoder(enc, data: Path, per_query: bool = False) -> dict:
    """The benchmark for a loaded encoder; `per_query` keeps each query's figures under
    row[ranking]["per_query"] (numpy arrays, for paired comparisons)."""
    photos = image_folder(GALLERY)
    t0 = time.perf_counter()
    g = enc.encode_photos([it.load() for it in photos]).normalized()
    g_labels = [it.label for it in photos]
    cal = SeenCalibration.from_encoder(enc)
    result = {"encoder": enc.encoder_id, "gallery": {"images": len(photos), "classes": len(set(g_labels))},
              "diffusion_k": enc.diffusion_k, "seen_calibration": cal.setting if cal else None}
    for group, items in product_queries(data).items():
        q = enc.encode_sketches([it.load() for it in items]).normalized()
        ql = [it.label for it in items]
        row = {"n_queries": len(items), "classes": sorted(set(ql))}
        for name, k, c in RANKINGS:
            gal = Gallery.from_embeddings(g, labels=g_labels, diffusion_k=enc.diffusion_k if k else 0,
                                          calibration=cal if c else None)
            rep = retrieval_report(gal.score_all(q), ql, g_labels, per_query=per_query)
            row[name] = {key: round(rep[key], 4) for key in KEYS}
            if per_query:
                row[name]["per_query"] = {key: rep["per_query"][key] for key in KEYS}
            row[name]["per_class_hit@5"] = {c: round(v["hit@5"], 3) for c, v in rep["per_class"].items()}
        result[group] = row
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--checkpoint", default="default", help="'default', 'none' (raw backbone) or a path")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run(Path(args.data), args.checkpoint)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"{r['encoder']}  gallery {r['gallery']}  diffusion k={r['diffusion_k']}  "
          f"seen-class calibration {r['seen_calibration']}")
    for group in ("zero-shot", "seen"):
        for name, _, _ in RANKINGS:
            m = r[group][name]
            print(f"{group:<10} {name:<20} n={r[group]['n_queries']:<5}" + "  ".join(f"{k} {m[k]:.3f}" for k in KEYS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
