#!/usr/bin/env python3
"""Run a `sbir_core` command or a script with cleaner pseudo-sketches: the photos' edge maps
drawn as object contours instead of plain Canny edges (an experiment, docs/EXPERIMENTS.md).

    python experiments/with_contour_edges.py -m sbir_core finetune --out contour.safetensors
    python experiments/with_contour_edges.py scripts/compare_checkpoints.py ctl.safetensors contour.safetensors

Why: the pacs queries are contour drawings (Sketchy, TU-Berlin), and Canny at the training
size also draws texture (fur, foliage, wood grain) that nobody sketches. Here the photo is
smoothed with an edge-preserving (bilateral) filter first, and edge fragments shorter than a
tenth of the picture are dropped. Everything else is `preprocess.photo_to_edges` unchanged.

Every caller of `photo_to_edges` in the process gets the contour version (training's edge
maps, gallery edge fusion, explanations). Caches go to their own `$SBIR_HOME`
(default ~/.cache/sbir-contour-edges) so they never mix with plain-Canny features.

Finding: contour edge maps run ahead early and end level with plain Canny; not shipped.
Backs: docs/EXPERIMENTS.md §5, "Cleaner pseudo-sketches: object contours".
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

MIN_EXTENT = 0.1  # edge fragments whose bounding box is under this share of the picture are dropped


def contour_edges(photo: Union[Image.Image, np.ndarray], size: int = 224) -> Image.Image:
    """A photo -> black object contours on white, same geometry as `photo_to_edges`."""
    import cv2

    from sbir_core.data.preprocess import fit_photo, pad_square

    img = np.asarray(fit_photo(photo, size).convert("RGB"))
    for _ in range(2):  # edge-preserving smoothing: texture goes, object boundaries stay
        img = cv2.bilateralFilter(img, 9, 50, 7)
    g = cv2.GaussianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), (5, 5), 1.5)
    med = float(np.median(g))
    lo, hi = int(max(0, 0.66 * med)), int(min(255, 1.33 * med))
    if hi <= lo:
        lo, hi = 50, 150
    e = cv2.Canny(g, lo, hi)
    n, lab, st, _ = cv2.connectedComponentsWithStats(e, connectivity=8)
    keep = np.zeros(n, bool)
    extent = np.maximum(st[1:, cv2.CC_STAT_WIDTH], st[1:, cv2.CC_STAT_HEIGHT])
    keep[1:] = extent >= max(3, int(size * MIN_EXTENT))
    e = np.where(keep[lab], 255, 0).astype(np.uint8)
    e = cv2.dilate(e, np.ones((2, 2), np.uint8))
    return pad_square(Image.fromarray(255 - e).convert("RGB"), size)


def install() -> None:
    """Make every module that calls `photo_to_edges` call `contour_edges`."""
    import sbir_core.data.preprocess as preprocess
    import sbir_core.eval.features as features
    import sbir_core.training.finetune_data as finetune_data

    for mod in (preprocess, features, finetune_data):  # those that bound the name at import
        mod.photo_to_edges = contour_edges


def main() -> None:
    os.environ.setdefault("SBIR_HOME", str(Path.home() / ".cache" / "sbir-contour-edges"))
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    install()
    if sys.argv[1] == "-m":
        sys.argv = [sys.argv[2]] + sys.argv[3:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        script = sys.argv[1]
        sys.argv = sys.argv[1:]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
