"""`Explanation`: what `explain_pair` found, as arrays, and how it is drawn.

`render_correspondences` (lines between the drawing's cells and the photo's, coloured by
appearance strength, with a legend), `render_heatmap` (where on the photo the drawing
found support) and `render_synthesis` (the drawing rebuilt from the photo's patches:
overlapping, blended patches, not a block mosaic); `save(dir)` writes the three PNGs.
Every label is at least MIN_TEXT_PX tall, so it stays readable at the page's size.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sbir_core.paths import PathLike



CMAP = "turbo"


SYNTHESIS_MIN_SCALE = 0.5  # synthesis: photo patches enlarged at most 2x (and never shrunk)


SYNTHESIS_EDGE = 1.25  # synthesis: opacity fades with patch coverage x this (clipped) past the ink


SYNTHESIS_STROKE = 0.6  # synthesis: strokes widened to this many cells, so the texture shows


LEGEND_HEIGHT = 34  # legend strip under the correspondences at scale <= 2 (pixels)


MIN_TEXT_PX = 13  # no rendered label is smaller (pixel height of its glyphs)


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
    token_source: str = "backbone"  # "backbone", "head" (correspondence head mixed in) or "relation"
    mutual: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per match: mutual NN?
    transform: Optional[dict] = None  # fitted sketch->photo placement (cells), None if none found
    candidates: list = field(default_factory=list)  # every line candidate before the threshold
    threshold: float = 0.0  # strength threshold the drawn lines passed (explain_tokens sets it)

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

    def heat_field(self, scale: int = 1) -> np.ndarray:
        """(H*scale, W*scale) in [0, 1]: the heatmap as drawn: the cell heatmap smoothly
        enlarged, kept to the picture's non-white pixels (the mask enlarged bilinearly, so
        its edge is anti-aliased): on clip-art, white paper and padding get no heat."""
        import cv2

        from sbir_core.explain.appearance import object_mask

        W, H = self.image_size[0] * scale, self.image_size[1] * scale
        hm = cv2.resize(np.clip(self.heatmap, 0, 1).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
        m = cv2.resize(object_mask(self.photo_image).astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
        return np.clip(hm, 0, 1) * np.clip(m, 0, 1)

    def render_heatmap(self, alpha: float = 0.55, scale: int = 2) -> Image.Image:
        """The photo with a translucent heatmap of where the drawing agrees with it
        (`heat_field`; size: W*scale x H*scale)."""
        import matplotlib

        W, H = self.image_size
        photo = self.photo_image.convert("RGB").resize((W * scale, H * scale), Image.Resampling.BICUBIC)
        hm = self.heat_field(scale)
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
