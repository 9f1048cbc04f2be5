"""Example sketches the app offers as one-click queries.

Each example is a hand-authored stroke list in `sbir_core/examples/<name>.json`
(no dataset content): ``{"label": ..., "format": "points", "canvas": [w, h],
"strokes": [[[x, y], ...], ...]}`` (or "format": "quickdraw" with [[xs], [ys]] strokes)
in a 256 x 256 drawing box, y pointing down like a browser canvas. They are rendered
with `preprocess.render_strokes`, the same path every stroke query takes, and the
browser tests and screenshot script replay the very same strokes with the mouse.
"""
from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image

from sbir_core.errors import InputError
from sbir_core.data.preprocess import render_strokes
from sbir_core.data.strokes import read_strokes

from sbir_core.paths import EXAMPLES_DIR  # noqa: E402


@dataclass(frozen=True)
class ExampleSketch:
    name: str
    label: str
    strokes: tuple[tuple[tuple[float, float], ...], ...]  # point lists, canvas coordinates
    canvas: tuple[int, int] = (256, 256)

    def render(self, size: int = 224, line_width: float = 3.0, margin: float = 0.08) -> Image.Image:
        """Black strokes on white, fitted into a size x size square."""
        return render_strokes(self.strokes, size=size, line_width=line_width, margin=margin)

    def scaled_strokes(self, width: float, height: float, margin: float = 0.1) -> list[list[tuple[float, float]]]:
        """Strokes mapped into a width x height box (aspect kept, centred): for
        replaying the drawing with a mouse on a canvas of that size."""
        cw, ch = self.canvas
        usable = 1 - 2 * margin
        s = min(width * usable / cw, height * usable / ch)
        ox = (width - cw * s) / 2
        oy = (height - ch * s) / 2
        return [[(ox + x * s, oy + y * s) for x, y in stroke] for stroke in self.strokes]

    def jittered_canvas(self, rng: random.Random, size: int = 384) -> Image.Image:
        """The drawing as a user might draw it on a size x size canvas: at a random scale,
        place and line width, black on white (load tests and benchmarks: no two alike, so
        no search hits the query cache)."""
        side = int(size * rng.uniform(0.55, 0.9))
        img = self.render(size=side, line_width=rng.uniform(4, 8), margin=0.05)
        canvas = Image.new("RGB", (size, size), "white")
        canvas.paste(img, (rng.randint(0, size - side), rng.randint(0, size - side)))
        return canvas


def _load(path: Path) -> ExampleSketch:
    data = json.loads(path.read_text())
    # Read in the file's own format (the one stroke reader), kept as point tuples.
    strokes = tuple(tuple((x, y) for x, y in a.tolist())
                    for a in read_strokes(data["strokes"], data.get("format", "points")))
    if not strokes:
        raise InputError(f"{path}: no strokes")
    canvas = tuple(int(v) for v in data.get("canvas", (256, 256)))
    return ExampleSketch(name=path.stem, label=str(data.get("label", path.stem)), strokes=strokes, canvas=canvas)


@functools.lru_cache(maxsize=1)
def _all() -> tuple[ExampleSketch, ...]:
    return tuple(_load(p) for p in sorted(EXAMPLES_DIR.glob("*.json")))


# The order the app shows them in; anything else found on disk follows alphabetically.
PREFERRED_ORDER = ("cat", "house", "bicycle", "fish", "tree", "car", "cup", "star", "sun", "flower", "guitar")


def list_examples() -> list[ExampleSketch]:
    ex = {e.name: e for e in _all()}
    ordered = [ex[n] for n in PREFERRED_ORDER if n in ex]
    return ordered + [e for n, e in sorted(ex.items()) if n not in PREFERRED_ORDER]


def get_example(name: str) -> ExampleSketch:
    for e in _all():
        if e.name == name:
            return e
    raise KeyError(f"no example sketch named {name!r}; have: {', '.join(e.name for e in _all())}")


def example_names() -> list[str]:
    return [e.name for e in list_examples()]


def render_example(name: str, size: int = 224, line_width: Optional[float] = None) -> Image.Image:
    e = get_example(name)
    return e.render(size=size, line_width=line_width if line_width is not None else max(3.0, size / 75))
