"""Gallery diffusion: database-side augmentation (DBA) and alpha query expansion (aQE).

Both are unsupervised (no labels) and standard in instance retrieval: each gallery
embedding is replaced by a similarity-weighted mean of its k nearest gallery
neighbours, and each query is expanded with its top-k diffused results. For
sketch->photo retrieval this matters more than usual: after one expansion the
query is partly made of *photo* embeddings, which bridges the modality gap.

The number of neighbours is a property of the trained model, chosen on held-out
training classes (never on benchmark classes) and stored in the checkpoint. Searches
keep the first results plain (`gallery.index.PLAIN_HEAD`): diffusion raises precision
down the list but can push a query's one correct match out of the first row.
"""
from __future__ import annotations

import numpy as np

ALPHA = 3.0  # weights are similarity**ALPHA: near neighbours dominate


def _weighted_mean(base: np.ndarray, scores: np.ndarray, idx: np.ndarray, self_vec: np.ndarray | None) -> np.ndarray:
    w = np.clip(scores, 0, None) ** ALPHA
    out = (w[..., None] * base[idx]).sum(1)
    if self_vec is not None:
        out = out + self_vec
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def diffuse_gallery(embeddings: np.ndarray, scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """DBA: (N, D) normalised embeddings and their k-NN within the gallery (self included)."""
    return _weighted_mean(embeddings, scores, idx, None)


def expand_queries(queries: np.ndarray, gallery: np.ndarray, scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """aQE: each query plus the weighted mean of its top-k (diffused) gallery items."""
    return _weighted_mean(gallery, scores, idx, queries)
