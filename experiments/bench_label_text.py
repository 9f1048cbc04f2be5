"""Would a labelled gallery rank better with its class names? (tried, not shipped)

The default gallery's folders name their classes. A sketch could be scored against each
picture's class name through the checkpoint's text head, and that score mixed into the
picture's: (1 - lam) * sketch.picture + lam * sketch.text(class). This script measures it
on the product benchmark (scripts/bench_product.py's queries and gallery), and how often the
text head alone names the drawn class among the gallery's class names. `--gates` mixes the
names in only for sketches the text head is sure of (its softmax over the gallery's names,
at the text loss's temperature, above the gate), the obvious way to spare unseen classes.

    python experiments/bench_label_text.py [--checkpoint default] [--gates 0,0.5,0.9]

Finding: mixing in class names lifts seen doodles but sinks zero-shot ones (hit@5 0.687 -> 0.447 at lam 0.5), gated or not; not shipped.
Backs: docs/EXPERIMENTS.md §5, "The gallery's class names as text".
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from sbir_core.eval.product import DEFAULT_GALLERY as GALLERY, KEYS, product_queries
from sbir_core.data.datasets import DATA_HELP, data_root, image_folder
from sbir_core.eval.metrics import retrieval_report
from sbir_core.models.encoders import create_encoder
from sbir_core.training.config import FinetuneConfig

TEXT_TEMPERATURE = FinetuneConfig().temperature


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--weights", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--gates", default="0", help="comma-separated confidence gates (0: every sketch)")
    args = ap.parse_args()
    args.data = data_root(args.data)
    enc = create_encoder(checkpoint=args.checkpoint)
    photos = image_folder(GALLERY)
    g_labels = [it.label for it in photos]
    g = enc.encode_photos([it.load() for it in photos]).normalized()
    names = sorted(set(g_labels))
    with torch.no_grad():  # the training prompts, as the text loss saw class names
        t = torch.nn.functional.normalize(enc.encode_text(names).float(), dim=-1).numpy()
    col = np.array([names.index(c) for c in g_labels])
    for group, items in product_queries(args.data).items():
        q = enc.encode_sketches([it.load() for it in items]).normalized()
        ql = [it.label for it in items]
        st = q @ t.T
        truth = np.array([names.index(c) for c in ql])
        rank = (st > st[np.arange(len(ql)), truth][:, None]).sum(1)
        print(json.dumps({"group": group, "n_queries": len(ql), "text names the class: top-1": round(float((rank == 0).mean()), 3),
                          "top-5": round(float((rank < 5).mean()), 3)}))
        sure = torch.softmax(torch.from_numpy(st) / TEXT_TEMPERATURE, dim=1).max(dim=1).values.numpy()
        for gate in (float(x) for x in args.gates.split(",")):
            mixed = (sure > gate) if gate > 0 else np.ones(len(ql), bool)
            for lam in (float(x) for x in args.weights.split(",")):
                w = lam * mixed[:, None]
                rep = retrieval_report((1 - w) * (q @ g.T) + w * st[:, col], ql, g_labels)
                print(json.dumps({"group": group, "gate": gate, "share mixed": round(float(mixed.mean()), 3), "lam": lam,
                                  **{k: round(rep[k], 3) for k in KEYS}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
