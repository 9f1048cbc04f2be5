"""`explain` (why a drawing matched a picture) and `map` (the gallery's map)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from sbir_core.cli import common

log = logging.getLogger(__name__)


def explain_encoder(checkpoint: str) -> Any:
    """The encoder `explain` uses (tests substitute an already-loaded one)."""
    from sbir_core.models.encoders import DEFAULT_CHECKPOINT, create_encoder

    if checkpoint == "default" and not DEFAULT_CHECKPOINT.is_file():
        log.info("no default checkpoint; explaining with the raw backbone's tokens")
        checkpoint = "none"
    return create_encoder(checkpoint=checkpoint)


def _cmd_explain(args: argparse.Namespace) -> int:
    from sbir_core.data.drawing import load_stroke_file
    from sbir_core.explain.correspondence import explain_pair
    from sbir_core.models.relation import relation_for

    enc = explain_encoder(args.checkpoint)
    relation = None if args.relation == "none" else relation_for(enc, None if args.relation == "auto" else args.relation)
    if args.query_photo:
        query, kind = args.query_photo, "photo"
    else:
        query, kind = (load_stroke_file(args.strokes, args.line) if args.strokes else args.sketch), "sketch"
    ex = explain_pair(enc, query, args.photo, relation=relation, query_kind=kind)
    paths = ex.save(args.out)
    score = f", relation score {ex.relation_score:.3f}" if ex.relation_score is not None else ""
    print(f"{len(ex.matches)} matches ({int(ex.mutual.sum())} mutual){score}")
    for k in ("correspondences", "heatmap", "synthesis"):
        print(paths[k])
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    from sbir_core.data.drawing import load_stroke_file
    from sbir_core.explain.embedding_map import gallery_map
    from sbir_core.gallery.query import encode_query

    gallery, enc, _ = common.open_gallery(args.gallery, None, args.checkpoint, args.galleries)
    m = gallery_map(gallery)  # the one map pipeline (the app's): stored with the gallery once fitted
    query_xy = highlight = None
    sketch = load_stroke_file(args.strokes, args.line) if args.strokes else args.sketch
    if sketch is not None:
        q = encode_query(enc, sketch=sketch)
        highlight = [r.index for r in gallery.search(q, args.k)]  # ranked as `search` and the app rank
        query_xy = m.place_by_results(highlight)  # the star with its results, as on the page
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{Path(gallery.root).name if gallery.root else 'gallery'}: {len(m)} images"
    m.render(query_xy=query_xy, highlight=highlight, title=title, thumbnails=gallery.paths).save(out)
    print(out)
    return 0


def add(sub: Any) -> None:
    p = sub.add_parser("explain", help="explain a sketch-photo match: correspondences, heatmap, synthesis")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--sketch", help="the query drawing (an image)")
    q.add_argument("--strokes", metavar="FILE", help="the query drawing as strokes (.json or QuickDraw .ndjson)")
    q.add_argument("--query-photo", metavar="IMAGE", help="a photo query (explained through its outline)")
    p.add_argument("--line", type=int, default=0, help="--strokes .ndjson: which drawing (0-based)")
    p.add_argument("--photo", required=True, help="the result to explain (an image)")
    p.add_argument("--out", required=True, help="folder for correspondences.png, heatmap.png, synthesis.png")
    p.add_argument("--checkpoint", default="default", metavar="default|none|PATH",
                   help="encoder checkpoint (the tokens come from its backbone; default: the shipped one, "
                        "falling back to the raw backbone if it is missing)")
    p.add_argument("--relation", default="auto", metavar="auto|none|PATH",
                   help="relation model: auto = checkpoints/relation.safetensors if present (default)")
    p.set_defaults(func=_cmd_explain)

    t = sub.add_parser("map", help="draw a gallery's t-SNE map (optionally with a sketch placed in it)")
    t.add_argument("--gallery", required=True, metavar="DIR|NAME", help="gallery folder or name")
    t.add_argument("--galleries", default=None, metavar="DIR", help="also look for named galleries here")
    t.add_argument("--checkpoint", default=None, metavar="default|none|PATH",
                   help="model for a named gallery (default: the shipped one)")
    tq = t.add_mutually_exclusive_group()
    tq.add_argument("--sketch", default=None, help="sketch to place on the map (its top results are framed)")
    tq.add_argument("--strokes", metavar="FILE", help="the same, as strokes (.json or QuickDraw .ndjson)")
    t.add_argument("--line", type=int, default=0, help="--strokes .ndjson: which drawing (0-based)")
    t.add_argument("--out", required=True, help="output PNG")
    t.add_argument("--k", type=int, default=10, help="results to highlight with --sketch")
    t.set_defaults(func=_cmd_map)
