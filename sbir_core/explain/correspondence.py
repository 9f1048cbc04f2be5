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
shows an object (or a part: a cat's face) much smaller in the photo. With the shipped
correspondence head (`models.correspondence_head`, trained on pixel-aligned pairs: photos
against their warped edge maps, doodles against their warped colour fill) its cosine is
mixed in (HEAD_WEIGHT): the retrieval tokens say what a cell shows, the head where it is.
With a relation model its cross-attended similarity is mixed in (RELATION_WEIGHT). Only
inked sketch cells take part: a blank cell draws no line and gets no patch.

Matching (measured by `experiments/bench_correspondence.py`: photos' own edge maps and doodles'
colour fills moved by a known random affine map, so every line can be checked, and real
searches of the default gallery):
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
   lands on outline and on the object (`end_on_object`: not on white paper), and its appearance strength (`match_strength`, in standard
   deviations) reaches MATCH_THRESHOLD, calibrated on training classes; every inked cell
   that passes draws its line (at most LINES_PER_PHOTO_CELL into one photo cell, at most
   MAX_MATCHES). Line colour is that appearance strength only, never the placement.
4. the heatmap (`_heatmap`): each inked cell's vote for the photo cell it matched, where it
   agrees with the placement, smoothed without border bias and kept to the picture's
   non-white pixels.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sbir_core.data.images import ImageTooLargeError, load_image
from sbir_core.errors import InputError
from sbir_core.data.preprocess import cell_counts
from sbir_core.explain.appearance import (EDGE_WEIGHT, RELATION_WEIGHT, PairFeatures, cell_xy, _centered_cosine,
                                          content_cells, encode_pair_features, object_mask, pair_similarity,
                                          photo_edge_view, photo_structure)
from sbir_core.explain.explanation import Explanation
from sbir_core.models.relation import RelationModel, ink_cells

log = logging.getLogger(__name__)

MIN_MATCHES = 8  # match_cells' fill-up when too few mutual matches remain
MAX_MATCHES = 60
LINES_PER_PHOTO_CELL = 2  # a drawing shown larger than the object: neighbouring cells share a photo cell
# Line strength (appearance only: how many standard deviations a cell's match stands
# above that cell's similarity to every photo cell) below which no line is drawn.
# Calibrated on training classes only, with the shipped correspondence head:
# `python experiments/bench_correspondence.py --calibrate --n 60` (the
# head's 36 selection classes, which it never trained on: 171 photo / edge-map, zoomed and
# doodle / fill pairs), the threshold that maximises right - 4 x wrong drawn lines (a line is
# drawn where lines of its strength are right at least 4 times in 5). Without the head (3.24
# before it) the strengths are not comparable: re-run it when the encoder or head changes.
MATCH_THRESHOLD = 1.81
BACKGROUND_WEIGHT = 0.15  # appearance penalty for a photo cell without any outline
LINE_WEIGHT = 1.5  # placement score: weight of the drawing-to-outline (chamfer) distance
DRAW_RADIUS = 1.5  # a line's photo end must lie this close (cells) to the placement's
HEAD_WEIGHT = 0.75  # share of the correspondence head's cosine in the similarity, when a head is loaded


# ----------------------------------------------------------------------------- the result


# ----------------------------------------------------------------------------- features


# ----------------------------------------------------------------------------- similarity


# ----------------------------------------------------------------------------- placement


def apply_placement(placement: dict, grid: tuple[int, int]) -> np.ndarray:
    """(h*w,) complex: where the placement sends each sketch cell centre (cell units)."""
    z = cell_xy(grid)
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
    zall = cell_xy(grid)
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
    return np.abs(pred[:, None] - cell_xy(grid)[None]).astype(np.float32)


# ----------------------------------------------------------------------------- matching
def select_matches(candidates: Sequence[tuple[int, int, float]], grid: tuple[int, int],
                   threshold: Optional[float] = None, max_matches: int = MAX_MATCHES,
                   per_photo_cell: int = LINES_PER_PHOTO_CELL) -> list:
    """The lines to draw: candidates (strongest first) at or above `threshold`
    (default MATCH_THRESHOLD), at most `per_photo_cell` into one photo cell (a drawing
    placed small on the photo would otherwise fan many lines into one cell), at most
    `max_matches`. Every inked cell that passes draws its line: the lines show all the
    parts found, not a sample of them (the benchmark's `coverage`)."""
    t = MATCH_THRESHOLD if threshold is None else threshold
    kept, ends = [], {}
    for c in sorted((c for c in candidates if c[2] >= t), key=lambda c: -c[2]):
        if ends.get(c[1], 0) < per_photo_cell:
            kept.append(c)
            ends[c[1]] = ends.get(c[1], 0) + 1
    return kept[:max_matches]


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


def content_fraction(photo_image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """(h*w,) share of each cell's pixels on the picture's object (`object_mask`)."""
    counts, area = cell_counts(object_mask(photo_image), grid)
    return (counts / np.maximum(area, 1)).reshape(-1).astype(np.float32)


def end_on_object(photo_image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """(h*w,) bool: a line ending at this cell's centre would touch the picture's object:
    a non-white pixel lies within a quarter cell of the centre (the size of the end's dot).
    On clip-art a line into white paper joins a part to nothing; on a photo every cell
    passes."""
    mask = object_mask(photo_image)
    H, W = mask.shape
    r = min(W / grid[1], H / grid[0]) / 4
    out = np.ones(grid[0] * grid[1], bool)
    if mask.all():
        return out
    for i, z in enumerate(cell_xy(grid)):
        x, y = z.real * W / grid[1], z.imag * H / grid[0]
        x0, x1, y0, y1 = int(max(0, x - r - 1)), int(min(W, x + r + 1)), int(max(0, y - r - 1)), int(min(H, y + r + 1))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        out[i] = bool(mask[y0:y1, x0:x1][(xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= r * r].any())
    return out


def _heatmap(sim: np.ndarray, assignment: np.ndarray, ink: np.ndarray, grid: tuple[int, int],
             placement: Optional[dict], content: np.ndarray, draw_radius: float = DRAW_RADIUS) -> np.ndarray:
    """(h, w) in [0, 1]: where the drawing agrees with the picture. Each inked drawing
    cell votes for the picture cell it matched, with its appearance strength above one
    standard deviation, but only where that match agrees with the placement (a cell the
    placement sends elsewhere agrees with nothing); the votes are smoothed by a Gaussian
    that is renormalised at the border (zero padding alone would dim border cells, edge
    replication would smear them) and weighted by each cell's share of object pixels (white
    paper and padding agree with nothing). Without any agreeing vote: each picture cell's
    best similarity to the drawing, so there is always something to see."""
    h, w = grid
    rows = np.flatnonzero(ink & (assignment >= 0))
    votes = np.zeros(h * w, np.float32)
    if len(rows):
        cols = assignment[rows]
        z = match_strength(sim, rows, cols)
        dist = placement_distance(placement, grid)
        ok = np.ones(len(rows), bool) if dist is None else dist[rows, cols] <= draw_radius
        np.add.at(votes, cols[ok], np.maximum(z[ok] - 1.0, 0.0))
    if not votes.any():
        best = sim[ink].max(0) if ink.any() else np.zeros(h * w, np.float32)
        lo, hi = float(np.median(best)), float(best.max())
        votes = np.clip((best - lo) / (hi - lo), 0, 1).astype(np.float32) if hi > lo else votes
    r = np.arange(-2, 3)
    k1 = np.exp(-r ** 2 / (2 * 0.8 ** 2)).astype(np.float32)
    k = torch.from_numpy(np.outer(k1, k1) / np.outer(k1, k1).sum())[None, None]
    t = torch.from_numpy(votes.reshape(1, 1, h, w))
    hm = (F.conv2d(t, k, padding=2) / F.conv2d(torch.ones_like(t), k, padding=2))[0, 0].numpy()
    hm = hm * content.reshape(h, w)
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
    head_weight: float = HEAD_WEIGHT,
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
        if features is not None and features.head_sketch is not None and head_weight > 0:
            # The trained correspondence head: where a part is, not only what it shows.
            hp = features.head_photo.float()
            sim = ((1 - head_weight) * sim + head_weight * (features.head_sketch.float() @ hp.T).numpy()
                   ).astype(np.float32)
            scaled = {f: ((1 - head_weight) * v + head_weight * (features.head_scaled[f].float() @ hp.T).numpy()
                          ).astype(np.float32) for f, v in scaled.items()}
            source = "head"
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
    on_object = end_on_object(photo_image, grid)
    cands = [c for c in cands if on_object[c[1]]]
    threshold = MATCH_THRESHOLD if min_strength is None else float(min_strength)
    matches = select_matches(cands, grid, threshold, max_matches)
    mutual = np.array([mutual_all[s] for s, _, _ in matches], bool)
    heat = _heatmap(sim, assignment, ink, grid, placement, content_fraction(photo_image, grid), draw_radius=DRAW_RADIUS)
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
