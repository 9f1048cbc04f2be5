"""`python -m sbir_core`: the command line, one subcommand per capability.

This module owns the whole command line: every subcommand's arguments, its handler
(read the arguments, call the library, print) and how failures are reported. The
library modules hold no argparse code and print nothing.

Building the parser must stay cheap (`--help` answers at once): handlers import the
library inside the function body, and the few library constants the parser needs
(choices, defaults, help text) are mirrored below; tests/test_cli.py checks that the
mirrors match the originals and that building the parser loads no torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from sbir_core.errors import SBIRError
from sbir_core.paths import cache_dir, checkpoint_path

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- mirrored constants
# Copies of library constants, so that building the parser imports no heavy module.
INDEX_TYPES = ("flat", "hnsw", "ivf")  # index.INDEX_TYPES
GALLERY_MODALITIES = ("photo", "sketch")  # index.GALLERY_MODALITIES
TRAIN_LOSSES = ("text", "center", "recon", "disc", "latent", "triplet", "decoder", "cls", "pair",
                "xclass")  # train.LOSSES
RELATION_TOPK = 50  # relation.DEFAULT_TOPK
FINETUNE_SELECT = ("zero-shot", "zero-shot+seen")  # finetune.SELECT
LITE_BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")  # encoders._LITE_PACKAGES

# What `eval` prints, in this order.
SUMMARY_KEYS = ("mAP@all", "P@100", "mAP@200", "P@200")
FIRST_ROW_KEYS = ("hit@1", "hit@5", "P@5", "P@10")


class CLIError(Exception):
    """An error the command line reports as one clear line, without a traceback."""


# ----------------------------------------------------------------------------- index, search
def _load_encoder(name: Optional[str], checkpoint: Optional[str]) -> Any:
    """Separate function so tests can substitute an already-loaded encoder."""
    from sbir_core.models.encoders import create_encoder

    return create_encoder(name, checkpoint=checkpoint)


def format_build_report(report: Any) -> str:
    """One `index.BuildReport` as printed by `index`."""
    lines = [
        f"gallery {report.out_dir}: {report.total} items ({report.index_type} index)"
        + ("" if report.written else ", unchanged"),
        f"  added {report.added}, updated {report.updated}, reused {report.reused}, "
        f"removed {report.removed}, skipped {len(report.skipped)}  [{report.seconds:.1f} s]",
    ]
    if report.rebuilt_reason:
        lines.append(f"  re-encoded everything: {report.rebuilt_reason}")
    if report.skipped:
        lines.append("  skipped files:")
        lines += [f"    {p}: {why}" for p, why in report.skipped]
    return "\n".join(lines)


def format_results_table(results: Sequence[Any]) -> str:
    """`index.SearchResult`s as the table `search` prints."""
    if not results:
        return "(no results)"
    rows = [(str(r + 1), f"{res.score:.4f}", res.label or "-", res.path) for r, res in enumerate(results)]
    head = ("rank", "score", "label", "path")
    widths = [max(len(h), *(len(row[c]) for row in rows)) for c, h in enumerate(head)]
    fmt = lambda row: "  ".join(  # noqa: E731 - right-align numbers, left-align text
        (v.rjust(w) if c < 2 else v.ljust(w)) for c, (v, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(head)] + [fmt(row) for row in rows])


def _cmd_index(args: argparse.Namespace) -> int:
    from sbir_core.gallery.build import build_gallery

    source = Path(args.photo_dir)
    if not source.is_dir():
        raise CLIError(f"not a folder: {source}")
    encoder = _load_encoder(args.encoder, args.checkpoint)
    gallery, report = build_gallery(
        source, args.out, encoder, modality=args.modality, index_type=args.index_type,
        store_tokens=not args.no_tokens, batch_size=args.batch_size, progress=not args.quiet,
        checkpoint=args.checkpoint,
    )
    print(format_build_report(report))
    print("  " + format_search_settings(gallery))
    return 0


def format_search_settings(gallery: Any) -> str:
    """How a gallery is searched (from its encoder's checkpoint), as `index` prints it."""
    from sbir_core.gallery.calibration import describe
    from sbir_core.gallery.index import PLAIN_HEAD

    k, cal = gallery.diffusion_k, gallery.calibration
    return (f"searched with {f'gallery diffusion k={k} after the first {PLAIN_HEAD} results' if k else 'no diffusion'}"
            f", seen-class calibration {describe(cal.setting if cal is not None else None)}")


def _search_encoder_spec(gallery: Any, name: Optional[str], checkpoint: Optional[str]) -> tuple[Optional[str], str]:
    """Which encoder to query `gallery` with: the gallery's own unless the user names another."""
    g_name = gallery.meta.get("encoder_name") or gallery.encoder_id.rsplit("@", 1)[0]
    g_ckpt = gallery.meta.get("checkpoint") or "none"
    if checkpoint is None and name is None:
        if g_ckpt.startswith("<"):
            raise CLIError(f"gallery {gallery.root} does not record its checkpoint file; pass --checkpoint PATH")
        return g_name, g_ckpt
    ckpt = checkpoint if checkpoint is not None else g_ckpt
    if ckpt.lower() == "none":
        return name or g_name, "none"
    return name, ckpt  # a checkpoint names its own backbone


def _gallery_roots(extra: Optional[str] = None) -> list[Path]:
    """Where named galleries live: --galleries, the checkout's galleries/, $SBIR_HOME/galleries."""
    from sbir_core.paths import SHIPPED_GALLERIES, galleries_dir

    return [Path(r) for r in ([extra] if extra else []) + [str(SHIPPED_GALLERIES), str(galleries_dir())]]


def _open_gallery(arg: str, encoder_name: Optional[str], checkpoint: Optional[str], roots: Optional[str] = None,
                  ef_search: Optional[int] = None, nprobe: Optional[int] = None) -> tuple[Any, Any, str]:
    """--gallery as a folder (queried with the encoder that built it) or as a name (as the
    app opens it: with the shipped model unless --checkpoint says otherwise, re-indexed
    into the cache if it was built with another model). -> (gallery, encoder, checkpoint)."""
    from sbir_core.gallery.identity import check_encoder
    from sbir_core.gallery.index import GALLERY_FILE, Gallery

    folder = Path(arg)
    if folder.is_dir():
        nested = sorted(folder.glob(f"*/{GALLERY_FILE}"))
        if not (folder / GALLERY_FILE).is_file() and len(nested) == 1:  # galleries/x/index/ beside x/images/
            folder = nested[0].parent
        gallery = Gallery.load(folder, ef_search=ef_search, nprobe=nprobe)
        name, ckpt = _search_encoder_spec(gallery, encoder_name, checkpoint)
        encoder = _load_encoder(name, ckpt)
        check_encoder(gallery, encoder, checkpoint=ckpt)
        return gallery, encoder, ckpt
    from sbir_core.gallery.store import GalleryStore

    ckpt = checkpoint or "default"
    encoder = _load_encoder(encoder_name, ckpt)
    known = []
    for root in _gallery_roots(roots):
        store = GalleryStore(encoder, ckpt, root)
        names = store.list_galleries()
        known += names
        if arg in names:
            gallery = store.get(arg).gallery
            gallery.set_search_params(ef_search=ef_search, nprobe=nprobe)
            return gallery, encoder, ckpt
    raise CLIError(f"no gallery folder or name {arg!r}; named galleries: {', '.join(sorted(set(known))) or 'none'} "
                   "(see `gallery list`)")


def _cmd_search(args: argparse.Namespace) -> int:
    from sbir_core.data.drawing import load_stroke_file
    from sbir_core.gallery.query import encode_query, encode_sketch_query, search_reranked

    gallery, encoder, _ = _open_gallery(args.gallery, args.encoder, args.checkpoint, args.galleries,
                                        args.ef_search, args.nprobe)
    sketch = load_stroke_file(args.strokes, args.line) if args.strokes else args.sketch
    if args.rerank and sketch is None:
        raise CLIError("--rerank re-ranks sketch queries (--sketch or --strokes)")
    if sketch is not None and (args.rerank or args.brush is not None):
        from sbir_core.data.images import load_image

        sq = encode_sketch_query(encoder, load_image(sketch) if isinstance(sketch, str) else sketch, brush=args.brush)
        if args.rerank:
            from sbir_core.models.relation import load_relation

            results = search_reranked(gallery, load_relation(), sq, args.k)
        else:
            results = gallery.search(sq.embedding, args.k)
    else:
        results = gallery.search(encode_query(encoder, sketch=sketch, photo=args.photo, text=args.text), args.k)
    if args.json:
        print(json.dumps([{"path": r.path, "score": round(r.score, 6), "label": r.label} for r in results], indent=2))
    else:
        print(format_results_table(results))
    return 0


def _add_index(sub: Any) -> None:
    p = sub.add_parser(
        "index", help="embed a folder of images into a searchable gallery (incremental)",
        description="Embed every image under PHOTO_DIR (class = first-level subfolder) into GALLERY_DIR. "
                    "Re-running only encodes new and changed files.",
    )
    p.add_argument("photo_dir", metavar="PHOTO_DIR")
    p.add_argument("--out", required=True, metavar="GALLERY_DIR", help="gallery folder to create or update")
    p.add_argument("--encoder", default=None, metavar="NAME",
                   help="backbone (default: the checkpoint's, else efficientnet-lite0)")
    p.add_argument("--checkpoint", default="default", metavar="default|none|PATH",
                   help="trained heads: the shipped default, none (raw backbone) or a file (default: default)")
    p.add_argument("--index-type", choices=INDEX_TYPES, default="flat",
                   help="flat = exact (default); hnsw / ivf = approximate, for large galleries")
    p.add_argument("--modality", choices=GALLERY_MODALITIES, default="photo", help="what the images are")
    p.add_argument("--no-tokens", action="store_true", help="do not store token grids (no explanations)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_index)

    s = sub.add_parser(
        "search", help="search a gallery with a sketch, a photo or text",
        description="Query a gallery; the encoder defaults to the one the gallery was built with.",
    )
    s.add_argument("--gallery", required=True, metavar="DIR|NAME",
                   help="a gallery folder, or a gallery's name (see `gallery list`), as the app names it")
    s.add_argument("--galleries", default=None, metavar="DIR", help="also look for named galleries here")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--sketch", metavar="IMAGE", help="sketch image (dark ink on light, or transparent canvas)")
    q.add_argument("--strokes", metavar="FILE", help="strokes: the page's JSON ({\"strokes\": [[[x, y], ...], ...]}) "
                                                      "or QuickDraw .ndjson (see --line)")
    q.add_argument("--photo", metavar="IMAGE", help="photo query")
    q.add_argument("--text", metavar="TEXT", help='text query, e.g. "a cat" (needs a checkpoint with a text head)')
    s.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    s.add_argument("--line", type=int, default=0, help="--strokes .ndjson: which drawing (0-based, default 0)")
    s.add_argument("--brush", type=float, default=None, metavar="PX",
                   help="the brush width the strokes were drawn with on a 384 px canvas (as the page sends it)")
    s.add_argument("--rerank", action="store_true",
                   help="re-rank the top candidates with the relation network (sketch queries; needs token grids)")
    s.add_argument("--json", action="store_true", help='print a JSON list of {"path", "score", "label"}')
    s.add_argument("--encoder", default=None, metavar="NAME", help="override the gallery's backbone")
    s.add_argument("--checkpoint", default=None, metavar="default|none|PATH",
                   help="override the gallery's checkpoint (must match it)")
    s.add_argument("--ef-search", type=int, default=None, help="hnsw: candidates per query (recall vs speed)")
    s.add_argument("--nprobe", type=int, default=None, help="ivf: lists probed per query (recall vs speed)")
    s.set_defaults(func=_cmd_search)


# ----------------------------------------------------------------------------- eval
def format_eval_report(r: dict) -> str:
    """An `evaluate.evaluate` report as the text `eval` prints."""
    from sbir_core.gallery.calibration import describe
    from sbir_core.gallery.index import PLAIN_HEAD

    lines = [f"encoder {r.get('encoder')}  queries {r['n_queries']}  gallery {r['n_gallery']}  "
             f"gallery diffusion k={r.get('diffusion_k', 0)}"
             + (f" after the first {PLAIN_HEAD} results" if r.get("diffusion_k") else "")
             + "  seen-class calibration " + describe(r.get("seen_calibration"))]
    lines.append("  ".join(f"{k} {r[k]:.4f}" for k in SUMMARY_KEYS))
    lines.append("first row: " + "  ".join(f"{k} {r[k]:.4f}" for k in FIRST_ROW_KEYS))
    lines.append("")
    lines.append(f"{'class':<24}{'queries':>8}{'mAP@all':>10}{'P@100':>8}{'hit@5':>8}{'P@5':>8}")
    for label, c in sorted(r["per_class"].items(), key=lambda kv: str(kv[0])):
        lines.append(f"{str(label):<24}{c['n_queries']:>8}{c['mAP@all']:>10.4f}{c['P@100']:>8.4f}"
                     f"{c['hit@5']:>8.4f}{c['P@5']:>8.4f}")
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    # Check what was asked for before loading a model: a wrong --data or --split fails at once.
    if args.split:
        if not args.data:
            raise CLIError("--split needs --data (the shared data folder, e.g. ../shared/data)")
        from sbir_core.data.datasets import get_split, load_splits

        get_split(load_splits(args.data), args.split)
    elif not (args.queries and args.gallery):
        raise CLIError("give --data DIR --split NAME, or --queries PATH --gallery PATH")

    from sbir_core.data.datasets import folder_items
    from sbir_core.models.encoders import create_encoder
    from sbir_core.eval.evaluate import evaluate, evaluate_split

    encoder = create_encoder(args.encoder, checkpoint=args.checkpoint)
    cache = None if args.no_cache else args.cache_dir
    ranking = {"diffusion": not args.no_diffusion, "calibration": not args.no_calibration}
    if args.split:
        report = evaluate_split(encoder, args.data, args.split, cache, generalized=args.generalized, **ranking)
    else:
        queries = folder_items(args.queries, modality="sketch")
        gallery = folder_items(args.gallery, modality="photo")
        if args.no_cache:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                report = evaluate(encoder, queries, gallery, tmp, **ranking)
        else:
            report = evaluate(encoder, queries, gallery, cache, **ranking)
    if args.json:
        print(json.dumps({k: report[k] for k in (*SUMMARY_KEYS, *FIRST_ROW_KEYS, "n_queries", "n_gallery")}
                         | {k: report[k] for k in ("per_class", "encoder", "diffusion_k", "seen_calibration")}))
    else:
        print(format_eval_report(report))
    return 0


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="mAP@all, P@100/200, hit@1/5, P@5/10 on a split or on folders")
    p.add_argument("--data", help="shared data folder holding splits.json")
    p.add_argument("--split", help="benchmark split name, e.g. pacs or doodle")
    p.add_argument("--queries", help="folder of class subfolders (images) or of .ndjson files")
    p.add_argument("--gallery", help="folder of class subfolders of photos")
    p.add_argument("--encoder", default=None, help="backbone (default: the checkpoint's)")
    p.add_argument("--checkpoint", default="default", help="'default', 'none' (raw backbone) or a path")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default $SBIR_HOME/cache/features)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--no-diffusion", action="store_true", help="no gallery diffusion")
    p.add_argument("--no-calibration", action="store_true",
                   help="no seen-class calibration (with --no-diffusion: the embedding's similarity alone)")
    p.add_argument("--generalized", action="store_true",
                   help="add every Caltech photo of the training classes to a split's gallery")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)


# ----------------------------------------------------------------------------- train, finetune
def _cmd_train(args: argparse.Namespace) -> int:
    from sbir_core.training.train import LOSSES, TrainConfig, train

    cfg = TrainConfig.from_recipe(args.recipe)
    for kv in args.loss or []:
        k, _, v = kv.partition("=")
        if k not in LOSSES:
            raise ValueError(f"unknown loss {k!r}; known: {', '.join(LOSSES)}")
        cfg.losses[k] = float(v)
    for name in ("steps", "seed", "lr", "batch", "photo_edge_weight", "embed_dim", "hidden"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    if args.encoder:
        cfg.encoder = args.encoder
    if args.exclude_split:
        cfg.exclude = tuple(args.exclude_split)
    if args.no_edges:
        cfg.use_edges = False
    out = None if args.out == "none" else Path(args.out)
    res = train(cfg, Path(args.data), out)
    summary = {k: res[k] for k in ("val_mAP", "best_step", "diffusion_k", "val_mAP_by_diffusion", "benchmarks",
                                   "data_fingerprint", "seconds")}
    print(json.dumps(summary, indent=1))
    if out:
        print(f"saved {out}")
    return 0


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train the heads on cached backbone features")
    p.add_argument("--data", required=True, help="shared data folder (splits.json, caltech101, quickdraw)")
    p.add_argument("--recipe", default="default", help="recipe name in sbir_core/recipes or a JSON path")
    p.add_argument("--out", default="none",
                   help="checkpoint path, or 'none' (default: print the scores only; the shipped model comes "
                        "from `finetune`, so this never overwrites it by accident)")
    p.add_argument("--loss", action="append", metavar="NAME=WEIGHT",
                   help=f"override a loss weight ({', '.join(TRAIN_LOSSES)})")
    p.add_argument("--exclude-split", action="append", help="benchmark split never to train on (repeatable)")
    p.add_argument("--encoder", help="backbone, e.g. efficientnet-lite2")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch", type=int)
    p.add_argument("--embed-dim", dest="embed_dim", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--photo-edge-weight", dest="photo_edge_weight", type=float)
    p.add_argument("--no-edges", action="store_true", help="no photo edge maps as pseudo-sketches")
    p.set_defaults(func=_cmd_train)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from sbir_core.training.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig()
    for name in ("steps", "image_size", "lr_backbone", "lr_head", "freeze_blocks", "seed", "val_every",
                 "sketches_per_step", "photos_per_step", "doodle_photos_per_step", "max_photos_per_class",
                 "warmup", "init", "w_text", "w_triplet", "w_pair", "w_preserve", "select", "encoder", "device", "workers"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    cfg.heldout_outside_gallery = not args.heldout_anywhere
    if args.interpolate:
        try:
            cfg.interpolate = tuple(float(a) for a in args.interpolate.split(","))
        except ValueError:
            cfg.interpolate = ()
        if not cfg.interpolate or not all(0.0 < a <= 1.0 for a in cfg.interpolate):
            raise CLIError(f"--interpolate takes weights in (0, 1] like 1,0.8,0.6, not {args.interpolate!r}")
    res = finetune(cfg, Path(args.data), Path(args.out), cache=Path(args.cache) if args.cache else None)
    print(json.dumps({"best": res["best"], "seconds": res["seconds"]}, indent=1))
    print(f"saved {args.out}")
    return 0


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser("finetune", help="train backbone and heads end to end (encoder v2; resumable)")
    p.add_argument("--data", required=True, help="shared data folder (splits.json, caltech101, quickdraw)")
    p.add_argument("--out", default=str(checkpoint_path("default")), help="checkpoint to write (default: the shipped one)")
    p.add_argument("--cache", default=str(cache_dir() / "finetune"),
                   help="folder for decoded training photos (default $SBIR_HOME/cache/finetune; '' = none)")
    p.add_argument("--steps", type=int)
    p.add_argument("--encoder", choices=LITE_BACKBONES, help="backbone to fine-tune (default efficientnet-lite0)")
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--init", metavar="CHECKPOINT", help="continue from a trained checkpoint (backbone and heads)")
    p.add_argument("--warmup", type=int, help="learning-rate warm-up steps")
    p.add_argument("--lr-backbone", dest="lr_backbone", type=float)
    p.add_argument("--lr-head", dest="lr_head", type=float)
    p.add_argument("--freeze-blocks", dest="freeze_blocks", type=int)
    p.add_argument("--sketches-per-step", dest="sketches_per_step", type=int)
    p.add_argument("--photos-per-step", dest="photos_per_step", type=int)
    p.add_argument("--doodle-photos-per-step", dest="doodle_photos_per_step", type=int,
                   help="doodles coloured like clip-art, on the photo side, per step")
    p.add_argument("--max-photos-per-class", dest="max_photos_per_class", type=int)
    p.add_argument("--val-every", dest="val_every", type=int)
    p.add_argument("--interpolate", metavar="A,B,...",
                   help="WiSE-FT: backbone weights a*trained + (1-a)*ImageNet, a chosen from these on held-out "
                        "classes (default 1: off); with --init and --steps 0, applied to a trained checkpoint")
    p.add_argument("--w-text", dest="w_text", type=float,
                   help="weight of aligning sketches and photos to their class-name text (MA-SBIR; default 1)")
    p.add_argument("--w-triplet", dest="w_triplet", type=float,
                   help="weight of the cross-modal sketch-photo triplet loss (ZSCMR; default 0.5)")
    p.add_argument("--w-pair", dest="w_pair", type=float,
                   help="weight of matching each photo with its own edge map among the batch (default 0.5)")
    p.add_argument("--w-preserve", dest="w_preserve", type=float,
                   help="weight of keeping the ImageNet backbone's photo-to-photo relations (default 0: off)")
    p.add_argument("--select", choices=FINETUNE_SELECT,
                   help="what picks the step: held-out classes only, or also held-out doodles of training "
                        "classes (default; the shipped model's runs used zero-shot)")
    p.add_argument("--heldout-anywhere", action="store_true",
                   help="draw the held-out selection classes from every training class, default-gallery classes "
                        "included (how the v2 checkpoint was trained); default: from classes outside that gallery; "
                        "with --init, the start's held-out classes (less the gallery's unless this is given)")
    p.add_argument("--device", help="torch device to train on (default: cuda when there is one, else cpu)")
    p.add_argument("--workers", type=int,
                   help="processes that make the batches (default 0; on a GPU machine, its CPU cores)")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_cmd_finetune)


# ----------------------------------------------------------------------------- relation model
def _require_splits(data: str) -> None:
    if not (Path(data) / "splits.json").is_file():
        raise CLIError(f"--data {data}: no splits.json there; pass the shared data folder")


def _cmd_train_relation(args: argparse.Namespace) -> int:
    _require_splits(args.data)
    from sbir_core.training.relation import train_relation

    _, meta = train_relation(args.data, out=args.out, epochs=args.epochs, seed=args.seed,
                             encoder_name=args.encoder, allow_extract=not args.no_extract,
                             max_photos_per_class=args.max_photos_per_class or None,
                             checkpoint=args.checkpoint)
    print(json.dumps({k: meta[k] for k in ("val_mAP_all", "val_mAP_all_base", "best_epoch", "val_classes",
                                           "train_seconds")}, indent=1))
    print(f"wrote {args.out} (alpha {meta['alpha']:g})")
    return 0


def _cmd_eval_relation(args: argparse.Namespace) -> int:
    _require_splits(args.data)
    from sbir_core.training.relation import benchmark_rerank

    res = benchmark_rerank(args.data, args.split, args.checkpoint, args.embedding, k=args.k, progress=True)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")
    return 0


def _add_relation(sub: Any) -> None:
    p = sub.add_parser("train-relation", help="train the cross-attention relation model (re-ranking, explanations)")
    p.add_argument("--data", required=True, help="the shared data folder (splits.json, caltech101/, quickdraw/)")
    p.add_argument("--out", default=str(checkpoint_path("relation")), help="where to write the model (.safetensors)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", default=None, help="backbone name (default efficientnet-lite0)")
    p.add_argument("--checkpoint", default="none",
                   help="the encoder whose tokens and embedding it works with: 'none' (raw backbone, 14x14 "
                        "tokens), 'default' (the shipped model, 10x10) or a checkpoint path")
    p.add_argument("--max-photos-per-class", type=int, default=80,
                   help="Caltech photos per class (as in the feature cache; 0 = all)")
    p.add_argument("--no-extract", action="store_true", help="fail instead of extracting features missing from the cache")
    p.set_defaults(func=_cmd_train_relation)

    e = sub.add_parser("eval-relation", help="benchmark mAP with and without relation re-ranking")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="pacs")
    e.add_argument("--checkpoint", default=None, help="relation model (default checkpoints/relation.safetensors)")
    e.add_argument("--embedding", default="encoder",
                   help="what is re-ranked: 'encoder' (the relation model's encoder, as search ranks), "
                        "'raw' (its backbone's pooled cosine) or a heads-only checkpoint path")
    e.add_argument("-k", type=int, default=RELATION_TOPK, help="candidates re-ranked per query")
    e.add_argument("--json", default=None, help="also write the result here")
    e.set_defaults(func=_cmd_eval_relation)


# ----------------------------------------------------------------------------- explain, tsne
def _explain_encoder(checkpoint: str) -> Any:
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

    enc = _explain_encoder(args.checkpoint)
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


def _cmd_tsne(args: argparse.Namespace) -> int:
    from sbir_core.data.drawing import load_stroke_file
    from sbir_core.explain.embedding_map import gallery_map
    from sbir_core.gallery.query import encode_query

    gallery, enc, _ = _open_gallery(args.gallery, None, args.checkpoint, args.galleries)
    m = gallery_map(gallery)  # the one map pipeline (the app's): stored with the gallery once fitted
    query_xy = highlight = None
    sketch = load_stroke_file(args.strokes, args.line) if args.strokes else args.sketch
    if sketch is not None:
        q = encode_query(enc, sketch=sketch)
        query_xy = m.place(q[None])[0]
        highlight = [r.index for r in gallery.search(q, args.k)]  # ranked as `search` and the app rank
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{Path(gallery.root).name if gallery.root else 'gallery'}: {len(m)} images"
    m.render(query_xy=query_xy, highlight=highlight, title=title, thumbnails=gallery.paths).save(out)
    print(out)
    return 0


def _add_explain(sub: Any) -> None:
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

    t = sub.add_parser("tsne", help="draw a gallery's t-SNE map (optionally with a sketch placed in it)")
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
    t.set_defaults(func=_cmd_tsne)


# ----------------------------------------------------------------------------- gallery download
def _cmd_gallery_download(args: argparse.Namespace) -> int:
    from sbir_core.data.download import fetch_dataset

    counts = fetch_dataset(args.name, args.out, url=args.url, md5=args.md5, sha256=args.sha256,
                           keep_archive=args.keep_archive)
    out = args.out or Path("galleries") / args.name / "images"
    print(f"{args.name}: {len(counts)} classes, {sum(counts.values())} images in {out}")
    return 0


def _add_gallery(sub: Any) -> None:
    # The dataset registry: standard library and tqdm only, no torch.
    from sbir_core.data.download import DATASETS

    gallery = sub.add_parser("gallery", help="manage image galleries", description="Manage image galleries.")
    actions = gallery.add_subparsers(dest="gallery_command", required=True)
    listing = "; ".join(f"{k}: {v.description}" for k, v in sorted(DATASETS.items()))
    p = actions.add_parser("download", help="download a public gallery (needs internet)",
                           description=f"Download, verify and unpack a public gallery. {listing}")
    p.add_argument("name", metavar="NAME", choices=sorted(DATASETS),
                   help=f"dataset, one of: {', '.join(sorted(DATASETS))}")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder, one subfolder per class (default galleries/NAME/images)")
    p.add_argument("--url", default=None, help="download from this URL instead (a mirror, a test server)")
    p.add_argument("--md5", default=None, help="expected MD5 of the archive (replaces the registered checksum)")
    p.add_argument("--sha256", default=None, help="expected SHA-256 of the archive (replaces the registered checksum)")
    p.add_argument("--keep-archive", action="store_true", help="keep the downloaded archive after extracting")
    p.set_defaults(func=_cmd_gallery_download)

    ls = actions.add_parser("list", help="list the named galleries (what `search --gallery NAME` and the app open)")
    ls.add_argument("--galleries", default=None, metavar="DIR", help="also list the galleries here")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=_cmd_gallery_list)


def _cmd_gallery_list(args: argparse.Namespace) -> int:
    """Reads only each gallery's gallery.json: no model is loaded."""
    from sbir_core.gallery.index import GALLERY_FILE
    from sbir_core.gallery.store import list_gallery_names

    rows, seen = [], set()
    for root in _gallery_roots(args.galleries):
        for name in list_gallery_names(root):
            if name in seen:  # the first root holding a name is the one `search --gallery NAME` opens
                continue
            seen.add(name)
            d = root / name
            meta_file = d / GALLERY_FILE if (d / GALLERY_FILE).is_file() else next(d.glob(f"*/{GALLERY_FILE}"), None)
            meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file else {}
            items = meta.get("items", [])
            rows.append({"name": name, "folder": str(d), "count": len(items), "modality": meta.get("modality", "?"),
                         "classes": len({it.get("label") for it in items}), "encoder": meta.get("encoder_id", "?")})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no named galleries (build one with `index PHOTO_DIR --out GALLERIES_DIR/NAME`)")
    else:
        for r in rows:
            print(f"{r['name']:<20} {r['count']:>6} {r['modality']}s  {r['classes']:>4} classes  {r['folder']}")
    return 0


# ----------------------------------------------------------------------------- serve
def _cmd_serve(args: argparse.Namespace) -> int:
    """Start the browser app (app.py of the source checkout; `serve -- --help` lists its options)."""
    import runpy

    from sbir_core.paths import PACKAGE_DIR

    app = PACKAGE_DIR.parent / "app.py"
    if not app.is_file():
        raise CLIError(f"the browser app (app.py) is not next to this installation ({app}); run it from a source "
                       "checkout: python app.py")
    module = runpy.run_path(str(app), run_name="sbir_app")
    return int(module["main"]([a for a in args.app_args if a != "--"]) or 0)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="start the browser app (the page you draw on)",
                       description="Start the Gradio app; arguments after -- go to it (e.g. -- --port 7861).")
    p.add_argument("app_args", nargs=argparse.REMAINDER, help="options of app.py (see: serve -- --help)")
    p.set_defaults(func=_cmd_serve)


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbir" if Path(sys.argv[0]).name == "sbir" else "python -m sbir_core",
        description="Zero-shot sketch-based image retrieval: index, search, evaluate, train, explain.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    # In the order they appear in --help.
    for add in (_add_index, _add_eval, _add_train, _add_finetune, _add_relation, _add_explain, _add_gallery,
                _add_serve):
        add(sub)
    return parser


# Exit codes: 0 done, 2 a problem the user can fix (one `error:` line), anything else a
# bug (Python's traceback, exit code 1).
EXIT_USER_ERROR = 2


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (SBIRError, CLIError, FileNotFoundError) as exc:
        # The library's own errors (bad input, missing or stale gallery, wrong split ...)
        # and missing files; a ValueError or KeyError from anywhere else is a bug and keeps
        # its traceback.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
