"""Why did this photo match this sketch? Token correspondences, a heatmap, a synthesis.

ZSE-SBIR explains a match with the token grids of the two images: which sketch
cell corresponds to which photo cell (lines between them), where on the photo the
sketch found support (a heatmap), and the sketch rebuilt from photo patches
("patch-replacement synthesis": each inked sketch cell replaced by its best photo
cell). `explain_pair(encoder, sketch, photo)` computes all of it as raw arrays in an
`Explanation`, whose `render_*` methods draw PIL images and `save(dir)` writes
`correspondences.png`, `heatmap.png` and `synthesis.png`.

Token similarities come from the relation model's cross-attended tokens when one is
given (`load_relation()`), else from the backbone tokens; either way as the cosine
of mean-centred tokens (an image's mean token mostly says "sketch" or "photo", and
after cross-attention both sides share a large common part; removing it leaves what
differs between cells). Only inked sketch cells take part: a blank cell draws no
line, gets no patch and adds nothing to the heatmap.

Matching (what made the lines agree with what a person would draw):
1. place the sketch on the photo: an axis-aligned map (per-axis scale, shift,
   optionally mirrored: a horse facing the other way) chosen among a fit to the
   strongest appearance matches (exhaustive 2-point hypotheses + inlier voting) and
   box-to-box maps onto the region the sketch resembles, by which one lets the
   sketch's cells find the most similar photo cells nearby;
2. score = similarity - prior_weight * (distance to where the map sends the cell)^2;
3. mutual nearest neighbours on that score (falling back to the strongest one-way
   matches when fewer than 8 are mutual), spread over the drawing, at most 30.
Pure appearance matching (prior_weight=0) sends many lines to look-alike texture in
the background; with the placement prior, heads go to heads and legs to legs far
more often (see the PACS examples described in docs).
"""
from __future__ import annotations

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

from sbir_core.relation import RelationModel, ink_cells
from sbir_core.relation import load_relation as _load_relation

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
MIN_MATCHES = 8
MAX_MATCHES = 30
CMAP = "turbo"


def load_relation(path: Optional[PathLike] = None) -> RelationModel:
    """The trained relation model (default `checkpoints/relation.safetensors`).

    Raises FileNotFoundError with how to train one when the file is missing.
    """
    return _load_relation(path)


# ----------------------------------------------------------------------------- the result
@dataclass
class Explanation:
    """Raw arrays of one sketch-photo explanation (cells are row-major over `grid`)."""

    sketch_image: Image.Image  # the preprocessed sketch the encoder saw
    photo_image: Image.Image  # the preprocessed photo the encoder saw
    grid: tuple[int, int]  # (h, w) token cells
    image_size: tuple[int, int]  # (width, height) of both images in pixels
    similarity: np.ndarray  # (Ns, Np) float32 token similarity (no spatial prior)
    sketch_ink: np.ndarray  # (Ns,) bool: sketch cells with ink
    matches: list[tuple[int, int, float]]  # (sketch cell, photo cell, strength), strongest first
    heatmap: np.ndarray  # (h, w) float32 in [0, 1]: photo regions the sketch matched
    assignment: np.ndarray  # (Ns,) int: best photo cell per inked sketch cell, -1 for blank cells
    relation_score: Optional[float] = None  # P(same class) from the relation model, if given
    relation_logit: Optional[float] = None
    token_source: str = "backbone"  # "backbone" or "relation"
    mutual: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per match: mutual NN?
    transform: Optional[dict] = None  # fitted sketch->photo placement (cells), None if none found

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
    def render_correspondences(self, scale: int = 2, max_lines: Optional[int] = None, gap: int = 16,
                               legend: bool = True) -> Image.Image:
        """Sketch (left) and photo (right) side by side, matched cell centres joined by
        lines coloured by strength (colour bar below). Size: (2*W*scale + gap,
        H*scale + 34 if legend else H*scale)."""
        import matplotlib

        cmap = matplotlib.colormaps[CMAP]
        W, H = self.image_size
        sw, sh = W * scale, H * scale
        bar = 34 if legend else 0
        canvas = Image.new("RGB", (2 * sw + gap, sh + bar), (255, 255, 255))
        sk = self.sketch_image.convert("RGB").resize((sw, sh), Image.Resampling.BICUBIC)
        # Inked cells lightly tinted, so the viewer sees which cells could vote.
        tint = Image.new("RGB", (sw, sh), (255, 255, 255))
        td = ImageDraw.Draw(tint)
        for cell in np.flatnonzero(self.sketch_ink):
            x0, y0, x1, y1 = self.cell_box(cell)
            td.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], fill=(232, 240, 255))
        sk = Image.fromarray(np.minimum(np.asarray(sk), np.asarray(tint)))
        canvas.paste(sk, (0, 0))
        canvas.paste(self.photo_image.convert("RGB").resize((sw, sh), Image.Resampling.BICUBIC), (sw + gap, 0))
        draw = ImageDraw.Draw(canvas)
        ms = self.matches[:max_lines] if max_lines else self.matches
        lo, hi = self._strength_range()
        # Weakest first so the strongest lines are drawn on top.
        for s, p, v in sorted(ms, key=lambda m: m[2]):
            t = (v - lo) / (hi - lo) if hi > lo else 1.0
            col = tuple(int(255 * x) for x in cmap(0.15 + 0.85 * float(np.clip(t, 0, 1)))[:3])
            xs, ys = self.cell_center(s)
            xp, yp = self.cell_center(p)
            a = (xs * scale, ys * scale)
            b = (xp * scale + sw + gap, yp * scale)
            draw.line([a, b], fill=col, width=max(1, scale))
            for x, y in (a, b):
                r = 2 * scale
                draw.ellipse([x - r, y - r, x + r, y + r], fill=col, outline=(0, 0, 0))
        if legend:
            self._draw_bar(canvas, draw, cmap, 8, sh + 8, 2 * sw + gap - 16, 10, lo, hi)
        return canvas

    def _strength_range(self) -> tuple[float, float]:
        if not self.matches:
            return 0.0, 1.0
        v = np.array([m[2] for m in self.matches], dtype=np.float64)
        return float(v.min()), float(v.max())

    def _draw_bar(self, canvas, draw, cmap, x, y, width, height, lo, hi) -> None:
        grad = np.linspace(0.15, 1.0, max(width, 2))
        rgb = (np.array([cmap(g)[:3] for g in grad]) * 255).astype(np.uint8)
        canvas.paste(Image.fromarray(np.repeat(rgb[None], height, axis=0)), (x, y))
        font = ImageFont.load_default()
        src = "relation tokens" if self.token_source == "relation" else "backbone tokens"
        n_mut = int(self.mutual.sum()) if len(self.mutual) else 0
        draw.text((x, y + height + 1), f"weak {lo:.2f}", fill=(0, 0, 0), font=font)
        label = f"{len(self.matches)} matches ({n_mut} mutual), cosine of {src}"
        if self.relation_score is not None:
            label += f", relation score {self.relation_score:.2f}"
        tw = draw.textlength(label, font=font)
        draw.text((x + (width - tw) / 2, y + height + 1), label, fill=(0, 0, 0), font=font)
        right = f"{hi:.2f} strong"
        draw.text((x + width - draw.textlength(right, font=font), y + height + 1), right, fill=(0, 0, 0), font=font)

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

    def render_synthesis(self, scale: int = 2) -> Image.Image:
        """The sketch rebuilt from photo patches: each inked sketch cell shows the pixels
        of its best-matching photo cell; blank cells stay white (size W*scale x H*scale)."""
        W, H = self.image_size
        photo = np.asarray(self.photo_image.convert("RGB"))
        out = np.full((H, W, 3), 255, np.uint8)
        for s in np.flatnonzero(self.sketch_ink):
            p = int(self.assignment[s])
            if p < 0:
                continue
            sx0, sy0, sx1, sy1 = self.cell_box(s)
            px0, py0, px1, py1 = self.cell_box(p)
            patch = photo[py0:py1, px0:px1]
            if patch.shape[:2] != (sy1 - sy0, sx1 - sx0):
                patch = np.asarray(Image.fromarray(patch).resize((sx1 - sx0, sy1 - sy0)))
            out[sy0:sy1, sx0:sx1] = patch
        img = Image.fromarray(out)
        return img.resize((W * scale, H * scale), Image.Resampling.NEAREST) if scale != 1 else img

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
            "matches": [{"sketch_cell": int(s), "photo_cell": int(p), "strength": round(float(v), 4),
                         "sketch_xy": [round(c, 1) for c in self.cell_center(s)],
                         "photo_xy": [round(c, 1) for c in self.cell_center(p)]} for s, p, v in self.matches],
            "heatmap": np.round(self.heatmap, 3).tolist(),
            "sketch_ink": np.asarray(self.sketch_ink, bool).reshape(self.grid).astype(int).tolist(),
            "assignment": [int(a) for a in self.assignment],
        }


# ----------------------------------------------------------------------------- matching
def fit_part_transform(sim: np.ndarray, sketch_ink: np.ndarray, grid: tuple[int, int], top: int = 2,
                       inlier_cells: float = 1.5) -> Optional[dict[str, Any]]:
    """Where the sketch's object lies in the photo: an axis-aligned map
    photo_xy = scale * sketch_xy + shift (per-axis scales; a negative x scale is a
    mirrored object, e.g. a horse facing the other way), fitted to the strongest
    appearance matches by exhaustive 2-point hypotheses + inlier voting (RANSAC
    without the randomness), then least squares on the inliers. Coordinates are in
    cells. Returns None when no hypothesis gathers enough support.
    """
    h, w = grid
    ink = np.asarray(sketch_ink, bool).reshape(-1)
    rows = np.flatnonzero(ink)
    if len(rows) < 4:
        return None
    sc = sim[rows]
    k = min(top, sc.shape[1])
    cand_p = np.argsort(-sc, axis=1)[:, :k]  # (n, k)
    cand_s = np.repeat(rows, k)
    cand_p = cand_p.reshape(-1)
    wgt = sim[cand_s, cand_p] - np.median(sc)
    wgt = np.maximum(wgt, 0) * np.where(np.tile(np.arange(k), len(rows)) == 0, 1.0, 0.5)
    sy_, sx_ = np.divmod(cand_s, w)
    py_, px_ = np.divmod(cand_p, w)
    S = np.stack([sx_, sy_], 1).astype(np.float32)
    P = np.stack([px_, py_], 1).astype(np.float32)
    # All pairs of candidates from different sketch cells far enough apart on both axes.
    i, j = np.triu_indices(len(S), 1)
    d_s = S[j] - S[i]
    ok = (np.abs(d_s[:, 0]) >= 2) & (np.abs(d_s[:, 1]) >= 2) & (cand_s[i] != cand_s[j])
    i, j = i[ok], j[ok]
    if len(i) == 0:
        return None
    scale = (P[j] - P[i]) / (S[j] - S[i])  # (H, 2)
    ax, ay = np.abs(scale[:, 0]), scale[:, 1]
    ok = (ax >= 0.25) & (ax <= 1.5) & (ay >= 0.25) & (ay <= 1.5) & (ax / np.maximum(ay, 1e-6) >= 0.5) \
        & (ax / np.maximum(ay, 1e-6) <= 2.0)
    i, j, scale = i[ok], j[ok], scale[ok]
    if len(i) == 0:
        return None
    if len(i) > 4000:  # keep it fast on big grids: the strongest hypotheses
        keep = np.argsort(-(wgt[i] + wgt[j]))[:4000]
        i, j, scale = i[keep], j[keep], scale[keep]
    shift = P[i] - scale * S[i]  # (H, 2)
    pred = S[None] * scale[:, None] + shift[:, None]  # (H, C, 2)
    err = np.linalg.norm(pred - P[None], axis=2)
    inl = err <= inlier_cells
    votes = (inl * wgt[None]).sum(1)
    best = int(votes.argmax())
    mask = inl[best]
    n_cells = len(np.unique(cand_s[mask]))
    if n_cells < max(5, 0.12 * len(rows)):
        return None
    # Least squares refinement per axis on the inliers (weighted), from each sketch
    # cell's best match only when there are enough of those (runner-up candidates
    # sit a cell off and would bias the fit).
    first = np.tile(np.arange(k), len(rows)) == 0
    if (mask & first).sum() >= 4:
        mask = mask & first
    ww = wgt[mask] + 1e-3
    params = []
    for ax_ in range(2):
        A = np.stack([S[mask, ax_], np.ones(mask.sum())], 1) * ww[:, None] ** 0.5
        b = P[mask, ax_] * ww ** 0.5
        (a, t), *_ = np.linalg.lstsq(A, b, rcond=None)
        params.append((a, t))
    (a_x, t_x), (a_y, t_y) = params
    if not (0.2 <= abs(a_x) <= 1.7 and 0.2 <= a_y <= 1.7):
        a_x, t_x, a_y, t_y = scale[best, 0], shift[best, 0], scale[best, 1], shift[best, 1]
    return {"scale": (float(a_x), float(a_y)), "shift": (float(t_x), float(t_y)), "inlier_cells": int(n_cells),
            "support": float(votes[best])}


def transform_prior(grid: tuple[int, int], transform: dict[str, Any]) -> np.ndarray:
    """(Ns, Np) squared distance (in cells) between where the transform sends each
    sketch cell and each photo cell."""
    h, w = grid
    r, c = np.divmod(np.arange(h * w), w)
    xy = np.stack([c, r], 1).astype(np.float32)
    pred = xy * np.array(transform["scale"], np.float32) + np.array(transform["shift"], np.float32)
    return ((pred[:, None, :] - xy[None, :, :]) ** 2).sum(-1)


def _bbox_transforms(ink: np.ndarray, weight: np.ndarray, grid: tuple[int, int]) -> list[dict[str, Any]]:
    """Sketch ink box -> photo object box (weighted 5-95% extent of `weight`), plain
    and mirrored."""
    h, w = grid
    r, c = np.divmod(np.arange(h * w), w)
    if not ink.any() or weight.sum() <= 0:
        return []
    sx0, sx1, sy0, sy1 = c[ink].min(), c[ink].max(), r[ink].min(), r[ink].max()

    def wq(v, q):
        o = np.argsort(v)
        cw = np.cumsum(weight[o])
        return float(v[o][min(len(v) - 1, np.searchsorted(cw, q * cw[-1]))])

    px0, px1, py0, py1 = wq(c, 0.05), wq(c, 0.95), wq(r, 0.05), wq(r, 0.95)
    ax = max(px1 - px0, 1.0) / max(sx1 - sx0, 1.0)
    ay = max(py1 - py0, 1.0) / max(sy1 - sy0, 1.0)
    ty = py0 - ay * sy0
    return [{"scale": (ax, ay), "shift": (px0 - ax * sx0, ty), "kind": "box"},
            {"scale": (-ax, ay), "shift": (px1 + ax * sx0, ty), "kind": "box-mirrored"}]


def _support(sim: np.ndarray, ink: np.ndarray, grid: tuple[int, int], t: dict[str, Any], lam: float) -> float:
    """Mean over inked sketch cells of the best (similarity - lam * distance^2) under t."""
    score = sim[ink] - lam * transform_prior(grid, t)[ink]
    return float(score.max(1).mean())


def place_sketch(sim: np.ndarray, ink: np.ndarray, grid: tuple[int, int], objectness: Optional[np.ndarray] = None,
                 lam: float = 0.03) -> Optional[dict[str, Any]]:
    """Choose where the sketch lies on the photo: among the appearance fit
    (`fit_part_transform`) and the box-to-box maps (plain and mirrored) onto the
    region the sketch resembles most (photo cells weighted by their best similarity
    to an inked sketch cell, times `objectness`, e.g. the non-padding cells), the
    one under which the sketch's cells find the most similar photo cells nearby."""
    cands = []
    t = fit_part_transform(sim, ink, grid)
    if t is not None:
        cands.append({**t, "kind": "fit"})
    best_p = sim[ink].max(0)
    lo, hi = np.median(best_p), best_p.max()
    heat = np.clip((best_p - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(best_p)
    weight = heat ** 2 if objectness is None else heat ** 2 * (objectness > 0)
    cands += _bbox_transforms(ink, weight, grid)
    if not cands:
        return None
    for c in cands:
        c["support"] = _support(sim, ink, grid, c, lam)
    return max(cands, key=lambda c: c["support"])


def _spread(cands: list, grid: tuple[int, int], limit: int) -> list:
    """Strongest-first matches, skipping ones whose sketch cell touches an already
    kept sketch cell (so the lines cover the whole drawing instead of a clump);
    the skipped ones fill up if fewer than `limit` remain."""
    w = grid[1]
    kept, skipped, taken = [], [], set()
    for c in cands:
        r, col = divmod(c[0], w)
        if any((r + dr, col + dc) in taken for dr in (-1, 0, 1) for dc in (-1, 0, 1)):
            skipped.append(c)
            continue
        kept.append(c)
        taken.add((r, col))
    return (kept + skipped)[:limit]


def match_cells(sim: np.ndarray, sketch_ink: np.ndarray, prior: Optional[np.ndarray] = None,
                prior_weight: float = 0.0, min_matches: int = MIN_MATCHES,
                max_matches: int = MAX_MATCHES, grid: Optional[tuple[int, int]] = None,
                drop_weak: float = 0.3) -> tuple[list[tuple[int, int, float]], np.ndarray, np.ndarray]:
    """Correspondences from an (Ns, Np) similarity matrix.

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
    sc = score[rows]  # (n_ink, Np)
    fwd = sc.argmax(1)  # best photo cell per inked sketch cell
    bwd = sc.argmax(0)  # best inked sketch cell (row in `rows`) per photo cell
    assignment[rows] = fwd
    mutual = bwd[fwd] == np.arange(len(rows))
    cand = [(int(rows[i]), int(fwd[i]), float(sim[rows[i], fwd[i]]), float(sc[i, fwd[i]]), bool(mutual[i]))
            for i in range(len(rows))]
    # Weak mutual pairs (bottom `drop_weak` of the inked cells' best scores) are
    # mostly background look-alikes: leave them out unless too few remain.
    thr = np.quantile(sc[np.arange(len(rows)), fwd], drop_weak) if drop_weak > 0 else -np.inf
    chosen = [c for c in cand if c[4] and c[3] >= thr]
    if len(chosen) < min_matches:
        taken = {c[0] for c in chosen}
        rest = sorted((c for c in cand if c[0] not in taken), key=lambda c: -c[3])
        chosen += rest[:min_matches - len(chosen)]
    chosen.sort(key=lambda c: -c[3])
    chosen = _spread(chosen, grid, max_matches) if grid is not None else chosen[:max_matches]
    return [(s, p, v) for s, p, v, _, _ in chosen], np.array([c[4] for c in chosen], bool), assignment


def _heatmap(score: np.ndarray, ink: np.ndarray, matches: Sequence[tuple[int, int, float]],
             grid: tuple[int, int]) -> np.ndarray:
    """(h, w) in [0, 1]: per photo cell, its best similarity to an inked sketch cell
    (rescaled between the median and the max), plus the matched cells' strengths."""
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


def content_cells(image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """(h*w,) bool: cells that are not (near-)white, by the same rule as sketch ink
    (`relation.ink_cells` on a white background): white padding and blank paper are
    not content. For a sketch image this equals its ink cells."""
    from sbir_core.preprocess import INK_THRESHOLD
    from sbir_core.relation import INK_CELL_FRACTION

    g = np.asarray(image.convert("L"), dtype=np.float32)
    dark = g < 255.0 - INK_THRESHOLD
    H, W = dark.shape
    h, w = grid
    ys = np.linspace(0, H, h + 1).round().astype(int)
    xs = np.linspace(0, W, w + 1).round().astype(int)
    sat = np.pad(dark.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = sat[ys[1:, None], xs[None, 1:]] - sat[ys[:-1, None], xs[None, 1:]] \
        - sat[ys[1:, None], xs[None, :-1]] + sat[ys[:-1, None], xs[None, :-1]]
    area = np.diff(ys)[:, None] * np.diff(xs)[None, :]
    return (counts >= np.maximum(1, INK_CELL_FRACTION * area)).reshape(-1)


def _centered_cosine(a: torch.Tensor, b: torch.Tensor, a_mask: Optional[torch.Tensor] = None,
                     b_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cosine similarity of mean-centred tokens: each image's mean token (over its
    inked / content cells) removed, since it mostly encodes the domain."""
    def centre(x, m):
        x = x.float()
        mu = x[m].mean(0, keepdim=True) if m is not None and m.any() else x.mean(0, keepdim=True)
        return F.normalize(x - mu, dim=-1)

    return centre(a, a_mask) @ centre(b, b_mask).T


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
) -> Explanation:
    """An Explanation from already-encoded tokens ((N, C) each, row-major over grid).

    `prior_weight` scales the spatial prior (0 = pure appearance matching).
    """
    grid = (int(grid[0]), int(grid[1]))
    st = torch.as_tensor(np.asarray(sketch_tokens, dtype=np.float32)) if not isinstance(sketch_tokens, torch.Tensor) else sketch_tokens.float()
    pt = torch.as_tensor(np.asarray(photo_tokens, dtype=np.float32)) if not isinstance(photo_tokens, torch.Tensor) else photo_tokens.float()
    st, pt = st.reshape(-1, st.shape[-1]), pt.reshape(-1, pt.shape[-1])
    if st.shape[0] != grid[0] * grid[1] or pt.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"tokens {tuple(st.shape)} / {tuple(pt.shape)} do not fit the grid {grid}")
    ink = ink_cells(sketch_image, grid).reshape(-1) if sketch_ink is None else np.asarray(sketch_ink, bool).reshape(-1)
    ink_t = torch.from_numpy(ink)
    rel_score = rel_logit = None
    with torch.inference_mode():
        if relation is not None:
            relation.eval()
            s2, p2 = relation.embed_pair(st[None], pt[None], ink_t[None])
            # Mean-centred like the backbone tokens: after cross-attention both sides
            # share a large common component that would make one cell a hub.
            content = torch.from_numpy(content_cells(photo_image, grid))
            sim = _centered_cosine(s2[0], p2[0], ink_t, content).numpy()
            rel_logit = float(relation(st[None], pt[None], ink_t[None])[0])
            rel_score = float(1 / (1 + np.exp(-rel_logit)))
            source = "relation"
        else:
            content = torch.from_numpy(content_cells(photo_image, grid))
            sim = _centered_cosine(st, pt, ink_t, content).numpy()
            source = "backbone"
    sim = sim.astype(np.float32)
    best_p = sim[ink].max(0) if ink.any() else sim.max(0)
    prior = None
    transform = None
    if prior_weight > 0 and ink.any():
        content = content_cells(photo_image, grid)
        transform = place_sketch(sim, ink, grid, content.astype(np.float32))
        if transform is not None:
            prior = transform_prior(grid, transform) * transform_weight
    matches, mutual, assignment = match_cells(sim, ink, prior, prior_weight, min_matches, max_matches, grid)
    score = sim if prior is None else sim - prior_weight * prior
    heat = _heatmap(score, ink, matches, grid)
    return Explanation(
        sketch_image=sketch_image, photo_image=photo_image, grid=grid,
        image_size=(sketch_image.width, sketch_image.height), similarity=sim, sketch_ink=ink,
        matches=matches, heatmap=heat, assignment=assignment, relation_score=rel_score,
        relation_logit=rel_logit, token_source=source, mutual=mutual, transform=transform,
    )


def _open_image(x: Any, what: str) -> Any:
    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if not p.is_file():
            raise FileNotFoundError(f"{what} not found: {p}")
        with Image.open(p) as im:
            im.load()
            return im.copy()
    return x


def prepare_pair(encoder, sketch: Any, photo: Any) -> tuple[Image.Image, Image.Image]:
    """User inputs -> the preprocessed (sketch, photo) model inputs as PIL images."""
    from sbir_core.preprocess import preprocess_photo, preprocess_sketch

    sk = preprocess_sketch(_open_image(sketch, "sketch"), encoder.image_size)
    ph = preprocess_photo(_open_image(photo, "photo"), encoder.image_size)
    return sk, ph


@torch.inference_mode()
def encode_pair_tokens(encoder, sketch_image: Image.Image, photo_image: Image.Image):
    """Backbone tokens of the two preprocessed images: ((N, C), (N, C), grid)."""
    x = torch.stack([encoder.to_tensor(sketch_image), encoder.to_tensor(photo_image)])
    f = encoder.backbone_features(x)
    return f.tokens[0], f.tokens[1], tuple(f.grid)


def explain_pair(encoder, sketch: Any, photo: Any, relation: Optional[RelationModel] = None,
                 **kwargs: Any) -> Explanation:
    """Explain why `photo` matches `sketch`.

    sketch: image, path or stroke list (preprocessed like a query); photo: image or
    path. relation: a RelationModel (its cross-attended tokens and score are used),
    or None for backbone tokens. Extra kwargs go to `explain_tokens`.
    """
    sk, ph = prepare_pair(encoder, sketch, photo)
    st, pt, grid = encode_pair_tokens(encoder, sk, ph)
    if relation is not None and tuple(relation.grid) != tuple(grid):
        raise ValueError(f"the relation model was trained on a {relation.grid} token grid, the encoder gives {grid}")
    return explain_tokens(sk, ph, st, pt, grid, relation=relation, **kwargs)
