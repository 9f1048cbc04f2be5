"""How often do the explanation's correspondence lines join the right places?

    python experiments/bench_correspondence.py [--checkpoint default|none|PATH]
        [--relation auto|none|PATH] [--n 240] [--n-doodles 240] [--n-search 90] [--no-search]
        [--seed 0] [--threads 1] [--json]
    python experiments/bench_correspondence.py --calibrate --n 60   # the line threshold
    python experiments/bench_correspondence.py --latency 5                                # click to explanation

Ground truth without any annotation: a photo's own edge map (`preprocess.photo_to_edges`,
the pseudo-sketch view the library uses) is moved by a known random affine map
(rotation +-15 deg, scale 0.8-1.1, translation +-10 %, mirrored with probability 1/2,
seeded) and used as the sketch, so for every token cell of that sketch the true photo
cell is known (where the inverse map sends the cell's centre). The explanation is
computed on (warped edge map, preprocessed photo) as `explain_pair` does for a user
(`explain.encode_pair_features` + `explain_tokens`), with the encoder under test
(`create_encoder(checkpoint=...)`: its input size and token grid, nothing hard-coded)
and, like the app, the shipped relation model when it exists and fits that grid.

The method also computes the photo's edge map, so on this standard set the sketch is,
up to the affine map, a view the method has: an easy case. Each photo therefore also
gives a hard pair (`hard` in the JSON): a zoomed-in part of the photo (1.3-2x), rotation
+-20 deg, shift +-25 %, drawn by another edge detector (stronger blur, other thresholds,
short and a random quarter of the fragments dropped, thicker lines).

PCK = share of the drawn matches (the lines the method would draw) whose photo end lies
within one token cell (Chebyshev distance <= 1) of the truth. Only inked sketch cells
whose truth falls inside the image count. Reported, for each set:

- `pck`: the shipped method's drawn lines (threshold `explain.MATCH_THRESHOLD`);
- `pck_spatial_only`: every inked cell matched to the photo cell at the same relative
  position (a prior alone);
- `pck_feature_only`: every inked cell matched to its most similar photo token (cosine
  of the encoder's mean-centred tokens, no prior);
- `pck_feature_only_multiview`: the same nearest neighbour on the method's own
  appearance similarity (token levels, drawing sizes, photo + its edge map): the method
  minus placement, background penalty and threshold;
- `pck_assignment`: the method's full assignment (every inked cell, as the synthesis
  uses it), comparable with the baselines cell for cell;
- `pck_all_candidates`: the lines it would draw with no threshold;
- `n_pairs`, `n_matches` (mean drawn lines per pair), `pairs_without_lines`;
- `coverage`: what PCK never sees, the parts the lines miss: the share of inked sketch
  cells whose truth is inside the picture that have a correct drawn line (pooled).

Top-level `pck_hard` / `coverage_hard` repeat the hard set's; `pck_doodle` /
`coverage_doodle` are the same figures on a third set: held-out QuickDraw doodles
(`data.heldout_doodles`, never trained on) moved by a standard-set map against their colour
fill (every closed region painted, clip-art style; `training.correspondence.fill_drawing`).

Real searches (`search` in the JSON, its headline figures also at the top level): the page's
example drawings and `--n-search` held-out doodles of the default gallery's classes
(`eval.product.product_queries`), each searched exactly as the app searches
(`RetrievalService`: shipped checkpoint, galleries/default), and its first correct picture
in the top 5 explained as a click explains it: `lines_median`, `zero_line_share` (share of
explanations with no line), `lines_on_object` (share of line ends whose dot, a quarter cell
across, touches a non-white pixel of the picture), `heat_on_object` (mean share of the
heatmap's mass, as drawn, on non-white pixels), `object_area` (mean share of non-white
pixels) and `explain_seconds_p50` (explain + the three images, wall time).

Each set is split in two halves by a fixed seed. The shipped line threshold is calibrated
on training classes (`--calibrate`); for reference the script also calibrates one on the
hard set's calibration half (`threshold_calibrated`, see
`calibrate_threshold`; on the standard set nearly every candidate is right, so it cannot
choose one), and every PCK is measured on the evaluation halves (`n_pairs` counts those).
`threshold` is the module constant in use; `pck_at_calibrated` the PCK at the
calibrated value.

Photos: an evenly spaced, fixed selection of the Caltech-101 photos in the shared data
(any classes, `data.image_folder`). The data is only read, never copied. About 100 s
for 240 photos on one core.

Finding: the shipped method's lines end within one cell of the truth 0.989 of the time (standard set), 0.839 (hard).
Backs: docs/BENCHMARKS.md §7 and §8 (explanation lines; its --calibrate sets the line threshold in sbir_core/explain/correspondence.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
import json
import time
from typing import Optional, Sequence

import numpy as np
from PIL import Image

MAX_ROTATION = 15.0  # degrees
SCALE_RANGE = (0.8, 1.1)
MAX_SHIFT = 0.10  # of the image side
# The hard set: a zoomed-in crop (the drawing shows part of the photo, 1.3-2x larger),
# rotation +-20 deg, shift +-25 %, and a sketch drawn by another edge detector (stronger
# blur, other thresholds, fragments dropped, thicker lines), so it is not the edge map
# the method computes for the photo.
HARD_ROTATION = 20.0
HARD_SCALE_RANGE = (1.3, 2.0)
HARD_SHIFT = 0.25
WRONG_COST = 4.0  # calibration: a wrong line costs as much as four right ones gain


# ----------------------------------------------------------------------------- ground truth
# One geometry for training and benchmark (the head trains on the same kind of pairs).
from sbir_core.data.datasets import DATA_HELP, data_root  # noqa: E402
from sbir_core.errors import InputError  # noqa: E402
from sbir_core.training.correspondence import affine_matrix, true_cells, warp_image  # noqa: E402


def random_affine(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """A random map within the benchmark's ranges and its parameters."""
    p = {"angle": float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), "scale": float(rng.uniform(*SCALE_RANGE)),
         "shift": [float(v) for v in rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2) * size], "flip": bool(rng.random() < 0.5)}
    return affine_matrix(size, **p), p


def correct(sketch_cells: Sequence[int], photo_cells: Sequence[int], truth: np.ndarray, grid: Sequence[int],
            tol: int = 1) -> np.ndarray:
    """Per match: does the photo end lie within `tol` cells (Chebyshev) of the truth?
    Matches whose sketch cell has no truth are not counted (returned as -1)."""
    w = int(grid[1])
    s = np.asarray(sketch_cells, int)
    p = np.asarray(photo_cells, int)
    t = truth[s]
    ok = (np.abs(p // w - t // w) <= tol) & (np.abs(p % w - t % w) <= tol)
    return np.where(t < 0, -1, ok.astype(int))


def pck(sketch_cells: Sequence[int], photo_cells: Sequence[int], truth: np.ndarray, grid: Sequence[int]) -> float:
    c = correct(sketch_cells, photo_cells, truth, grid)
    c = c[c >= 0]
    return float(c.mean()) if len(c) else float("nan")


def coverage_counts(sketch_cells: Sequence[int], photo_cells: Sequence[int], truth: np.ndarray,
                    ink: np.ndarray, grid: Sequence[int]) -> tuple[int, int]:
    """(inked sketch cells whose truth is inside the picture and that have a correct
    drawn line, inked sketch cells whose truth is inside the picture): what PCK never
    sees, the parts the lines miss."""
    c = correct(sketch_cells, photo_cells, truth, grid)
    right = {int(s) for s, ok in zip(np.asarray(sketch_cells, int), c) if ok == 1}
    want = np.flatnonzero(np.asarray(ink, bool) & (truth >= 0))
    return sum(int(s) in right for s in want), len(want)


def spatial_only(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: each inked sketch cell -> the photo cell at the same position."""
    s = np.flatnonzero(ink)
    return s, s.copy()


def feature_only(sim: np.ndarray, ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: each inked sketch cell -> its most similar photo token."""
    s = np.flatnonzero(ink)
    return s, sim[s].argmax(1)


# ----------------------------------------------------------------------------- calibration
def calibrate_threshold(records: Sequence[dict], thresholds: Optional[np.ndarray] = None,
                        wrong_cost: float = WRONG_COST) -> dict:
    """The line-strength threshold for the drawn matches, from training pairs.

    Each record holds a pair's line candidates (`candidates`: (s, p, strength) before
    any threshold), its `truth` and `grid`. At threshold t the drawn lines are what
    `explain.select_matches` keeps at t; the chosen t maximises
    correct - wrong_cost * wrong over the drawn lines of all training pairs. With
    wrong_cost 4 a line is worth drawing when lines of its strength are right at
    least 4 times in 5 (a wrong line misleads more than a missing one). Ties go to the
    lower t (more lines).
    """
    from sbir_core.explain.correspondence import select_matches

    if thresholds is None:
        allv = np.concatenate([[m[2] for m in r["candidates"]] for r in records if r["candidates"]] or [[0.0]])
        thresholds = np.unique(np.round(np.quantile(allv, np.linspace(0, 0.98, 99)), 2))
    rows = []
    for t in thresholds:
        good = bad = 0
        for r in records:
            ms = select_matches(r["candidates"], r["grid"], float(t))
            if not ms:
                continue
            c = correct([m[0] for m in ms], [m[1] for m in ms], r["truth"], r["grid"])
            good += int((c == 1).sum())
            bad += int((c == 0).sum())
        rows.append((float(t), good - wrong_cost * bad, good, bad))
    best = max(rows, key=lambda x: (x[1], -x[0]))
    return {"threshold": best[0], "objective": best[1], "correct": best[2], "wrong": best[3],
            "pck": best[2] / max(best[2] + best[3], 1), "sweep": rows}


# ----------------------------------------------------------------------------- the run
def photo_items(data: Path, n: int) -> list:
    from sbir_core.data.datasets import image_folder

    items = image_folder(data / "caltech101", "photo", source="caltech101")
    if not items:
        raise SystemExit(f"no Caltech-101 photos under {data / 'caltech101'}")
    idx = np.unique(np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int))
    return [items[i] for i in idx]


def other_edges(photo, size: int, rng: np.random.Generator) -> Image.Image:
    """A pseudo-sketch unlike `photo_to_edges`: stronger blur, other Canny thresholds,
    fragments under 25 px and a random quarter of the rest dropped, 3-px lines; the same
    fit-and-pad geometry as `preprocess_photo`."""
    import cv2

    from sbir_core.data.preprocess import fit_photo, pad_square

    g = cv2.GaussianBlur(np.asarray(fit_photo(photo, size).convert("L")), (0, 0), 2.0)
    med = float(np.median(g))
    e = cv2.Canny(g, int(0.5 * med), int(1.5 * med) or 100)
    n, lab, stats, _ = cv2.connectedComponentsWithStats((e > 0).astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = (stats[1:, cv2.CC_STAT_AREA] >= 25) & (rng.random(n - 1) > 0.25)
    e = cv2.dilate((keep[lab] * 255).astype(np.uint8), np.ones((3, 3), np.uint8))
    return pad_square(Image.fromarray(255 - e).convert("RGB"), size)


def doodle_pair(strokes, size: int, rng: np.random.Generator):
    """(sketch, picture, M, params): a held-out doodle moved by a standard-set map, and
    its colour fill (every closed region painted, clip-art style) in place."""
    from sbir_core.data.preprocess import preprocess_sketch
    from sbir_core.training.correspondence import fill_drawing

    sk = preprocess_sketch(strokes, size)
    M, params = random_affine(rng, size)
    return warp_image(sk, M), fill_drawing(sk, rng), M, params


def doodle_items(data: Path, n: int) -> list:
    """An evenly spaced selection of held-out doodles (`data.heldout_doodles`: the last
    five of every QuickDraw class, never trained on), one per class where possible."""
    from sbir_core.data.datasets import heldout_doodles

    items = heldout_doodles(data)
    items = items[::5] + [it for i, it in enumerate(items) if i % 5]  # first one of each class first
    return items[:n]


def make_pair(photo, size: int, rng: np.random.Generator, hard: bool = False):
    """(sketch, photo image, M, params): the photo preprocessed like a gallery photo and
    its edge map, in the same geometry, moved by a random affine map M (photo -> sketch)."""
    from sbir_core.data.preprocess import photo_to_edges, preprocess_photo

    ph = preprocess_photo(photo, size)
    if not hard:
        edges = photo_to_edges(photo, size)  # same fit-and-pad geometry as `ph`
        M, params = random_affine(rng, size)
    else:
        params = {"angle": float(rng.uniform(-HARD_ROTATION, HARD_ROTATION)),
                  "scale": float(rng.uniform(*HARD_SCALE_RANGE)),
                  "shift": [float(v) for v in rng.uniform(-HARD_SHIFT, HARD_SHIFT, 2) * size],
                  "flip": bool(rng.random() < 0.5)}
        M = affine_matrix(size, **params)
        edges = other_edges(photo, size, rng)
    return warp_image(edges, M), ph, M, params


def collect(encoder, items: Sequence, hard: bool, seed: int, relation=None, log=None) -> list[dict]:
    """One record per usable pair: truth, ink, line candidates (no threshold), the
    method's similarity and assignment, and the plain token similarity."""
    from sbir_core.explain import appearance as A
    from sbir_core.explain import correspondence as E
    from sbir_core.models.relation import ink_cells

    doodle = hard == "doodle"
    rng = np.random.default_rng(seed + {True: 7919, False: 0, "doodle": 104729}[hard])
    size = encoder.image_size
    records = []
    t0 = time.perf_counter()
    for i, item in enumerate(items):
        try:
            photo = item.load()
        except Exception:  # an unreadable file: skip it, like indexing does
            continue
        try:
            sk, ph, M, params = doodle_pair(photo, size, rng) if doodle else make_pair(photo, size, rng, hard)
        except InputError:  # a doodle with nothing to draw (BlankSketchError)
            continue
        feats = A.encode_pair_features(encoder, sk, ph)
        grid = feats.grid
        ink = ink_cells(sk, grid).reshape(-1)
        truth = true_cells(M, grid, sk.size)
        if (ink & (truth >= 0)).sum() < 4:
            continue
        ex = E.explain_tokens(sk, ph, feats.sketch[0], feats.photo[0], grid, sketch_ink=ink, features=feats,
                              relation=relation, min_strength=float("-inf"))
        # The plain baseline: cosine of the encoder's own tokens (mean-centred, as always).
        plain = A.pair_similarity([feats.sketch[0]], [feats.photo[0]], None, ink, A.content_cells(ph, grid))
        records.append({"key": item.key, "grid": tuple(grid), "truth": truth, "ink": ink, "params": params,
                        "candidates": list(ex.candidates), "similarity": ex.similarity, "plain": plain,
                        "assignment": ex.assignment})
        if log and (i + 1) % 40 == 0:
            log(f"{'doodle' if doodle else 'hard' if hard else 'standard'}: {i + 1} pairs, {time.perf_counter() - t0:.0f} s")
    return records


def split_halves(records: Sequence[dict], seed: int = 1234) -> tuple[list, list]:
    """(calibration half, evaluation half), by a fixed permutation."""
    order = np.random.default_rng(seed).permutation(len(records))
    half = len(records) // 2
    return [records[i] for i in order[:half]], [records[i] for i in order[half:]]


def score(records: Sequence[dict], threshold: float) -> dict:
    """PCK of the method's drawn lines at `threshold` and of the baselines, pooled over
    the records' lines."""
    from sbir_core.explain.correspondence import select_matches

    def pooled(pick):
        good = tot = 0
        for r in records:
            s, p = pick(r)
            c = correct(s, p, r["truth"], r["grid"])
            c = c[c >= 0]
            good += int(c.sum())
            tot += len(c)
        return round(good / max(tot, 1), 4), tot

    def drawn(r, t=threshold):
        ms = select_matches(r["candidates"], r["grid"], t)
        return np.array([m[0] for m in ms], int), np.array([m[1] for m in ms], int)

    pck_m, n_scored = pooled(drawn)
    cov = np.array([coverage_counts(*drawn(r), r["truth"], r["ink"], r["grid"]) for r in records]).reshape(-1, 2)
    n_drawn = [len(drawn(r)[0]) for r in records]
    ink_cells_of = lambda r: np.flatnonzero(r["ink"])  # noqa: E731
    return {
        "pck": pck_m,
        "coverage": round(float(cov[:, 0].sum() / max(cov[:, 1].sum(), 1)), 4),
        "pck_spatial_only": pooled(lambda r: spatial_only(r["ink"]))[0],
        "pck_feature_only": pooled(lambda r: feature_only(r["plain"], r["ink"]))[0],
        "pck_feature_only_multiview": pooled(lambda r: feature_only(r["similarity"], r["ink"]))[0],
        "pck_assignment": pooled(lambda r: (ink_cells_of(r), r["assignment"][ink_cells_of(r)]))[0],
        "pck_all_candidates": pooled(lambda r: drawn(r, float("-inf")))[0],
        "n_pairs": len(records),
        "n_matches": round(float(np.mean(n_drawn)) if n_drawn else 0.0, 2),
        "n_matches_scored": n_scored,
        "pairs_without_lines": int(sum(v == 0 for v in n_drawn)),
    }


# ----------------------------------------------------------------------------- calibration on training classes
def calibrate_on_training_classes(encoder, data: Path, n: int = 120, seed: int = 0, log=None) -> dict:
    """The line threshold calibrated (`calibrate_threshold`) on pairs of the shipped
    head's selection classes: training classes (never a benchmark class) that the head
    never trained on: their photos (standard and hard pairs) and their trainable doodles
    against their fill. The benchmark's own sets never choose the threshold."""
    from sbir_core.data.datasets import training_items
    from sbir_core.models.correspondence_head import head_for

    head = head_for(encoder)
    if head is None:
        raise SystemExit("no correspondence head for this encoder: nothing to calibrate for")
    classes = set(head.meta["selection_classes"])
    items = [it for it in training_items(data) if it.label in classes]
    photos = [it for it in items if it.modality == "photo"]
    doodles = [it for it in items if it.modality != "photo"]
    pick = lambda xs: [xs[i] for i in np.unique(np.linspace(0, len(xs) - 1, min(n, len(xs))).round().astype(int))]  # noqa: E731
    records = (collect(encoder, pick(photos), False, seed + 1, None, log)
               + collect(encoder, pick(photos), True, seed + 1, None, log)
               + collect(encoder, pick(doodles), "doodle", seed + 1, None, log))
    cal = calibrate_threshold(records)
    return {"threshold": cal["threshold"], "pck": round(cal["pck"], 4), "pairs": len(records),
            "classes": sorted(classes), **{k: score(records, cal["threshold"])[k] for k in ("coverage", "n_matches")}}


# ----------------------------------------------------------------------------- real searches
def heat_field(ex) -> np.ndarray:
    """The heatmap as the page draws it, at the picture's size."""
    if hasattr(ex, "heat_field"):
        return ex.heat_field()
    import cv2  # an Explanation from before `heat_field`: the plain enlarged cell heatmap

    return np.clip(cv2.resize(ex.heatmap.astype(np.float32), tuple(ex.image_size), interpolation=cv2.INTER_CUBIC),
                   0, 1)


def object_pixels(image: Image.Image) -> np.ndarray:
    """(H, W) bool: the picture's non-white pixels (every channel < 235 is not white)."""
    return (np.asarray(image.convert("RGB")) < 235).any(-1)


def ends_on_object(ends: Sequence[tuple[float, float]], mask: np.ndarray, radius: float) -> np.ndarray:
    """Per line end (x, y) in pixels: does a non-white pixel lie within `radius` pixels
    (the end's dot on the page)?"""
    H, W = mask.shape
    yy, xx = np.mgrid[0:H, 0:W]
    return np.array([bool(mask[(xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= radius ** 2].any()) for x, y in ends], bool)


def heat_share(field: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heat mass on the mask (nan for an empty heatmap)."""
    tot = float(field.sum())
    return float((field * mask).sum() / tot) if tot > 0 else float("nan")


def explanation_figures(ex) -> dict:
    """Lines, their ends on the object, heat on the object and the object's area for one
    explanation (the object: the preprocessed picture's non-white pixels)."""
    mask = object_pixels(ex.photo_image)
    ends = [ex.cell_center(p) for _, p, _ in ex.matches]
    on = ends_on_object(ends, mask, radius=min(ex.cell_size) / 4)
    return {"lines": len(ex.matches), "ends_on_object": int(on.sum()), "heat_on_object": heat_share(heat_field(ex), mask),
            "object_area": float(mask.mean())}


def search_queries(data: Path, n: int) -> list[tuple[str, str, object]]:
    """(name, gallery class, strokes): the page's example drawings, then `n` held-out
    doodles of the default gallery's classes evenly spaced over the product benchmark's
    queries (zero-shot classes first; `eval.product.product_queries`)."""
    from sbir_core.data.examples import list_examples
    from sbir_core.eval.product import product_queries

    out = [(f"example:{e.name}", e.label, [list(map(list, st)) for st in e.strokes]) for e in list_examples()]
    items = [it for group in product_queries(data).values() for it in group]
    idx = np.unique(np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int))
    return out + [(items[i].key, items[i].label, items[i].load()) for i in idx]


def real_searches(data: Path, n: int = 90, k: int = 5, log=None) -> dict:
    """Each query searched exactly as the app searches (`RetrievalService`, the shipped
    checkpoint, galleries/default), its first correct picture in the top `k` explained as
    the page does on a click (`explain_pair` with the service's relation model, then the
    three images rendered; its wall time is the click-to-explanation latency)."""
    from sbir_core.explain.correspondence import explain_pair
    from sbir_core.service import RetrievalService

    svc = RetrievalService()
    rows, seconds = [], []
    queries = search_queries(data, n)
    for name, label, strokes in queries:
        out = svc.search_sketch(strokes, k=max(k, 12), gallery="default")
        if not out.ok:
            continue
        hit = next((h for h in out.hits[:k] if h.label == label), None)
        if hit is None:
            continue
        t0 = time.perf_counter()
        ex = explain_pair(svc.encoder, out.query.image, hit.path, relation=svc.relation, query_kind=out.query.kind)
        ex.render_correspondences(), ex.render_synthesis(), ex.render_heatmap()
        seconds.append(time.perf_counter() - t0)
        rows.append({"query": name, "label": label, "rank": hit.rank + 1, **explanation_figures(ex)})
        if log and len(rows) % 20 == 0:
            log(f"real searches: {len(rows)} explained")
    lines = np.array([r["lines"] for r in rows])
    heat = np.array([r["heat_on_object"] for r in rows], float)
    return {
        "queries": len(queries), "explained": len(rows),
        "lines_median": float(np.median(lines)) if len(rows) else float("nan"),
        "lines_mean": round(float(lines.mean()), 2) if len(rows) else float("nan"),
        "zero_line_share": round(float((lines == 0).mean()), 4) if len(rows) else float("nan"),
        "lines_on_object": round(sum(r["ends_on_object"] for r in rows) / max(int(lines.sum()), 1), 4),
        "heat_on_object": round(float(np.nanmean(heat)), 4) if len(rows) else float("nan"),
        "object_area": round(float(np.mean([r["object_area"] for r in rows])), 4) if len(rows) else float("nan"),
        "explain_seconds_p50": round(float(np.median(seconds)), 3) if seconds else float("nan"),
        "per_query": rows,
    }


def latency(repeats: int = 5) -> dict:
    """Click to explanation for the page's examples (each against its first correct
    default-gallery picture in the top 5): `explain_pair` + the three images, median wall
    and CPU seconds of this process over the examples x `repeats` (one torch thread)."""
    from sbir_core.data.examples import list_examples
    from sbir_core.explain.correspondence import explain_pair
    from sbir_core.service import RetrievalService

    svc = RetrievalService()
    wall, cpu = [], []
    for e in list_examples():
        out = svc.search_sketch([list(map(list, st)) for st in e.strokes], k=12, gallery="default")
        hit = next((h for h in out.hits[:5] if h.label == e.label), None) if out.ok else None
        if hit is None:
            continue
        for i in range(repeats + 1):
            t, c = time.perf_counter(), time.process_time()
            ex = explain_pair(svc.encoder, out.query.image, hit.path, relation=svc.relation, query_kind=out.query.kind)
            ex.render_correspondences(), ex.render_synthesis(), ex.render_heatmap()
            if i:  # the first run warms up
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
    return {"explain_wall_p50": round(float(np.median(wall)), 3), "explain_cpu_p50": round(float(np.median(cpu)), 3),
            "runs": len(wall)}


def run(encoder, data: Path, n: int = 240, seed: int = 0, relation=None, log=None, n_doodles: int = 240,
        n_search: int = 90, searches: bool = True) -> dict:
    from sbir_core.explain import correspondence as E

    t0 = time.perf_counter()
    items = photo_items(data, n)
    std = collect(encoder, items, False, seed, relation, log)
    hard = collect(encoder, items, True, seed, relation, log)
    doodles = collect(encoder, doodle_items(data, n_doodles), "doodle", seed, relation, log) if n_doodles else []
    std_cal, std_eval = split_halves(std)
    hard_cal, hard_eval = split_halves(hard)
    doodle_eval = split_halves(doodles)[1]
    cal = calibrate_threshold(hard_cal)
    used = E.MATCH_THRESHOLD
    res = {"encoder": encoder.encoder_id, "image_size": int(encoder.image_size),
           "grid": list(std[0]["grid"]) if std else None,
           "relation": relation is not None, **score(std_eval, used)}
    res["n_pairs_calibration"] = len(std_cal)
    res["hard"] = {**score(hard_eval, used), "n_pairs_calibration": len(hard_cal)}
    res["threshold"] = used
    res["threshold_calibrated"] = cal["threshold"]
    res["pck_at_calibrated"] = score(std_eval, cal["threshold"])["pck"]
    res["hard"]["pck_at_calibrated"] = score(hard_eval, cal["threshold"])["pck"]
    res["pck_hard"], res["coverage_hard"] = res["hard"]["pck"], res["hard"]["coverage"]
    if doodles:
        res["doodle"] = score(doodle_eval, used)
        res["pck_doodle"], res["coverage_doodle"] = res["doodle"]["pck"], res["doodle"]["coverage"]
    if searches:
        res["search"] = real_searches(data, n_search, log=log)
        for key in ("lines_median", "zero_line_share", "lines_on_object", "heat_on_object", "object_area",
                    "explain_seconds_p50"):
            res[key] = res["search"][key]
    res["seed"] = seed
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--checkpoint", default="default", help="'default' (shipped), 'none' (raw backbone) or a path")
    ap.add_argument("--relation", default="auto",
                    help="'auto' (the shipped relation model when present and on the encoder's grid, as the "
                         "app does), 'none', or a path")
    ap.add_argument("--n", type=int, default=240, help="photos; each gives a standard and a hard pair, "
                                                        "half of each set calibrates, half evaluates")
    ap.add_argument("--n-doodles", type=int, default=240, help="held-out doodles against their warped colour fill "
                                                                "(half evaluated; 0 skips the set)")
    ap.add_argument("--n-search", type=int, default=90, help="held-out doodles searched and explained as the app "
                                                             "does (after the page's examples)")
    ap.add_argument("--no-search", action="store_true", help="skip the real searches")
    ap.add_argument("--latency", type=int, default=0, metavar="REPEATS",
                    help="only time click to explanation on the page's examples (REPEATS runs each) and print it")
    ap.add_argument("--calibrate", action="store_true",
                    help="only calibrate the line threshold on the correspondence head's selection classes "
                         "(training classes) and print it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    import torch

    from sbir_core.models.encoders import create_encoder
    from sbir_core.models.relation import load_relation

    torch.set_num_threads(args.threads)
    enc = create_encoder(checkpoint=args.checkpoint)
    relation = None
    if args.relation != "none":
        from sbir_core.models.relation import DEFAULT_RELATION

        path = DEFAULT_RELATION if args.relation == "auto" else Path(args.relation)
        if args.relation != "auto" or Path(path).is_file():
            relation = load_relation(path)
            if args.relation == "auto" and tuple(relation.grid) != tuple(
                    enc.encode(torch.zeros(1, 3, enc.image_size, enc.image_size), "photo").grid):
                relation = None  # the service skips a relation model on another grid too
    log = (lambda m: print(m, file=sys.stderr)) if not args.json else None
    if args.latency:
        print(json.dumps(latency(args.latency)))
        return 0
    data = data_root(args.data)
    if args.calibrate:
        print(json.dumps(calibrate_on_training_classes(enc, data, n=args.n, seed=args.seed, log=log)))
        return 0
    res = run(enc, data, n=args.n, seed=args.seed, relation=relation, log=log, n_doodles=args.n_doodles,
              n_search=args.n_search, searches=not args.no_search)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"encoder {res['encoder']} ({res['image_size']} px, grid {res['grid']}), relation model: "
          f"{'yes' if res['relation'] else 'no'}; {res['seconds']} s")
    sets = [("standard", res), ("hard", res["hard"])] + ([("doodle", res["doodle"])] if "doodle" in res else [])
    print(f"{'PCK@1 cell (evaluation halves)':<38}" + "".join(f"{n:>10}" for n, _ in sets))
    rows = [("explanation lines (shipped)", "pck"), ("coverage (inked cells rightly joined)", "coverage"),
            ("  every line candidate", "pck_all_candidates"),
            ("  full assignment (all ink cells)", "pck_assignment"), ("spatial prior only", "pck_spatial_only"),
            ("feature nearest neighbour only", "pck_feature_only"),
            ("  on the method's similarity", "pck_feature_only_multiview"), ("lines per pair", "n_matches")]
    for label, key in rows:
        print(f"{label:<38}" + "".join(f"{r[key]:>10.3f}" for _, r in sets))
    print(f"{'pairs':<38}" + "".join(f"{r['n_pairs']:>10d}" for _, r in sets))
    if "search" in res:
        q = res["search"]
        print(f"real searches ({q['explained']} of {q['queries']} queries had a right picture in the top 5): "
              f"lines median {q['lines_median']:g}, none {q['zero_line_share']:.2f}, line ends on the object "
              f"{q['lines_on_object']:.3f}, heat on the object {q['heat_on_object']:.3f} (object area "
              f"{q['object_area']:.3f}), explanation p50 {q['explain_seconds_p50']:.3f} s")
    print(f"threshold {res['threshold']} (calibrated on the hard calibration half: {res['threshold_calibrated']}; "
          f"PCK there {res['pck_at_calibrated']:.3f} / {res['hard']['pck_at_calibrated']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
