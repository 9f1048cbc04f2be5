"""Frozen-backbone features, computed once and cached on disk.

Training the heads (and the relation network) runs on these caches, which is what
makes training on a 2-core CPU take minutes: the backbone never runs twice on the
same image and view. A cache file is named by backbone, view and a hash of the
items, so a changed selection never reads stale features.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sbir_core.data.datasets import Item
from sbir_core.models.encoders import SBIREncoder
from sbir_core.paths import cache_dir
from sbir_core.data.preprocess import edges_as_sketch, photo_to_edges, preprocess_photo, preprocess_sketch

log = logging.getLogger(__name__)

DEFAULT_CACHE = cache_dir() / "features"


def _photo(it: Item, size: int, rng: np.random.Generator) -> Image.Image:
    return preprocess_photo(it.load(), size)


def _edges(it: Item, size: int, rng: np.random.Generator) -> Image.Image:
    return photo_to_edges(it.load(), size)


def _edges_sketch(it: Item, size: int, rng: np.random.Generator) -> Image.Image:
    return edges_as_sketch(it.load(), size)


def _sketch(it: Item, size: int, rng: np.random.Generator) -> Image.Image:
    return preprocess_sketch(it.load(), size)


def _sketch_flip(it: Item, size: int, rng: np.random.Generator) -> Image.Image:
    return preprocess_sketch(it.load(), size).transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _sketch_aug(it: Item, size: int, rng: np.random.Generator) -> Image.Image:
    from sbir_core.data.augment import augment_sketch

    return augment_sketch(it.load(), size, rng)


def _edges_aug(it: Item, size: int, rng: np.random.Generator) -> Image.Image:
    from sbir_core.data.augment import augment_edges

    return augment_edges(photo_to_edges(it.load(), size), size, rng)


# A view is how an item becomes a model input. Augmented views take a seed.
VIEWS: dict[str, Callable[[Item, int, np.random.Generator], Image.Image]] = {
    "photo": _photo,
    "edges": _edges,
    "edges_sketch": _edges_sketch,  # the photo view that edge fusion embeds (encoders.edge_transform)
    "sketch": _sketch,
    "sketch_flip": _sketch_flip,  # the mirror view of test-time flip averaging
    "sketch_aug": _sketch_aug,
    "edges_aug": _edges_aug,
}
# Which modality the encoder sees for each view.
VIEW_MODALITY = {"photo": "photo", "edges": "sketch", "edges_sketch": "sketch", "sketch": "sketch",
                 "sketch_flip": "sketch", "sketch_aug": "sketch", "edges_aug": "sketch"}


def cache_path(cache_dir: Path, backbone: str, view: str, items: Sequence[Item], seed: int, tokens: bool) -> Path:
    h = hashlib.sha256()
    for it in items:
        h.update(it.key.encode())
        h.update(b"\n")
    tag = f"{backbone.replace(':', '_').replace('/', '_')}-{view}-s{seed}{'-tok' if tokens else ''}-{h.hexdigest()[:12]}"
    return cache_dir / f"{tag}.npz"


def extract_features(
    encoder: SBIREncoder,
    items: Sequence[Item],
    view: str,
    seed: int = 0,
    tokens: bool = False,
    cache_dir: Union[str, Path, None] = None,
    batch_size: int = 32,
    desc: Optional[str] = None,
) -> dict[str, np.ndarray]:
    """Backbone features of `items` under `view`: {'pooled', 'raw'[, 'tokens'], 'ok'}.

    'ok' marks items that decoded; failed ones (corrupt file, empty drawing) get
    zeros and ok=False, so callers can drop them without losing alignment.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; known: {sorted(VIEWS)}")
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    # Fine-tuned backbones (and other input sizes) give other features: key on both.
    bb_key = encoder.backbone.name
    if getattr(encoder.backbone, "weights_id", ""):
        bb_key += f"@{encoder.backbone.weights_id}"
    if encoder.image_size != 224:
        bb_key += f"@{encoder.image_size}px"
    path = cache_path(cache_dir, bb_key, view, items, seed, tokens)
    # A cache made with tokens also serves requests without them.
    for candidate in (path, cache_path(cache_dir, bb_key, view, items, seed, True)):
        if candidate.is_file():
            with np.load(candidate) as z:
                return {k: z[k] for k in z.files if tokens or k not in ("tokens", "grid")}
    fn = VIEWS[view]
    size = encoder.image_size
    rng = np.random.default_rng(seed)
    bb = encoder.backbone
    n = len(items)
    pooled = np.zeros((n, bb.pooled_dim), np.float16)
    raw = np.zeros((n, bb.raw_dim), np.float16)
    ok = np.zeros(n, bool)
    tok = None
    grid = None
    for start in tqdm(range(0, n, batch_size), desc=desc or f"{view} features", unit="batch", leave=False):
        idx, tensors = [], []
        for i in range(start, min(n, start + batch_size)):
            try:
                tensors.append(encoder.to_tensor(fn(items[i], size, rng)))
                idx.append(i)
            except Exception as exc:  # a corrupt file must not end a long extraction
                log.warning("skipping %s: %s", items[i].key, exc)
        if not tensors:
            continue
        x = torch.stack(tensors).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            f = encoder.backbone_features(x)
        pooled[idx] = f.pooled.float().numpy()
        raw[idx] = f.raw.float().numpy()
        ok[idx] = True
        if tokens:
            if tok is None:
                grid = f.grid
                tok = np.zeros((n, f.tokens.shape[1], f.tokens.shape[2]), np.float16)
            tok[idx] = f.tokens.float().numpy()
    out = {"pooled": pooled, "raw": raw, "ok": ok}
    if tokens and tok is not None:
        out["tokens"] = tok
        out["grid"] = np.array(grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out
