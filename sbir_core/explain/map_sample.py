"""Which gallery rows the t-SNE map of a big gallery shows.

t-SNE on a million points never finishes (and a million thumbnails would not fit on a
page), so above `MAP_MAX_POINTS` pictures the map is fitted on a sample: deterministic
(the same gallery always gives the same rows, so a cached map stays valid) and
stratified by class (each class keeps its share, so every class still has its island).
Smaller galleries are mapped whole, exactly as before.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from sbir_core.gallery.format import rows_of

# About as many points as t-SNE fits in well under a minute on 2 CPU cores (Barnes-Hut
# up to 3000 points) and a 640-pixel map can show as dots.
MAP_MAX_POINTS = 3000


def label_codes(gallery: Any) -> np.ndarray:
    """(N,) one integer per class for every row of `gallery` ("" is a class too), read as a
    whole Arrow column when the gallery has one, without a Python string per row."""
    table = getattr(gallery.items, "_table", None)
    if table is not None:
        if "label" not in table.column_names:
            return np.zeros(len(gallery), np.int64)
        col = table.column("label").fill_null("").dictionary_encode().combine_chunks()
        return np.asarray(col.indices, dtype=np.int64)
    _, codes = np.unique(np.asarray(list(gallery.labels), dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64).reshape(-1)


def sample_rows(codes: np.ndarray, max_points: int = MAP_MAX_POINTS, seed: int = 0) -> np.ndarray:
    """Sorted gallery rows, at most `max_points`, each class keeping its share of them
    (largest remainders get the leftover places); every row when there are few enough."""
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    n, m = len(codes), int(max_points)
    if m < 1:
        raise ValueError(f"a map needs at least one point, got max_points={max_points}")
    if n <= m:
        return np.arange(n, dtype=np.int64)
    counts = np.bincount(codes)
    share = counts * (m / n)
    quota = np.floor(share).astype(np.int64)
    left = m - int(quota.sum())
    # Leftover places to the largest remainders, ties to the lower class code.
    extra = np.lexsort((np.arange(len(counts)), -(share - quota)))[:left]
    quota[extra] += 1
    quota = np.minimum(quota, counts)
    # A seeded shuffle grouped by class: each class's first `quota` rows are its sample.
    perm = np.random.default_rng(seed).permutation(n)
    grouped = perm[np.argsort(codes[perm], kind="stable")]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    picked = [grouped[s:s + q] for s, q in zip(starts, quota) if q]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def sample_of(gallery: Any, max_points: int = MAP_MAX_POINTS) -> tuple[np.ndarray, np.ndarray, Optional[list[str]]]:
    """(rows, their raw embeddings (k, D), their classes or None) of the sample a big
    gallery's map is fitted on; only those rows are read."""
    rows = sample_rows(label_codes(gallery), max_points)
    labels = [str(gallery.labels[int(r)] or "") for r in rows]
    return rows, read_rows(gallery, rows), labels if any(labels) else None


def read_rows(gallery: Any, rows: np.ndarray) -> np.ndarray:
    """(k, D) raw embeddings of `rows`, read by pread from a memory-mapped file: page
    faults on the map would pull read-ahead around every scattered row into RSS."""
    return np.asarray(rows_of(gallery.raw_embeddings)(np.asarray(rows, dtype=np.int64)), np.float32)


def fits(m: Any, gallery: Any, max_points: int = MAP_MAX_POINTS) -> bool:
    """Whether a stored map (`EmbeddingMap`) was fitted on this gallery as `gallery_map`
    fits it: the same size, dimension and (on its first points, through the map's own
    projection) the same embeddings; whole below `max_points` pictures, a sample above."""
    n = min(5, len(m))
    if m.gallery_size != len(gallery) or m.dim != gallery.raw_embeddings.shape[1]:
        return False
    if m.sampled != (len(gallery) > max_points) or len(m) > max_points:
        return False  # e.g. a whole-gallery map from before sampling: too big to draw, fitted again
    return bool(np.allclose(m.reference[:n], m._prepare(read_rows(gallery, m.rows[:n])), atol=1e-4))
