"""The one stroke reader: a drawing's strokes in either form -> (n, 2) point arrays.

Two forms exist: point lists `[[x, y], ...]` (the page's canvas, the example drawings,
API clients) and QuickDraw's `[[x0, x1, ...], [y0, y1, ...]]` (the doodle data set).
The form is a property of the whole drawing, so it is decided once per drawing, never
per stroke: `format="points"` or `"quickdraw"` says it, and `format=None` detects it
from all the strokes together. A stroke that is not 2 x 2 tells the forms apart (an
(n, 2) stroke with n != 2 is a point list, a (2, n) one is QuickDraw).

Ambiguous drawings, where every stroke is 2 x 2 (`[[a, b], [c, d]]`: two points, or a
QuickDraw segment from (a, c) to (b, d)), are read as points: that is what the canvas,
the examples and every API client send, while QuickDraw data only comes from `.ndjson`
files, whose readers say `format="quickdraw"`. Tuples and lists are read alike.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import numpy as np

from sbir_core.errors import InputError

StrokeFormat = Literal["points", "quickdraw"]
FORMATS = ("points", "quickdraw")
MAX_COORDINATE = 1e7  # far beyond any canvas; also refuses inf and NaN


class StrokeError(InputError):
    """Stroke data that cannot be read as a drawing."""


def _arrays(strokes: Any) -> list[np.ndarray]:
    """Each non-empty stroke as a 2-D float32 array, in the form it was given."""
    if isinstance(strokes, (str, bytes, dict)) or not hasattr(strokes, "__iter__"):
        raise StrokeError("strokes must be a list of strokes")
    out = []
    for stroke in strokes:
        try:
            arr = np.asarray(stroke, dtype=np.float32)
        except (ValueError, TypeError) as exc:  # ragged rows, text, nested objects
            raise StrokeError("a stroke must be [[x, y], ...] or [[xs], [ys]] of numbers") from exc
        if arr.size == 0:
            continue
        if arr.ndim != 2 or 2 not in arr.shape:
            raise StrokeError("a stroke must be [[x, y], ...] or [[xs], [ys]] of numbers")
        if not (np.abs(arr) < MAX_COORDINATE).all():
            raise StrokeError("stroke coordinates must be finite numbers")
        out.append(arr)
    return out


def detect_format(arrays: list[np.ndarray]) -> StrokeFormat:
    """The drawing's form, from all its strokes: "points" unless a stroke can only be
    QuickDraw's; a drawing mixing strokes that can only be one form or the other is refused."""
    points = any(a.shape[1] == 2 and a.shape[0] != 2 for a in arrays)
    quickdraw = any(a.shape[0] == 2 and a.shape[1] != 2 for a in arrays)
    if points and quickdraw:
        raise StrokeError("a drawing's strokes must all be point lists or all be QuickDraw [[xs], [ys]]")
    return "quickdraw" if quickdraw else "points"


def read_strokes(strokes: Any, format: Optional[str] = None) -> list[np.ndarray]:
    """A drawing's strokes -> list of (n, 2) float32 (x, y) arrays; empty strokes dropped.

    format: "points" ([[x, y], ...]), "quickdraw" ([[xs], [ys]]) or None (detected once
    for the whole drawing; see the module's note on 2 x 2 strokes). Raises StrokeError
    for anything that is not a drawing in that form."""
    if format is not None and format not in FORMATS:
        raise StrokeError(f"unknown stroke format {format!r}; use one of {', '.join(FORMATS)}")
    arrays = _arrays(strokes)
    form = format or detect_format(arrays)
    want = 1 if form == "points" else 0  # the axis of length 2
    if any(a.shape[want] != 2 for a in arrays):
        raise StrokeError("every stroke must be [[x, y], ...]" if form == "points"
                          else "every QuickDraw stroke must be [[xs], [ys]] with as many xs as ys")
    return [a if form == "points" else np.ascontiguousarray(a.T) for a in arrays]
