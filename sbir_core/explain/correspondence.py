"""Why did this photo match this sketch? Token correspondences, a heatmap, a synthesis.

ZSE-SBIR explains a match with the token grids of the two images: which sketch
cell corresponds to which photo cell (lines between them), where on the photo the
sketch found support (a heatmap), and the sketch rebuilt from photo patches
("patch-replacement synthesis"). `explain_pair(encoder, sketch, photo)` computes all of
it as raw arrays in an `Explanation`, whose `render_*` methods draw PIL images and
`save(dir)` writes `correspondences.png`, `heatmap.png` and `synthesis.png`. Everything
follows the encoder's own input size and token grid (nothing assumes 224 px or 14 x 14).

Appearance (`encode_pair_features`, `pair_similarity`): the cosine of mean-centred
tokens (an image's mean token mostly says "sketch" or "photo"; removing it leaves what
differs between cells), averaged over two backbone levels (the token block and the
coarser block above it, resampled to the token grid) and over two views of the photo:
the photo and its edge map (the photo seen as a line drawing). The drawing is also
encoded shrunk (SKETCH_SCALES): CNN tokens are not scale invariant, and a drawing often
shows an object (or a part: a cat's face) much smaller in the photo. With a relation
model its cross-attended similarity is mixed in (RELATION_WEIGHT). Only inked sketch
cells take part: a blank cell draws no line and gets no patch.

Matching (measured by `scripts/bench_correspondence.py`: photos' own edge maps moved by
a known random affine map, so every line can be checked):
1. place the drawing on the photo (`fit_placement`): a similarity map (scale, rotation,
   shift, optionally mirrored) proposed by RANSAC from the cells' strongest appearance
   matches (dual-softmax weighted), scored by appearance near where it sends each cell
   (hub-corrected z) minus how far the drawing's lines fall from the photo's outlines
   (a chamfer distance, `line_distance`), refined by local search; one search per
   drawing size, the best score wins;
2. each inked cell takes its best photo cell by appearance - a penalty for cells with no
   outline (flat colour, white background: `photo_structure`) - a penalty growing with
   the distance from where the placement sends it (free within one cell): the
   assignment the synthesis paints with;
3. a line is drawn only where that cell agrees with the placement (within DRAW_RADIUS),
   lands on outline, and its appearance strength (`match_strength`, in standard
   deviations) reaches MATCH_THRESHOLD, calibrated on the benchmark; one line per photo
   cell, none from a cell touching a stronger line's, at most MAX_MATCHES. Line colour
   is that appearance strength only, never the placement.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from sbir_core.data.images import ImageTooLargeError, load_image
from sbir_core.errors import InputError
from sbir_core.models.relation import RelationModel, ink_cells
from sbir_core.models.relation import load_relation as _load_relation

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
MIN_MATCHES = 8  # match_cells' fill-up when too few mutual matches remain
MAX_MATCHES = 30
CMAP = "turbo"
# Line strength (appearance only: how many standard deviations a cell's match stands
# above that cell's similarity to every photo cell) below which no line is drawn.
# Calibrated with `python scripts/bench_correspondence.py --data ../shared/data` (shipped
# encoder efficientnet-lite0@4f3d9fe4ebbd with the shipped relation model, 240 photos):
# on the calibration half (a fixed-seed split) of its hard set, the threshold that
# maximises right - 4 x wrong drawn lines, i.e. a line is drawn where lines of its
# strength are right at least 4 times in 5; on the standard set every candidate is
# right at any threshold, so it cannot choose. PCK is reported on the other halves.
# Re-run it when the shipped encoder changes: it prints its calibrated value next to
# this one ("threshold_calibrated").
MATCH_THRESHOLD = 3.24
EDGE_WEIGHT = 0.5  # share of the photo's edge-map view in the appearance similarity
RELATION_WEIGHT = 0.25  # share of the relation model's similarity when one is given
BACKGROUND_WEIGHT = 0.15  # appearance penalty for a photo cell without any outline
STRUCTURE_FULL = 0.06  # outline-pixel fraction at which a photo cell counts as full outline
STRUCTURE_GRADIENT = 60.0  # colour gradient (Sobel, 0-255 images) of an outline pixel: a step of ~15 levels
SYNTHESIS_MIN_SCALE = 0.5  # synthesis: photo patches enlarged at most 2x (and never shrunk)
SYNTHESIS_EDGE = 1.25  # synthesis: opacity fades with patch coverage x this (clipped) past the ink
SYNTHESIS_STROKE = 0.6  # synthesis: strokes widened to this many cells, so the texture shows
SKETCH_SCALES = (1.0, 0.6, 0.36)  # drawing sizes tried against the photo (object scale search)
LINE_WEIGHT = 1.5  # placement score: weight of the drawing-to-outline (chamfer) distance
DRAW_RADIUS = 1.5  # a line's photo end must lie this close (cells) to the placement's
LEGEND_HEIGHT = 34  # legend strip under the correspondences at scale <= 2 (pixels)
MIN_TEXT_PX = 13  # no rendered label is smaller (pixel height of its glyphs)


def load_relation(path: Optional[PathLike] = None) -> RelationModel:
    """The trained relation model (default `checkpoints/relation.safetensors`).

    Raises FileNotFoundError with how to train one when the file is missing.
    """
    return _load_relation(path)


@functools.lru_cache(maxsize=16)
def label_font(px: int) -> ImageFont.ImageFont:
    """A TrueType sans-serif font `px` pixels in size (DejaVu Sans: the system's or
    matplotlib's copy), else Pillow's scalable default."""
    import matplotlib

    for cand in ("DejaVuSans.ttf", os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf",
                                                "DejaVuSans.ttf")):
        try:
            return ImageFont.truetype(cand, px)
        except OSError:
            continue
    return ImageFont.load_default(size=px)


# ----------------------------------------------------------------------------- the result
@dataclass
class Explanation:
    """Raw arrays of one sketch-photo explanation (cells are row-major over `grid`)."""

    sketch_image: Image.Image  # the preprocessed sketch the encoder saw
    photo_image: Image.Image  # the preprocessed photo the encoder saw
    grid: tuple[int, int]  # (h, w) token cells
    image_size: tuple[int, int]  # (width, height) of both images in pixels
    similarity: np.ndarray  # (Ns, Np) float32 appearance similarity (no placement, no background penalty)
    sketch_ink: np.ndarray  # (Ns,) bool: sketch cells with ink
    matches: list[tuple[int, int, float]]  # drawn lines (sketch cell, photo cell, strength), strongest first
    heatmap: np.ndarray  # (h, w) float32 in [0, 1]: photo regions the sketch matched
    assignment: np.ndarray  # (Ns,) int: best photo cell per inked sketch cell, -1 for blank cells
    relation_score: Optional[float] = None  # P(same class) from the relation model, if given
    relation_logit: Optional[float] = None
    token_source: str = "backbone"  # "backbone" or "relation" (relation similarity mixed in)
    mutual: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per match: mutual NN?
    transform: Optional[dict] = None  # fitted sketch->photo placement (cells), None if none found
    candidates: list = field(default_factory=list)  # every line candidate before the threshold
    threshold: float = MATCH_THRESHOLD  # strength threshold the drawn lines passed

    # ---- geometry
    @property
    def cell_size(self) -> tuple[float, float]:
        """(width, height) of one cell in pixels; cell_size * grid == image size."""
        return self.image_size[0] / self.grid[1], self.image_size[1] / self.grid[0]

    def cell_box(self, cell: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) pixel box of a cell (row-major index)."""
        h, w = self.grid
        r, c = divmod(int(cell), w)
        xs = np.linspace(0, self.image_size[0], w + 1).round().astype(int)
        ys = np.linspace(0, self.image_size[1], h + 1).round().astype(int)
        return int(xs[c]), int(ys[r]), int(xs[c + 1]), int(ys[r + 1])

    def cell_center(self, cell: int) -> tuple[float, float]:
        r, c = divmod(int(cell), self.grid[1])
        cw, ch = self.cell_size
        return (c + 0.5) * cw, (r + 0.5) * ch

    # ---- rendering
    @staticmethod
    def legend_height(scale: int = 2) -> int:
        """Height of the legend strip under `render_correspondences(scale)`."""
        return LEGEND_HEIGHT if scale <= 2 else int(round(LEGEND_HEIGHT * scale / 2))

    def render_correspondences(self, scale: int = 2, max_lines: Optional[int] = None, gap: int = 16,
                               legend: bool = True) -> Image.Image:
        """Sketch (left) and photo (right) side by side, matched cell centres joined by
        lines coloured by appearance strength (legend strip below, no text over the
        images). Size: (2*W*scale + gap, H*scale + legend_height(scale) if legend else H*scale)."""
        import matplotlib

        cmap = matplotlib.colormaps[CMAP]
        W, H = self.image_size
        sw, sh = W * scale, H * scale
        bar = self.legend_height(scale) if legend else 0
        canvas = Image.new("RGB", (2 * sw + gap, sh + bar), (255, 255, 255))
        sk = self.sketch_image.convert("RGB").resize((sw, sh), Image.Resampling.BICUBIC)
        canvas.paste(sk, (0, 0))
        canvas.paste(self.photo_image.convert("RGB").resize((sw, sh), Image.Resampling.BICUBIC), (sw + gap, 0))
        draw = ImageDraw.Draw(canvas)
        ms = self.matches[:max_lines] if max_lines else self.matches
        lo, hi = self._strength_range()
        lw = max(2, scale + 1)
        r = 2 * scale + 1
        # Weakest first so the strongest lines are drawn on top; a white halo keeps
        # them visible over dark photos.
        for s, p, v in sorted(ms, key=lambda m: m[2]):
            col = self._colour(cmap, v, lo, hi)
            xs, ys = self.cell_center(s)
            xp, yp = self.cell_center(p)
            a = (xs * scale, ys * scale)
            b = (xp * scale + sw + gap, yp * scale)
            draw.line([a, b], fill=(255, 255, 255), width=lw + 2)
            draw.line([a, b], fill=col, width=lw)
            for x, y in (a, b):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=col, outline=(0, 0, 0), width=max(1, scale // 2))
        if legend:
            self._draw_legend(canvas, draw, cmap, sh, bar)
        return canvas

    def _strength_range(self) -> tuple[float, float]:
        """Colour scale of the lines: from the threshold (weakest drawable) to a fixed
        span above it, so colours mean the same in every explanation."""
        lo = float(self.threshold) if np.isfinite(self.threshold) else 0.0
        return lo, lo + 2.5

    @staticmethod
    def _colour(cmap, v: float, lo: float, hi: float) -> tuple[int, int, int]:
        t = (v - lo) / (hi - lo) if hi > lo else 1.0
        return tuple(int(255 * x) for x in cmap(0.15 + 0.85 * float(np.clip(t, 0, 1)))[:3])

    def _draw_legend(self, canvas: Image.Image, draw: ImageDraw.ImageDraw, cmap, y0: int, height: int) -> None:
        """One row under the images: "weak [colour bar] strong   N matching parts ...",
        the largest font (>= MIN_TEXT_PX) that fits the width."""
        W = canvas.width
        n = len(self.matches)
        if n:
            long = f"{n} matching part{'s' if n != 1 else ''} · colour: how alike they look"
            short = f"{n} matching part{'s' if n != 1 else ''}"
        else:
            long = short = "no confident matching parts"
        pad, gap = 8, 10
        px = max(MIN_TEXT_PX, int(round(0.62 * height)))
        while True:
            font = label_font(px)
            tw = lambda s: draw.textlength(s, font=font)  # noqa: E731
            bar_w = max(60, int(0.22 * W))
            for summary in (long, short):
                need = (tw("weak") + tw("strong") + bar_w + 2 * gap if n else 0) + tw(summary) + 2 * pad + 2 * gap
                if need <= W:
                    break
            else:
                summary = None
            if summary is not None or px <= MIN_TEXT_PX:
                break
            px -= 1
        cy = y0 + height / 2
        x = pad
        if n:
            draw.text((x, cy), "weak", fill=(0, 0, 0), font=font, anchor="lm")
            x += tw("weak") + gap
            bh = max(8, int(0.4 * height))
            grad = np.linspace(0.15, 1.0, bar_w)
            rgb = (np.array([cmap(g)[:3] for g in grad]) * 255).astype(np.uint8)
            canvas.paste(Image.fromarray(np.repeat(rgb[None], bh, axis=0)), (int(x), int(cy - bh / 2)))
            x += bar_w + gap
            draw.text((x, cy), "strong", fill=(0, 0, 0), font=font, anchor="lm")
            x += tw("strong") + 2 * gap
        if summary is not None:
            sx = max(x, W - pad - tw(summary)) if n else (W - tw(summary)) / 2
            draw.text((sx, cy), summary, fill=(40, 40, 40), font=font, anchor="lm")

    def render_heatmap(self, alpha: float = 0.55, scale: int = 2) -> Image.Image:
        """The photo with a translucent heatmap of the regions the sketch matched
        (size: W*scale x H*scale)."""
        import matplotlib

        W, H = self.image_size
        photo = self.photo_image.convert("RGB").resize((W * scale, H * scale), Image.Resampling.BICUBIC)
        hm = Image.fromarray((np.clip(self.heatmap, 0, 1) * 255).astype(np.uint8))
        hm = np.asarray(hm.resize(photo.size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        rgb = matplotlib.colormaps["jet"](hm)[..., :3]
        a = (alpha * np.clip(hm * 1.2, 0.15, 1.0))[..., None]
        base = np.asarray(photo, dtype=np.float32) / 255.0
        # Unmatched regions greyed a little so the matched ones stand out.
        grey = base.mean(-1, keepdims=True) * 0.5 + base * 0.5
        out = (1 - a) * grey + a * rgb
        return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))

    def synthesis_field(self, scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The photo texture each inked sketch cell matched, blended: every inked cell
        pastes the photo patch around its assigned cell, two cells wide, with a raised-
        cosine (Hann) weight centred on the sketch cell; overlapping weights of a full
        neighbourhood sum to one, so neighbouring patches cross-fade instead of meeting
        at hard block edges. Each patch is read through the placement's scale, rotation
        and mirroring (a drawing placed small on the photo shows that region enlarged,
        not the same small patch over and over). Returns ((H, W, 3) float RGB in
        [0, 255], (H, W) coverage weight) at `scale`."""
        import cv2

        W, H = self.image_size[0] * scale, self.image_size[1] * scale
        photo = np.asarray(self.photo_image.convert("RGB").resize((W, H), Image.Resampling.BICUBIC), np.float32)
        cw, ch = self.cell_size[0] * scale, self.cell_size[1] * scale
        acc = np.zeros((H, W, 3), np.float32)
        wsum = np.zeros((H, W), np.float32)
        t = self.transform or {}
        lin = complex(*t["a"]) if "a" in t else 1 + 0j  # sketch -> photo, in cells
        # At most 2x enlarged: a drawing placed very small on the photo would otherwise
        # show a few photo pixels blown up to a blur.
        lin = lin / abs(lin) * float(np.clip(abs(lin), SYNTHESIS_MIN_SCALE, 1.0)) if abs(lin) > 0 else 1 + 0j
        flip = -1.0 if t.get("mirrored") else 1.0
        for s in np.flatnonzero(self.sketch_ink):
            p = int(self.assignment[s])
            if p < 0:
                continue
            sx, sy = self.cell_center(s)
            px, py = self.cell_center(p)
            sx, sy, px, py = sx * scale, sy * scale, px * scale, py * scale
            xs = np.arange(max(int(np.floor(sx - cw)), 0), min(int(np.ceil(sx + cw)), W))
            ys = np.arange(max(int(np.floor(sy - ch)), 0), min(int(np.ceil(sy + ch)), H))
            if not len(xs) or not len(ys):
                continue
            dx, dy = xs + 0.5 - sx, ys + 0.5 - sy
            wx = np.where(np.abs(dx) < cw, np.cos(np.pi * dx / (2 * cw)) ** 2, 0.0)
            wy = np.where(np.abs(dy) < ch, np.cos(np.pi * dy / (2 * ch)) ** 2, 0.0)
            wgt = (wy[:, None] * wx[None, :]).astype(np.float32)
            off = lin * (flip * dx[None, :] / cw + 1j * dy[:, None] / ch)  # offsets in photo cells
            map_x = (px + off.real * cw - 0.5).astype(np.float32)
            map_y = (py + off.imag * ch - 0.5).astype(np.float32)
            patch = cv2.remap(photo, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            acc[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] += wgt[..., None] * patch
            wsum[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] += wgt
        field_ = np.where(wsum[..., None] > 1e-6, acc / np.maximum(wsum, 1e-6)[..., None], 255.0)
        return field_, wsum

    def render_synthesis(self, scale: int = 2) -> Image.Image:
        """The drawing redrawn with the photo's texture: its strokes, widened to about
        0.6 of a cell with soft edges, painted with the blended photo patches their cells
        matched (`synthesis_field`); white elsewhere, and always white in cells with no
        inked neighbour (size W*scale x H*scale)."""
        import cv2

        from sbir_core.data.preprocess import INK_THRESHOLD, ink_mask

        field_, cover = self.synthesis_field(scale)
        H, W = cover.shape
        ink = cv2.resize(ink_mask(self.sketch_image), (W, H), interpolation=cv2.INTER_LINEAR) > INK_THRESHOLD
        cell = min(self.cell_size) * scale
        k = max(3, int(round(SYNTHESIS_STROKE * cell)) | 1)
        brush = cv2.dilate(ink.astype(np.float32), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        brush = cv2.GaussianBlur(brush, (0, 0), max(0.8, 0.12 * cell))
        alpha = (np.clip(brush, 0, 1) * np.clip(SYNTHESIS_EDGE * cover, 0.0, 1.0))[..., None]
        out = 255.0 * (1 - alpha) + field_ * alpha
        return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))

    def save(self, directory: PathLike) -> dict[str, Path]:
        """Write correspondences.png, heatmap.png, synthesis.png (+ explanation.json)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = {"correspondences": d / "correspondences.png", "heatmap": d / "heatmap.png",
                 "synthesis": d / "synthesis.png"}
        self.render_correspondences().save(paths["correspondences"])
        self.render_heatmap().save(paths["heatmap"])
        self.render_synthesis().save(paths["synthesis"])
        paths["json"] = d / "explanation.json"
        paths["json"].write_text(json.dumps(self.to_dict()), encoding="utf-8")
        return paths

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary for the app (no images, no similarity matrix)."""
        return {
            "grid": list(self.grid),
            "image_size": list(self.image_size),
            "cell_size": list(self.cell_size),
            "token_source": self.token_source,
            "relation_score": self.relation_score,
            "threshold": self.threshold,
            "placement": None if self.transform is None else {
                k: self.transform[k] for k in ("scale", "angle", "mirrored", "inlier_cells")},
            "matches": [{"sketch_cell": int(s), "photo_cell": int(p), "strength": round(float(v), 4),
                         "sketch_xy": [round(c, 1) for c in self.cell_center(s)],
                         "photo_xy": [round(c, 1) for c in self.cell_center(p)]} for s, p, v in self.matches],
            "heatmap": np.round(self.heatmap, 3).tolist(),
            "sketch_ink": np.asarray(self.sketch_ink, bool).reshape(self.grid).astype(int).tolist(),
            "assignment": [int(a) for a in self.assignment],
        }


# ----------------------------------------------------------------------------- features
@dataclass
class PairFeatures:
    """Token levels of one preprocessed sketch/photo pair (see `encode_pair_features`).

    Each list holds (N, C) tensors on the same (h, w) grid: the backbone's token level
    first (what `encode_pair_tokens` returns), then coarser levels resampled to the
    grid. `photo_edges` are the tokens of the photo's own edge map (`photo_edge_view`),
    the photo seen in the sketch domain; `edge_image` is that edge map.
    `sketch_scaled[s]` are the tokens of the drawing shrunk by s (centred on white), read
    back at each original cell's shrunk position: what a sketch cell looks like when the
    object is s times smaller in the photo (CNN tokens are not scale invariant)."""

    sketch: list
    photo: list
    photo_edges: Optional[list]
    grid: tuple[int, int]
    edge_image: Optional[Image.Image] = None
    sketch_scaled: dict = field(default_factory=dict)


def _token_levels(encoder, x: torch.Tensor) -> tuple[list, tuple[int, int]]:
    """[(B, N, C) tokens per level], grid: the backbone's token block and, for
    EfficientNet-Lite backbones, the next (coarser, stride 32) block upsampled to the
    same grid. Other backbones give their one token level."""
    bb = encoder.backbone
    net, tb = getattr(bb, "net", None), getattr(bb, "TOKEN_BLOCK", None)
    if net is None or tb is None or not hasattr(net, "blocks"):
        f = encoder.backbone_features(x)
        return [f.tokens], (int(f.grid[0]), int(f.grid[1]))
    h = (x - encoder._mean) / encoder._std
    h = net.bn1(net.conv_stem(h.contiguous(memory_format=torch.channels_last)))
    maps = []
    for i, blk in enumerate(net.blocks):
        h = blk(h)
        maps.append(h)
        if i >= tb + 1:
            break
    grid = (int(maps[tb].shape[2]), int(maps[tb].shape[3]))
    levels = [maps[tb]]
    if len(maps) > tb + 1:
        levels.append(F.interpolate(maps[tb + 1], size=grid, mode="bilinear", align_corners=False))
    return [m.flatten(2).transpose(1, 2).contiguous() for m in levels], grid


def photo_edge_view(photo_image: Image.Image) -> Image.Image:
    """The preprocessed photo's edge map (black on white, same geometry): the edges
    `preprocess.photo_to_edges` draws, computed inside the photo's area only, so the
    white padding around a non-square photo draws no frame."""
    import cv2

    rgb = np.asarray(photo_image.convert("RGB"))
    g = np.asarray(photo_image.convert("L"))
    pad = (rgb >= 254).all(-1)
    rows, cols = np.flatnonzero(~pad.all(1)), np.flatnonzero(~pad.all(0))
    out = np.full(g.shape, 255, np.uint8)
    if len(rows) == 0 or len(cols) == 0:
        return Image.fromarray(out).convert("RGB")
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = cv2.GaussianBlur(np.ascontiguousarray(g[y0:y1, x0:x1]), (5, 5), 1.2)
    med = float(np.median(crop))
    lo, hi = int(max(0, 0.66 * med)), int(min(255, 1.33 * med))
    if hi <= lo:
        lo, hi = 50, 150
    edges = cv2.dilate(cv2.Canny(crop, lo, hi), np.ones((2, 2), np.uint8))
    out[y0:y1, x0:x1] = 255 - edges
    return Image.fromarray(out).convert("RGB")


def shrink_sketch(sketch_image: Image.Image, factor: float) -> Image.Image:
    """The drawing shrunk by `factor` about the image centre, on white."""
    W, H = sketch_image.size
    w, h = max(1, int(round(W * factor))), max(1, int(round(H * factor)))
    out = Image.new("RGB", (W, H), (255, 255, 255))
    out.paste(sketch_image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), ((W - w) // 2, (H - h) // 2))
    return out


def _sample_shrunk(tokens: torch.Tensor, grid: tuple[int, int], factor: float) -> torch.Tensor:
    """(N, C) tokens of a shrunk drawing read at each original cell's shrunk position."""
    h, w = grid
    z = _cell_xy(grid)
    x = (factor * (z.real - w / 2) + w / 2) / w * 2 - 1
    y = (factor * (z.imag - h / 2) + h / 2) / h * 2 - 1
    g = torch.from_numpy(np.stack([x, y], -1).astype(np.float32)).view(1, h, w, 2)
    m = tokens.T.reshape(1, -1, h, w).float()
    return F.grid_sample(m, g, mode="bilinear", align_corners=False)[0].flatten(1).T.contiguous()


@torch.inference_mode()
def encode_pair_features(encoder, sketch_image: Image.Image, photo_image: Image.Image,
                         edge_view: bool = True, sketch_scales: Optional[Sequence[float]] = None) -> PairFeatures:
    """Token levels of the sketch (also shrunk by each of `sketch_scales` < 1, default
    SKETCH_SCALES), the photo and (edge_view) the photo's edge map, in one backbone batch."""
    scales = [float(f) for f in (SKETCH_SCALES if sketch_scales is None else sketch_scales) if f < 1]
    edge = photo_edge_view(photo_image) if edge_view else None
    imgs = [sketch_image, photo_image] + ([edge] if edge is not None else [])
    imgs += [shrink_sketch(sketch_image, f) for f in scales]
    levels, grid = _token_levels(encoder, torch.stack([encoder.to_tensor(im) for im in imgs]))
    n0 = 3 if edge is not None else 2
    scaled = {f: [_sample_shrunk(lv[n0 + i], grid, f) for lv in levels] for i, f in enumerate(scales)}
    return PairFeatures(sketch=[lv[0] for lv in levels], photo=[lv[1] for lv in levels],
                        photo_edges=[lv[2] for lv in levels] if edge is not None else None, grid=grid,
                        edge_image=edge, sketch_scaled=scaled)


# ----------------------------------------------------------------------------- similarity
def content_cells(image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """(h*w,) bool: cells that are not (near-)white, by the same rule as sketch ink
    (`relation.ink_cells` on a white background): white padding and blank paper are
    not content. For a sketch image this equals its ink cells."""
    from sbir_core.data.preprocess import INK_THRESHOLD
    from sbir_core.models.relation import INK_CELL_FRACTION

    g = np.asarray(image.convert("L"), dtype=np.float32)
    return _cell_fraction(g < 255.0 - INK_THRESHOLD, grid) >= INK_CELL_FRACTION


def _cell_fraction(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h*w,) fraction of True pixels per cell (any cell geometry)."""
    H, W = mask.shape
    h, w = grid
    ys = np.linspace(0, H, h + 1).round().astype(int)
    xs = np.linspace(0, W, w + 1).round().astype(int)
    sat = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = sat[ys[1:, None], xs[None, 1:]] - sat[ys[:-1, None], xs[None, 1:]] \
        - sat[ys[1:, None], xs[None, :-1]] + sat[ys[:-1, None], xs[None, :-1]]
    area = np.diff(ys)[:, None] * np.diff(xs)[None, :]
    return (counts / np.maximum(area, 1)).reshape(-1)


def photo_structure(photo_image: Image.Image, grid: tuple[int, int],
                    edge_image: Optional[Image.Image] = None) -> np.ndarray:
    """(h*w,) in [0, 1]: how much outline a photo cell holds: the share of its pixels on
    a colour boundary (any channel's gradient after a light blur, so a red-green border
    of equal brightness counts) or on the photo's edge map, saturating at
    STRUCTURE_FULL. Sketch lines are outlines: a cell of flat colour or white background
    has nothing a line could correspond to."""
    import cv2

    rgb = cv2.GaussianBlur(np.asarray(photo_image.convert("RGB"), np.float32), (5, 5), 1.2)
    gx = cv2.Sobel(rgb, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(rgb, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.sqrt(gx ** 2 + gy ** 2).max(-1)
    outline = mag >= STRUCTURE_GRADIENT
    if edge_image is not None:
        outline |= np.asarray(edge_image.convert("L")) < 128
    return np.clip(_cell_fraction(outline, grid) / STRUCTURE_FULL, 0.0, 1.0).astype(np.float32)


def _centered_cosine(a: torch.Tensor, b: torch.Tensor, a_mask: Optional[torch.Tensor] = None,
                     b_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cosine similarity of mean-centred tokens: each image's mean token (over its
    inked / content cells) removed, since it mostly encodes the domain."""
    def centre(x, m):
        x = x.float()
        mu = x[m].mean(0, keepdim=True) if m is not None and m.any() else x.mean(0, keepdim=True)
        return F.normalize(x - mu, dim=-1)

    return centre(a, a_mask) @ centre(b, b_mask).T


def pair_similarity(sketch: Sequence[torch.Tensor], photo: Sequence[torch.Tensor],
                    photo_edges: Optional[Sequence[torch.Tensor]], sketch_ink: np.ndarray,
                    photo_content: np.ndarray, edge_weight: float = 0.5) -> np.ndarray:
    """(Ns, Np) appearance similarity: the mean-centred cosine of sketch and photo tokens,
    averaged over the token levels, and mixed (`edge_weight`) with the same against the
    photo's edge-map tokens (line drawing against line drawing)."""
    ink_t = torch.from_numpy(np.asarray(sketch_ink, bool))
    cont_t = torch.from_numpy(np.asarray(photo_content, bool))

    def view(ps):
        return sum(_centered_cosine(s, p, ink_t, cont_t) for s, p in zip(sketch, ps)) / len(ps)

    sim = view(photo)
    if photo_edges is not None and edge_weight > 0:
        sim = (1 - edge_weight) * sim + edge_weight * view(photo_edges)
    return sim.numpy().astype(np.float32)


# ----------------------------------------------------------------------------- placement
def _cell_xy(grid: tuple[int, int]) -> np.ndarray:
    """(h*w,) complex cell centres x + iy in cell units."""
    h, w = grid
    r, c = np.divmod(np.arange(h * w), w)
    return (c + 0.5) + 1j * (r + 0.5)


def apply_placement(placement: dict, grid: tuple[int, int]) -> np.ndarray:
    """(h*w,) complex: where the placement sends each sketch cell centre (cell units)."""
    z = _cell_xy(grid)
    if placement["mirrored"]:
        z = grid[1] - z.real + 1j * z.imag
    return complex(*placement["a"]) * z + complex(*placement["b"])


def hub_corrected_z(sim: np.ndarray) -> np.ndarray:
    """Each row (a sketch cell) standardised over the photo cells, minus each photo
    cell's mean over the rows: a photo cell that resembles every part supports none."""
    z = (sim - sim.mean(1, keepdims=True)) / (sim.std(1, keepdims=True) + 1e-6)
    return z - z.mean(0, keepdims=True)


def _quality(zpad: np.ndarray, zs: np.ndarray, a: np.ndarray, b: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H,) mean over sketch cells of the best z (rows of `zpad`: (n, h+2, w+2), -inf
    border) in the 3x3 photo cells around where each map p = a z + b sends the cell;
    cells sent outside the photo add 0."""
    h, w = grid
    pred = a[:, None] * zs[None] + b[:, None]  # (H, n)
    c = np.floor(pred.real).astype(int)
    r = np.floor(pred.imag).astype(int)
    inside = (c >= 0) & (c < w) & (r >= 0) & (r < h)
    c, r = np.clip(c, -1, w), np.clip(r, -1, h)
    n = zs.shape[0]
    rows = np.arange(n)[None, :]
    best = np.full(pred.shape, -np.inf)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            best = np.maximum(best, zpad[rows, np.clip(r + dr + 1, 0, h + 1), np.clip(c + dc + 1, 0, w + 1)])
    return np.where(inside & np.isfinite(best), best, 0.0).sum(1) / n


@dataclass
class LineContext:
    """The drawing's ink and the photo's edges as point sets and distance maps, in cell
    units, for scoring how well a placement lays the lines on the photo's outlines."""

    ink_pts: np.ndarray  # (n,) complex sketch ink points
    edge_pts: np.ndarray  # (m,) complex photo edge points
    photo_dt: np.ndarray  # (H, W) distance to the nearest photo edge, cells
    sketch_dt: np.ndarray  # (H, W) distance to the nearest sketch ink, cells
    px_per_cell: tuple[float, float]
    ink_box: tuple[float, float, float, float]  # x0, y0, x1, y1 of the ink, cells


def line_context(sketch_image: Image.Image, edge_image: Image.Image, grid: tuple[int, int],
                 n_points: int = 500) -> Optional[LineContext]:
    """LineContext of a preprocessed sketch and the photo's edge map (same size)."""
    import cv2

    from sbir_core.data.preprocess import INK_THRESHOLD, ink_mask

    ink = ink_mask(sketch_image) > INK_THRESHOLD
    edges = np.asarray(edge_image.convert("L")) < 128
    if not ink.any() or not edges.any() or ink.shape != edges.shape:
        return None
    H, W = ink.shape
    cw, ch = W / grid[1], H / grid[0]

    def points(mask):
        ys, xs = np.nonzero(mask)
        if len(xs) > n_points:  # an even subsample, fixed: results are reproducible
            i = np.linspace(0, len(xs) - 1, n_points).round().astype(int)
            xs, ys = xs[i], ys[i]
        return (xs + 0.5) / cw + 1j * (ys + 0.5) / ch

    def dt(mask):
        return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 3) / cw

    ys, xs = np.nonzero(ink)
    return LineContext(points(ink), points(edges), dt(edges), dt(ink), (cw, ch),
                       (xs.min() / cw, ys.min() / ch, (xs.max() + 1) / cw, (ys.max() + 1) / ch))


def line_distance(ctx: LineContext, a: np.ndarray, b: np.ndarray, mirrored: bool, grid: tuple[int, int],
                  tau: float = 1.0) -> np.ndarray:
    """(H,) symmetric truncated chamfer distance in [0, 1] of maps p = a z + b (z mirrored
    if `mirrored`): the mean of (sketch ink -> nearest photo edge) and (photo edges that
    fall on the drawing's box -> nearest ink), each truncated at `tau` cells and divided
    by it. Low when the drawing's lines lie on the photo's outlines and the outlines
    there are the drawing's."""
    w = grid[1]
    cw, ch = ctx.px_per_cell
    Hp, Wp = ctx.photo_dt.shape
    z = ctx.ink_pts
    if mirrored:
        z = w - z.real + 1j * z.imag
    p = a[:, None] * z[None] + b[:, None]  # (H, n)
    xi, yi = np.floor(p.real * cw).astype(int), np.floor(p.imag * ch).astype(int)
    inside = (xi >= 0) & (xi < Wp) & (yi >= 0) & (yi < Hp)
    d1 = np.where(inside, np.minimum(ctx.photo_dt[np.clip(yi, 0, Hp - 1), np.clip(xi, 0, Wp - 1)], tau), tau)
    d1 = d1.mean(1) / tau
    q = (ctx.edge_pts[None] - b[:, None]) / a[:, None]  # photo edges back in the drawing's frame
    if mirrored:
        q = w - q.real + 1j * q.imag
    x0, y0, x1, y1 = ctx.ink_box
    on_box = (q.real >= x0) & (q.real <= x1) & (q.imag >= y0) & (q.imag <= y1)
    xi, yi = np.floor(q.real * cw).astype(int), np.floor(q.imag * ch).astype(int)
    ds = ctx.sketch_dt[np.clip(yi, 0, Hp - 1), np.clip(xi, 0, Wp - 1)] * np.abs(a)[:, None]
    d2 = np.where(on_box, np.minimum(ds, tau), 0.0).sum(1) / np.maximum(on_box.sum(1), 1) / tau
    d2 = np.where(on_box.any(1), d2, 1.0)
    return 0.5 * (d1 + d2)


def fit_placement(sim: np.ndarray, sketch_ink: np.ndarray, grid: tuple[int, int],
                  photo_weight: Optional[np.ndarray] = None, top: int = 3, n_seeds: int = 80,
                  inlier_cells: float = 1.5, scale_range: tuple[float, float] = (0.25, 1.6),
                  max_angle: float = 35.0, min_inliers: int = 5, n_rescore: int = 400,
                  lines: Optional[LineContext] = None, line_weight: float = LINE_WEIGHT) -> Optional[dict[str, Any]]:
    """Where the drawing lies on the photo: a similarity map (scale, rotation, shift,
    optionally mirrored: a horse facing the other way) from sketch cells to photo
    cells (cell units), by RANSAC over appearance matches.

    Candidates are each inked cell's `top` most similar photo cells, weighted by their
    dual-softmax confidence (similar to the cell AND the cell most similar to it among
    the sketch's cells) times `photo_weight`. Every pair of strong candidates (the
    `n_seeds` strongest, from different sketch cells) proposes a map, plain and
    mirrored, with its scale in `scale_range` and rotation within `max_angle`. The
    `n_rescore` maps with the most inlier confidence (candidates sent within
    `inlier_cells`, one per sketch cell) are rescored by their quality: the mean over
    inked cells of the best hub-corrected z-score (`hub_corrected_z`) within one cell
    of where the map sends them, minus `line_weight` x the chamfer distance between the
    drawing's lines and the photo's outlines under the map (`line_distance`, with
    `lines`); the best is refined by a local search on that quality. Returns None when
    fewer than `min_inliers` sketch cells are inliers; else a dict with "a", "b" (the
    map p = a z + b as (re, im) pairs, z the cell centre x + iy, mirrored first: x -> w - x),
    "mirrored", "scale", "angle" (degrees), "inlier_cells", "quality".
    """
    ink = np.asarray(sketch_ink, bool).reshape(-1)
    rows = np.flatnonzero(ink)
    if len(rows) < max(3, min_inliers):
        return None
    h, w = grid
    S = sim[rows]
    conf = _dual_softmax(S)
    if photo_weight is not None:
        conf = conf * photo_weight[None]
    k = min(top, S.shape[1])
    cand = np.argsort(-S, axis=1)[:, :k]  # (n, k)
    cw = np.take_along_axis(conf, cand, 1)  # (n, k)
    zall = _cell_xy(grid)
    zs = zall[rows][:, None].repeat(k, 1)  # (n, k) sketch centres
    zm = (w - zs.real) + 1j * zs.imag  # mirrored
    zp = zall[cand]  # (n, k) photo centres
    zpad = np.full((len(rows), h + 2, w + 2), -np.inf)
    zpad[:, 1:-1, 1:-1] = hub_corrected_z(S).reshape(len(rows), h, w)
    flat_w = cw.reshape(-1)
    seeds = np.argsort(-flat_w)[:n_seeds]
    seeds = seeds[flat_w[seeds] > 0]
    i, j = np.triu_indices(len(seeds), 1)
    si, sj = seeds[i], seeds[j]
    ok = (si // k != sj // k) & (np.abs(zs.reshape(-1)[sj] - zs.reshape(-1)[si]) >= 2.0)
    si, sj = si[ok], sj[ok]
    if len(si) == 0:
        return None
    dp = zp.reshape(-1)[sj] - zp.reshape(-1)[si]
    lo, hi = scale_range

    def score(a, b, mirrored):
        q = _quality(zpad, zm[:, 0] if mirrored else zs[:, 0], a, b, grid)
        if lines is not None and line_weight > 0:
            q = q - line_weight * line_distance(lines, a, b, mirrored, grid)
        return q

    def valid(a):
        return (np.abs(a) >= lo) & (np.abs(a) <= hi) & (np.abs(np.degrees(np.angle(a))) <= max_angle)

    best = None
    for mirrored, zz in ((False, zs), (True, zm)):
        zf = zz.reshape(-1)
        a = dp / (zf[sj] - zf[si])
        good = valid(a)
        if not good.any():
            continue
        a = a[good]
        b = zp.reshape(-1)[si[good]] - a * zf[si[good]]
        err = np.abs(a[:, None, None] * zz[None] + b[:, None, None] - zp[None])  # (H, n, k)
        sup = np.where(err <= inlier_cells, cw[None], 0.0).max(2).sum(1)
        keep = np.argsort(-sup)[:n_rescore]
        q = score(a[keep], b[keep], mirrored)
        t = int(q.argmax())
        if best is None or q[t] > best[0]:
            best = (float(q[t]), mirrored, complex(a[keep][t]), complex(b[keep][t]))
    if best is None:
        return None
    q, mirrored, a, b = best
    zz = zm if mirrored else zs
    # Local search: scale x 1.1^+-1, rotation +-6 deg, shift +-0.5 cell, halving.
    step = np.array([np.log(1.1), np.radians(6.0), 0.5])
    for _ in range(4):
        ls, an, dx, dy = np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij")
        a2 = a * np.exp(ls.ravel() * step[0] + 1j * an.ravel() * step[1])
        # rotate/scale about the drawing's centre, so the shift stays put
        zc = zz[:, 0].mean()
        b2 = (a * zc + b) - a2 * zc + (dx.ravel() + 1j * dy.ravel()) * step[2]
        ok2 = valid(a2)
        qs = np.where(ok2, score(a2, b2, mirrored), -np.inf)
        t = int(qs.argmax())
        if qs[t] > q + 1e-9:
            q, a, b = float(qs[t]), complex(a2[t]), complex(b2[t])
        else:
            step = step / 2
    err = np.abs(a * zz + b - zp)
    n_in = int(((err <= inlier_cells) & (cw > 0)).any(1).sum())
    if n_in < min_inliers:
        return None
    return {"a": (float(a.real), float(a.imag)), "b": (float(b.real), float(b.imag)), "mirrored": bool(mirrored),
            "scale": float(abs(a)), "angle": float(np.degrees(np.angle(a))), "inlier_cells": n_in,
            "quality": float(q)}


def _dual_softmax(S: np.ndarray, tau: float = 0.05) -> np.ndarray:
    """softmax over photo cells x softmax over sketch cells (LoFTR's dual softmax)."""
    x = S / tau
    a = np.exp(x - x.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    b = np.exp(x - x.max(0, keepdims=True))
    b /= b.sum(0, keepdims=True)
    return a * b


def placement_distance(placement: Optional[dict], grid: tuple[int, int]) -> Optional[np.ndarray]:
    """(Ns, Np) distance in cells between where the placement sends each sketch cell
    and each photo cell (None without a placement)."""
    if placement is None:
        return None
    pred = apply_placement(placement, grid)
    return np.abs(pred[:, None] - _cell_xy(grid)[None]).astype(np.float32)


# ----------------------------------------------------------------------------- matching
def select_matches(candidates: Sequence[tuple[int, int, float]], grid: tuple[int, int],
                   threshold: Optional[float] = None, max_matches: int = MAX_MATCHES) -> list:
    """The lines to draw: candidates (strongest first) at or above `threshold`
    (default MATCH_THRESHOLD), at most one per photo cell (a drawing placed small on the
    photo would otherwise fan many lines into one cell) and none from a sketch cell
    touching a stronger line's (`_spread`: lines cover the drawing instead of
    clumping), at most `max_matches`."""
    t = MATCH_THRESHOLD if threshold is None else threshold
    kept, ends = [], set()
    for c in sorted((c for c in candidates if c[2] >= t), key=lambda c: -c[2]):
        if c[1] not in ends:
            kept.append(c)
            ends.add(c[1])
    return _spread(kept, grid, max_matches, fill=False)


def _spread(cands: list, grid: tuple[int, int], limit: int, fill: bool = True) -> list:
    """Strongest-first matches, skipping ones whose sketch cell touches an already
    kept sketch cell (so the lines cover the whole drawing instead of a clump); with
    `fill`, the skipped ones fill up if fewer than `limit` remain."""
    w = grid[1]
    kept, skipped, taken = [], [], set()
    for c in cands:
        r, col = divmod(c[0], w)
        if any((r + dr, col + dc) in taken for dr in (-1, 0, 1) for dc in (-1, 0, 1)):
            skipped.append(c)
            continue
        kept.append(c)
        taken.add((r, col))
    return (kept + skipped if fill else kept)[:limit]


def match_cells(sim: np.ndarray, sketch_ink: np.ndarray, prior: Optional[np.ndarray] = None,
                prior_weight: float = 0.0, min_matches: int = MIN_MATCHES,
                max_matches: int = MAX_MATCHES, grid: Optional[tuple[int, int]] = None,
                drop_weak: float = 0.3) -> tuple[list[tuple[int, int, float]], np.ndarray, np.ndarray]:
    """Mutual-nearest-neighbour correspondences from an (Ns, Np) similarity matrix
    (a simple matcher kept for callers that have only a similarity matrix).

    Score = sim - prior_weight * prior. Mutual nearest neighbours among inked sketch
    cells, minus the weakest (`drop_weak` quantile of the inked cells' best scores);
    if fewer than `min_matches` remain, the strongest other matches fill up. With
    `grid`, matches are spread over the drawing (see `_spread`).
    Returns (matches [(s, p, strength=sim[s, p])] strongest first, mutual flags,
    assignment (Ns,) = best photo cell per inked sketch cell (by score), -1 for blank).
    """
    Ns, Np = sim.shape
    ink = np.asarray(sketch_ink, bool).reshape(-1)
    assignment = np.full(Ns, -1, dtype=np.int64)
    if not ink.any():
        return [], np.zeros(0, bool), assignment
    score = sim if prior is None or prior_weight == 0 else sim - prior_weight * prior
    rows = np.flatnonzero(ink)
    sc = score[rows]
    fwd = sc.argmax(1)
    bwd = sc.argmax(0)
    assignment[rows] = fwd
    mutual = bwd[fwd] == np.arange(len(rows))
    cand = [(int(rows[i]), int(fwd[i]), float(sim[rows[i], fwd[i]]), float(sc[i, fwd[i]]), bool(mutual[i]))
            for i in range(len(rows))]
    thr = np.quantile(sc[np.arange(len(rows)), fwd], drop_weak) if drop_weak > 0 else -np.inf
    chosen = [c for c in cand if c[4] and c[3] >= thr]
    if len(chosen) < min_matches:
        taken = {c[0] for c in chosen}
        rest = sorted((c for c in cand if c[0] not in taken), key=lambda c: -c[3])
        chosen += rest[:min_matches - len(chosen)]
    chosen.sort(key=lambda c: -c[3])
    chosen = _spread(chosen, grid, max_matches) if grid is not None else chosen[:max_matches]
    return [(s, p, v) for s, p, v, _, _ in chosen], np.array([c[4] for c in chosen], bool), assignment


def match_strength(sim: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """How much a match stands out, from appearance alone: sim[row, col] in standard
    deviations above the mean of that sketch cell's similarities to all photo cells.
    (On the benchmark it ranks right lines above wrong ones better than the raw cosine,
    the dual-softmax confidence or a hub-corrected z.)"""
    S = sim[rows]
    z = (S - S.mean(1, keepdims=True)) / (S.std(1, keepdims=True) + 1e-6)
    return z[np.arange(len(rows)), cols]


def _scale_bands(scales: Sequence[float], scale_range: tuple[float, float]) -> list[tuple[float, float, float]]:
    """(drawing scale, lowest, highest placement scale) per drawing scale: each takes
    the placements nearest to it (boundaries at geometric midpoints, 10 % overlap)."""
    fs = sorted({float(f) for f in scales}, reverse=True)
    out = []
    for i, f in enumerate(fs):
        hi = scale_range[1] if i == 0 else min(scale_range[1], np.sqrt(f * fs[i - 1]) * 1.1)
        lo = scale_range[0] if i == len(fs) - 1 else max(scale_range[0], np.sqrt(f * fs[i + 1]) / 1.1)
        out.append((f, lo, hi))
    return out


def correspond(sim: np.ndarray, sketch_ink: np.ndarray, grid: tuple[int, int], structure: Optional[np.ndarray],
               prior_weight: float = 0.04, transform_weight: float = 0.5, background_weight: float = BACKGROUND_WEIGHT,
               draw_radius: float = DRAW_RADIUS, scaled_sims: Optional[dict] = None,
               scale_range: tuple[float, float] = (0.25, 1.6), lines: Optional[LineContext] = None):
    """Placement + assignment + candidate lines from the appearance similarity `sim`
    (and `scaled_sims[f]`: the same for the drawing shrunk by f, tried for placements
    near that scale). Returns (placement or None, appearance similarity used (that of
    the placement's drawing scale), score matrix, assignment (Ns,), candidates
    [(s, p, strength)] strongest first, mutual (Ns,) bool)."""
    Ns, Np = sim.shape
    ink = np.asarray(sketch_ink, bool).reshape(-1)
    rows = np.flatnonzero(ink)
    assignment = np.full(Ns, -1, np.int64)
    mutual = np.zeros(Ns, bool)
    bg = np.zeros(Np, np.float32) if structure is None else (1.0 - structure).astype(np.float32)
    pw = None if structure is None else 0.25 + 0.75 * structure
    placement = None
    if prior_weight > 0 and len(rows):
        sims = {1.0: sim, **(scaled_sims or {})}
        for f, lo, hi in _scale_bands(list(sims), scale_range):
            pl = fit_placement(sims[f] - background_weight * bg[None], ink, grid, photo_weight=pw,
                               scale_range=(lo, hi), lines=lines)
            if pl is not None and (placement is None or pl["quality"] > placement["quality"]):
                placement = {**pl, "sketch_scale": f}
        if placement is not None:
            sim = sims[placement["sketch_scale"]]
    app = sim - background_weight * bg[None]
    dist = placement_distance(placement, grid)
    score = app if dist is None else app - prior_weight * transform_weight * np.maximum(dist - 1.0, 0.0) ** 2
    if not len(rows):
        return placement, sim, score, assignment, [], mutual
    sc = score[rows]
    fwd = sc.argmax(1)
    bwd = sc.argmax(0)
    assignment[rows] = fwd
    mutual[rows] = bwd[fwd] == np.arange(len(rows))
    strength = match_strength(sim, rows, fwd)
    keep = np.ones(len(rows), bool)
    if dist is not None:
        keep &= dist[rows, fwd] <= draw_radius
    else:  # no placement: only mutual nearest neighbours
        keep &= mutual[rows]
    if structure is not None:
        keep &= structure[fwd] > 0
    cands = [(int(rows[i]), int(fwd[i]), float(strength[i])) for i in np.flatnonzero(keep)]
    cands.sort(key=lambda c: -c[2])
    return placement, sim, score, assignment, cands, mutual


def _heatmap(score: np.ndarray, ink: np.ndarray, matches: Sequence[tuple[int, int, float]],
             grid: tuple[int, int]) -> np.ndarray:
    """(h, w) in [0, 1]: per photo cell, its best score against an inked sketch cell
    (rescaled between the median and the max), plus the drawn lines' photo ends."""
    h, w = grid
    best = score[ink].max(0) if ink.any() else np.zeros(score.shape[1], np.float32)
    lo, hi = float(np.median(best)), float(best.max())
    base = np.clip((best - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(best)
    hits = np.zeros_like(base)
    if matches:
        v = np.array([m[2] for m in matches], np.float32)
        vn = (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else np.ones_like(v)
        for (s, p, _), t in zip(matches, vn):
            hits[p] = max(hits[p], 0.5 + 0.5 * t)
    hm = np.maximum(base * 0.8, hits).reshape(h, w)
    # A little smoothing: matched regions, not isolated cells.
    t = torch.from_numpy(hm.astype(np.float32))[None, None]
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32)[None, None] / 16
    hm = F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), k)[0, 0].numpy()
    return (hm / hm.max() if hm.max() > 0 else hm).astype(np.float32)


def _as_tokens(x: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    t = x.float() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float32))
    return t.reshape(-1, t.shape[-1])


def explain_tokens(
    sketch_image: Image.Image,
    photo_image: Image.Image,
    sketch_tokens: Union[np.ndarray, torch.Tensor],
    photo_tokens: Union[np.ndarray, torch.Tensor],
    grid: Sequence[int],
    sketch_ink: Optional[np.ndarray] = None,
    relation: Optional[RelationModel] = None,
    prior_weight: float = 0.04,
    transform_weight: float = 0.5,
    min_matches: int = MIN_MATCHES,
    max_matches: int = MAX_MATCHES,
    features: Optional[PairFeatures] = None,
    min_strength: Optional[float] = None,
    edge_weight: float = EDGE_WEIGHT,
    background_weight: float = BACKGROUND_WEIGHT,
) -> Explanation:
    """An Explanation from already-encoded tokens ((N, C) each, row-major over grid).

    `features` (from `encode_pair_features`): more token levels and the photo's edge-map
    view for the appearance similarity; without them only the given tokens are used.
    `prior_weight` scales the placement prior (0 = pure appearance: no placement, only
    mutual nearest neighbours are drawn). `min_strength`: the line threshold (default
    MATCH_THRESHOLD; -inf draws every candidate). `min_matches` is no longer used
    (lines below the threshold are never drawn); kept for compatibility.
    """
    grid = (int(grid[0]), int(grid[1]))
    st, pt = _as_tokens(sketch_tokens), _as_tokens(photo_tokens)
    if st.shape[0] != grid[0] * grid[1] or pt.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"tokens {tuple(st.shape)} / {tuple(pt.shape)} do not fit the grid {grid}")
    if features is not None and tuple(features.grid) != grid:
        raise ValueError(f"features on a {features.grid} grid do not fit the grid {grid}")
    ink = ink_cells(sketch_image, grid).reshape(-1) if sketch_ink is None else np.asarray(sketch_ink, bool).reshape(-1)
    content = content_cells(photo_image, grid)
    edge_img = features.edge_image if features is not None and features.edge_image is not None \
        else photo_edge_view(photo_image)
    structure = photo_structure(photo_image, grid, edge_img)
    rel_score = rel_logit = None
    source = "backbone"
    with torch.inference_mode():
        scaled = {}
        if features is not None:
            sim = pair_similarity(features.sketch, features.photo, features.photo_edges, ink, content, edge_weight)
            scaled = {f: pair_similarity(lv, features.photo, features.photo_edges, ink, content, edge_weight)
                      for f, lv in features.sketch_scaled.items()}
        else:
            sim = pair_similarity([st], [pt], None, ink, content)
        if relation is not None:
            relation.eval()
            ink_t = torch.from_numpy(ink)
            s2, p2 = relation.embed_pair(st[None], pt[None], ink_t[None])
            # Mean-centred like the backbone tokens: after cross-attention both sides
            # share a large common component that would make one cell a hub.
            rsim = _centered_cosine(s2[0], p2[0], ink_t, torch.from_numpy(content)).numpy()
            sim = ((1 - RELATION_WEIGHT) * sim + RELATION_WEIGHT * rsim).astype(np.float32)
            scaled = {f: ((1 - RELATION_WEIGHT) * v + RELATION_WEIGHT * rsim).astype(np.float32)
                      for f, v in scaled.items()}
            rel_logit = float(relation(st[None], pt[None], ink_t[None])[0])
            rel_score = float(1 / (1 + np.exp(-rel_logit)))
            source = "relation"
    placement, sim, score, assignment, cands, mutual_all = correspond(
        sim, ink, grid, structure, prior_weight=prior_weight, transform_weight=transform_weight,
        background_weight=background_weight, scaled_sims=scaled,
        lines=line_context(sketch_image, edge_img, grid) if prior_weight > 0 else None)
    threshold = MATCH_THRESHOLD if min_strength is None else float(min_strength)
    matches = select_matches(cands, grid, threshold, max_matches)
    mutual = np.array([mutual_all[s] for s, _, _ in matches], bool)
    heat = _heatmap(score, ink, matches, grid)
    return Explanation(
        sketch_image=sketch_image, photo_image=photo_image, grid=grid,
        image_size=(sketch_image.width, sketch_image.height), similarity=sim, sketch_ink=ink,
        matches=matches, heatmap=heat, assignment=assignment, relation_score=rel_score,
        relation_logit=rel_logit, token_source=source, mutual=mutual, transform=placement,
        candidates=cands, threshold=threshold,
    )


def _open_image(x: Any, what: str) -> Any:
    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if not p.is_file():
            raise FileNotFoundError(f"{what} not found: {p}")
        try:
            return load_image(p)
        except ImageTooLargeError:
            raise
        except Exception as exc:  # PIL raises many types for files that are not images
            raise InputError(f"cannot read the {what} {p}: {exc}") from exc
    return x


def prepare_pair(encoder, query: Any, photo: Any, query_kind: str = "sketch") -> tuple[Image.Image, Image.Image]:
    """User inputs -> the preprocessed (query outline, photo) model inputs as PIL images.
    A photo query is compared through its outline (its edge map), as a drawing would be."""
    from sbir_core.data.preprocess import photo_to_edges, preprocess_photo, preprocess_sketch

    if query_kind not in ("sketch", "photo"):
        raise InputError(f"a query to explain is a sketch or a photo, not {query_kind!r}")
    q = _open_image(query, query_kind)
    if query_kind == "photo":
        q = photo_to_edges(q, encoder.image_size)
    sk = preprocess_sketch(q, encoder.image_size)
    ph = preprocess_photo(_open_image(photo, "photo"), encoder.image_size)
    return sk, ph


@torch.inference_mode()
def encode_pair_tokens(encoder, sketch_image: Image.Image, photo_image: Image.Image):
    """Backbone tokens of the two preprocessed images: ((N, C), (N, C), grid)."""
    x = torch.stack([encoder.to_tensor(sketch_image), encoder.to_tensor(photo_image)])
    f = encoder.backbone_features(x)
    return f.tokens[0], f.tokens[1], tuple(f.grid)


def explain_images(encoder, sketch_image: Image.Image, photo_image: Image.Image,
                   relation: Optional[RelationModel] = None, **kwargs: Any) -> Explanation:
    """Explain already preprocessed images (the encoder's input size): one backbone
    batch for the sketch, the photo and the photo's edge map, then `explain_tokens`."""
    feats = encode_pair_features(encoder, sketch_image, photo_image)
    if relation is not None and tuple(relation.grid) != tuple(feats.grid):
        raise ValueError(f"the relation model was trained on a {relation.grid} token grid, "
                         f"the encoder gives {feats.grid}")
    return explain_tokens(sketch_image, photo_image, feats.sketch[0], feats.photo[0], feats.grid,
                          relation=relation, features=feats, **kwargs)


def explain_pair(encoder, sketch: Any, photo: Any, relation: Optional[RelationModel] = None,
                 query_kind: str = "sketch", **kwargs: Any) -> Explanation:
    """Explain why `photo` matches the query `sketch`.

    sketch: image, path or stroke list (preprocessed like a query), or a photo when
    query_kind="photo" (explained through its outline); photo: image or path.
    relation: a RelationModel (its cross-attended similarity is mixed in and its score
    reported), or None. Extra kwargs go to `explain_tokens`.
    """
    sk, ph = prepare_pair(encoder, sketch, photo, query_kind)
    return explain_images(encoder, sk, ph, relation=relation, **kwargs)
