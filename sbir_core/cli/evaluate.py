"""`eval`: a benchmark split or two folders, scored as search ranks."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sbir_core.cli import common
from sbir_core.paths import SHIPPED_GALLERIES

# What `eval` prints, in this order.
SUMMARY_KEYS = ("mAP@all", "P@100", "mAP@200", "P@200")
FIRST_ROW_KEYS = ("hit@1", "hit@5", "P@5", "P@10")


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
        args.data = common.data_folder(args.data)
        from sbir_core.data.datasets import get_split, load_splits

        get_split(load_splits(args.data), args.split)
    elif not (args.queries and args.gallery):
        raise common.CLIError("give --data DIR --split NAME, or --queries PATH --gallery PATH")
    if args.absent_queries:
        return _eval_confidence(args)

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


def _eval_confidence(args: argparse.Namespace) -> int:
    """`eval --absent-queries`: how sure the page is, searched through the app's own service."""
    from sbir_core.data.drawing import parse_strokes
    from sbir_core.eval.confidence import evaluate_confidence
    from sbir_core.service import RetrievalService

    for folder in (args.queries, args.absent_queries):
        if not Path(folder).is_dir():
            raise common.CLIError(f"not a folder: {folder}")
    service = RetrievalService(gallery=args.gallery, checkpoint=args.checkpoint,
                               galleries_root=args.galleries or SHIPPED_GALLERIES)
    if service.default_gallery != args.gallery:
        raise common.CLIError(f"no gallery named {args.gallery!r} (see `gallery list`)")
    if service.confidence_rule is None:
        raise common.CLIError("this checkpoint has no confidence rule; make one with `calibrate-confidence`")

    def search(strokes: Any, brush: Any) -> tuple:
        out = service.search_sketch(parse_strokes(strokes), gallery=args.gallery, brush=brush)
        return out.level, out.guess, (out.hits[0].label if out.hits else None)

    report = evaluate_confidence(search, args.queries, args.absent_queries, unreadable=args.unreadable)
    report["gallery"] = args.gallery
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:<22}{v}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    args.data = common.data_folder(args.data)
    from sbir_core.eval.confidence import calibrate
    from sbir_core.gallery.confidence import save_rule
    from sbir_core.models.encoders import create_encoder
    from sbir_core.paths import checkpoint_path

    encoder = create_encoder(checkpoint=args.checkpoint)
    rule = calibrate(encoder, args.data)
    path = save_rule(rule, checkpoint_path() if args.checkpoint == "default" else Path(args.checkpoint))
    print(json.dumps(rule.calibration, indent=1))
    print(f"wrote {path}")
    return 0


def _cmd_queries(args: argparse.Namespace) -> int:
    args.data = common.data_folder(args.data)
    from sbir_core.eval.confidence import write_query_folders
    from sbir_core.models.encoders import create_encoder

    counts = write_query_folders(args.data, args.out, create_encoder(checkpoint="default"))
    for name, n in counts.items():
        print(f"{Path(args.out) / name}: {n} doodles")
    return 0


def add(sub: Any) -> None:
    p = sub.add_parser("eval", help="mAP@all, P@100/200, hit@1/5, P@5/10 on a split or on folders")
    p.add_argument("--data", help=common.DATA_HELP + "; with --split")
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
    p.add_argument("--absent-queries", metavar="DIR",
                   help="how sure the page is: --queries and DIR hold QuickDraw <class>.ndjson files of classes "
                        "the gallery has and lacks; --gallery is then a gallery name, searched as the app does")
    p.add_argument("--galleries", default=None, metavar="DIR", help="with --absent-queries: where named galleries are")
    p.add_argument("--unreadable", type=int, default=300, metavar="N",
                   help="with --absent-queries: generated scribbles, dots and lines to test (default 300)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_eval)

    c = sub.add_parser("calibrate-confidence",
                       help="choose the confidence rule's thresholds on training classes; saved next to the checkpoint")
    c.add_argument("--data", help=common.DATA_HELP)
    c.add_argument("--checkpoint", default="default", help="'default' or a path")
    c.set_defaults(func=_cmd_calibrate)

    e = sub.add_parser("confidence-queries",
                       help="write the folders `eval --absent-queries` measures (held-out doodles; not in the repo)")
    e.add_argument("--data", help=common.DATA_HELP)
    e.add_argument("--out", required=True, help="where to write present/, absent/ and absent-unseen/ (e.g. /tmp/conf)")
    e.set_defaults(func=_cmd_queries)
