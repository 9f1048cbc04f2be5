"""Where each example drawing on the page finds its class in the default gallery, searched
exactly as the page's example buttons search (`app.Callbacks.search_example`), with any
checkpoint (the shipped one is what `tests/test_shipped_model.py` checks).

    python scripts/bench_examples.py                        # shipped checkpoint and index
    python scripts/bench_examples.py --checkpoint v3.safetensors   # indexes the gallery for it first
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(checkpoint: str = "default", k: int = 12, encoder=None) -> dict:
    """Each example's rank and first row -> {"checkpoint", "in_top5", "examples": {name: {...}}};
    `encoder`: the checkpoint's, already loaded (else the service loads it)."""
    import sbir_app as app_module
    from sbir_core.data.examples import list_examples
    from sbir_core.service import RetrievalService

    with tempfile.TemporaryDirectory() as tmp:  # a checkpoint other than the shipped one re-indexes here
        svc = RetrievalService(ROOT / "galleries", gallery="default", checkpoint=checkpoint, encoder=encoder, relation=None,
                               cache_dir=Path(tmp) / "cache", uploads_dir=Path(tmp) / "user")
        calls = app_module.Callbacks(svc)
        rows = {}
        for e in list_examples():
            _, msg, query = calls.search_example(e.name, k, "default")
            if query is None:
                raise SystemExit(f"{e.name}: {msg}")
            labels = [h.label for h in query.hits]
            rows[e.name] = {"rank": labels.index(e.name) + 1 if e.name in labels else None, "first_row": labels[:5]}
    found = sum(1 for r in rows.values() if r["rank"] and r["rank"] <= 5)
    return {"checkpoint": checkpoint, "in_top5": found, "examples": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="default", help="'default' or a checkpoint path")
    ap.add_argument("--k", type=int, default=12, help="results per search (the page shows 12)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.checkpoint, args.k)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for name, r in res["examples"].items():
            print(f"{name:8s} rank {r['rank'] or f'>{args.k}':>4}  first row: {', '.join(r['first_row'])}")
        print(f"{res['in_top5']} of {len(res['examples'])} examples have their class in the first five")
    return 0


if __name__ == "__main__":
    sys.exit(main())
