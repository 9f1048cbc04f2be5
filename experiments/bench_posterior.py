#!/usr/bin/env python3
"""Does comparing class posteriors pay? (tried, not shipped)

ConSE-style semantic re-embedding: each sketch and each picture becomes its softmax over the
training class names (through the checkpoint's text head, at temperature tau), and the score
mixes the embedding cosine with the cosine of the two posteriors:
(1 - lam) * cos(q, g) + lam * cos(p(q), p(g)). It needs no gallery labels and stays an inner
product (of [sqrt(1 - lam) q, sqrt(lam) p(q)]), so an index could search it.

    python experiments/bench_posterior.py [--checkpoint PATH]

Rows: the product benchmark and `pacs`/`doodle`, all without diffusion or calibration (the
embedding alone at lam = 0). A sweep on the benchmarks themselves, so an upper bound.

Finding: posteriors help seen doodles (hit@5 0.700 -> 0.762) and cost every zero-shot first row; not shipped.
Backs: docs/EXPERIMENTS.md §5, "Comparing class posteriors".
"""
from __future__ import annotations

import numpy as np
import torch

from sbir_core.data.datasets import training_items
from sbir_core.eval.evaluate import embedded_benchmarks
from sbir_core.eval.metrics import retrieval_report

from sweep import row, setup  # experiments/sweep.py

TAUS = (0.03, 0.07, 0.15)
LAMS = (0.0, 0.25, 0.5, 1.0)


def _posterior(x: np.ndarray, text: np.ndarray, tau: float) -> np.ndarray:
    p = torch.softmax(torch.from_numpy(x @ text.T) / tau, dim=1).numpy()
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def main() -> int:
    data, enc = setup(__doc__)
    names = sorted({it.label for it in training_items(data)})
    with torch.no_grad():
        text = torch.nn.functional.normalize(enc.encode_text(names).float(), dim=-1).numpy()

    sets = embedded_benchmarks(enc, data)
    print(f"{len(names)} training class names\n")
    print("| queries | tau | lam | hit@1 | hit@5 | P@5 | mAP@all |\n|---|---|---|---|---|---|---|")
    for name, (q, ql, g, gl) in sets.items():
        cos = q @ g.T
        for tau in TAUS:
            post = _posterior(q, text, tau) @ _posterior(g, text, tau).T
            for lam in LAMS if tau == TAUS[0] else LAMS[1:]:
                rep = retrieval_report((1 - lam) * cos + lam * post, ql, gl)
                print(row((name, tau, lam), rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
