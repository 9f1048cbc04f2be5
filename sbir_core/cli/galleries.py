"""`gallery download`, `list`, `delete` and `rename`: named and class galleries without loading a model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sbir_core.cli import common


def _cmd_gallery_download(args: argparse.Namespace) -> int:
    from sbir_core.data.download import fetch_dataset

    counts = fetch_dataset(args.name, args.out, url=args.url, md5=args.md5, sha256=args.sha256,
                           keep_archive=args.keep_archive)
    out = args.out or Path("galleries") / args.name / "images"
    print(f"{args.name}: {len(counts)} classes, {sum(counts.values())} images in {out}")
    return 0


def add(sub: Any) -> None:
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

    rm = actions.add_parser("delete", help="delete a class gallery (needs its owner token)")
    rm.add_argument("code", metavar="CODE", help="its class code")
    rm.add_argument("--owner", required=True, metavar="TOKEN", help="the owner token `index --share` printed")
    rm.set_defaults(func=_cmd_gallery_delete)
    mv = actions.add_parser("rename", help="rename a class gallery (needs its owner token; the code stays)")
    mv.add_argument("code", metavar="CODE", help="its class code")
    mv.add_argument("name", metavar="NAME", help="the new name")
    mv.add_argument("--owner", required=True, metavar="TOKEN", help="the owner token `index --share` printed")
    mv.set_defaults(func=_cmd_gallery_rename)


def _cmd_gallery_delete(args: argparse.Namespace) -> int:
    from sbir_core.gallery.sharing import ClassGalleries, parse_code

    info = ClassGalleries().delete(parse_code(args.code), args.owner)
    print(f"deleted class gallery {info.name} ({args.code})")
    return 0


def _cmd_gallery_rename(args: argparse.Namespace) -> int:
    from sbir_core.gallery.sharing import ClassGalleries, parse_code
    from sbir_core.gallery.store import sanitize_gallery_name

    info = ClassGalleries().rename(parse_code(args.code), sanitize_gallery_name(args.name), args.owner)
    print(f"class gallery {args.code} is now called {info.name}")
    return 0


def _cmd_gallery_list(args: argparse.Namespace) -> int:
    """Reads only each gallery's gallery.json: no model is loaded."""
    from sbir_core.gallery.index import GALLERY_FILE
    from sbir_core.gallery.store import list_gallery_names

    rows, seen = [], set()
    for root in common.gallery_roots(args.galleries):
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
    # Class galleries (whoever runs this owns the disk they are on, so their codes are shown).
    from sbir_core.gallery.sharing import ClassGalleries, format_code

    shared = ClassGalleries()
    for info in shared.all():
        d = shared.folder(info.code)
        meta_file = d / "index" / GALLERY_FILE
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        items = meta.get("items", [])
        rows.append({"name": info.name, "code": format_code(info.code), "folder": str(d), "count": len(items),
                     "modality": meta.get("modality", "?"), "classes": len({it.get("label") for it in items}),
                     "encoder": meta.get("encoder_id", "?"), "pinned": info.pinned})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no named galleries (build one with `index PHOTO_DIR --out GALLERIES_DIR/NAME`)")
    else:
        for r in rows:
            name = f"{r['name']} [class {r['code']}]" if "code" in r else r["name"]
            print(f"{name:<20} {r['count']:>6} {r['modality']}s  {r['classes']:>4} classes  {r['folder']}")
    return 0
