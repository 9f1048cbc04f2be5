#!/usr/bin/env python3
"""Checkpoints side by side on what a person sees: every benchmark as search ranks (hit@1 /
hit@5 / P@5 / mAP@all), the embedding alone's mAP@all on pacs and doodle (issue 8's bars),
the product benchmark (doodles never trained on, against the default gallery, as the app
searches) and the page's example sketches. The comparison docs/BENCHMARKS.md §5 makes for a
retrained model (e.g. one trained on a lent GPU, after `finetune --init X --steps 0`).

    python scripts/compare_checkpoints.py --data ../shared/data default runs/chosen.safetensors [--json out.json]

Each checkpoint is searched with its own retrieval settings. Features are cached per model
(`eval`'s cache), so a second comparison with the same models takes a minute or two.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

KEYS = ("hit@1", "hit@5", "P@5", "mAP@all")
# (row, evaluate_split arguments): as `eval` ranks with the flags in the row's name
SPLITS = (("pacs", {"split": "pacs"}),
          ("pacs `--generalized`", {"split": "pacs", "generalized": True}),
          ("doodle", {"split": "doodle"}),
          ("pacs embedding alone (`--no-diffusion --no-calibration`)",
           {"split": "pacs", "diffusion": False, "calibration": False}),
          ("doodle embedding alone (`--no-diffusion --no-calibration`)",
           {"split": "doodle", "diffusion": False, "calibration": False}))


def measure(data: Path, checkpoint: str) -> dict:
    """{row: {metric: value}} for one checkpoint ('default', 'none' or a path)."""
    import bench_examples
    import bench_product
    from sbir_core.eval.evaluate import evaluate_split
    from sbir_core.models.encoders import create_encoder

    enc = create_encoder(checkpoint=checkpoint)
    rows = {}
    for name, kw in SPLITS:
        r = evaluate_split(enc, data, **kw)
        rows[name] = {k: r[k] for k in KEYS}
    product = bench_product.run_encoder(enc, data)
    for group in ("zero-shot", "seen"):
        rows[f"product {group} ({product[group]['n_queries']})"] = {
            k: product[group]["as the app searches"][k] for k in KEYS}
    ex = bench_examples.run(checkpoint, encoder=enc)  # the same model, loaded once
    rows["example sketches in the top 5"] = {"found": ex["in_top5"], "of": len(ex["examples"]),
                                             "misses": [n for n, r in ex["examples"].items()
                                                        if not (r["rank"] and r["rank"] <= 5)]}
    return rows


def cell(m: dict) -> str:
    if "found" in m:
        return f"{m['found']} of {m['of']}" + (f" ({', '.join(m['misses'])} missed)" if m["misses"] else "")
    return " / ".join(f"{m[k]:.3f}" for k in KEYS if k in m)


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per measure, one column per checkpoint."""
    names = list(results)
    rows = list(next(iter(results.values())))
    lines = ["| queries (hit@1 / hit@5 / P@5 / mAP@all) | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {r} | " + " | ".join(cell(results[n][r]) for n in names) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="'default', 'none' or checkpoint paths")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--json", default=None, help="also write every figure here")
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not (data / "splits.json").is_file():
        ap.error(f"--data {data}: no splits.json there; pass the shared data folder")
    for c in args.checkpoints:
        if c not in ("default", "none") and not Path(c).is_file():
            ap.error(f"no checkpoint file {c}")
    results = {c: measure(data, c) for c in args.checkpoints}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
