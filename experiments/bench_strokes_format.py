#!/usr/bin/env python3
"""Do JSON-loaded example strokes (lists) search like the same strokes as tuples? With the
shipped model and gallery, per example: the cosine of the two embeddings and each one's
first result (issue 34: a 2-point stroke in a JSON list was read as QuickDraw's [xs, ys]).

    python experiments/bench_strokes_format.py
    # the code before the fix, same model and gallery:
    git archive c54f4a6 sbir_core checkpoints | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before python experiments/bench_strokes_format.py

Finding: before the fix JSON lists and tuples gave cosine 0.50 (guitar) and 0.33 (tree); now 1.000 for every example.
Backs: docs/BENCHMARKS.md I34, "Strokes are read in one format per drawing".
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import sbir_core
from sbir_core.paths import EXAMPLES_DIR
from sbir_core.service import RetrievalService

GALLERIES = Path(__file__).resolve().parents[1] / "galleries"  # this checkout's, whichever code runs


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="strokes_format_"))
    svc = RetrievalService(GALLERIES, gallery="default", checkpoint="default", relation=None,
                           cache_dir=tmp / "cache", uploads_dir=tmp / "user")
    print(f"sbir_core from {Path(sbir_core.__file__).parent}")
    print("| example | 2-point strokes | cosine(lists, tuples) | first result (lists) | first result (tuples) |")
    print("|---|---|---|---|---|")
    for p in sorted(EXAMPLES_DIR.glob("*.json")):
        lists = json.loads(p.read_text())["strokes"]
        tuples = [[tuple(q) for q in s] for s in lists]
        a, b = svc.encoder.encode_sketch(lists), svc.encoder.encode_sketch(tuples)
        first = [(o.hits[0].label if o.hits else o.message) for o in
                 (svc.search_sketch(s, 5, "default") for s in (lists, tuples))]
        print(f"| {p.stem} | {sum(len(s) == 2 for s in lists)} of {len(lists)} | {float(a @ b):.3f} | "
              f"{first[0]} | {first[1]} |")


if __name__ == "__main__":
    main()
