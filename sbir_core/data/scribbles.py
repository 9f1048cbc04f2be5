"""Generated drawings that show nothing: scribbles, dots and random straight lines.

The confidence rule must call these "unreadable" instead of naming a match; this module
makes them (as the page's stroke data: point lists on a 384 px canvas, with a brush) to
calibrate that rule (one seed) and to measure it (another seed).
"""
from __future__ import annotations

import numpy as np

CANVAS = 384  # the page's canvas side, in stroke units
KINDS = ("scribble", "dots", "lines")


def _scribble(rng: np.random.Generator) -> list:
    """A fast back-and-forth scrawl: one to three strokes of a jittery random walk."""
    strokes = []
    for _ in range(int(rng.integers(1, 4))):
        n = int(rng.integers(30, 200))
        c = rng.uniform(0.3, 0.7, 2) * CANVAS
        step = rng.uniform(8, 40)
        ang = np.cumsum(rng.normal(0, rng.uniform(1.0, 2.5), n))
        pts = c + np.cumsum(np.stack([np.cos(ang), np.sin(ang)], 1) * step, 0)
        strokes.append(np.clip(pts, 0, CANVAS))
    return strokes


def _dots(rng: np.random.Generator) -> list:
    """One to four taps: each a point or a stroke of a few pixels."""
    strokes = []
    c = rng.uniform(0.2, 0.8, 2) * CANVAS
    for _ in range(int(rng.integers(1, 5))):
        p = c + rng.normal(0, 2 if len(strokes) == 0 else 4, 2)
        strokes.append(p + rng.uniform(-2, 2, (int(rng.integers(1, 4)), 2)))
    return strokes


def _lines(rng: np.random.Generator) -> list:
    """Two to six straight lines between random points of the canvas."""
    return [rng.uniform(0, CANVAS, (2, 2)) for _ in range(int(rng.integers(2, 7)))]


def unreadable_drawings(n: int, seed: int = 0) -> list[tuple[str, list, float]]:
    """n drawings, an equal share of each kind: (kind, strokes as [[x, y], ...] lists, brush px)."""
    rng = np.random.default_rng(seed)
    make = {"scribble": _scribble, "dots": _dots, "lines": _lines}
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        strokes = [[[round(float(x), 1), round(float(y), 1)] for x, y in s] for s in make[kind](rng)]
        out.append((kind, strokes, float(rng.uniform(3, 10))))
    return out
