"""Turn whatever a user gives us into the images the encoder sees.

One function per input kind, used everywhere (training, indexing, the app), so a
sketch drawn in the browser and a QuickDraw doodle reach the model the same way:

- `preprocess_sketch`: canvas image (RGBA / RGB / L, either polarity) or strokes
  -> black ink on white, cropped to the ink, square, model-sized.
- `preprocess_photo`: any photo -> RGB, padded to a white square (whole object kept).
- `photo_to_edges`: a photo -> a pseudo-sketch (Canny edges), the photo side's
  bridge to the sketch domain.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from sbir_core.data.strokes import read_strokes
from sbir_core.errors import InputError

# A stroke is [(x, y), ...] (canvas points) or ([x0, x1, ...], [y0, y1, ...]) (QuickDraw); the
# form is decided once per drawing by `data.strokes.read_strokes`.
Stroke = Union[Sequence[Sequence[float]], Sequence[tuple[float, float]]]
Strokes = Sequence[Stroke]
SketchInput = Union[Image.Image, np.ndarray, Strokes]

# Ink is anything this much darker than the background (0-255 scale).
INK_THRESHOLD = 40
# Margin around the ink's bounding box, as a fraction of its longer side.
DEFAULT_MARGIN = 0.08
# Line width the model sees, in pixels at 224 px; close to QuickDraw renders and
# the PACS/TU-Berlin sketches the encoder is trained and evaluated on.
TARGET_LINE_WIDTH = 3.0
# Line widths (model pixels) the encoder is trained with (augment.augment_sketch); a
# person's brush size is mapped into this range.
LINE_WIDTH_RANGE = (2.0, 5.0)


class BlankSketchError(InputError):
    """The sketch has no ink: nothing to search with."""

    def __init__(self, detail: str = "") -> None:
        msg = "The sketch is empty: draw something first (no ink was found on the canvas)."
        super().__init__(msg + (f" {detail}" if detail else ""))


# ----------------------------------------------------------------------------- strokes
def read_sketch(sketch: SketchInput, format: Optional[str] = None) -> SketchInput:
    """A drawing as given, its strokes read once: images and arrays pass unchanged, a stroke
    list becomes (n, 2) point arrays (`data.strokes.read_strokes`; `format` "points" or
    "quickdraw", None: detected for the whole drawing), which every later step reads as points."""
    if isinstance(sketch, (Image.Image, np.ndarray)):
        return sketch
    return read_strokes(sketch, format)


def render_strokes(
    strokes: Strokes,
    size: int = 224,
    line_width: float = TARGET_LINE_WIDTH,
    margin: float = DEFAULT_MARGIN,
) -> Image.Image:
    """Draw strokes black on white, fitted (aspect kept) into a size x size square.

    Rendering directly at the target size keeps line width exact instead of
    thinning it by a later downscale.
    """
    pts = read_strokes(strokes)
    if not pts:
        raise BlankSketchError("The stroke list has no points.")
    allp = np.concatenate(pts)
    lo, hi = allp.min(0), allp.max(0)
    extent = float(max(hi - lo)) or 1.0
    usable = size * (1 - 2 * margin) - line_width
    scale = usable / extent
    offset = (size - (hi - lo) * scale) / 2 - lo * scale
    # Supersample 4x then downscale: smooth, anti-aliased lines.
    ss = 4
    img = Image.new("L", (size * ss, size * ss), 255)
    draw = ImageDraw.Draw(img)
    w = max(1, int(round(line_width * ss)))
    for p in pts:
        q = (p * scale + offset) * ss
        if len(q) == 1:
            x, y = q[0]
            draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=0)
            continue
        draw.line([tuple(v) for v in q], fill=0, width=w, joint="curve")
        for x, y in (q[0], q[-1]):  # round caps
            draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=0)
    return img.resize((size, size), Image.Resampling.LANCZOS).convert("RGB")


# ----------------------------------------------------------------------------- canvas images
def cell_counts(mask: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) count of True pixels per token cell and (h, w) cell areas, for any cell
    geometry (cells split the image as evenly as pixels allow; a summed-area table)."""
    H, W = mask.shape
    h, w = int(grid[0]), int(grid[1])
    ys = np.linspace(0, H, h + 1).round().astype(int)
    xs = np.linspace(0, W, w + 1).round().astype(int)
    sat = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = sat[ys[1:, None], xs[None, 1:]] - sat[ys[:-1, None], xs[None, 1:]] \
        - sat[ys[1:, None], xs[None, :-1]] + sat[ys[:-1, None], xs[None, :-1]]
    return counts, np.diff(ys)[:, None] * np.diff(xs)[None, :]


def ink_mask(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
    """Return ink darkness in [0, 255] (255 = full ink) for a canvas image of any kind.

    - RGBA with a transparent background (Gradio's sketchpad): ink is opaque pixels,
      whatever their colour.
    - RGB / L: the background is the border's median; white-on-black is inverted.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3]
        if alpha.min() < 250:  # real transparency: opaque pixels are the ink
            gray = rgba[..., :3].mean(-1)
            # Light strokes on transparent canvas still count as ink; dark strokes
            # on an opaque white layer are handled by the gray path below.
            bg_opaque = np.median(_border(alpha)) > 128
            if not bg_opaque:
                return alpha.astype(np.uint8)
            return _polarity(gray)
        image = image.convert("RGB")
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    return _polarity(gray)


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def _polarity(gray: np.ndarray) -> np.ndarray:
    bg = float(np.median(_border(gray)))
    ink = (255.0 - gray) if bg >= 128 else gray  # dark background: light ink
    ink = np.clip(ink - (255.0 - bg if bg >= 128 else bg), 0, 255)
    return ink.astype(np.uint8)


def preprocess_sketch(
    sketch: SketchInput,
    size: int = 224,
    margin: float = DEFAULT_MARGIN,
    line_width: float = TARGET_LINE_WIDTH,
    brush: Optional[float] = None,
) -> Image.Image:
    """Canvas image or strokes -> RGB image, black ink on white, size x size.

    Crops to the ink's bounding box plus a margin, pads to a square (aspect kept),
    resizes, and thickens lines that a large downscale would make too thin.
    `brush`: for strokes, the pen width in the strokes' own units (a canvas brush size);
    it is scaled like the drawing and kept within LINE_WIDTH_RANGE.
    Raises BlankSketchError when there is no ink.
    """
    if not isinstance(sketch, (Image.Image, np.ndarray)):
        sketch = read_strokes(sketch)
        if brush is not None and brush > 0:
            line_width = brush_line_width(sketch, brush, size, margin)
        return render_strokes(sketch, size=size, line_width=line_width, margin=margin)
    ink = ink_mask(sketch)
    on = ink > INK_THRESHOLD
    if not on.any():
        raise BlankSketchError()
    ys, xs = np.nonzero(on)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    pad = int(round(side * margin))
    side += 2 * pad
    canvas = np.zeros((side, side), dtype=np.uint8)
    oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    canvas[oy:oy + y1 - y0, ox:ox + x1 - x0] = ink[y0:y1, x0:x1]
    img = Image.fromarray(canvas)
    # Keep lines readable: the stroke width after downscaling should be about
    # TARGET_LINE_WIDTH. Estimate the current width as ink area / skeleton length
    # (approximated by area / (perimeter/2)) and dilate before shrinking if needed.
    scale = size / side
    width_now = _stroke_width(on[y0:y1, x0:x1])
    if width_now * scale < line_width * 0.75:
        grow = int(round(line_width / scale - width_now))
        if grow >= 1:  # an odd square kernel >= 3
            import cv2

            # OpenCV's square dilation is separable: 8 ms where PIL's MaxFilter took 19 s on a
            # 3000 px scan (kernel 61), with the same pixels (PIL's filter replicates the edges).
            k = 2 * ((grow + 1) // 2) + 1
            img = Image.fromarray(cv2.dilate(canvas, np.ones((k, k), np.uint8)))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    return ImageOps.invert(img).convert("RGB")


def brush_line_width(strokes: Strokes, brush: float, size: int, margin: float = DEFAULT_MARGIN) -> float:
    """A brush width in stroke units -> the line width at `size`, as the drawing is scaled."""
    pts = read_strokes(strokes)
    if not pts:
        return TARGET_LINE_WIDTH
    allp = np.concatenate(pts)
    extent = float(max(allp.max(0) - allp.min(0))) or 1.0
    lo, hi = LINE_WIDTH_RANGE
    return float(np.clip(brush * size * (1 - 2 * margin) / extent, lo, hi))


def _stroke_width(on: np.ndarray) -> float:
    """Mean stroke width of a binary ink mask: area / (boundary length / 2)."""
    area = float(on.sum())
    if area == 0:
        return 0.0
    edges = (on[1:, :] != on[:-1, :]).sum() + (on[:, 1:] != on[:, :-1]).sum()
    return max(1.0, 2.0 * area / max(float(edges), 1.0))


# ----------------------------------------------------------------------------- photos
def fit_photo(photo: Union[Image.Image, np.ndarray], size: int) -> Image.Image:
    """RGB (alpha composited on white), longer side resized to `size`."""
    if isinstance(photo, np.ndarray):
        photo = Image.fromarray(photo)
    if photo.mode in ("RGBA", "LA", "PA", "P"):
        rgba = photo.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        photo = Image.alpha_composite(bg, rgba)
    if photo.mode != "RGB":  # convert() would copy an RGB photo: 0.14 ms of a gallery's 1.2 ms per photo
        photo = photo.convert("RGB")
    w, h = photo.size
    s = size / max(w, h)
    return photo.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)


def pad_square(img: Image.Image, size: int) -> Image.Image:
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return out


def preprocess_photo(photo: Union[Image.Image, np.ndarray], size: int = 224) -> Image.Image:
    """Any photo -> RGB size x size, aspect kept, padded with white.

    Padding (rather than a centre crop) keeps the whole object, as a sketch does.
    """
    return pad_square(fit_photo(photo, size), size)


def edges_as_sketch(photo: Union[Image.Image, np.ndarray], size: int = 224) -> Image.Image:
    """A photo's edge map seen as a drawing: cropped to its lines and padded like a sketch
    (the view a sketch encoder sees); a flat photo gives its plain (blank) edge map."""
    edges = photo_to_edges(photo, size)
    try:
        return preprocess_sketch(edges, size)
    except ValueError:
        return edges


def photo_to_edges(photo: Union[Image.Image, np.ndarray], size: int = 224) -> Image.Image:
    """A photo -> black edges on white (Canny), a pseudo-sketch of the photo.

    Thresholds follow the median-intensity heuristic so one setting works across
    bright and dark photos; a light blur first drops texture edges. Edges are taken
    before padding so the padding border does not draw a frame.
    """
    import cv2  # only needed on the photo-edge path

    img = np.asarray(fit_photo(photo, size).convert("L"))
    img = cv2.GaussianBlur(img, (5, 5), 1.2)
    med = float(np.median(img))
    lo, hi = int(max(0, 0.66 * med)), int(min(255, 1.33 * med))
    if hi <= lo:
        lo, hi = 50, 150
    edges = cv2.Canny(img, lo, hi)
    edges = cv2.dilate(edges, np.ones((2, 2), np.uint8))
    return pad_square(Image.fromarray(255 - edges).convert("RGB"), size)
