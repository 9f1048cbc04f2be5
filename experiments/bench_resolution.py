"""Would the shipped encoder do better at another input size, or without flip averaging?

    python experiments/bench_resolution.py [--settings 160:flip 192:noflip 192:flip]

No retraining: the shipped checkpoint (trained at 160 px) is run at each size, with or
without test-time flip averaging of sketches, on the product benchmark (as
`scripts/bench_product.py`) and the `doodle` and `pacs` splits without diffusion (as
`eval --no-diffusion`). One JSON line per setting. Informative only: settings are chosen
on held-out training classes (`finetune`), never on these benchmarks.

Finding: a larger input lifts unseen first rows and lowers seen ones; mAP@all unchanged; 160 px kept.
Backs: docs/EXPERIMENTS.md §5, "Another input size or no flip averaging at inference".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile

from sbir_core.eval.product import product_benchmark

from sbir_core.data.datasets import DATA_HELP, data_root
from sbir_core.eval.evaluate import evaluate_split
from sbir_core.models.encoders import create_encoder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--settings", nargs="+", default=["160:flip", "192:noflip", "192:flip", "176:flip"])
    args = ap.parse_args()
    args.data = data_root(args.data)
    enc = create_encoder(checkpoint=args.checkpoint)
    for setting in args.settings:
        size, flip = setting.split(":")
        enc.image_size = enc.backbone.image_size = int(size)
        enc.retrieval = dataclasses.replace(enc.retrieval, flip_sketch=flip == "flip")
        out = {"image_size": int(size), "flip_sketch": flip == "flip"}
        product = product_benchmark(enc, args.data)
        for group in ("zero-shot", "seen"):
            key = next(k for k in product if k.startswith(group))
            out[group] = {m: product[key]["as the app searches"][m] for m in ("hit@5", "mAP@all")}
        with tempfile.TemporaryDirectory() as tmp:
            for split in ("doodle", "pacs"):
                r = evaluate_split(enc, args.data, split, tmp, diffusion=False)
                out[split] = {k: round(r[k], 4) for k in ("mAP@all", "hit@5", "P@5")}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
