"""How often do the explanation's correspondence lines join the right places?

    python scripts/bench_correspondence.py --data ../shared/data [--checkpoint default|none|PATH]
        [--relation auto|none|PATH] [--n 240] [--seed 0] [--threads 1] [--json]

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
- `n_pairs`, `n_matches` (mean drawn lines per pair), `pairs_without_lines`.

Each set is split in two halves by a fixed seed. The line-strength threshold is
calibrated on the hard set's calibration half (`threshold_calibrated`, see
`calibrate_threshold`; on the standard set nearly every candidate is right, so it cannot
choose one), and every PCK is measured on the evaluation halves (`n_pairs` counts those).
`threshold` is the module constant in use; `pck_at_calibrated` the PCK at the
calibrated value.

Photos: an evenly spaced, fixed selection of the Caltech-101 photos in the shared data
(any classes, `data.image_folder`). The data is only read, never copied. About 100 s
for 240 photos on one core.
"""
from __future__ import annotations

import sys
from pathlib import Path


import argparse
import json
import math
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
def affine_matrix(size: int, angle: float = 0.0, scale: float = 1.0, shift: Sequence[float] = (0.0, 0.0),
                  flip: bool = False) -> np.ndarray:
    """(2, 3) map from photo pixels to sketch pixels (continuous coordinates, a pixel's
    centre at i + 0.5): mirror (optional) about the vertical centre line, then rotate by
    `angle` degrees and scale about the centre, then shift by `shift` pixels."""
    c = size / 2.0
    F = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    F[0, 2] = size if flip else 0.0
    a = math.radians(angle)
    R = np.array([[scale * math.cos(a), -scale * math.sin(a), 0.0],
                  [scale * math.sin(a), scale * math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    T0 = np.array([[1.0, 0, -c], [0, 1.0, -c], [0, 0, 1.0]])
    T1 = np.array([[1.0, 0, c + shift[0]], [0, 1.0, c + shift[1]], [0, 0, 1.0]])
    return (T1 @ R @ T0 @ F)[:2]


def random_affine(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """A random map within the benchmark's ranges and its parameters."""
    p = {"angle": float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), "scale": float(rng.uniform(*SCALE_RANGE)),
         "shift": [float(v) for v in rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2) * size], "flip": bool(rng.random() < 0.5)}
    return affine_matrix(size, **p), p


def warp_image(img: Image.Image, M: np.ndarray) -> Image.Image:
    """`img` moved by M (photo -> sketch pixels), white where nothing lands."""
    import cv2

    # cv2 puts pixel centres at integers: shift the continuous map by half a pixel.
    A = np.vstack([M, [0, 0, 1]])
    H = np.array([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])
    Ai = np.linalg.inv(H) @ A @ H
    a = np.asarray(img.convert("RGB"))
    out = cv2.warpAffine(a, Ai[:2], (a.shape[1], a.shape[0]), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))
    return Image.fromarray(out)


def true_cells(M: np.ndarray, grid: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """(h*w,) int: for each sketch cell, the photo cell its centre came from under M
    (photo -> sketch), -1 where that point lies outside the photo. `size` = (W, H)."""
    h, w = int(grid[0]), int(grid[1])
    W, H = float(size[0]), float(size[1])
    r, c = np.divmod(np.arange(h * w), w)
    q = np.stack([(c + 0.5) * W / w, (r + 0.5) * H / h, np.ones(h * w)], 0)
    Ai = np.linalg.inv(np.vstack([M, [0, 0, 1]]))
    p = (Ai @ q)[:2]
    pc = np.floor(p[0] / (W / w)).astype(int)
    pr = np.floor(p[1] / (H / h)).astype(int)
    ok = (p[0] >= 0) & (p[0] < W) & (p[1] >= 0) & (p[1] < H)
    return np.where(ok, pr * w + pc, -1)


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

    rng = np.random.default_rng(seed + (7919 if hard else 0))
    size = encoder.image_size
    records = []
    t0 = time.perf_counter()
    for i, item in enumerate(items):
        try:
            photo = item.load()
        except Exception:  # an unreadable file: skip it, like indexing does
            continue
        sk, ph, M, params = make_pair(photo, size, rng, hard)
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
            log(f"{'hard' if hard else 'standard'}: {i + 1} pairs, {time.perf_counter() - t0:.0f} s")
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
    n_drawn = [len(drawn(r)[0]) for r in records]
    ink_cells_of = lambda r: np.flatnonzero(r["ink"])  # noqa: E731
    return {
        "pck": pck_m,
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


def run(encoder, data: Path, n: int = 240, seed: int = 0, relation=None, log=None) -> dict:
    from sbir_core.explain import correspondence as E

    t0 = time.perf_counter()
    items = photo_items(data, n)
    std = collect(encoder, items, False, seed, relation, log)
    hard = collect(encoder, items, True, seed, relation, log)
    std_cal, std_eval = split_halves(std)
    hard_cal, hard_eval = split_halves(hard)
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
    res["seed"] = seed
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="the shared data folder (holds caltech101/)")
    ap.add_argument("--checkpoint", default="default", help="'default' (shipped), 'none' (raw backbone) or a path")
    ap.add_argument("--relation", default="auto",
                    help="'auto' (the shipped relation model when present and on the encoder's grid, as the "
                         "app does), 'none', or a path")
    ap.add_argument("--n", type=int, default=240, help="photos; each gives a standard and a hard pair, "
                                                        "half of each set calibrates, half evaluates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    import torch

    from sbir_core.models.encoders import create_encoder
    from sbir_core.models.relation import load_relation

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "caltech101").is_dir():
        print(f"no caltech101/ under {data}: pass --data PATH_TO_SHARED_DATA", file=sys.stderr)
        return 2
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
    res = run(enc, data, n=args.n, seed=args.seed, relation=relation, log=log)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"encoder {res['encoder']} ({res['image_size']} px, grid {res['grid']}), relation model: "
          f"{'yes' if res['relation'] else 'no'}; {res['seconds']} s")
    print(f"{'PCK@1 cell (evaluation halves)':<38}{'standard':>10}{'hard':>10}")
    h = res["hard"]
    rows = [("explanation lines (shipped)", "pck"), ("  every line candidate", "pck_all_candidates"),
            ("  full assignment (all ink cells)", "pck_assignment"), ("spatial prior only", "pck_spatial_only"),
            ("feature nearest neighbour only", "pck_feature_only"),
            ("  on the method's similarity", "pck_feature_only_multiview")]
    for label, key in rows:
        print(f"{label:<38}{res[key]:>10.3f}{h[key]:>10.3f}")
    print(f"{'lines per pair':<38}{res['n_matches']:>10.1f}{h['n_matches']:>10.1f}")
    print(f"{'pairs':<38}{res['n_pairs']:>10d}{h['n_pairs']:>10d}")
    print(f"threshold {res['threshold']} (calibrated on the hard calibration half: {res['threshold_calibrated']}; "
          f"PCK there {res['pck_at_calibrated']:.3f} / {h['pck_at_calibrated']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
