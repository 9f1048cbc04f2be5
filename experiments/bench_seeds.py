#!/usr/bin/env python3
"""Recipes judged over several seeds: each checkpoint's embedding alone on every benchmark
(product zero-shot and seen doodles against the default gallery, pacs, doodle; hit@5 /
mAP@all, no diffusion, no calibration), each arm's mean, and with --ensemble each arm's
ensemble (the concatenated embeddings of its checkpoints, i.e. their mean cosine) and
that of all checkpoints together: how far the recipe family reaches if seeds were free.

    python experiments/bench_seeds.py \\
        --arm names=runs/names_s0/model.safetensors,runs/names_s1/model.safetensors \\
        --arm kd=runs/kd_s0/model.safetensors,runs/kd_s1/model.safetensors [--ensemble] [--json]

A single retrained model lands anywhere in a wide band (docs/EXPERIMENTS.md: product zero-shot
hit@5 0.600-0.733 over four seeds of one recipe), so recipes are compared by arm means.
Features are cached per model (`eval`'s cache), so a second run takes a minute or two.

Finding: one recipe's seeds span product zero-shot hit@5 0.600-0.733, so recipes are compared by arm means.
Backs: docs/EXPERIMENTS.md §5 (ImageNet-prediction term; ensembles) and docs/TRAINING.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sbir_core.data.datasets import DATA_HELP, data_root
from sbir_core.eval.evaluate import embedded_benchmarks
from sbir_core.eval.metrics import retrieval_report
from sbir_core.models.encoders import create_encoder

KEYS = ("hit@5", "mAP@all")


def scores(embs: list[dict]) -> dict[str, dict[str, float]]:
    """{benchmark: {hit@5, mAP@all}} of the ensemble of `embs` (one model: itself)."""
    out = {}
    for bench, (_, ql, _, gl) in embs[0].items():
        q = np.concatenate([e[bench][0] for e in embs], 1)
        g = np.concatenate([e[bench][2] for e in embs], 1)
        rep = retrieval_report(q @ g.T / len(embs), ql, gl)
        out[bench] = {k: round(rep[k], 4) for k in KEYS}
    return out


def parse_arm(spec: str) -> tuple[str, list[str]]:
    name, sep, cks = spec.partition("=")
    if not sep or not name or not cks:
        raise argparse.ArgumentTypeError(f"an arm is NAME=CHECKPOINT[,CHECKPOINT...], not {spec!r}")
    return name, [c for c in cks.split(",") if c]


def run(data: Path, arms: dict[str, list[str]], ensemble: bool) -> dict:
    embs = {ck: embedded_benchmarks(create_encoder(checkpoint=ck), data) for cks in arms.values() for ck in cks}
    rows: dict[str, dict] = {}
    for arm, cks in arms.items():
        each = [scores([embs[ck]]) for ck in cks]
        for ck, s in zip(cks, each):
            rows[f"{arm}: {ck}"] = s
        if len(cks) > 1:
            rows[f"{arm}: mean of {len(cks)}"] = {b: {k: round(float(np.mean([s[b][k] for s in each])), 4) for k in KEYS}
                                                  for b in each[0]}
            if ensemble:
                rows[f"{arm}: ensemble of {len(cks)}"] = scores([embs[ck] for ck in cks])
    every = list(dict.fromkeys(ck for cks in arms.values() for ck in cks))
    if ensemble and len(arms) > 1:
        rows[f"all: ensemble of {len(every)}"] = scores([embs[ck] for ck in every])
    return rows


def table(rows: dict) -> str:
    benches = list(next(iter(rows.values())))
    lines = ["| checkpoint (embedding alone) | " + " | ".join(f"{b}: hit@5 / mAP@all" for b in benches) + " |",
             "|---|" + "---|" * len(benches)]
    lines += [f"| {name} | " + " | ".join(f"{r[b]['hit@5']:.3f} / {r[b]['mAP@all']:.3f}" for b in benches) + " |"
              for name, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--arm", type=parse_arm, action="append", required=True, metavar="NAME=CK[,CK...]",
                    help="a recipe and its checkpoints (one per seed; 'default' is the shipped model)")
    ap.add_argument("--ensemble", action="store_true", help="also each arm's ensemble and all checkpoints'")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.data = data_root(args.data)
    arms = dict(args.arm)
    if len(arms) != len(args.arm):
        ap.error("arm names must differ")
    rows = run(args.data, arms, args.ensemble)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
