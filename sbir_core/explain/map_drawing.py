"""Drawing the embedding map: layout geometry, thumbnails, class names, the query's star,
rings, rank badges and captions (anti-aliased by supersampling small patches). Used by
`EmbeddingMap.render`; no t-SNE here."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ThumbnailSource = Union[Sequence[Any], Callable[[int], Any]]

BACKGROUND = (255, 255, 255)
INK = (25, 25, 25)
UNLABELLED = (68, 119, 170)
HIGHLIGHT = (222, 0, 122)  # frames, rings and rank numbers of the results
STAR_FILL = (255, 205, 0)
# matplotlib's tab20: strong/pale pairs (tab10 = the strong ones).
PALETTE = [(31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44), (152, 223, 138),
           (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
           (227, 119, 194), (247, 182, 210), (127, 127, 127), (199, 199, 199), (188, 189, 34), (219, 219, 141),
           (23, 190, 207), (158, 218, 229)]
THUMB_KEEP = 96  # decoded thumbnails are kept at most this big (~27 KB each)
MAX_COVERED = 0.8  # a thumbnail more covered than this by the ones above it becomes a dot
MAX_RANK_NUMBERS = 5
MAX_LABELS_TRIED = 400  # only the biggest classes compete for a place (more cannot fit)
RESULT_ZOOM = 1.25  # the results' thumbnails are drawn this much bigger than the others
RESULT_MAX_MOVE = 1.0  # a result's tile moves at most this many half-tiles off its place
# Class names at 640 px wide: the page shows the map about 500 px wide at 1366 x 768
# (measured in Chromium), so names are at least 12 CSS px there.
LABEL_PX = 16
CAPTION_PAD = 4
MAX_STRETCH = 1.4  # the map fills the canvas, one axis stretched at most this much more than the other
RENDER_CACHE_ENTRIES = 6  # base layers kept per map (size x title-or-not x thumbnails-or-dots)


@dataclass
class PlacedLabel:
    name: str  # the class
    text: str  # as drawn (underscores as spaces)
    anchor: tuple[float, float]  # pixel position of the class median
    xy: tuple[float, float]  # where the name's centre went (anchor, or nudged)
    box: tuple[float, float, float, float]
    shown: bool


@dataclass
class MapLayout:
    size: tuple[int, int]
    plot: tuple[float, float, float, float]  # left, top, right, bottom (pixels)
    scale: tuple[float, float]  # pixels per map unit along x and y
    centre: np.ndarray  # map point at the plot's centre
    thumb_px: int  # thumbnail side (0: dots)
    dot_r: float
    unit: float  # 1 at 640x560
    title_px: int
    title_h: int
    label_px: int
    shown: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # rows drawn as thumbnails, bottom first
    dots: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # rows drawn as dots
    labels: list[PlacedLabel] = field(default_factory=list)

    def to_pixels(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) map coordinates -> (N, 2) pixel coordinates (y down)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        cx, cy = (self.plot[0] + self.plot[2]) / 2, (self.plot[1] + self.plot[3]) / 2
        return np.stack([cx + (xy[:, 0] - self.centre[0]) * self.scale[0],
                         cy - (xy[:, 1] - self.centre[1]) * self.scale[1]], axis=1)


@dataclass
class MapMarks:
    """What a render draws for one query, in pixels (`EmbeddingMap.marks`)."""
    layout: MapLayout
    title: Optional[str]
    thumbnails: bool  # the gallery as thumbnails (else dots)
    rows: list[int]  # the results' gallery rows, best first
    query: np.ndarray  # (0 or 1, 2) the marker's centre
    query_r: float  # half the marker's size
    query_image: Optional[Image.Image] = None  # the drawing shown instead of a star
    places: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # the results' own map positions
    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # where their tiles/rings are drawn
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # their frames
    tiles: list[Image.Image] = field(default_factory=list)
    caption: Optional[tuple[str, tuple[float, float], tuple[float, float, float, float]]] = None  # text, centre, box
    labels: list[PlacedLabel] = field(default_factory=list)  # the class names drawn

    def marker_box(self) -> Optional[tuple[float, float, float, float]]:
        if not len(self.query):
            return None
        x, y, r = float(self.query[0][0]), float(self.query[0][1]), self.query_r
        return (x - r, y - r, x + r, y + r)


def canvas_size(size: Any) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    w, h = int(size[0]), int(size[1])
    if w < 16 or h < 16:
        raise ValueError(f"map size {w}x{h} is too small")
    return w, h


@functools.lru_cache(maxsize=32)
def map_font(px: int, bold: bool = True) -> Any:
    """DejaVu Sans (shipped with matplotlib) at `px` pixels; Pillow's default font otherwise."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(name, px)
    except OSError:
        pass
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), px)
    except Exception:
        return ImageFont.load_default(px)


def small_image(src: Any, keep: int = THUMB_KEEP) -> Image.Image:
    """A PIL image / path / array -> an RGB image at most `keep` px (transparency on white)."""
    if isinstance(src, np.ndarray):
        src = Image.fromarray(src)
    if isinstance(src, Image.Image):
        im = src
    else:
        im = Image.open(src)
        if im.format == "JPEG":
            im.draft("RGB", (keep, keep))  # decode at 1/2..1/8 scale: much faster
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        im = out
    else:
        im = im.convert("RGB") if im.mode != "RGB" else im.copy()
    im.thumbnail((keep, keep), Image.Resampling.LANCZOS)
    return im


def fit(im: Image.Image, side: int) -> Image.Image:
    w, h = im.size
    s = side / max(w, h)
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def overlap(a: Sequence[float], b: Sequence[float], pad: float = 0.0) -> bool:
    return a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad and b[1] < a[3] + pad


def _area(a: Sequence[float], b: Sequence[float]) -> float:
    """Area of the intersection of two (x0, y0, x1, y1) boxes."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def choose_thumbnails(pix: np.ndarray, px: int, size: tuple[int, int],
                       labels: Optional[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(rows drawn as thumbnails bottom-first, rows drawn as dots). Top of the pile: each
    class's most central point, then the rest in a fixed random order; a thumbnail that
    those above it would cover more than MAX_COVERED is left out (a dot instead)."""
    n = len(pix)
    order = list(np.random.default_rng(0).permutation(n))
    if labels:
        lab = np.asarray(labels)
        first = []
        for c in sorted(set(labels)):
            rows = np.flatnonzero(lab == c)
            med = np.median(pix[rows], axis=0)
            first.append(int(rows[np.linalg.norm(pix[rows] - med, axis=1).argmin()]))
        firsts = set(first)
        order = first + [i for i in order if i not in firsts]
    W, H = size
    covered = np.zeros((H, W), bool)
    top_first, dots = [], []
    half = px / 2
    for i in order:
        x0, y0 = int(round(pix[i, 0] - half)), int(round(pix[i, 1] - half))
        box = covered[max(y0, 0):max(y0 + px, 0), max(x0, 0):max(x0 + px, 0)]
        if box.size and box.mean() > MAX_COVERED:
            dots.append(i)
            continue
        box[...] = True
        top_first.append(i)
    return np.asarray(top_first[::-1], dtype=int), np.asarray(dots, dtype=int)


def _aa_patch(w: int, h: int, paint: Callable[[ImageDraw.ImageDraw, int], None], ss: int = 4) -> Image.Image:
    """An anti-aliased RGBA patch: `paint(draw, ss)` draws at `ss` x scale, then it is shrunk."""
    big = Image.new("RGBA", (w * ss, h * ss), (0, 0, 0, 0))
    paint(ImageDraw.Draw(big), ss)
    return big.resize((w, h), Image.Resampling.LANCZOS)


def _paste_patch(img: Image.Image, patch: Image.Image, centre: Sequence[float]) -> None:
    x0, y0 = int(round(centre[0] - patch.width / 2)), int(round(centre[1] - patch.height / 2))
    img.paste(patch.convert("RGB"), (x0, y0), patch.getchannel("A"))


@functools.lru_cache(maxsize=64)
def _dot_patch(r: float, colour: tuple[int, int, int]) -> Image.Image:
    s = int(np.ceil(2 * r + 4))

    def paint(d: ImageDraw.ImageDraw, k: int) -> None:
        c = s * k / 2
        d.ellipse((c - (r + 0.8) * k, c - (r + 0.8) * k, c + (r + 0.8) * k, c + (r + 0.8) * k), fill=BACKGROUND)
        d.ellipse((c - r * k, c - r * k, c + r * k, c + r * k), fill=colour)

    return _aa_patch(s, s, paint)


def paste_dot(img: Image.Image, centre: Sequence[float], r: float, colour: tuple[int, int, int]) -> None:
    _paste_patch(img, _dot_patch(round(float(r), 1), tuple(colour)), centre)


def paste_ring(img: Image.Image, centre: Sequence[float], r: float, width: float,
                colour: tuple[int, int, int]) -> None:
    s = int(np.ceil(2 * (r + width) + 6))

    def paint(d: ImageDraw.ImageDraw, k: int) -> None:
        c = s * k / 2
        R = (r + width / 2 + 1) * k
        d.ellipse((c - R, c - R, c + R, c + R), outline=BACKGROUND, width=int((width + 2) * k))
        R = (r + width / 2) * k
        d.ellipse((c - R, c - R, c + R, c + R), outline=colour, width=int(width * k))

    _paste_patch(img, _aa_patch(s, s, paint), centre)


def paste_badge(img: Image.Image, centre: Sequence[float], d: int, text: str) -> None:
    s = d + 4

    def paint(dr: ImageDraw.ImageDraw, k: int) -> None:
        c = s * k / 2
        dr.ellipse((c - (d / 2 + 1.5) * k, c - (d / 2 + 1.5) * k, c + (d / 2 + 1.5) * k, c + (d / 2 + 1.5) * k),
                   fill=BACKGROUND)
        dr.ellipse((c - d / 2 * k, c - d / 2 * k, c + d / 2 * k, c + d / 2 * k), fill=HIGHLIGHT)

    patch = _aa_patch(s, s, paint)
    ImageDraw.Draw(patch).text((s / 2, s / 2 + 0.5), text, fill=(255, 255, 255, 255),
                               font=map_font(max(10, round(d * 0.72))), anchor="mm")
    _paste_patch(img, patch, centre)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    a = np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return [(float(cx + q * np.cos(t)), float(cy - q * np.sin(t))) for q, t in zip(rad, a)]


def paste_star(img: Image.Image, centre: Sequence[float], r: float) -> None:
    halo = max(2.0, r / 6)
    s = int(np.ceil(2 * (r + 2 * halo) + 4))

    def paint(d: ImageDraw.ImageDraw, k: int) -> None:
        c = s * k / 2
        d.polygon(_star(c, c, (r + 2 * halo) * k), fill=BACKGROUND)
        d.polygon(_star(c, c, (r + 0.3 * halo) * k), fill=INK)
        d.polygon(_star(c, c, (r - 1.2 * halo) * k), fill=STAR_FILL)

    _paste_patch(img, _aa_patch(s, s, paint), centre)


def spread(pts: np.ndarray, half: float, fixed: Sequence[Sequence[float]],
            bounds: Sequence[float], iters: int = 150, max_move: Optional[float] = None) -> np.ndarray:
    """Centres for squares of half-side `half` at `pts` (best rank first), nudged apart
    until none overlaps another or a `fixed` box (the query marker), inside `bounds`
    (x0, y0, x1, y1), each at most `max_move` px (per axis) from its place. Of two
    overlapping squares the later (worse-ranked) one moves more, so the best results stay
    closest to where they are."""
    p0 = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    p = p0.copy()
    k = len(p)
    if k == 0:
        return p
    sep = 2 * half + 2
    lo, hi = np.array(bounds[:2], float), np.array(bounds[2:], float)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    angle = 2 * np.pi * (np.arange(k) / k) + 0.6  # tie-breaking directions
    ties = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    fx = np.asarray(fixed, dtype=np.float64).reshape(-1, 4)
    fc = np.stack([(fx[:, 0] + fx[:, 2]) / 2, (fx[:, 1] + fx[:, 3]) / 2], axis=1)
    fh = np.stack([(fx[:, 2] - fx[:, 0]) / 2, (fx[:, 3] - fx[:, 1]) / 2], axis=1)
    upper = np.triu(np.ones((k, k), bool), 1)
    for _ in range(iters):
        delta = np.zeros_like(p)
        d = p[None, :, :] - p[:, None, :]  # d[i, j] = p[j] - p[i]
        over = sep - np.abs(d)
        hit = (over > 0).all(-1) & upper
        if hit.any():
            i, j = np.nonzero(hit)
            a = (over[i, j, 1] < over[i, j, 0]).astype(int)
            sgn = np.sign(d[i, j, a])
            tie = np.sign(ties[j, a] - ties[i, a])
            sgn = np.where(sgn != 0, sgn, np.where(tie != 0, tie, 1.0))
            push = sgn * (over[i, j, a] + 0.5)
            np.add.at(delta, (i, a), -0.25 * push)
            np.add.at(delta, (j, a), 0.75 * push)
        if len(fx):
            dq = p[:, None, :] - fc[None]  # (k, F, 2)
            overq = half + fh[None] + 1 - np.abs(dq)
            hitq = (overq > 0).all(-1)
            if hitq.any():
                i, f = np.nonzero(hitq)
                v = np.where((np.abs(dq[i, f]).max(1) > 1e-6)[:, None], dq[i, f], ties[i])
                a = (overq[i, f, 1] < overq[i, f, 0]).astype(int)
                a = np.where(np.abs(v[np.arange(len(i)), a]) < 1e-6, 1 - a, a)
                np.add.at(delta, (i, a), np.sign(v[np.arange(len(i)), a]) * overq[i, f, a])
        if not delta.any():
            break
        q = p + delta
        if max_move is not None:  # results that sit together stay together (issue 31)
            np.clip(q, p0 - max_move, p0 + max_move, out=q)
        np.clip(q, lo, hi, out=q)
        if np.abs(q - p).max() < 0.25:  # held by the bounds: no further to go
            break
        p = q
    return p


def badge_spot(box: Sequence[float], d: float, canvas: Sequence[float], taken: Sequence[Sequence[float]],
                others: Sequence[Sequence[float]]) -> Optional[tuple[float, float, float, float]]:
    """A d x d box for a rank number by `box`: its corners, edge middles, then further out;
    inside `canvas`, overlapping nothing in `taken`, preferably nothing in `others`."""
    x0, y0, x1, y1 = box
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    spots = [(x0, y0), (x1, y0), (x0, y1), (x1, y1), (xm, y0), (xm, y1), (x0, ym), (x1, ym)]
    for f in (1.0, 2.0):
        g = f * d
        spots += [(x0 - g, y0 - g), (x1 + g, y0 - g), (x0 - g, y1 + g), (x1 + g, y1 + g),
                  (xm, y0 - g), (xm, y1 + g), (x0 - g, ym), (x1 + g, ym)]
    h = d / 2
    fallback = None
    for cx, cy in spots:
        cx = min(max(cx, canvas[0] + h), canvas[2] - h)
        cy = min(max(cy, canvas[1] + h), canvas[3] - h)
        b = (cx - h, cy - h, cx + h, cy + h)
        if any(overlap(b, o, 1) for o in taken):
            continue
        if not any(overlap(b, o) for o in others):
            return b
        fallback = fallback or b
    return fallback


def caption_spot(p: Sequence[float], r: float, lay: MapLayout, avoid: Sequence[Sequence[float]],
                  text: str) -> tuple[str, tuple[float, float], tuple[float, float, float, float]]:
    """Where the query's caption goes next to its marker: right, left, below, above it, at
    a corner, or a little further out, the first that covers no result and no class name
    (else the one covering least, results weighing 10x), inside the canvas."""
    font = map_font(lay.label_px)
    l, t, r_, b = font.getbbox(text, anchor="mm")
    w, h = r_ - l + 2 * CAPTION_PAD, b - t + 2 * CAPTION_PAD
    W, H = lay.size
    best, best_cost = None, None
    ax, ay = r + 4 + w / 2, r + 4 + h / 2
    # beside, below, above, at the corners, then a little further out
    spots = [(ax, 0), (-ax, 0), (0, ay), (0, -ay), (ax, ay), (-ax, ay), (ax, -ay), (-ax, -ay)]
    for dx, dy in spots + [(1.6 * x, 1.6 * y) for x, y in spots]:
        x = min(max(p[0] + dx, w / 2 + 1), W - w / 2 - 1)
        y = min(max(p[1] + dy, lay.title_h + h / 2 + 1), H - h / 2 - 1)
        box = (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
        cost = 10 * sum(_area(box, o) for o in list(avoid) + [(p[0] - r, p[1] - r, p[0] + r, p[1] + r)]) + sum(
            _area(box, lab.box) for lab in lay.labels if lab.shown)
        if best_cost is None or cost < best_cost - 1e-6:
            best, best_cost = (text, (x, y), box), cost
        if cost <= 0:
            break
    return best


def draw_caption(img: Image.Image, spot: tuple[str, tuple[float, float], Sequence[float]], lay: MapLayout) -> None:
    text, (x, y), box = spot
    d = ImageDraw.Draw(img)
    d.rounded_rectangle(tuple(box), radius=max(3, round(4 * lay.unit)), fill=BACKGROUND, outline=INK,
                        width=max(1, round(1.5 * lay.unit)))
    d.text((x, y), text, fill=INK, font=map_font(lay.label_px), anchor="mm")


