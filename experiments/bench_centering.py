#!/usr/bin/env python3
"""Does removing each modality's mean embedding pay? Sketch and picture embeddings can sit
in two offset cones (the "modality gap"); subtracting each side's mean before the cosine is
a free, label-free correction. Query side: the mean of 1,500 training doodles (fixed, could
ship in the checkpoint). Gallery side: the gallery's own mean (made at index time) or the
mean of 1,500 training photos.

    python experiments/bench_centering.py [--checkpoint PATH]

Rows: the product benchmark and `pacs`/`doodle`, all without diffusion (the first five
results, which diffusion never changes). A sweep on the benchmarks themselves, so an upper
bound: nothing here was selected on held-out training classes, and nothing of it ships.

Finding: no centering variant beats the shipped none on the product's zero-shot first row (0.740 hit@5); not shipped.
Backs: docs/EXPERIMENTS.md §5, "Removing each modality's mean embedding".
"""
from __future__ import annotations

import numpy as np

from sbir_core.data.datasets import training_items
from sbir_core.eval.evaluate import embed_items, embedded_benchmarks
from sbir_core.eval.metrics import retrieval_report

from sweep import row, setup  # experiments/sweep.py

REFERENCE = 1500
# name -> (weight of the training-doodle mean on queries, gallery mean: "" / "own" / "train")
VARIANTS = {
    "none (shipped)": (0.0, ""),
    "gallery: its own mean": (0.0, "own"),
    "queries: training-doodle mean": (1.0, ""),
    "both (gallery: own mean)": (1.0, "own"),
    "both (gallery: training-photo mean)": (1.0, "train"),
}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main() -> int:
    data, enc = setup(__doc__)

    train = training_items(data)
    rng = np.random.default_rng(0)
    means = {}
    for modality in ("sketch", "photo"):
        items = [it for it in train if it.modality == modality]
        pick = rng.choice(len(items), min(REFERENCE, len(items)), replace=False)
        e, ok = embed_items(enc, [items[i] for i in pick], modality)
        means[modality] = e[ok].mean(0)

    sets = embedded_benchmarks(enc, data)
    print("| queries | centering | hit@1 | hit@5 | P@5 | mAP@all |\n|---|---|---|---|---|---|")
    for name, (q, ql, g, gl) in sets.items():
        for variant, (wq, gm) in VARIANTS.items():
            shift = {"": 0.0, "own": g.mean(0), "train": means["photo"]}[gm]
            rep = retrieval_report(_unit(q - wq * means["sketch"]) @ _unit(g - shift).T, ql, gl)
            print(row((name, variant), rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
