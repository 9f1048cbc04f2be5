"""What each retrieval setting of a checkpoint buys, on the benchmarks and the product
benchmark: edge fusion of gallery photos, test-time flip averaging of sketches, gallery
diffusion, seen-class calibration. The shipped setting was chosen on held-out *training* classes (see the
checkpoint's `retrieval.validation`); this script only documents the alternatives.

    python experiments/bench_settings.py [--checkpoint default] [--generalized] [--json out.json]

Each row switches one setting away from the shipped one, in memory (the checkpoint file
is not changed), and evaluates exactly as `eval` and the app rank.

Finding: calibration is the generalized rows' gain (pacs hit@5 +0.225); edge fusion helps photo galleries and costs clip-art.
Backs: docs/BENCHMARKS.md §3, "What each retrieval setting buys" (and EXPERIMENTS §5 retrains).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path


from sbir_core.eval.product import product_benchmark
from sbir_core.data.datasets import DATA_HELP, data_root
from sbir_core.models.encoders import create_encoder
from sbir_core.eval.evaluate import evaluate_split
from sbir_core.models.settings import RetrievalSettings


def variant(enc, **settings):
    """A copy of the encoder's retrieval settings with some changed (weights shared)."""
    v = copy.copy(enc)
    v._modules = dict(enc._modules)  # nn.Module keeps submodules in a dict a shallow copy would share
    v.meta = copy.deepcopy(enc.meta)
    v.head = copy.copy(enc.head)  # the setter below sets the copy's edge weight, not the shipped head's
    v.head.config = dict(enc.head.config)
    v.retrieval = RetrievalSettings.from_meta({**enc.retrieval.as_dict(), **settings})
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--splits", default="pacs,doodle")
    ap.add_argument("--json", default=None)
    ap.add_argument("--generalized", action="store_true", help="also each split with `--generalized` galleries")
    args = ap.parse_args()
    args.data = data_root(args.data)
    enc = create_encoder(checkpoint=args.checkpoint)
    shipped = enc.retrieval.as_dict()
    rows = [("shipped " + json.dumps(shipped), {})]
    rows.append(("edge fusion " + ("off" if shipped["edge_weight"] else "0.5"),
                 {"edge_weight": 0.0 if shipped["edge_weight"] else 0.5}))
    rows.append(("flip averaging " + ("off" if shipped["flip_sketch"] else "on"),
                 {"flip_sketch": not shipped["flip_sketch"]}))
    rows.append(("gallery diffusion " + ("off" if shipped["diffusion_k"] else "k=20"),
                 {"diffusion_k": 0 if shipped["diffusion_k"] else 20}))
    if shipped["seen_calibration"]:
        rows.append(("seen-class calibration off", {"seen_calibration": None}))
    out = []
    for name, change in rows:
        v = variant(enc, **change)
        row = {"setting": name}
        for split in args.splits.split(","):
            for gen in (False, True) if args.generalized else (False,):
                rep = evaluate_split(v, args.data, split, generalized=gen)
                row[split + (" --generalized" if gen else "")] = {k: round(rep[k], 4)
                                                                  for k in ("mAP@all", "hit@1", "hit@5", "P@5")}
        prod = product_benchmark(v, Path(args.data))
        for group in ("zero-shot", "seen"):
            row[f"product {group}"] = {k: prod[group]["as the app searches"][k] for k in ("hit@1", "hit@5", "P@5",
                                                                                         "mAP@all")}
        out.append(row)
        print(json.dumps(row), flush=True)
    cols = [c for c in out[0] if c != "setting"]
    print("\n| setting | " + " | ".join(f"{c} hit@5 / mAP@all" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for row in out:
        print(f"| {row['setting']} | " + " | ".join(f"{row[c]['hit@5']:.3f} / {row[c]['mAP@all']:.3f}" for c in cols)
              + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
