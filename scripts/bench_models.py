"""Model benchmarks for docs/BENCHMARKS.md: recipes, generalized setting, other directions, ablation.

    python scripts/bench_models.py --data ../shared/data [--sections main,generalized,directions,ablation]
        [--out docs/bench_models.md] [--json runs/bench_models.json]

Every trained model here is trained from scratch in this process with `sbir_core.train.train`
(model selection on held-out training classes only), then evaluated once on the benchmarks.
Backbone features come from the feature cache, so a rerun costs minutes.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from sbir_core.data.datasets import benchmark, training_items
from sbir_core.models.encoders import create_encoder
from sbir_core.eval.evaluate import embed_items
from sbir_core.eval.metrics import average_precision_batch, precision_at_k_batch, rank_gallery, retrieval_report
from sbir_core.training.train import LOSSES, TrainConfig, train

KEYS = ("mAP@all", "P@100", "mAP@200", "P@200")


def report(q, g, ql, gl, exclude_self: bool = False) -> dict:
    """Metrics for embeddings; with exclude_self (same set as queries and gallery) each
    query's own item is removed from its ranking before scoring."""
    scores = q @ g.T
    ql, gl = np.asarray(ql), np.asarray(gl)
    if not exclude_self:
        r = retrieval_report(scores, list(ql), list(gl), ks=(100, 200))
        return {k: r[k] for k in KEYS}
    np.fill_diagonal(scores, -np.inf)
    ranked = rank_gallery(scores)[:, :-1]  # the query itself ranks last: drop it
    rel = ql[:, None] == gl[ranked]
    n_rel = rel.sum(1)
    return {
        "mAP@all": float(average_precision_batch(rel).mean()),
        "P@100": float(precision_at_k_batch(rel, 100).mean()),
        "mAP@200": float(average_precision_batch(rel, 200, n_relevant=n_rel).mean()),
        "P@200": float(precision_at_k_batch(rel, 200).mean()),
    }


def table(rows: list[tuple[str, dict]], title: str, cols=KEYS) -> str:
    out = [f"### {title}", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows:
        out.append(f"| {name} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    return "\n".join(out) + "\n"


def split_report(enc, data, split, extra_gallery=None) -> dict:
    q_items, g_items = benchmark(data, split)
    if extra_gallery:
        g_items = list(g_items) + list(extra_gallery)
    q, qok = embed_items(enc, q_items, "sketch")
    g, gok = embed_items(enc, g_items, "photo")
    return report(q[qok], g[gok], [i.label for i, k in zip(q_items, qok) if k], [i.label for i, k in zip(g_items, gok) if k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--sections", default="main,generalized,directions,ablation")
    ap.add_argument("--checkpoint", default="default", help="the shipped model to report")
    ap.add_argument("--out", default="runs/bench_models.md")
    ap.add_argument("--json", default="runs/bench_models.json")
    args = ap.parse_args()
    data = Path(args.data)
    sections = set(args.sections.split(","))
    t0 = time.time()
    md, js = [], {}

    models = {"raw backbone (no training)": create_encoder(checkpoint="none")}
    trained = {}
    if sections & {"main", "generalized", "directions"}:
        for recipe in ("zscmr", "ma-sbir"):
            res = train(TrainConfig.from_recipe(recipe), data, out=None, progress=False)
            models[f"{recipe} recipe"] = trained[recipe] = res["encoder"]
        models[f"shipped default ({args.checkpoint})"] = create_encoder(checkpoint=args.checkpoint)

    if "main" in sections:
        for split in ("pacs", "doodle"):
            rows = [(name, split_report(enc, data, split)) for name, enc in models.items()]
            js[f"main/{split}"] = dict(rows)
            md.append(table(rows, f"Zero-shot sketch->photo, `{split}` split (embedding similarity only, no gallery diffusion)"))

    if "generalized" in sections:
        # Gallery = unseen-class photos + photos of the seen (training) Caltech classes.
        seen = [i for i in training_items(data, max_photos_per_class=80) if i.modality == "photo"]
        for split in ("pacs", "doodle"):
            rows = [(name, split_report(enc, data, split, extra_gallery=seen)) for name, enc in models.items()]
            js[f"generalized/{split}"] = dict(rows)
            md.append(table(rows, f"Generalized ZS-SBIR, `{split}` queries, gallery + {len(seen)} seen-class photos (no diffusion)"))

    if "directions" in sections:
        q_items, g_items = benchmark(data, "pacs")
        for name in (n for n in models if not n.endswith("recipe")):
            enc = models[name]
            s, sok = embed_items(enc, q_items, "sketch")
            p, pok = embed_items(enc, g_items, "photo")
            sl = [i.label for i, k in zip(q_items, sok) if k]
            pl = [i.label for i, k in zip(g_items, pok) if k]
            s, p = s[sok], p[pok]
            rows = [
                ("sketch->photo", report(s, p, sl, pl)),
                ("photo->sketch", report(p, s, pl, sl)),
                ("sketch->sketch", report(s, s, sl, sl, exclude_self=True)),
                ("photo->photo", report(p, p, pl, pl, exclude_self=True)),
            ]
            js[f"directions/{name}"] = dict(rows)
            md.append(table(rows, f"Retrieval directions on `pacs`, {name} (no diffusion)"))

    if "ablation" in sections:
        base = TrainConfig.from_recipe("default")
        variants = [("default recipe", base)]
        for term, w in base.losses.items():
            if w:
                c = copy.deepcopy(base)
                c.losses[term] = 0.0
                variants.append((f"without `{term}`", c))
        for label, change in (
            ("no photo edge maps (pseudo-sketches)", {"use_edges": False, "photo_edge_weight": 0.0}),
            ("no stroke/edge augmentation", {"aug_seeds": ()}),
        ):
            c = copy.deepcopy(base)
            for k, v in change.items():
                setattr(c, k, v)
            variants.append((label, c))
        rows_p, rows_d = [], []
        for label, cfg in variants:
            res = train(cfg, data, out=None, progress=False)
            b = res["benchmarks"]
            # Every run reports with and without gallery diffusion, so that ablation is free.
            rows_p.append((label, {
                "val mAP": res["val_mAP"],
                "pacs": b["pacs"]["mAP@all"], "pacs, no diffusion": b["pacs (embedding only)"]["mAP@all"],
                "doodle": b["doodle"]["mAP@all"], "doodle, no diffusion": b["doodle (embedding only)"]["mAP@all"],
            }))
        cols = ("val mAP", "pacs", "pacs, no diffusion", "doodle", "doodle, no diffusion")
        js["ablation"] = dict(rows_p)
        md.append(table(rows_p, "Ablation: mAP@all, default recipe minus one thing (val = held-out training classes, no diffusion)", cols=cols))

    text = f"_Generated by `python scripts/bench_models.py --data {args.data} --sections {args.sections}` in {time.time() - t0:.0f} s._\n\n" + "\n".join(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(js, indent=1))
    print(text)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
