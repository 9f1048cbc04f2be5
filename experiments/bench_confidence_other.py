"""How sure the page is for photos and typed words (the doodle figures come from
`python -m sbir_core eval --absent-queries`), searched through the app's service with the
shipped checkpoint and gallery.

- photos: up to --per Caltech photos of each Caltech class, split by whether the default
  gallery holds the class (its QuickDraw name, `eval.product`);
- words: the default gallery's 68 class names typed as queries (present), and the names
  of QuickDraw classes it lacks (absent).

    python experiments/bench_confidence_other.py --json

Finding: photos of gallery classes are called absent twice as often as drawings (22%), typed names of missing classes 96% absent.
Backs: docs/BENCHMARKS.md §10 (photos and typed words, the confidence notice).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from sbir_core.data.datasets import DATA_HELP, data_root
from sbir_core.data.datasets import caltech_class, image_folder, load_splits
from sbir_core.eval.product import DEFAULT_GALLERY, product_classes
from sbir_core.gallery.confidence import class_key
from sbir_core.service import RetrievalService



def _summary(rows: list) -> dict:
    """rows: (level, first result right)."""
    n = max(len(rows), 1)
    sure = [r for lv, r in rows if lv == "sure"]
    return {"n": len(rows), "levels": {k: round(v / n, 3) for k, v in sorted(Counter(lv for lv, _ in rows).items())},
            "first_right": round(sum(r for _, r in rows) / n, 3),
            "sure_precision": round(sum(sure) / len(sure), 3) if sure else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--per", type=int, default=4, help="photos per Caltech class")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.data = data_root(args.data)
    data = Path(args.data)
    svc = RetrievalService(gallery="default")
    gallery_keys = {class_key(p.name) for p in DEFAULT_GALLERY.iterdir() if p.is_dir()}
    in_gallery = {class_key(c) for c in product_classes(data)} | gallery_keys
    splits = load_splits(data)
    by: dict = {}
    for it in image_folder(data / "caltech101"):
        by.setdefault(it.label, []).append(it)
    photos = {"present": [], "absent": []}
    for folder, items in sorted(by.items()):
        key = class_key(caltech_class(folder, splits))
        for it in items[-args.per:]:  # the last ones: training capped large classes by even spacing
            out = svc.search_photo(it.load(), 12)
            right = bool(out.hits) and class_key(out.hits[0].label) == key
            photos["present" if key in in_gallery else "absent"].append((out.level, right))
    words = {"present": [], "absent": []}
    for name in sorted(gallery_keys):
        out = svc.search_text(name, 12)
        words["present"].append((out.level, bool(out.hits) and class_key(out.hits[0].label) == name))
    for p in sorted((data / "quickdraw").glob("*.ndjson")):
        if class_key(p.stem) not in in_gallery:
            words["absent"].append((svc.search_text(p.stem, 12).level, False))
    report = {"photos": {k: _summary(v) for k, v in photos.items()},
              "words": {k: _summary(v) for k, v in words.items()}}
    print(json.dumps(report, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
