"""What each retrieval setting of a checkpoint buys, on the benchmarks and the product
benchmark: edge fusion of gallery photos, test-time flip averaging of sketches, gallery
diffusion, seen-class calibration. The shipped setting was chosen on held-out *training* classes (see the
checkpoint's `retrieval.validation`); this script only documents the alternatives.

    python scripts/bench_settings.py --data ../shared/data [--checkpoint default] [--generalized] [--json out.json]

Each row switches one setting away from the shipped one, in memory (the checkpoint file
is not changed), and evaluates exactly as `eval` and the app rank.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_product import run_encoder  # noqa: E402
from sbir_core.models.encoders import create_encoder  # noqa: E402
from sbir_core.eval.evaluate import evaluate_split  # noqa: E402


def variant(enc, **settings):
    """A copy of the encoder's retrieval settings with some changed (weights shared)."""
    v = copy.copy(enc)
    v._modules = dict(enc._modules)  # nn.Module keeps submodules in a dict a shallow copy would share
    v.meta = copy.deepcopy(enc.meta)
    v.meta.setdefault("retrieval", {}).update({k: val for k, val in settings.items() if k != "edge_weight"})
    if "edge_weight" in settings:
        v.head = copy.copy(enc.head)
        v.head.photo_edge_weight = settings["edge_weight"]
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--splits", default="pacs,doodle")
    ap.add_argument("--json", default=None)
    ap.add_argument("--generalized", action="store_true", help="also each split with `--generalized` galleries")
    args = ap.parse_args()
    enc = create_encoder(checkpoint=args.checkpoint)
    r = enc.meta.get("retrieval", {})
    shipped = {"edge_weight": float(enc.head.photo_edge_weight), "flip_sketch": bool(r.get("flip_sketch")),
               "diffusion_k": int(r.get("diffusion_k", 0)), "seen_calibration": r.get("seen_calibration")}
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
        prod = run_encoder(v, Path(args.data))
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
