"""`index` (embed a folder into a gallery) and `search` (query one), and how they print."""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any, Sequence

from sbir_core.cli import common


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
    lines += [f"  warning: {w}" for w in report.warnings]
    if report.skipped:
        lines.append("  skipped files:")
        lines += [f"    {p}: {why}" for p, why in report.skipped]
    return "\n".join(lines)


def format_results_table(results: Sequence[Any]) -> str:
    """`SearchResult`s (gallery.results) as the table `search` prints."""
    if not results:
        return "(no results)"
    rows = [(str(r + 1), f"{res.score:.4f}", res.label or "-", res.path) for r, res in enumerate(results)]
    head = ("rank", "score", "label", "path")
    widths = [max(len(h), *(len(row[c]) for row in rows)) for c, h in enumerate(head)]
    fmt = lambda row: "  ".join(  # noqa: E731 - right-align numbers, left-align text
        (v.rjust(w) if c < 2 else v.ljust(w)) for c, (v, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(head)] + [fmt(row) for row in rows])


def _cmd_index(args: argparse.Namespace) -> int:
    from sbir_core.data.manifest import is_manifest
    from sbir_core.gallery.index import build_gallery

    source = Path(args.photo_dir)
    if not source.is_dir() and not is_manifest(source):
        raise common.CLIError(f"not a folder or a manifest (.csv or .parquet with path and label columns): {source}")
    if args.share is None and args.out is None:
        raise common.CLIError("say where the gallery goes: --out GALLERY_DIR, or --share NAME for a class gallery")
    if args.share is not None and (args.engine != "local" or not source.is_dir()):
        raise common.CLIError("--share builds a class gallery from a folder with the local engine")
    if args.engine == "ray":
        from sbir_core.gallery.embed_ray import require_ray

        require_ray()  # before the encoder loads: say at once how to install it
    encoder = common.load_encoder(args.encoder, args.checkpoint)
    encoder.backbone.fuse_for_inference()  # this encoder only embeds: a third less CPU a picture, as the app
    if args.share is not None:
        return _share(args, source, encoder)
    settings = dict(modality=args.modality, index_type=args.index_type, store_tokens=not args.no_tokens,
                    diffusion=not args.no_diffusion, batch_size=args.batch_size, progress=not args.quiet,
                    checkpoint=args.checkpoint)
    if args.engine == "ray":
        from sbir_core.gallery.embed_ray import build_gallery_ray

        gallery, report, engine = build_gallery_ray(
            source, args.out, encoder, shards=args.shards, workers=args.workers,
            gpus_per_worker=args.gpus_per_worker, address=args.address, **settings)
    else:
        gallery, report = build_gallery(source, args.out, encoder, **settings)
    print(format_build_report(report))
    if args.engine == "ray":
        print(f"  ray: {engine.embedded} shards embedded by {engine.workers or 0} workers, {engine.reused} already done"
              + (f" (kept in {engine.shards})" if args.shards else ""))
    print("  " + format_search_settings(gallery))
    return 0


def _share(args: argparse.Namespace, source: Path, encoder: Any) -> int:
    """`index --share NAME`: a class gallery the app opens by its code (copied under
    $SBIR_HOME/class-galleries, kept until its owner deletes it)."""
    from sbir_core.gallery.sharing import CLASS_PREFIX, format_code, lan_address, new_owner_token, valid_owner
    from sbir_core.gallery.store import GalleryStore

    if args.owner is not None and not valid_owner(args.owner):
        raise common.CLIError("--owner takes the 32-letter owner token that `index --share` printed")
    owner = args.owner or new_owner_token()
    store = GalleryStore(encoder, args.checkpoint)
    out = store.share_folder(source, args.share, owner, modality=args.modality)
    if not out.ok:
        raise common.CLIError(out.message)
    code = out.name[len(CLASS_PREFIX):]
    print(format_build_report(out.report))
    print(f"class gallery {store.display_name(out.name)}")
    print(f"  class code:  {format_code(code)}")
    print(f"  link:        http://{lan_address() or 'THIS-COMPUTER'}:{args.port}/?class={code}"
          f"   (while `python app.py --host 0.0.0.0 --port {args.port}` runs on this computer)")
    print(f"  owner token: {owner}")
    print(f"  keep the owner token secret: `index {shlex.quote(args.photo_dir)} --share {shlex.quote(args.share)} "
          "--owner TOKEN` rebuilds "
          f"this gallery (same code), `gallery delete {code} --owner TOKEN` deletes it")
    return 0


def format_search_settings(gallery: Any) -> str:
    """How a gallery is searched (from its encoder's checkpoint), as `index` prints it."""
    from sbir_core.gallery.calibration import describe
    from sbir_core.gallery.index import PLAIN_HEAD

    k, cal = gallery.diffusion_k, gallery.calibration
    return (f"searched with {f'gallery diffusion k={k} after the first {PLAIN_HEAD} results' if k else 'no diffusion'}"
            f", seen-class calibration {describe(cal.setting if cal is not None else None)}")


def _cmd_search(args: argparse.Namespace) -> int:
    from sbir_core.data.drawing import load_stroke_file
    from sbir_core.gallery.query import encode_query, encode_sketch_query, search_reranked

    gallery, encoder, _ = common.open_gallery(args.gallery, args.encoder, args.checkpoint, args.galleries,
                                        args.ef_search, args.nprobe)
    sq = emb = None
    sketch = load_stroke_file(args.strokes, args.line) if args.strokes else args.sketch
    if args.rerank and sketch is None:
        raise common.CLIError("--rerank re-ranks sketch queries (--sketch or --strokes)")
    if sketch is not None and (args.rerank or args.brush is not None):
        from sbir_core.data.images import load_image

        sq = encode_sketch_query(encoder, load_image(sketch) if isinstance(sketch, str) else sketch, brush=args.brush)
        if args.rerank:
            from sbir_core.models.relation import load_relation

            results = search_reranked(gallery, load_relation(), sq, args.k)
        else:
            results = gallery.search(sq.embedding, args.k)
    else:
        if sketch is not None and args.confidence:  # the same embedding, with what the model saw
            from sbir_core.data.images import load_image

            sq = encode_sketch_query(encoder, load_image(sketch) if isinstance(sketch, str) else sketch)
        emb = sq.embedding if sq is not None else encode_query(encoder, sketch=sketch, photo=args.photo, text=args.text)
        results = gallery.search(emb, args.k)
    rows = [{"path": r.path, "score": round(r.score, 6), "label": r.label} for r in results]
    level = guess = None
    if args.confidence:
        level, guess = _confidence(args, encoder, gallery, results, sketch, sq if sketch is not None else emb)
        level = level or None  # "": no rule for this checkpoint, not assessed
    if args.json:
        print(json.dumps({"level": level, "guess": guess, "results": rows} if args.confidence else rows, indent=2))
    else:
        if args.confidence:
            print(f"level: {level or 'not assessed'}" + (f"  guess: {guess}" if guess else ""))
        print(format_results_table(results))
    return 0


def _confidence(args: argparse.Namespace, encoder: Any, gallery: Any, results: Sequence[Any], sketch: Any,
                query: Any) -> tuple:
    """(level, guess) as the page decides them (`gallery.confidence.assess`); `query` is the
    sketch's `SketchQuery` (the rule needs what the model saw) or the searched embedding."""
    from sbir_core.data.images import load_image
    from sbir_core.gallery import confidence

    rule = confidence.rule_for(encoder)
    labels = [r.label for r in results]
    if sketch is not None:
        return confidence.assess(rule, encoder, gallery, query.embedding, labels, kind="sketch",
                                 drawing=load_image(sketch) if isinstance(sketch, str) else sketch,
                                 brush=args.brush, model_input=query.model_input)
    kind = "text" if args.text is not None else "photo"
    return confidence.assess(rule, encoder, gallery, query, labels, kind=kind, text=args.text)


def add(sub: Any) -> None:
    p = sub.add_parser(
        "index", help="embed a folder of images into a searchable gallery (incremental)",
        description="Embed every image under PHOTO_DIR (class = first-level subfolder), or listed in a manifest "
                    "(a .csv or .parquet with path and label columns), into GALLERY_DIR, "
                    "or (--share NAME) into a class gallery the app opens by a class code. "
                    "Re-running only encodes new and changed files.",
    )
    p.add_argument("photo_dir", metavar="PHOTO_DIR", help="a folder of images, or a manifest: a .csv or .parquet "
                   "with path and label columns (relative paths from the manifest's folder)")
    p.add_argument("--out", default=None, metavar="GALLERY_DIR", help="gallery folder to create or update")
    p.add_argument("--share", default=None, metavar="NAME",
                   help="instead of --out: a class gallery called NAME, opened in the app by the class code printed "
                        "(kept under $SBIR_HOME/class-galleries until deleted)")
    p.add_argument("--owner", default=None, metavar="TOKEN",
                   help="--share: the owner token printed the first time; rebuilds your gallery NAME, keeping its code")
    p.add_argument("--port", type=int, default=7860, help="--share: the app's port, for the printed link")
    p.add_argument("--encoder", default=None, metavar="NAME",
                   help="backbone (default: the checkpoint's, else efficientnet-lite0)")
    p.add_argument("--checkpoint", default="default", metavar="default|none|PATH",
                   help="trained heads: the shipped default, none (raw backbone) or a file (default: default)")
    p.add_argument("--index-type", choices=common.INDEX_TYPES, default="auto",
                   help="auto (default) = by size: exact flat up to 50k pictures, ivfpq beyond (compressed, "
                        "shortlist re-scored exactly); or name one (hnsw: faster, less exact when calibrated)")
    p.add_argument("--modality", choices=common.GALLERY_MODALITIES, default="photo", help="what the images are")
    p.add_argument("--no-tokens", action="store_true", help="do not store token grids (no explanations)")
    p.add_argument("--no-diffusion", action="store_true",
                   help="no gallery diffusion, whatever the checkpoint prescribes: results rank by similarity "
                        "alone; skips a build step that takes most of an hour at 1M pictures on 2 cores")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local = encode in this process (default); ray = Ray Data actors writing Parquet shards "
                        "(pip install 'sbir-core[scale]'), here or on a cluster")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="ray: the cluster to join (auto, or HEAD:6379 after `ray start --head`); default a local Ray")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="ray: encoder actors (default one per CPU, one thread each, or one per GPU share)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="ray: GPUs per actor (0 = CPU; 1 = one GPU each)")
    p.add_argument("--shards", default=None, metavar="DIR",
                   help="ray: keep the Parquet shards here (a rerun skips finished ones; on a cluster a folder "
                        "every node shares); default GALLERY_DIR.shards, removed after the build")
    p.set_defaults(func=_cmd_index)

    s = sub.add_parser(
        "search", help="search a gallery with a sketch, a photo or text",
        description="Query a gallery; the encoder defaults to the one the gallery was built with.",
    )
    s.add_argument("--gallery", required=True, metavar="DIR|NAME",
                   help="a gallery folder, a gallery's name (see `gallery list`), as the app names it, "
                        "or class:CODE for a class gallery")
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
    s.add_argument("--json", action="store_true", help='print a JSON list of {"path", "score", "label"} '
                   '(with --confidence: {"level", "guess", "results": that list})')
    s.add_argument("--confidence", action="store_true",
                   help="also say how sure the search is, as the page does: sure, closest, absent (not in "
                        "this gallery?) or unreadable, and the model's guess when it has one")
    s.add_argument("--encoder", default=None, metavar="NAME", help="override the gallery's backbone")
    s.add_argument("--checkpoint", default=None, metavar="default|none|PATH",
                   help="override the gallery's checkpoint (must match it)")
    s.add_argument("--ef-search", type=int, default=None, help="hnsw: candidates per query (recall vs speed)")
    s.add_argument("--nprobe", type=int, default=None, help="ivf, ivfpq: lists probed per query (recall vs speed)")
    s.set_defaults(func=_cmd_search)
