#!/usr/bin/env python3
"""Sketch search in the browser: draw an object, find matching pictures, see why they match.

    python app.py                         # http://127.0.0.1:7860, gallery galleries/default
    python app.py --host 0.0.0.0 --port 8080
    python app.py --gallery ~/Pictures/animals [--name animals] [--sketch-gallery]

GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are respected (flags win). The page lives in the
`sbir_app` package, a thin Gradio layer over `sbir_core.service.RetrievalService`.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import sys
from pathlib import Path
from typing import Optional

from sbir_app import build_demo, launch
from sbir_app.page import CONCURRENCY, DEFAULT_HOST, DEFAULT_PORT, TEMP_FILES_AGE_S
from sbir_core.paths import SHIPPED_GALLERIES
from sbir_core.service import RetrievalService

log = logging.getLogger("sbir_app")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Zero-shot sketch-based image retrieval in the browser.")
    p.add_argument("--host", default=None, help=f"address to serve on (default $GRADIO_SERVER_NAME or {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None,
                   help=f"port (default $GRADIO_SERVER_PORT or {DEFAULT_PORT})")
    p.add_argument("--gallery", default=None, metavar="PATH",
                   help="index this folder of images (class = subfolder) into galleries/<name> and show it")
    p.add_argument("--name", default=None, help="gallery name for --gallery (default: the folder's name)")
    p.add_argument("--sketch-gallery", action="store_true", help="--gallery holds sketches (sketch -> sketch)")
    p.add_argument("--galleries", default=None, metavar="DIR", help="galleries root (default: galleries/)")
    p.add_argument("--default-gallery", default="default", help="gallery shown first (default: default)")
    p.add_argument("--uploads-dir", default=None, metavar="DIR",
                   help="where class galleries (built in the page or with `index --share`) are kept "
                        "(default $SBIR_HOME/class-galleries; $SBIR_HOME is ~/.cache/sbir unless set)")
    p.add_argument("--checkpoint", default="default", metavar="default|none|PATH",
                   help="model checkpoint (falls back to the raw backbone, with a warning, if missing)")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY,
                   help="events without a limit of their own run at once (searches: sbir_app.page.SEARCH_CONCURRENCY)")
    p.add_argument("--temp-files-age", type=int, default=TEMP_FILES_AGE_S, metavar="SECONDS",
                   help="delete Gradio's temporary files (uploads) this old (default: one hour)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per search (default 1: best on 2 cores)")
    p.add_argument("--no-warmup", action="store_true", help="skip making thumbnails and the map before serving")
    return p.parse_args(argv)


def few_malloc_arenas(n: int = 2) -> None:
    """glibc gives threads that allocate at once arenas of their own (up to 8 per core), and
    memory freed in one is not reused by the others: with Gradio's worker threads the
    server's memory kept climbing through a lesson (docs/BENCHMARKS.md section 10). Called
    before any thread starts; a no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    few_malloc_arenas()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import torch

    torch.set_num_threads(max(1, args.threads))
    root = Path(args.galleries) if args.galleries else SHIPPED_GALLERIES
    service = RetrievalService(root, gallery=None if args.gallery else args.default_gallery,
                               checkpoint=args.checkpoint, uploads_dir=args.uploads_dir,
                               progress=lambda f, d: print(d, file=sys.stderr))
    if args.gallery:
        print(f"Indexing {args.gallery} …", file=sys.stderr)
        out = service.build_gallery_from_folder(args.gallery, args.name,
                                                modality="sketch" if args.sketch_gallery else "photo",
                                                progress=lambda f, d: print(d, file=sys.stderr))
        print(out.message, file=sys.stderr)
        if not out.ok:
            return 2
    if service.default_gallery and not args.no_warmup:
        try:
            service.warm_up()
        except Exception as exc:  # warm-up is an optimisation only
            log.warning("warm-up failed: %s", exc)
    for n in service.notices:
        log.warning(n)
    demo = build_demo(service)
    launch(demo, service, args.host, args.port, concurrency=args.concurrency, temp_files_age_s=args.temp_files_age)
    return 0


if __name__ == "__main__":
    sys.exit(main())
