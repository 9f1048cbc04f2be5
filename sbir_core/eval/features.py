"""Frozen-backbone features, computed once per item and cached on disk.

Training the heads (and the relation network) and evaluation run on these caches,
which is what makes them take minutes on a 2-core CPU: the backbone never runs twice
on the same image and view. The cache is keyed per item (its resolved file path, plus
the drawing's line for strokes) within a folder per backbone, view and seed, so a new
selection of images reuses every feature already extracted, whatever spelling of the
data root listed them. Each extraction adds a chunk of rows; later chunks win.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
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


def item_key(it: Item) -> str:
    """A cache key that does not depend on how the data root was spelled."""
    path, sep, rest = it.key.partition("#")
    return os.path.realpath(path) + sep + rest


def store_dir(cache_dir: Path, backbone: str, view: str, seed: int) -> Path:
    return cache_dir / f"{backbone.replace(':', '_').replace('/', '_')}-{view}-s{seed}"


def _item_rng(seed: int, key: str) -> np.random.Generator:
    # Augmented views draw from a per-item generator, so an item's view does not depend
    # on which other items were extracted with it.
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")])


def _read_store(d: Path, keys: Sequence[str], tokens: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows of `keys` found in the store folder `d` -> ({name: (n, ...) arrays}, found mask)."""
    n = len(keys)
    want = {k: i for i, k in enumerate(keys)}
    found = np.zeros(n, bool)
    out: dict[str, np.ndarray] = {}
    for chunk in sorted(d.glob("chunk-*"), reverse=True):  # newest first
        if not (chunk / "keys.json").is_file() or (tokens and not (chunk / "tokens.npy").is_file()):
            continue
        ckeys = json.loads((chunk / "keys.json").read_text())
        pairs = [(want[k], r) for r, k in enumerate(ckeys) if k in want and not found[want[k]]]
        if not pairs:
            continue
        dst, src = (np.array(x) for x in zip(*pairs))
        names = ["pooled", "raw", "ok"] + (["tokens"] if tokens else [])
        for name in names:
            a = np.load(chunk / f"{name}.npy", mmap_mode="r")
            if name not in out:
                out[name] = np.zeros((n, *a.shape[1:]), a.dtype)
            out[name][dst] = a[np.sort(src)][np.argsort(np.argsort(src))]
        if tokens and "grid" not in out:
            out["grid"] = np.load(chunk / "grid.npy")
        found[dst] = True
        if found.all():
            break
    return out, found


def _write_chunk(d: Path, keys: Sequence[str], arrays: dict[str, np.ndarray]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    (tmp / "keys.json").write_text(json.dumps(list(keys)))
    for name, a in arrays.items():
        np.save(tmp / f"{name}.npy", a)
    os.replace(tmp, d / f"chunk-{time.time_ns():020d}")


def extract_features(
    encoder: SBIREncoder,
    items: Sequence[Item],
    view: str,
    seed: int = 0,
    tokens: bool = False,
    cache_dir: Union[str, Path, None] = None,
    batch_size: int = 32,
    desc: Optional[str] = None,
    allow_extract: bool = True,
) -> dict[str, np.ndarray]:
    """Backbone features of `items` under `view`: {'pooled', 'raw'[, 'tokens', 'grid'], 'ok'}.
    Items already in the cache are read from it; only the others are extracted
    (FileNotFoundError instead when `allow_extract` is False).

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
    d = store_dir(cache_dir, bb_key, view, seed)
    keys = [item_key(it) for it in items]
    cached, found = _read_store(d, keys, tokens) if d.is_dir() else ({}, np.zeros(len(items), bool))
    if found.all() and len(items):
        return cached
    if not allow_extract:
        raise FileNotFoundError(f"{int((~found).sum())} of {len(items)} items have no cached {view} features in {d}")
    todo = np.flatnonzero(~found)
    fn = VIEWS[view]
    size = encoder.image_size
    bb = encoder.backbone
    n = len(todo)
    pooled = np.zeros((n, bb.pooled_dim), np.float16)
    raw = np.zeros((n, bb.raw_dim), np.float16)
    ok = np.zeros(n, bool)
    tok = None
    grid = None
    for start in tqdm(range(0, n, batch_size), desc=desc or f"{view} features", unit="batch", leave=False):
        idx, tensors = [], []
        for i in range(start, min(n, start + batch_size)):
            it = items[todo[i]]
            try:
                tensors.append(encoder.to_tensor(fn(it, size, _item_rng(seed, keys[todo[i]]))))
                idx.append(i)
            except Exception as exc:  # a corrupt file must not end a long extraction
                log.warning("skipping %s: %s", it.key, exc)
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
    new = {"pooled": pooled, "raw": raw, "ok": ok}
    if tokens:
        if tok is None:  # nothing decoded: an empty token grid of the right shape
            f = encoder.backbone_features(torch.zeros(1, 3, size, size))
            grid, tok = f.grid, np.zeros((n, f.tokens.shape[1], f.tokens.shape[2]), np.float16)
        new["tokens"] = tok
    if n:
        _write_chunk(d, [keys[i] for i in todo], {**new, **({"grid": np.array(grid)} if tokens else {})})
    if not found.any():
        return {**new, **({"grid": np.array(grid)} if tokens else {})}
    out = {k: np.zeros((len(items), *v.shape[1:]), v.dtype) for k, v in new.items()}
    for k in out:
        out[k][found] = cached[k][found]
        out[k][todo] = new[k]
    if tokens:
        out["grid"] = cached.get("grid", np.array(grid))
    return out
