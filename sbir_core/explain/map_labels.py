"""Class names on the embedding map: where each goes (at its class's median, nudged off
the others, or left out), where they move for a query (never under its star or caption,
another class's name never on a result), and drawing them. Used by `EmbeddingMap`."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from sbir_core.explain.map_drawing import (BACKGROUND, INK, MAX_LABELS_TRIED, MapLayout, PlacedLabel, map_font,
                                           overlap)


def _nudges(w: float, h: float) -> tuple[tuple[float, float], ...]:
    """Offsets tried for a name w x h px: on its place, then up, down, sideways, further out."""
    return ((0, 0), (0, -0.8 * h), (0, 0.8 * h), (-0.35 * w, 0), (0.35 * w, 0), (0, -1.6 * h), (0, 1.6 * h),
            (-0.35 * w, -0.8 * h), (0.35 * w, -0.8 * h), (-0.35 * w, 0.8 * h), (0.35 * w, 0.8 * h),
            (0, -2.4 * h), (0, 2.4 * h), (-0.7 * w, 0), (0.7 * w, 0))


def _label_spot(anchor: Sequence[float], bbox: Sequence[float], lay: MapLayout,
                avoid: Sequence[Sequence[float]]) -> Optional[tuple[tuple[float, float], tuple[float, float, float, float]]]:
    """(centre, box) of the first free spot for a name whose text box around its centre is
    `bbox` (l, t, r, b), near `anchor`, on the canvas, overlapping nothing in `avoid`."""
    l, t, r, b = bbox
    W, H = lay.size
    av = np.asarray(avoid, dtype=np.float64).reshape(-1, 4)
    for dx, dy in _nudges(r - l, b - t):
        # keep the whole name on the canvas (shift it in from the edges)
        x = min(max(anchor[0] + dx, -l + 1), W - r - 1)
        y = min(max(anchor[1] + dy, lay.title_h - t + 1), H - b - 1)
        box = (x + l, y + t, x + r, y + b)
        if not ((box[0] < av[:, 2] + 1) & (av[:, 0] < box[2] + 1) & (box[1] < av[:, 3] + 1)
                & (av[:, 1] < box[3] + 1)).any():
            return (float(x), float(y)), box
    return None


def _text_box(text: str, lay: MapLayout) -> tuple[float, float, float, float]:
    return _label_patch(text, lay.label_px)[0]


@functools.lru_cache(maxsize=1024)
def _label_patch(text: str, px: int) -> tuple[tuple[int, int, int, int], Image.Image]:
    """(box around the centre (l, t, r, b), RGBA picture) of a class name in a white outline:
    drawn once, pasted per render (drawing text is most of a render's cost otherwise)."""
    font, sw = map_font(px), max(2, round(px / 5))
    l, t, r, b = font.getbbox(text, anchor="mm", stroke_width=sw)
    im = Image.new("RGBA", (max(1, r - l), max(1, b - t)), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((-l, -t), text, fill=INK + (255,), font=font, anchor="mm", stroke_width=sw,
                            stroke_fill=BACKGROUND + (255,))
    return (l, t, r, b), im


def draw_labels(img: Image.Image, labels: Sequence[PlacedLabel], px: int) -> None:
    """Class names at their places (`PlacedLabel.xy` is the name's centre)."""
    for lab in labels:
        (l, t, _, _), patch = _label_patch(lab.text, px)
        img.paste(patch, (int(round(lab.xy[0] + l)), int(round(lab.xy[1] + t))), patch)


def place_labels(centres: dict[str, tuple[float, float]], lay: MapLayout,
                  labels: Sequence[str]) -> list[PlacedLabel]:
    """Class names at their medians, biggest classes first; a name that would overlap one
    already placed is nudged (up, down, sideways), or left out if no spot is free."""
    counts: dict[str, int] = {}
    for c in labels:
        counts[c] = counts.get(c, 0) + 1
    placed: list[PlacedLabel] = []
    boxes: list[tuple[float, float, float, float]] = []
    for c in sorted(centres, key=lambda c: (-counts.get(c, 0), c))[:MAX_LABELS_TRIED]:
        ax, ay = lay.to_pixels(np.asarray(centres[c]))[0]
        text = c.replace("_", " ").strip()
        if not text:
            continue
        l, t, r, b = _text_box(text, lay)
        spot = _label_spot((ax, ay), (l, t, r, b), lay, boxes)
        if spot is None:
            placed.append(PlacedLabel(c, text, (float(ax), float(ay)), (float(ax), float(ay)),
                                      (ax + l, ay + t, ax + r, ay + b), False))
        else:
            boxes.append(spot[1])
            placed.append(PlacedLabel(c, text, (float(ax), float(ay)), spot[0], spot[1], True))
    return placed


def clear_labels(labels: Sequence[PlacedLabel], lay: MapLayout, keep_off: Sequence[Sequence[float]],
                 results: Sequence[Sequence[float]] = (), first: Sequence[str] = ()) -> list[PlacedLabel]:
    """The class names drawn with a query. None under a `keep_off` box (the query's marker
    and caption); the names of the results' classes (`first`, best first) before the others,
    off the `results` frames if a spot near their class is free; another class's name never
    on a result (it would name the wrong picture). A name without a spot is left out."""
    rank = {c: i for i, c in enumerate(dict.fromkeys(first))}
    order = sorted((lab for lab in labels if lab.shown or lab.name in rank),
                   key=lambda lab: rank.get(lab.name, len(rank)))  # stable: the others keep their order
    placed: list[PlacedLabel] = []
    boxes = [tuple(k) for k in keep_off]
    for lab in order:
        bbox = _text_box(lab.text, lay)
        hit = [o for o in boxes + list(results) if overlap(lab.box, o, 1)] if lab.shown else [True]
        if not hit:
            spot = (lab.xy, lab.box)  # where it was: nothing to move it for
        else:
            spot = _label_spot(lab.anchor, bbox, lay, boxes + list(results))
            if spot is None and lab.name in rank:
                spot = _label_spot(lab.anchor, bbox, lay, boxes)  # its own class's results may hide under it
        if spot is not None:
            boxes.append(spot[1])
            placed.append(PlacedLabel(lab.name, lab.text, lab.anchor, spot[0], spot[1], True))
    return placed
