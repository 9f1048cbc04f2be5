"""The embedded default gallery (galleries/default/) is present, well-formed and attributed."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

GALLERY = Path(__file__).resolve().parents[1] / "galleries" / "default"
IMAGES = GALLERY / "images"


def _image_files() -> list[Path]:
    return sorted(p for p in IMAGES.rglob("*") if p.is_file())


def test_gallery_folder_exists() -> None:
    assert IMAGES.is_dir(), f"missing {IMAGES}; run scripts/build_default_gallery.py"
    assert (GALLERY / "selection.tsv").is_file()


def test_enough_images_and_classes() -> None:
    classes = [d for d in IMAGES.iterdir() if d.is_dir() and any(d.glob("*.jpg"))]
    files = _image_files()
    assert len(files) >= 200, len(files)
    assert len(classes) >= 30, len(classes)
    # One folder level per class: no stray files at the top, no nested folders.
    assert all(p.parent.parent == IMAGES for p in files)


def test_every_image_is_small_rgb_jpeg() -> None:
    bad = []
    for path in _image_files():
        with Image.open(path) as im:
            im.load()
            if path.suffix != ".jpg" or im.format != "JPEG" or im.mode != "RGB" or max(im.size) > 256:
                bad.append(f"{path.relative_to(GALLERY)}: {im.format} {im.mode} {im.size}")
    assert not bad, bad[:10]


def test_gallery_stays_small() -> None:
    total = sum(p.stat().st_size for p in _image_files())
    assert total < 8_000_000, total


def test_attribution_lists_every_image() -> None:
    attribution = (GALLERY / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "public domain" in attribution.lower()
    missing = [p.relative_to(GALLERY).as_posix() for p in _image_files()
               if f"`{p.relative_to(GALLERY).as_posix()}`" not in attribution]
    assert not missing, missing[:10]


@pytest.mark.parametrize("column", ["class", "source", "title", "author"])
def test_selection_has_columns(column: str) -> None:
    header = (GALLERY / "selection.tsv").read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert column in header
