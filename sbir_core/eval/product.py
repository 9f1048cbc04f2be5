"""The product benchmark: doodles no training run may use, searched against the shipped
default gallery as the app searches it (`scripts/bench_product.py` prints it; experiments
and `scripts/compare_checkpoints.py` call `product_benchmark`).

- zero-shot: every doodle of the gallery classes the `pacs`/`doodle` splits reserve;
- seen: the held-out doodles (`data.HELDOUT_DOODLES`) of the other gallery classes.

Training selects models on held-out doodles of *other* classes (`product_classes` says which
to avoid), so the benchmark never decides a training step.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Union

from sbir_core.data.datasets import Item, excluded_names, heldout_doodles, image_folder, load_splits, quickdraw_folder
from sbir_core.eval.metrics import retrieval_report
from sbir_core.gallery.calibration import SeenCalibration
from sbir_core.gallery.index import Gallery
from sbir_core.paths import SHIPPED_GALLERIES

DEFAULT_GALLERY = SHIPPED_GALLERIES / "default" / "images"
KEYS = ("hit@1", "hit@5", "P@5", "mAP@all")
# (name, gallery diffusion, seen-class calibration), each as the checkpoint prescribes
RANKINGS = (("as the app searches", True, True), ("no diffusion", False, True), ("embedding alone", False, False))
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


def product_benchmark(enc: Any, data_root: Union[str, Path], per_query: bool = False) -> dict:
    """The benchmark for a loaded encoder (`SBIREncoder`): per query group, each of RANKINGS'
    figures (KEYS) and per-class hit@5; `per_query` keeps each query's figures under
    row[ranking]["per_query"] (numpy arrays, for paired comparisons)."""
    photos = image_folder(DEFAULT_GALLERY)
    t0 = time.perf_counter()
    g = enc.encode_photos([it.load() for it in photos]).normalized()
    g_labels = [it.label for it in photos]
    cal = SeenCalibration.from_encoder(enc)
    diffusion_k = enc.retrieval.diffusion_k
    result = {"encoder": enc.encoder_id, "gallery": {"images": len(photos), "classes": len(set(g_labels))},
              "diffusion_k": diffusion_k, "seen_calibration": cal.setting if cal else None}
    for group, items in product_queries(data_root).items():
        q = enc.encode_sketches([it.load() for it in items]).normalized()
        ql = [it.label for it in items]
        row: dict = {"n_queries": len(items), "classes": sorted(set(ql))}
        for name, diffuse, calibrate in RANKINGS:
            gal = Gallery.from_embeddings(g, labels=g_labels, diffusion_k=diffusion_k if diffuse else 0,
                                          calibration=cal if calibrate else None)
            rep = retrieval_report(gal.score_all(q), ql, g_labels, per_query=per_query)
            row[name] = {key: round(rep[key], 4) for key in KEYS}
            if per_query:
                row[name]["per_query"] = {key: rep["per_query"][key] for key in KEYS}
            row[name]["per_class_hit@5"] = {c: round(v["hit@5"], 3) for c, v in rep["per_class"].items()}
        result[group] = row
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
