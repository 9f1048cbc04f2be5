#!/usr/bin/env python3
"""Rebuild the embedded default gallery (galleries/default/) from Debian's openclipart-png.

    apt-get install -y openclipart-png
    python scripts/build_default_gallery.py

Reads the curated list galleries/default/selection.tsv (columns: class, source path
relative to the openclipart root, title, author), turns each clip-art PNG into a
white-background, content-cropped, square JPEG of at most 256 px under
galleries/default/images/<class_with_underscores>/, and writes ATTRIBUTION.md.
The output is deterministic, so rebuilding only changes files when the list changes.
"""
from __future__ import annotations

import argparse
import csv
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path("/usr/share/openclipart")
DEFAULT_OUT = REPO / "galleries" / "default"
COPYRIGHT_FILE = Path("/usr/share/doc/openclipart-png/copyright")
PACKAGE = "openclipart-png"

# A few package images are poster-sized; they are trusted local files, not uploads.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class Entry:
    cls: str      # class name, lowercase with spaces ("ice cream")
    source: str   # path relative to the openclipart root ("png/food/...png")
    title: str
    author: str


def class_dir(cls: str) -> str:
    """Folder name for a class: lowercase, spaces become underscores."""
    return re.sub(r"[^a-z0-9_-]+", "_", cls.strip().lower()).strip("_")


def image_stem(source: str) -> str:
    """Output file stem derived from the source file name, safe on any filesystem."""
    stem = Path(source).stem.lower()
    return re.sub(r"[^a-z0-9_-]+", "_", stem).strip("_") or "image"


def read_selection(path: Path) -> list[Entry]:
    entries = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if not row.get("class") or not row.get("source"):
                continue
            entries.append(Entry(row["class"].strip(), row["source"].strip(),
                                 (row.get("title") or "").strip(), (row.get("author") or "").strip()))
    return entries


def to_white_rgb(im: Image.Image) -> Image.Image:
    """Flatten any mode (palette with transparency, LA, RGBA...) onto white."""
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    return white.convert("RGB")


def process(src: Path, size: int = 256, margin: float = 0.04) -> Image.Image:
    """White background, crop to the drawn content plus a margin, pad square, downscale."""
    with Image.open(src) as im:
        im.load()
        rgb = to_white_rgb(im)
    # Threshold the difference from white so antialiasing haze and faint shadows
    # don't stretch the box to the canvas edge.
    diff = ImageChops.difference(rgb, Image.new("RGB", rgb.size, (255, 255, 255))).convert("L")
    bbox = diff.point(lambda v: 255 if v > 12 else 0).getbbox() or (0, 0, *rgb.size)
    rgb = rgb.crop(bbox)
    side = max(rgb.size)
    pad = max(2, round(side * margin))
    canvas = Image.new("RGB", (side + 2 * pad, side + 2 * pad), (255, 255, 255))
    canvas.paste(rgb, (pad + (side - rgb.width) // 2, pad + (side - rgb.height) // 2))
    if canvas.width > size:
        canvas = canvas.resize((size, size), Image.Resampling.LANCZOS)
    return canvas


def package_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def licence_statement() -> str:
    """The licence section of the Debian copyright file, verbatim."""
    try:
        text = COPYRIGHT_FILE.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(copyright file not found; see the openclipart-png package)"
    start = text.find("Copyright:")
    body = text[start:] if start >= 0 else text
    # Stop before Debian's own packaging notes, which are not the clip art's licence.
    for marker in ("\nThe Debian packaging", "\nOn Debian systems"):
        cut = body.find(marker)
        if cut > 0:
            body = body[:cut]
    return body.strip()


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "—"


def write_attribution(out: Path, rows: list[tuple[str, Entry]], version: str) -> None:
    n_classes = len({e.cls for _, e in rows})
    lines = [
        "# Default gallery — attribution",
        "",
        f"{len(rows)} images in {n_classes} classes, built by `scripts/build_default_gallery.py` "
        "from the curated list `selection.tsv`.",
        "",
        "## Source",
        "",
        "Open Clip Art Library (http://www.openclipart.org), as packaged by Debian in "
        f"`{PACKAGE}` version `{version}` (files under `/usr/share/openclipart/`). "
        "Each image was flattened onto white, cropped to its content, padded square, "
        "downscaled to at most 256×256 px and saved as JPEG.",
        "",
        "## Licence",
        "",
        f"Public domain. The licence statement from `{COPYRIGHT_FILE}`:",
        "",
        *["> " + line if line else ">" for line in licence_statement().splitlines()],
        "",
        "Titles and authors below come from the metadata embedded in each PNG.",
        "",
        "## Files",
        "",
        "| image | original path | title | author |",
        "| --- | --- | --- | --- |",
    ]
    for rel, e in rows:
        lines.append(f"| `{rel}` | `{e.source}` | {md_cell(e.title)} | {md_cell(e.author)} |")
    (out / "ATTRIBUTION.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build(root: Path, selection: Path, out: Path, size: int, quality: int) -> int:
    entries = read_selection(selection)
    missing = [e.source for e in entries if not (root / e.source).is_file()]
    if missing:
        print(f"error: {len(missing)} source files not found under {root} "
              f"(is {PACKAGE} installed?), first: {missing[0]}", file=sys.stderr)
        return 1
    images = out / "images"
    # Rebuild from scratch so images dropped from the list don't linger.
    if images.exists():
        shutil.rmtree(images)
    rows: list[tuple[str, Entry]] = []
    for e in entries:
        folder = images / class_dir(e.cls)
        folder.mkdir(parents=True, exist_ok=True)
        stem, n = image_stem(e.source), 1
        while (folder / f"{stem}.jpg").exists():  # two sources with one name
            n += 1
            stem = f"{image_stem(e.source)}_{n}"
        dest = folder / f"{stem}.jpg"
        process(root / e.source, size=size).save(dest, "JPEG", quality=quality, optimize=True)
        rows.append((dest.relative_to(out).as_posix(), e))
    write_attribution(out, rows, package_version())
    total = sum(p.stat().st_size for p in images.rglob("*.jpg"))
    print(f"wrote {len(rows)} images in {len({e.cls for e in entries})} classes, "
          f"{total / 1e6:.2f} MB, to {images}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="openclipart root (default %(default)s)")
    ap.add_argument("--selection", type=Path, default=DEFAULT_OUT / "selection.tsv")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--size", type=int, default=256, help="max side in pixels")
    ap.add_argument("--quality", type=int, default=88, help="JPEG quality")
    args = ap.parse_args(argv)
    return build(args.root, args.selection, args.out, args.size, args.quality)


if __name__ == "__main__":
    raise SystemExit(main())
