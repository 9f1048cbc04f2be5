#!/usr/bin/env python3
"""Checkpoints side by side on what a person sees: every benchmark as search ranks (hit@1 /
hit@5 / P@5 / mAP@all), the embedding alone's mAP@all on pacs and doodle (issue 8's bars),
the product benchmark (doodles never trained on, against the default gallery, as the app
searches) and the page's example sketches. The comparison docs/EXPERIMENTS.md makes for a
retrained model (e.g. one trained on a lent GPU, after `finetune --init X --steps 0`).

    python scripts/compare_checkpoints.py default runs/chosen.safetensors [--json out.json]
    python scripts/compare_checkpoints.py --examples default [v3.safetensors]   # the page's examples only

Each checkpoint is searched with its own retrieval settings. A second table gives each
checkpoint's difference from the first, query by query (`metrics.paired_difference`): the
mean difference with its 95% interval and how many queries gained or lost a correct
picture in the first five, so a change of a few queries is not read as a better model. Features are cached per model
(`eval`'s cache), so a second comparison with the same models takes a minute or two.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Optional

from sbir_core.data.datasets import DATA_HELP, data_root
from sbir_core.errors import InputError
from sbir_core.paths import stored_checkpoint

KEYS = ("hit@1", "hit@5", "P@5", "mAP@all")
# (row, evaluate_split arguments): as `eval` ranks with the flags in the row's name
SPLITS = (("pacs", {"split": "pacs"}),
          ("pacs `--generalized`", {"split": "pacs", "generalized": True}),
          ("doodle", {"split": "doodle"}),
          ("pacs embedding alone (`--no-diffusion --no-calibration`)",
           {"split": "pacs", "diffusion": False, "calibration": False}),
          ("doodle embedding alone (`--no-diffusion --no-calibration`)",
           {"split": "doodle", "diffusion": False, "calibration": False}))


def example_ranks(checkpoint: str = "default", k: int = 12, encoder: Optional[Any] = None) -> dict:
    """Where each example drawing on the page finds its class in the default gallery, searched
    exactly as the page's example buttons search (`Callbacks.search_example`; the shipped
    checkpoint's figures are what `tests/test_shipped_model.py` checks) -> {"checkpoint",
    "in_top5", "examples": {name: {"rank", "first_row"}}}. `encoder`: the checkpoint's, already
    loaded (else the service loads it; another checkpoint than the shipped one re-indexes the
    gallery in a temporary folder)."""
    import sbir_app
    from sbir_core.data.examples import list_examples
    from sbir_core.paths import SHIPPED_GALLERIES
    from sbir_core.service import RetrievalService

    with tempfile.TemporaryDirectory() as tmp:
        svc = RetrievalService(SHIPPED_GALLERIES, gallery="default", checkpoint=checkpoint, encoder=encoder,
                               relation=None, cache_dir=Path(tmp) / "cache", uploads_dir=Path(tmp) / "user")
        calls = sbir_app.Callbacks(svc)
        rows = {}
        for e in list_examples():
            _, msg, query = calls.search_example(e.name, k, "default")
            if query is None:
                raise SystemExit(f"{e.name}: {msg}")
            labels = [h.label for h in query.hits]
            rows[e.name] = {"rank": labels.index(e.name) + 1 if e.name in labels else None, "first_row": labels[:5]}
    found = sum(1 for r in rows.values() if r["rank"] and r["rank"] <= 5)
    return {"checkpoint": checkpoint, "in_top5": found, "examples": rows}


def measure(data: Path, checkpoint: str) -> dict:
    """{row: {metric: value}} for one checkpoint ('default', 'none' or a path)."""
    from sbir_core.eval.evaluate import evaluate_split
    from sbir_core.eval.product import product_benchmark
    from sbir_core.models.encoders import create_encoder

    enc = create_encoder(checkpoint=checkpoint)
    rows = {}
    for name, kw in SPLITS:
        r = evaluate_split(enc, data, per_query=True, **kw)
        rows[name] = {**{k: r[k] for k in KEYS}, "per_query": r["per_query"]}
    product = product_benchmark(enc, data, per_query=True)
    for group in ("zero-shot", "seen"):
        rows[f"product {group} ({product[group]['n_queries']})"] = product[group]["as the app searches"]
    ex = example_ranks(checkpoint, encoder=enc)  # the same model, loaded once
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


def differences(results: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{row: {checkpoint: {metric: paired_difference}}} of every checkpoint after the first
    against the first, on the rows measured query by query."""
    from sbir_core.eval.metrics import paired_difference

    names = list(results)
    base = results[names[0]]
    out: dict[str, dict[str, dict]] = {}
    for row, m in base.items():
        if "per_query" not in m:
            continue
        out[row] = {n: {k: paired_difference(m["per_query"][k], results[n][row]["per_query"][k])
                        for k in ("hit@5", "mAP@all")} for n in names[1:]}
    return out


def difference_table(diffs: dict[str, dict[str, dict]], base: str) -> str:
    """Markdown: hit@5 and mAP@all of each checkpoint minus `base`'s, +- the 95% interval;
    for hit@5 also the queries that gained / lost a correct picture in the first five."""
    names = list(next(iter(diffs.values())))
    lines = [f"| against `{base}`: hit@5 (queries gained / lost), mAP@all | "
             + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for row, by_name in diffs.items():
        cells = []
        for n in names:
            h, a = by_name[n]["hit@5"], by_name[n]["mAP@all"]
            cells.append(f"{h['diff']:+.3f} ± {h['ci']:.3f} (+{h['better']} / -{h['worse']}), "
                         f"{a['diff']:+.3f} ± {a['ci']:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="'default', 'none' or checkpoint paths")
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--json", default=None, help="also write every figure here")
    ap.add_argument("--examples", action="store_true",
                    help="only the page's example sketches: each one's rank and first row (needs no data)")
    args = ap.parse_args(argv)
    for c in args.checkpoints:
        if c not in ("default", "none") and not stored_checkpoint(c).is_file():  # a file, or its shards
            ap.error(f"no checkpoint file {c}")
    if args.examples:
        for c in args.checkpoints:
            res = example_ranks(c)
            print(f"`{c}`")
            for name, r in res["examples"].items():
                print(f"{name:8s} rank {r['rank'] or '>12':>4}  first row: {', '.join(r['first_row'])}")
            print(f"{res['in_top5']} of {len(res['examples'])} examples have their class in the first five")
        return 0
    try:
        data = data_root(args.data)
    except InputError as exc:
        ap.error(str(exc))
    results = {c: measure(data, c) for c in args.checkpoints}
    diffs = differences(results) if len(results) > 1 else {}
    if args.json:
        lean = {c: {row: {k: v for k, v in m.items() if k != "per_query"} for row, m in r.items()}
                for c, r in results.items()}
        Path(args.json).write_text(json.dumps({"results": lean, "differences": diffs}, indent=1))
    print(table(results))
    if diffs:
        print()
        print(difference_table(diffs, args.checkpoints[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
