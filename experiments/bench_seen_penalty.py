#!/usr/bin/env python3
"""Does a seen-class penalty pay? Gallery pictures that look like the training classes
(high similarity to training doodles) crowd out unseen classes in the generalized setting.
CSLS-style hubness correction subtracts, from every score, beta times a picture's mean
similarity to its 10 nearest reference doodles (4 training doodles per training class,
seed 0). It is computed once per picture at index time, so it would cost nothing per search.

    python experiments/bench_seen_penalty.py [--checkpoint PATH]

Rows: `pacs`/`doodle` as `eval` ranks them (no diffusion, as shipped), the same with
`--generalized` galleries, and the product benchmark (as `bench_product.py`), for each beta.
A sweep on the benchmarks themselves, so an upper bound: nothing here was selected on
held-out training classes, and nothing of it ships.

Finding: pacs generalized hit@5 +0.18 at beta 1, but the default gallery loses 5-11 of 150 zero-shot queries; not shipped.
Backs: docs/EXPERIMENTS.md §5, "A seen-class penalty for the generalized setting".
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from sbir_core.data.datasets import training_items
from sbir_core.eval.evaluate import embed_items, embedded_benchmarks
from sbir_core.eval.metrics import retrieval_report

from sweep import row, setup  # experiments/sweep.py

BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
REF_PER_CLASS = 4
NEIGHBOURS = 10


def reference_doodles(enc, data: Path) -> np.ndarray:
    by_class: dict[str, list] = {}
    for it in training_items(data):
        if it.modality == "sketch":
            by_class.setdefault(it.label, []).append(it)
    rng = random.Random(0)
    items = [x for c in sorted(by_class) for x in rng.sample(by_class[c], min(REF_PER_CLASS, len(by_class[c])))]
    return enc.encode_sketches([it.load() for it in items]).normalized()


def main() -> int:
    data, enc = setup(__doc__)
    ref = reference_doodles(enc, data)

    sets = embedded_benchmarks(enc, data)
    seen_photos = [i for i in training_items(data, hold_out_doodles=False) if i.modality == "photo"]
    extra, ok = embed_items(enc, seen_photos, "photo")
    extra_l = [it.label for it, k in zip(seen_photos, ok) if k]
    for split in ("pacs", "doodle"):
        Q, Ql, G, Gl = sets[split]
        sets[f"{split} --generalized"] = (Q, Ql, np.concatenate([G, extra[ok]]), Gl + extra_l)

    print(f"{enc.encoder_id}; {len(ref)} reference doodles, {NEIGHBOURS} neighbours")
    print("| queries | beta | hit@1 | hit@5 | P@5 | mAP@all |\n|---|---|---|---|---|---|")
    for name, (Q, Ql, G, Gl) in sets.items():
        hub = np.sort(G @ ref.T, axis=1)[:, -NEIGHBOURS:].mean(axis=1)
        base = Q @ G.T
        for beta in BETAS:
            r = retrieval_report(base - beta * hub[None], Ql, Gl)
            print(row((name, f"{beta:g}"), r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
