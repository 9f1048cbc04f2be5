#!/usr/bin/env python3
"""Ablation of the fine-tuning recipe: the shipped recipe minus one part at a time.

Each variant is a short run from ImageNet with the same seed, so every run draws the same
batches and the rows differ only in the part removed. A run is scored where `finetune`
selects (held-out training classes and held-out doodles of training classes: the
selection score) and on the product benchmark (doodles no training used, against the
default gallery, as `bench_product.py`, without diffusion). Short runs rank the parts;
they are not the shipped model's figures (docs/TRAINING.md has those).

    python experiments/ablate_finetune.py --steps 250 [--json out.json]

Finding: the text alignment is the part that matters most (selection score 0.282 -> 0.181 without it); removing the triplet or the photo/edge-map term did not hurt these short runs.
Backs: docs/BENCHMARKS.md §1, "What each part of the training recipe buys (ablation)".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch


from sbir_core.eval.product import product_benchmark
from sbir_core.data.datasets import DATA_HELP, data_root
from sbir_core.models.checkpoint import save_checkpoint
from sbir_core.paths import cache_dir
from sbir_core.models.encoders import create_encoder
from sbir_core.training.config import FinetuneConfig
from sbir_core.training.finetune import Finetuner
from sbir_core.training.finetune_data import prepare_data, run_heldout_classes, training_text_features

VARIANTS = {
    "full recipe": {},
    "- text alignment (MA-SBIR; `--w-text 0`)": {"w_text": 0.0},
    "- cross-modal triplet (ZSCMR; `--w-triplet 0`)": {"w_triplet": 0.0},
    "- photo <-> own edge map term (`--w-pair 0`)": {"w_pair": 0.0},
    "- clip-art-coloured doodles on the photo side (`--doodle-photos-per-step 0`)": {"doodle_photos_per_step": 0},
}
KEYS = ("hit@5", "mAP@all", "seen_hit@5", "seen_mAP@all", "score")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--only", default=None, help="comma-separated variant numbers (0 = full recipe)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.data = data_root(args.data)
    base = FinetuneConfig(steps=args.steps, val_every=args.steps)
    td, _ = prepare_data(Path(args.data), base, cache_dir() / "finetune")  # finetune's photo cache
    text = training_text_features(Path(args.data), td.classes)
    held = run_heldout_classes(td, base, Path(args.data))  # the held-out classes `finetune` would draw
    names = list(VARIANTS)
    chosen = [names[int(i)] for i in args.only.split(",")] if args.only else names
    rows = []
    for name in chosen:
        t0 = time.time()
        cfg = dataclasses.replace(base, **VARIANTS[name])
        torch.manual_seed(cfg.seed)
        ft = Finetuner(cfg, td, text, held)
        best = ft.fit()["best"]
        ft.model.cpu()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ablation.safetensors"
            save_checkpoint(path, ft.model.head, {
                "encoder": cfg.encoder, "image_size": cfg.image_size, "backbone_trained": True,
                "config": dataclasses.asdict(cfg),
                "retrieval": {"edge_weight": 0.0, "diffusion_k": 0, "flip_sketch": False}},
                backbone=ft.model.backbone.net)
            prod = product_benchmark(create_encoder(checkpoint=str(path)), Path(args.data))
        row = {"variant": name, **{k: round(best[k], 3) for k in KEYS},
               "product zero-shot hit@5": prod["zero-shot"]["no diffusion"]["hit@5"],
               "product seen hit@5": prod["seen"]["no diffusion"]["hit@5"],
               "minutes": round((time.time() - t0) / 60, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = list(KEYS) + ["product zero-shot hit@5", "product seen hit@5"]
    print(f"\n{args.steps} steps from ImageNet, seed {base.seed}\n")
    print(f"| variant ({args.steps} steps) | held-out classes hit@5 | held-out classes mAP@all | seen doodles hit@5 | "
          "seen doodles mAP@all | selection score | product zero-shot hit@5 | product seen hit@5 |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
