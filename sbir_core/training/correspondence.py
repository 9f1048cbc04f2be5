"""Training the dense correspondence head (`models.correspondence_head`) on pixel-aligned
pairs that need no annotation, and the ground-truth geometry the benchmark shares.

A pair is a drawing and a picture whose cells are known to correspond:
- a photo and its own edge map (the library's or a rougher one), the edge map moved by a
  random similarity map (rotation, scale 0.5-2, shift, mirror);
- a QuickDraw doodle and its colour fill (every closed region painted, clip-art style),
  the doodle moved the same way.
The head learns, for each inked drawing cell, which picture cell it came from (a soft
cross-entropy over the picture's cells, the target a narrow Gaussian around the true
point). Only training classes are used (`data.training_items`: never a benchmark class,
never a held-out doodle); a seeded tenth of those classes is kept apart to select the
checkpoint. The backbone stays frozen, so each pair's backbone maps are computed once
(a pool, saved next to the resume file) and the head trains for epochs over them.

    nice python -m sbir_core train-correspondence --pairs 2400 --epochs 2 \
        --state /tmp/corr_state.pt --out checkpoints/correspondence.safetensors --force

The shipped head: that command (about 20 min to encode the pool, then about 5 min an epoch
on a busy 2-core CPU); its first epoch ran under a 5-epoch schedule (`--epochs 5`) and was
resumed with `--epochs 2` to fit the time (selection accuracy 0.837 after epoch 1, 0.851
after epoch 2: nearest-neighbour PCK on 200 pairs of the 36 selection classes).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TAU = 0.07  # softmax temperature of the descriptor cosine
TARGET_SIGMA = 0.5  # cells: width of the soft target around the true point
VAL_CLASS_FRACTION = 0.1


# ----------------------------------------------------------------------------- geometry
def affine_matrix(size: int, angle: float = 0.0, scale: float = 1.0, shift: Sequence[float] = (0.0, 0.0),
                  flip: bool = False) -> np.ndarray:
    """(2, 3) map from photo pixels to sketch pixels (continuous coordinates, a pixel's
    centre at i + 0.5): mirror (optional) about the vertical centre line, then rotate by
    `angle` degrees and scale about the centre, then shift by `shift` pixels."""
    c = size / 2.0
    Fm = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    Fm[0, 2] = size if flip else 0.0
    a = math.radians(angle)
    R = np.array([[scale * math.cos(a), -scale * math.sin(a), 0.0],
                  [scale * math.sin(a), scale * math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    T0 = np.array([[1.0, 0, -c], [0, 1.0, -c], [0, 0, 1.0]])
    T1 = np.array([[1.0, 0, c + shift[0]], [0, 1.0, c + shift[1]], [0, 0, 1.0]])
    return (T1 @ R @ T0 @ Fm)[:2]


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


def true_points(M: np.ndarray, grid: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """(h*w,) complex: where each sketch cell's centre came from in the photo, in cell
    units (x + iy); NaN where that point lies outside the photo. `size` = (W, H)."""
    h, w = int(grid[0]), int(grid[1])
    W, H = float(size[0]), float(size[1])
    r, c = np.divmod(np.arange(h * w), w)
    q = np.stack([(c + 0.5) * W / w, (r + 0.5) * H / h, np.ones(h * w)], 0)
    p = (np.linalg.inv(np.vstack([M, [0, 0, 1]])) @ q)[:2]
    ok = (p[0] >= 0) & (p[0] < W) & (p[1] >= 0) & (p[1] < H)
    z = p[0] / (W / w) + 1j * p[1] / (H / h)
    return np.where(ok, z, np.nan + 0j)


def true_cells(M: np.ndarray, grid: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """(h*w,) int: for each sketch cell, the photo cell its centre came from under M
    (photo -> sketch), -1 where that point lies outside the photo. `size` = (W, H)."""
    w = int(grid[1])
    z = true_points(M, grid, size)
    ok = ~np.isnan(z.real)
    zz = np.where(ok, z, 0)
    return np.where(ok, np.floor(zz.imag).astype(int) * w + np.floor(zz.real).astype(int), -1)


# ----------------------------------------------------------------------------- pairs
def random_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """A training map: rotation +-20 deg, scale 0.5-2 (log-uniform), shift +-20 %, mirror 1/2."""
    return affine_matrix(size, angle=float(rng.uniform(-20, 20)), scale=float(np.exp(rng.uniform(-0.69, 0.69))),
                         shift=rng.uniform(-0.2, 0.2, 2) * size, flip=bool(rng.random() < 0.5))


def rough_edges(photo: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """An edge map unlike the library's: random blur and thresholds, some fragments
    dropped, random line width; the same fit-and-pad geometry as `preprocess_photo`."""
    import cv2

    from sbir_core.data.preprocess import fit_photo, pad_square

    g = cv2.GaussianBlur(np.asarray(fit_photo(photo, size).convert("L")), (0, 0), float(rng.uniform(1.0, 2.5)))
    med = float(np.median(g))
    e = cv2.Canny(g, int(rng.uniform(0.4, 0.8) * med), int(rng.uniform(1.2, 1.8) * med) or 100)
    n, lab, stats, _ = cv2.connectedComponentsWithStats((e > 0).astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = (stats[1:, cv2.CC_STAT_AREA] >= 15) & (rng.random(n - 1) > 0.2)
    k = int(rng.integers(2, 4))
    e = cv2.dilate((keep[lab] * 255).astype(np.uint8), np.ones((k, k), np.uint8))
    return pad_square(Image.fromarray(255 - e).convert("RGB"), size)


def fill_drawing(sketch: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A rendered drawing as a clip-art picture: each closed region a colour (most inner
    regions one main colour), the outside white, the lines dark: pixel-aligned with it."""
    from scipy import ndimage

    g = np.asarray(sketch.convert("L"))
    regions, n = ndimage.label(g >= 160)
    border = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    palette = rng.integers(0, 256, size=(n + 1, 3))
    base = palette[rng.integers(1, n + 1)] if n else np.array([128, 128, 128])
    for r in range(1, n + 1):
        if rng.random() < 0.6:
            palette[r] = np.clip(base + rng.integers(-25, 26, 3), 0, 255)
    palette[border] = 255
    out = palette[regions].astype(np.float32)
    a = (1 - g.astype(np.float32) / 255.0)[..., None]
    out = out * (1 - a) + np.array(rng.integers(0, 70, 3), np.float32) * a
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def photo_pair(photo: Image.Image, size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """(drawing, picture, M): the preprocessed photo and its edge map moved by M."""
    from sbir_core.data.preprocess import photo_to_edges, preprocess_photo

    edges = photo_to_edges(photo, size) if rng.random() < 0.5 else rough_edges(photo, size, rng)
    M = random_map(rng, size)
    return warp_image(edges, M), preprocess_photo(photo, size), M


def doodle_pair(strokes: list, size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image, np.ndarray]:
    """(drawing, picture, M): a rendered doodle moved by M, and its colour fill."""
    from sbir_core.data.preprocess import preprocess_sketch

    sk = preprocess_sketch(strokes, size, line_width=float(rng.uniform(2.0, 5.0)))
    M = random_map(rng, size)
    return warp_image(sk, M), fill_drawing(sk, rng), M


# ----------------------------------------------------------------------------- loss
def pair_targets(sketches: Sequence[Image.Image], Ms: Sequence[np.ndarray], grid: tuple[int, int],
                 size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) bool rows to train (inked cells whose truth is inside the picture) and
    (B, N, N) soft targets over picture cells (a Gaussian of TARGET_SIGMA cells)."""
    from sbir_core.explain.appearance import cell_xy
    from sbir_core.models.relation import ink_cells

    centres = cell_xy(grid)
    rows, targets = [], []
    for sk, M in zip(sketches, Ms):
        z = true_points(M, grid, (size, size))
        ok = ~np.isnan(z.real) & ink_cells(sk, grid).reshape(-1)
        d2 = np.abs(np.where(ok, z, 0)[:, None] - centres[None]) ** 2
        t = np.exp(-d2 / (2 * TARGET_SIGMA ** 2))
        rows.append(ok)
        targets.append(t / t.sum(1, keepdims=True))
    return torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(targets).astype(np.float32))


def correspondence_loss(s: torch.Tensor, p: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of each trained drawing cell over the picture's cells."""
    logits = torch.einsum("bnd,bmd->bnm", s, p) / TAU
    ce = -(targets * F.log_softmax(logits, -1)).sum(-1)
    return ce[rows].mean() if rows.any() else logits.sum() * 0


def cell_accuracy(s: torch.Tensor, p: torch.Tensor, rows: torch.Tensor, sketches_truth: Sequence[np.ndarray],
                  grid: tuple[int, int]) -> float:
    """Share of trained drawing cells whose most similar picture cell is within one cell
    (Chebyshev) of the truth: the benchmark's PCK of the plain nearest neighbour."""
    w = grid[1]
    best = torch.einsum("bnd,bmd->bnm", s, p).argmax(-1).numpy()
    good = tot = 0
    for b, truth in enumerate(sketches_truth):
        r = rows[b].numpy()
        t, q = truth[r], best[b][r]
        good += int(((np.abs(q // w - t // w) <= 1) & (np.abs(q % w - t % w) <= 1)).sum())
        tot += int(r.sum())
    return good / max(tot, 1)


# ----------------------------------------------------------------------------- the run
def split_items(data_root: Path, seed: int) -> dict[str, list]:
    """Training photos and doodles, and the selection ones (a seeded tenth of the classes)."""
    from sbir_core.data.datasets import training_items

    items = training_items(data_root)
    labels = sorted({it.label for it in items})
    rng = np.random.default_rng(seed)
    val = set(rng.choice(labels, max(1, int(VAL_CLASS_FRACTION * len(labels))), replace=False).tolist())
    out = {"train_photo": [], "train_doodle": [], "val_photo": [], "val_doodle": []}
    for it in items:
        kind = "photo" if it.modality == "photo" else "doodle"
        out[("val_" if it.label in val else "train_") + kind].append(it)
    out["val_classes"] = sorted(val)
    return out


def make_pairs(items: Sequence, n: int, size: int, rng: np.random.Generator, kind: str) -> tuple[list, list, list]:
    sketches, pictures, Ms = [], [], []
    for i in rng.choice(len(items), n, replace=len(items) < n):
        try:
            raw = items[int(i)].load()
            sk, pic, M = (photo_pair(raw.convert("RGB"), size, rng) if kind == "photo"
                          else doodle_pair(raw, size, rng))
        except Exception:  # an unreadable photo or a blank doodle: take another next step
            continue
        sketches.append(sk)
        pictures.append(pic)
        Ms.append(M)
    return sketches, pictures, Ms


def encode_pool(encoder, sketches: Sequence[Image.Image], pictures: Sequence[Image.Image], Ms: Sequence[np.ndarray],
                chunk: int = 32) -> dict:
    """The frozen backbone's maps of a pool of pairs, computed once (fp16) with their
    targets: the head then trains for many epochs at a fraction of the cost."""
    from sbir_core.models.correspondence_head import HEAD_BLOCKS, backbone_maps

    size = int(encoder.image_size)
    out: dict = {"s": [], "p": []}
    with torch.no_grad():
        for key, imgs in (("s", sketches), ("p", pictures)):
            parts = [backbone_maps(encoder, torch.stack([encoder.to_tensor(im) for im in imgs[i:i + chunk]]),
                                   HEAD_BLOCKS) for i in range(0, len(imgs), chunk)]
            out[key] = [torch.cat([pt[j] for pt in parts]).half().contiguous() for j in range(len(HEAD_BLOCKS))]
    grid = tuple(int(v) for v in out["s"][2].shape[2:])
    out["rows"], out["targets"] = pair_targets(sketches, Ms, grid, size)
    out["truth"] = np.stack([true_cells(M, grid, (size, size)) for M in Ms])
    out["grid"] = grid
    return out


def build_pool(encoder, items: Sequence, n: int, rng: np.random.Generator, kind: str, chunk: int = 64,
               log: Callable[[str], None] = print) -> dict:
    """`n` pairs of one kind, encoded in chunks (bounded memory for the images)."""
    size = int(encoder.image_size)
    pools = []
    while sum(len(p["truth"]) for p in pools) < n:
        sk, pic, Ms = make_pairs(items, min(chunk, n - sum(len(p["truth"]) for p in pools)), size, rng, kind)
        if sk:
            pools.append(encode_pool(encoder, sk, pic, Ms))
            log(f"  {kind} pairs: {sum(len(p['truth']) for p in pools)}/{n}")
    return merge_pools(pools)


def merge_pools(pools: Sequence[dict]) -> dict:
    return {"s": [torch.cat([p["s"][j] for p in pools]) for j in range(len(pools[0]["s"]))],
            "p": [torch.cat([p["p"][j] for p in pools]) for j in range(len(pools[0]["p"]))],
            "rows": torch.cat([p["rows"] for p in pools]), "targets": torch.cat([p["targets"] for p in pools]),
            "truth": np.concatenate([p["truth"] for p in pools]), "grid": pools[0]["grid"]}


def _run_head(head, pool: dict, idx) -> tuple[torch.Tensor, torch.Tensor]:
    return (head([m[idx].float() for m in pool["s"]], pool["grid"]),
            head([m[idx].float() for m in pool["p"]], pool["grid"]))


def train_head(data_root: Path, out: Path, encoder: Any, pairs: int = 4000, epochs: int = 12, batch: int = 32,
               lr: float = 2e-3, seed: int = 0, state: Optional[Path] = None, n_val: int = 200,
               log: Callable[[str], None] = print) -> dict:
    """Build (or load from `state`.pool) the pair pool, train (or resume from `state`)
    and write the best selection checkpoint to `out`. Half the pairs are photos against
    their edge maps, half doodles against their fill."""
    from sbir_core.models.correspondence_head import CorrespondenceHead, save_head

    torch.manual_seed(seed)
    pool_file = Path(str(state) + ".pool") if state is not None else None
    if pool_file is not None and pool_file.is_file():
        pools = torch.load(pool_file, weights_only=False)
        log(f"loaded the pair pool from {pool_file}")
    else:
        data = split_items(data_root, seed)
        log(f"train {len(data['train_photo'])} photos, {len(data['train_doodle'])} doodles; "
            f"selection classes {len(data['val_classes'])}")
        rng = np.random.default_rng(seed)
        pools = {"train": merge_pools([build_pool(encoder, data["train_photo"], pairs // 2, rng, "photo", log=log),
                                       build_pool(encoder, data["train_doodle"], pairs - pairs // 2, rng, "doodle",
                                                  log=log)]),
                 "val": merge_pools([build_pool(encoder, data["val_photo"], n_val // 2, rng, "photo", log=log),
                                     build_pool(encoder, data["val_doodle"], n_val // 2, rng, "doodle", log=log)]),
                 "val_classes": data["val_classes"]}
        if pool_file is not None:
            torch.save(pools, pool_file)
    tr, va = pools["train"], pools["val"]
    grid = tr["grid"]
    head = CorrespondenceHead([m.shape[1] for m in tr["s"]])
    n = len(tr["truth"])
    steps = epochs * (n // batch)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)  # linear warm-up, then cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    step, best, history = 0, -1.0, []
    if state is not None and Path(state).is_file():
        ck = torch.load(state, weights_only=False)
        head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step, best, history = ck["step"], ck["best"], ck["history"]
        log(f"resumed at step {step} (best selection accuracy {best:.3f})")
    t0 = time.perf_counter()
    per_epoch = n // batch
    while step < steps:
        head.train()
        order = torch.from_numpy(np.random.default_rng([seed, step // per_epoch]).permutation(n))
        idx = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        s, p = _run_head(head, tr, idx)
        loss = correspondence_loss(s, p, tr["rows"][idx], tr["targets"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % per_epoch == 0 or step == steps:
            head.eval()
            with torch.no_grad():
                vi = torch.arange(len(va["truth"]))
                acc = cell_accuracy(*_run_head(head, va, vi), va["rows"], list(va["truth"]), grid)
            history.append({"step": step, "loss": round(float(loss.detach()), 4), "selection_accuracy": round(acc, 4)})
            log(f"epoch {step // per_epoch}/{epochs} (step {step}/{steps}) loss {float(loss.detach()):.3f} "
                f"selection accuracy {acc:.3f} ({time.perf_counter() - t0:.0f} s)")
            if acc > best:
                best = acc
                save_head(out, head, {"encoder_id": encoder.encoder_id, "step": step, "selection_accuracy": acc,
                                      "selection_classes": pools["val_classes"], "seed": seed, "pairs": n,
                                      "epochs": epochs, "grid": list(grid)})
            if state is not None:
                torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "step": step, "best": best, "history": history}, state)
    return {"best_selection_accuracy": best, "history": history, "out": str(out)}
