"""The product benchmark's queries: doodles no training run may use, searched against the
shipped default gallery (`scripts/bench_product.py` runs it).

- zero-shot: every doodle of the gallery classes the `pacs`/`doodle` splits reserve;
- seen: the held-out doodles (`data.HELDOUT_DOODLES`) of the other gallery classes.

Training selects models on held-out doodles of *other* classes (`product_classes` says which
to avoid), so the benchmark never decides a training step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from sbir_core.data.datasets import Item, excluded_names, heldout_doodles, load_splits, quickdraw_folder
from sbir_core.paths import SHIPPED_GALLERIES

DEFAULT_GALLERY = SHIPPED_GALLERIES / "default" / "images"
# Gallery folders whose QuickDraw class is spelled differently.
QUICKDRAW_NAME = {"mobile_phone": "cell phone", "smiley": "smiley face", "teddy_bear": "teddy-bear"}


def quickdraw_name(folder: str, available: set[str]) -> str | None:
    name = QUICKDRAW_NAME.get(folder, folder.replace("_", " "))
    return name if name in available else None


def _gallery_to_quickdraw(data_root: Path, gallery: Path) -> dict[str, str]:
    """{QuickDraw class: gallery folder} for the gallery classes QuickDraw has."""
    available = {p.stem for p in (data_root / "quickdraw").glob("*.ndjson")}
    folders = sorted(p.name for p in gallery.iterdir() if p.is_dir())
    return {q: f for f in folders if (q := quickdraw_name(f, available))}


def product_classes(data_root: Union[str, Path], gallery: Union[str, Path] = DEFAULT_GALLERY) -> set[str]:
    """QuickDraw names of the benchmark gallery's classes (seen and zero-shot)."""
    return set(_gallery_to_quickdraw(Path(data_root), Path(gallery)))


def product_queries(data_root: Union[str, Path], gallery: Union[str, Path] = DEFAULT_GALLERY) -> dict[str, list[Item]]:
    """{'zero-shot': [...], 'seen': [...]} doodle items, labelled with gallery folder names."""
    data_root = Path(data_root)
    reserved = excluded_names(load_splits(data_root), ("pacs", "doodle"))["quickdraw"]
    to_folder = _gallery_to_quickdraw(data_root, Path(gallery))
    zs = [c for c in to_folder if c in reserved]
    seen = [c for c in to_folder if c not in reserved]
    out = {"zero-shot": quickdraw_folder(data_root / "quickdraw", classes=zs),
           "seen": heldout_doodles(data_root, classes=seen)}
    for items in out.values():
        for it in items:
            it.label = to_folder[it.label]
    return out
