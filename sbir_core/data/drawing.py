"""A drawing as a browser, an API client or the command line sends it.

- stroke JSON (`read_stroke_json`: what the page's canvas sends; strict size and nesting
  limits, because anyone can call the public endpoint) and stroke files
  (`load_stroke_file`: .json as the canvas writes it, or QuickDraw .ndjson);
- canvas values (`canvas_image`: a stroke list, image, array or image-editor dict of
  those), never a file name.

Everything returns what `preprocess_sketch` takes; strokes are read by the one stroke
reader, `data.strokes` (point lists or QuickDraw's [[xs], [ys]], decided once per drawing).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from sbir_core.data.preprocess import BlankSketchError
from sbir_core.data.strokes import StrokeError, read_strokes
from sbir_core.errors import InputError
from sbir_core.paths import PathLike



MAX_STROKE_POINTS = 50_000  # a stroke query larger than this is refused (a drawing has a few hundred)


MAX_STROKES = 2_000


MAX_STROKE_JSON_CHARS = 40 * MAX_STROKE_POINTS


MAX_JSON_DEPTH = 4  # {"strokes": [stroke [point [x, y]]]}


def parse_strokes(value: Any, format: Optional[str] = None) -> Optional[list]:
    """Stroke JSON from the canvas (or an API client) -> a stroke list `preprocess_sketch` takes.

    Accepts a list of strokes or {"strokes": [...], "format": ...}. The strokes' form, point
    lists [[x, y], ...] (what the canvas sends) or QuickDraw's [[xs], [ys]], is `format`, else
    the object's "format", else detected once for the whole drawing (`data.strokes`: a
    drawing of only 2 x 2 strokes is read as points). Strokes come back as point lists of
    tuples, which every reader reads as points again. "" -> None (nothing drawn)."""
    data = json.loads(value) if isinstance(value, str) else value
    if isinstance(data, dict):
        format = format or data.get("format")
        data = data.get("strokes")
    if data is None:
        return None
    if not isinstance(data, list):
        raise StrokeError("strokes must be a list")
    arrays = read_strokes(data, format)
    if sum(len(a) for a in arrays) > MAX_STROKE_POINTS:
        raise StrokeError(f"too many points (more than {MAX_STROKE_POINTS})")
    return [[(x, y) for x, y in a.tolist()] for a in arrays]


def _json_depth(s: str) -> int:
    """Deepest bracket nesting of a JSON text, counted without parsing it (a deeply
    nested payload must be refused before json.loads recurses into it)."""
    depth = best = 0
    in_str = esc = False
    for ch in s:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def read_stroke_json(value: Any) -> Any:
    """What the page's canvas or an API client sends to /search_strokes -> a stroke list.

    Only stroke JSON is accepted ("" for nothing drawn); any other text is refused, so no
    string is ever read as a file name. Size and nesting are checked before parsing."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise StrokeError("strokes must be sent as JSON text")
    s = value.strip()
    if not s:
        return None
    if s[0] not in "[{":
        raise StrokeError("strokes must be JSON: [[[x, y], ...], ...]")
    if len(s) > MAX_STROKE_JSON_CHARS:
        raise StrokeError(f"too many points (more than {MAX_STROKE_POINTS})")
    if _json_depth(s) > MAX_JSON_DEPTH:
        raise StrokeError("the stroke JSON is nested too deeply")
    strokes = parse_strokes(s)
    if strokes is not None and len(strokes) > MAX_STROKES:
        raise StrokeError(f"too many strokes (more than {MAX_STROKES})")
    return strokes


def stroke_brush(value: Any) -> Optional[float]:
    """The brush width the canvas drew with ({"strokes": ..., "brush": px}), if any."""
    if not isinstance(value, str) or not value.lstrip().startswith("{"):
        return None
    try:
        b = json.loads(value).get("brush")
    except (ValueError, AttributeError, RecursionError):
        return None
    return float(b) if isinstance(b, (int, float)) and 0 < b <= 100 else None


# Drawings sent as images (API clients; the page sends strokes): a canvas is at most a few
# megapixels, so anything bigger is refused from its header, before decoding.
MAX_CANVAS_PIXELS = 4_000_000


def canvas_image(value: Any) -> Any:
    """A drawing as data -> something `preprocess_sketch` takes.

    Accepted: a stroke list, a PIL image, an array, or an editor dict
    {"background", "layers", "composite"} of those (the composite is what the user
    sees). File names are refused: the service never opens a path a client names.
    """
    if value is None:
        raise BlankSketchError()
    if isinstance(value, dict):
        if "path" in value or "url" in value:
            _as_image(value)  # a file reference: refused
        comp = value.get("composite")
        if comp is not None:
            return _as_image(comp)
        parts = [value.get("background"), *(value.get("layers") or [])]
        parts = [_to_pil(_as_image(p)).convert("RGBA") for p in parts if p is not None]
        if not parts:
            raise BlankSketchError()
        base = Image.new("RGBA", parts[0].size, (255, 255, 255, 0))
        for p in parts:
            if p.size != base.size:
                p = p.resize(base.size)
            base.alpha_composite(p)
        return base
    return _as_image(value)


def _as_image(x: Any) -> Any:
    """Images, arrays and stroke lists pass; anything else (a path, a file dict) is refused."""
    if isinstance(x, (str, os.PathLike, dict, bytes)):
        raise InputError("A drawing must be sent as strokes or as image data, not as a file name.")
    if isinstance(x, np.ndarray):
        if x.ndim not in (2, 3) or x.size == 0:
            raise InputError("That drawing is not an image.")
        if x.shape[0] * x.shape[1] > MAX_CANVAS_PIXELS:
            raise InputError(f"That drawing is too large ({x.shape[1]}×{x.shape[0]}); the limit is "
                               f"{MAX_CANVAS_PIXELS / 1e6:.0f} megapixels.")
    if isinstance(x, Image.Image) and x.width * x.height > MAX_CANVAS_PIXELS:
        raise InputError(f"That drawing is too large ({x.width}×{x.height}); the limit is "
                           f"{MAX_CANVAS_PIXELS / 1e6:.0f} megapixels.")
    return x


def _to_pil(x: Any) -> Image.Image:
    if isinstance(x, Image.Image):
        return x
    a = np.asarray(x)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def compact_sketch(x: Any) -> Any:
    """A drawing as a small grey image to keep with the query (page state holds one
    per visitor): transparent canvases are flattened onto white first."""
    if not isinstance(x, (Image.Image, np.ndarray)):
        return x  # strokes are small already
    im = _to_pil(x)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        if np.asarray(rgba)[..., 3].min() < 250:
            return im  # real transparency: the alpha is the ink, keep it
        im = rgba
    return im.convert("L")


def input_fingerprint(x: Any) -> str:
    """A cache key for a query input (exact: any changed pixel or point changes it)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(x, Image.Image):
        h.update(f"{x.mode}{x.size}".encode())
        h.update(x.tobytes())
    elif isinstance(x, np.ndarray):
        h.update(f"{x.dtype}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    else:
        h.update(repr(x).encode())
    return h.hexdigest()


def load_stroke_file(path: PathLike, line: int = 0) -> list:
    """Strokes from a file the caller chose (the command line's `--strokes`): the page's
    stroke JSON (`{"strokes": [[[x, y], ...], ...]}` or a bare stroke list; the form is
    detected, or named by the object's "format") or QuickDraw ndjson, of which drawing
    number `line` (0-based) is read as QuickDraw strokes."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"stroke file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".ndjson":
        rows = [r for r in text.splitlines() if r.strip()]
        if not 0 <= line < len(rows):
            raise InputError(f"{p} has {len(rows)} drawings; there is no number {line}")
        try:
            value = json.loads(rows[line]).get("drawing")
        except (ValueError, AttributeError) as exc:
            raise InputError(f"line {line + 1} of {p} is not a QuickDraw drawing") from exc
    else:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{p} is not stroke JSON: {exc}") from exc
    strokes = parse_strokes(value, "quickdraw" if p.suffix.lower() == ".ndjson" else None)
    if not strokes:
        raise BlankSketchError()
    return strokes
