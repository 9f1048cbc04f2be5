#!/usr/bin/env python3
"""Pack what `finetune` reads into a folder small enough to travel to a GPU machine.

A GPU machine gets only the working tree (64 MiB), not ../shared. This writes a miniature
data root: `splits.json`, the QuickDraw stroke files as they are (strokes are small), and
only the Caltech photos a run at `--max-photos-per-class` trains on, shrunk to
`--max-side` px JPEG (enough for training at up to ~0.9 x that size; `finetune` crops from
1.1 x its input size). Benchmark photos and sketches are not packed: evaluate here.

    python scripts/pack_training_data.py --data ../shared/data --out packed   # packed/ is git-ignored
    # on the GPU machine (device tool, carry ["packed"]):
    python -m sbir_core finetune --data packed --device cuda --workers 14 --cache '' --out $OUT/model.safetensors

`finetune` on the packed folder selects the same classes, photos and doodles as on the full
data (the packed folder holds exactly that selection); photos differ only by the JPEG round
trip.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from PIL import Image

from sbir_core.data.datasets import training_items
from sbir_core.training.finetune import FinetuneConfig

MAX_BYTES = 60 * 2**20  # what the device tool carries, with room for the code
DEFAULTS = FinetuneConfig()  # pack exactly what a default run selects


def pack(data: Path, out: Path, max_side: int = 192, max_photos_per_class: int = DEFAULTS.max_photos_per_class,
         quality: int = 90, exclude: tuple = DEFAULTS.exclude) -> dict:
    """Write the packed data root; -> a summary (counts, bytes)."""
    data, out = Path(data), Path(out)
    if not (data / "splits.json").is_file():
        raise SystemExit(f"error: no splits.json in {data}")
    if out.exists():
        shutil.rmtree(out)
    (out / "quickdraw").mkdir(parents=True)
    shutil.copy2(data / "splits.json", out / "splits.json")
    for f in sorted((data / "quickdraw").glob("*.ndjson")):
        shutil.copy2(f, out / "quickdraw" / f.name)
    photos = [it for it in training_items(data, exclude=exclude, max_photos_per_class=max_photos_per_class)
              if it.modality == "photo"]
    root = (data / "caltech101").resolve()
    skipped = []
    for it in photos:
        rel = Path(it.path).resolve().relative_to(root)
        dst = (out / "caltech101" / rel).with_suffix(".jpg")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            with Image.open(it.path) as im:
                im = im.convert("RGB")
                im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                im.save(dst, "JPEG", quality=quality)
        except (OSError, ValueError) as exc:  # finetune skips unreadable photos too
            skipped.append(f"{it.path}: {exc}")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    summary = {"photos": len(photos) - len(skipped), "skipped": skipped,
               "doodle_files": len(list((out / "quickdraw").glob("*.ndjson"))), "bytes": size,
               "max_side": max_side, "max_photos_per_class": max_photos_per_class}
    (out / "PACKED.json").write_text(json.dumps({**summary, "source": str(data)}, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "packed"))
    ap.add_argument("--max-side", type=int, default=192)
    ap.add_argument("--max-photos-per-class", type=int, default=DEFAULTS.max_photos_per_class,
                    help=f"as finetune's (default {DEFAULTS.max_photos_per_class})")
    ap.add_argument("--quality", type=int, default=90)
    args = ap.parse_args(argv)
    s = pack(Path(args.data), Path(args.out), args.max_side, args.max_photos_per_class, args.quality)
    print(f"{args.out}: {s['photos']} photos, {s['doodle_files']} doodle files, {s['bytes'] / 2**20:.1f} MiB")
    if s["bytes"] > MAX_BYTES:
        print(f"warning: over {MAX_BYTES / 2**20:.0f} MiB: lower --max-side or --quality", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
