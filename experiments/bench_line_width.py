#!/usr/bin/env python3
"""Which line width should a stroke query be drawn with? Strokes (the canvas, QuickDraw) are
rendered at the model's input size with `preprocess.TARGET_LINE_WIDTH` (3 px); training
draws them with 2-5 px (`preprocess.LINE_WIDTH_RANGE`). This draws every stroke query with
each width in turn and scores:

- the selection set of `finetune` (held-out training classes, and held-out doodles of
  training classes: what may choose a setting; `score` as in `Finetuner.validate`);
- the product benchmark and the `doodle` split, without diffusion (reported, never choosing).

    python experiments/bench_line_width.py [--widths 3,2,4,5]

Image queries (a canvas picture, PACS sketches) keep their own lines and are not affected.

Finding: the selection set keeps 3 px (score 0.400); other widths move the benchmarks by 1-3 queries. Kept.
Backs: docs/EXPERIMENTS.md §5, "Another line width for stroke queries".
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import sbir_core.models.encoders as encoders
import sbir_core.training.finetune as finetune
import sbir_core.training.finetune_data as finetune_data
from sbir_core.data import preprocess
from sbir_core.data.datasets import DATA_HELP, data_root, benchmark, image_folder
from sbir_core.eval.metrics import retrieval_report
from sbir_core.eval.product import DEFAULT_GALLERY, product_queries
from sbir_core.models.encoders import create_encoder
from sbir_core.paths import checkpoint_path


def _scores(enc, queries, g, gl) -> dict:
    q = enc.encode_sketches([it.load() for it in queries]).normalized()
    rep = retrieval_report(q @ g.T, [it.label for it in queries], gl)
    return {k: round(rep[k], 3) for k in ("hit@1", "hit@5", "P@5", "mAP@all")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--checkpoint", default="default", help="'default' or a checkpoint path")
    ap.add_argument("--widths", default="3,2,4,5", help="line widths in model pixels")
    args = ap.parse_args()
    args.data = data_root(args.data)
    data = Path(args.data)
    path = str(checkpoint_path(args.checkpoint)) if args.checkpoint == "default" else args.checkpoint

    cfg = finetune.FinetuneConfig(init=path, steps=0, heldout_outside_gallery=False)  # all its held-out classes
    td, _ = finetune_data.prepare_data(data, cfg)
    held = finetune_data.run_heldout_classes(td, cfg, data)  # the checkpoint's own held-out classes
    selection = finetune.Finetuner(cfg, td, finetune_data.training_text_features(data, td.classes), held)

    enc = create_encoder(checkpoint=path)
    benches = {}
    gallery = image_folder(DEFAULT_GALLERY)
    g = enc.encode_photos([it.load() for it in gallery]).normalized()
    for group, items in product_queries(data).items():
        benches[f"product {group}"] = (items, g, [it.label for it in gallery])
    queries, photos = benchmark(data, "doodle")
    benches["doodle"] = (queries, enc.encode_photos([it.load() for it in photos]).normalized(),
                         [it.label for it in photos])

    # The width is a default argument of preprocess_sketch; the modules that render stroke
    # queries (the encoder, finetune's validation) get a copy with this width fixed.
    render = preprocess.preprocess_sketch
    rows = []
    for width in (float(w) for w in args.widths.split(",")):
        fixed = functools.partial(render, line_width=width)
        encoders.preprocess_sketch = finetune.preprocess_sketch = fixed
        v = selection.validate()
        row = {"line_width": width, "selection_score": round(v["score"], 4),
               "held-out classes hit@5 / mAP@all": (round(v["hit@5"], 3), round(v["mAP@all"], 3)),
               "held-out doodles hit@5 / mAP@all": (round(v["seen_hit@5"], 3), round(v["seen_mAP@all"], 3))}
        row.update({name: _scores(enc, *b) for name, b in benches.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    encoders.preprocess_sketch = finetune.preprocess_sketch = render
    best = max(rows, key=lambda r: r["selection_score"])
    print(f"chosen on the selection set: {best['line_width']} px (shipped: {preprocess.TARGET_LINE_WIDTH} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
