#!/usr/bin/env python3
"""A uniform model soup (Wortsman et al. 2022): the element-wise mean of the weights of
several fine-tuned checkpoints that started from the same ImageNet backbone. The result is
an ordinary checkpoint (the first one's metadata and retrieval settings, plus a `soup`
entry naming its ingredients), so `eval` and `scripts/bench_product.py` take it as it is.

    python experiments/make_soup.py --out soup.safetensors checkpoints/default.safetensors A.safetensors B.safetensors
    python scripts/bench_product.py --checkpoint soup.safetensors

Batch-norm statistics are averaged like every other float tensor.

Finding: a soup of 3 buys mAP@all and costs the first row (product seen hit@5 -0.075); not shipped.
Backs: docs/EXPERIMENTS.md §5, "A uniform model soup".
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sbir_core.models.checkpoint import read_tensors, write_tensors


def soup(paths: list[Path], out: Path) -> Path:
    states = [read_tensors(p) for p in paths]
    first, meta = states[0]
    for p, (st, _) in zip(paths[1:], states[1:]):
        if st.keys() != first.keys() or any(st[k].shape != v.shape for k, v in first.items()):
            raise SystemExit(f"{p} does not have the tensors of {paths[0]}: not the same architecture")
    mean = {k: (sum(st[k].float() for st, _ in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in first.items()}
    meta = {**meta, "soup": [p.name for p in paths]}
    return write_tensors(out, mean, meta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if len(args.checkpoints) < 2:
        ap.error("a soup needs at least two checkpoints")
    print(soup(args.checkpoints, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
