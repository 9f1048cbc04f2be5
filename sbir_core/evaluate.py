"""`eval`: zero-shot retrieval metrics for an encoder on a benchmark split or on folders.

Backbone features go through the on-disk feature cache (`features.py`), so
re-evaluating another checkpoint on the same data costs seconds, not minutes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from sbir_core.data import Item, benchmark, folder_items, training_items
from sbir_core.encoders import SBIREncoder, create_encoder
from sbir_core.features import extract_features
from sbir_core.index import Gallery
from sbir_core.metrics import retrieval_report

log = logging.getLogger(__name__)


def embed_items(
    encoder: SBIREncoder, items: Sequence[Item], modality: str, cache_dir: Union[str, Path, None] = None
) -> tuple[np.ndarray, np.ndarray]:
    """-> (L2-normalised float32 embeddings, ok mask) of items seen as `modality`."""
    if modality == "sketch":
        # The same embedding SBIREncoder.encode gives (flip averaging included), from cached features.
        f = extract_features(encoder, items, "sketch", cache_dir=cache_dir, desc="queries")
        with torch.inference_mode():
            emb = encoder.embed_sketch(torch.from_numpy(f["pooled"]).float(), torch.from_numpy(f["raw"]).float())
            if encoder.flip_sketches:
                m = extract_features(encoder, items, "sketch_flip", cache_dir=cache_dir, desc="mirrored queries")
                mirror = encoder.embed_sketch(torch.from_numpy(m["pooled"]).float(), torch.from_numpy(m["raw"]).float())
                emb = F.normalize(emb.float(), dim=-1) + F.normalize(mirror.float(), dim=-1)
        ok = f["ok"]
    else:
        f = extract_features(encoder, items, "photo", cache_dir=cache_dir, desc="gallery")
        ok = f["ok"]
        edge = None
        if encoder.photo_uses_edges:
            fe = extract_features(encoder, items, "edges_sketch", cache_dir=cache_dir, desc="gallery edges")
            edge = torch.from_numpy(fe["pooled"]).float()
            ok = ok & fe["ok"]
        with torch.inference_mode():
            emb = encoder.embed_photo(torch.from_numpy(f["pooled"]).float(), torch.from_numpy(f["raw"]).float(), edge)
    return F.normalize(emb.float(), dim=-1).numpy(), ok


def evaluate(
    encoder: SBIREncoder,
    queries: Sequence[Item],
    gallery: Sequence[Item],
    cache_dir: Union[str, Path, None] = None,
    diffusion: bool = True,
) -> dict:
    """Embed queries (in their own modality) and gallery, rank, and report metrics.

    `diffusion` applies the gallery diffusion the checkpoint prescribes (as searches do)."""
    if not queries or not gallery:
        raise ValueError(f"nothing to evaluate: {len(queries)} queries, {len(gallery)} gallery items")
    q, qok = embed_items(encoder, queries, queries[0].modality, cache_dir)
    g, gok = embed_items(encoder, gallery, gallery[0].modality, cache_dir)
    if not qok.all() or not gok.all():
        log.warning("dropping %d queries and %d gallery items that failed to load", (~qok).sum(), (~gok).sum())
    ql = [it.label for it, k in zip(queries, qok) if k]
    gl = [it.label for it, k in zip(gallery, gok) if k]
    k = encoder.diffusion_k if diffusion else 0
    # The same Gallery class the app and `search` use, so eval measures what ships.
    scores = Gallery.from_embeddings(g[gok], labels=gl, diffusion_k=k).score_all(q[qok])
    report = retrieval_report(scores, ql, gl, ks=(100, 200))
    report["encoder"] = encoder.encoder_id
    report["diffusion_k"] = k
    return report


def evaluate_split(encoder: SBIREncoder, data_root: Union[str, Path], split: str,
                   cache_dir: Union[str, Path, None] = None, diffusion: bool = True,
                   generalized: bool = False) -> dict:
    """A benchmark split. `generalized` adds every Caltech photo of the training classes
    to the gallery (as distractors): real galleries mix seen and unseen classes."""
    queries, gallery = benchmark(data_root, split)
    if generalized:
        gallery = gallery + [i for i in training_items(data_root, hold_out_doodles=False) if i.modality == "photo"]
    report = evaluate(encoder, queries, gallery, cache_dir, diffusion)
    return {"split": split, "generalized": generalized, **report}


SUMMARY_KEYS = ("mAP@all", "P@100", "mAP@200", "P@200")
FIRST_ROW_KEYS = ("hit@1", "hit@5", "P@5", "P@10")


def format_report(r: dict) -> str:
    lines = [f"encoder {r.get('encoder')}  queries {r['n_queries']}  gallery {r['n_gallery']}  "
             f"gallery diffusion k={r.get('diffusion_k', 0)}"]
    lines.append("  ".join(f"{k} {r[k]:.4f}" for k in SUMMARY_KEYS))
    lines.append("first row: " + "  ".join(f"{k} {r[k]:.4f}" for k in FIRST_ROW_KEYS))
    lines.append("")
    lines.append(f"{'class':<24}{'queries':>8}{'mAP@all':>10}{'P@100':>8}{'hit@5':>8}{'P@5':>8}")
    for label, c in sorted(r["per_class"].items(), key=lambda kv: str(kv[0])):
        lines.append(f"{str(label):<24}{c['n_queries']:>8}{c['mAP@all']:>10.4f}{c['P@100']:>8.4f}"
                     f"{c['hit@5']:>8.4f}{c['P@5']:>8.4f}")
    return "\n".join(lines)


def _run(args) -> int:
    from sbir_core.cli import CLIError

    encoder = create_encoder(args.encoder, checkpoint=args.checkpoint)
    cache = None if args.no_cache else args.cache_dir
    if args.split:
        if not args.data:
            raise CLIError("--split needs --data (the shared data folder, e.g. ../shared/data)")
        report = evaluate_split(encoder, args.data, args.split, cache, diffusion=not args.no_diffusion,
                                generalized=args.generalized)
    elif args.queries and args.gallery:
        queries = folder_items(args.queries, modality="sketch")
        gallery = folder_items(args.gallery, modality="photo")
        if args.no_cache:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                report = evaluate(encoder, queries, gallery, tmp, diffusion=not args.no_diffusion)
        else:
            report = evaluate(encoder, queries, gallery, cache, diffusion=not args.no_diffusion)
    else:
        raise CLIError("give --data DIR --split NAME, or --queries PATH --gallery PATH")
    if args.json:
        print(json.dumps({k: report[k] for k in (*SUMMARY_KEYS, *FIRST_ROW_KEYS, "n_queries", "n_gallery")}
                         | {k: report[k] for k in ("per_class", "encoder", "diffusion_k")}))
    else:
        print(format_report(report))
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("eval", help="mAP@all, P@100/200, hit@1/5, P@5/10 on a split or on folders")
    p.add_argument("--data", help="shared data folder holding splits.json")
    p.add_argument("--split", help="benchmark split name, e.g. pacs or doodle")
    p.add_argument("--queries", help="folder of class subfolders (images) or of .ndjson files")
    p.add_argument("--gallery", help="folder of class subfolders of photos")
    p.add_argument("--encoder", default=None, help="backbone (default: the checkpoint's)")
    p.add_argument("--checkpoint", default="default", help="'default', 'none' (raw backbone) or a path")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default $SBIR_HOME/cache/features)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--no-diffusion", action="store_true", help="embedding similarity only (no gallery diffusion)")
    p.add_argument("--generalized", action="store_true",
                   help="add every Caltech photo of the training classes to a split's gallery")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)
