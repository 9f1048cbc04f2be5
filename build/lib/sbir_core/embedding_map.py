"""A 2-D t-SNE map of a gallery, with new queries placed into it.

`fit_map(embeddings, labels)` runs openTSNE once (at gallery build time) and keeps
what placing new points needs: the map coordinates and the reference embeddings.
`EmbeddingMap.place(queries)` then positions a query sketch in the existing map
with openTSNE's own `TSNEEmbedding.transform` (the reference points stay fixed), so
the map never has to be recomputed per search.

Storage (`save(dir)`): `embedding_map.npz` (coords, the reference data t-SNE saw:
normalised embeddings, or above 2000 points their 50-d PCA projection plus the PCA
mean/components) and `embedding_map.json` (labels, parameters). No pickle: loading
is two file reads; the openTSNE objects `place` needs are rebuilt on the fly
(exact brute-force kNN against the reference, fast for the ~10k points a gallery
map is for). Timings on the shared 2-core CPU: ~1-2 s to fit 400 points, ~1.5 min
for 10k; placing a query ~0.1 s (400) / ~0.5 s (10k).

Typical use::

    m = fit_map(gallery_embeddings, gallery_labels)        # build time
    m.save(gallery_dir)
    m = EmbeddingMap.load(gallery_dir)                       # search time
    q = m.place(query_embedding[None])                       # (1, 2)
    img = m.render(query_xy=q[0], highlight=top_k_indices)   # PIL image
    data = m.to_plot_data(query_xy=q[0], highlight=top_k_indices)  # JSON for the app
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

MAP_NPZ = "embedding_map.npz"
MAP_JSON = "embedding_map.json"
FORMAT_VERSION = 1
# Maps with fewer points than this skip t-SNE (perplexity needs neighbours).
MIN_TSNE_POINTS = 8
# Above this many points, t-SNE runs on a PCA_DIMS-d PCA projection of the embeddings.
PCA_ABOVE_POINTS = 2000
PCA_DIMS = 50


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {x.shape}")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _perplexity(n: int, wanted: float) -> float:
    # openTSNE needs 3 * perplexity neighbours; keep it sensible for small maps.
    return float(max(2.0, min(wanted, (n - 1) / 3.0)))


# ----------------------------------------------------------------------------- openTSNE glue
def _reference_affinities(reference: np.ndarray, perplexity: float, metric: str = "cosine"):
    """An openTSNE `Affinities` whose `to_new` does exact kNN against `reference`
    (cosine on normalised embeddings, or euclidean on their PCA projection).

    It is all `TSNEEmbedding.transform` needs; building it costs nothing (no kNN graph
    of the reference set is recomputed, unlike constructing `PerplexityBasedNN`).
    """
    import scipy.sparse as sp
    from openTSNE.affinity import Affinities, joint_probabilities_nn
    from openTSNE.nearest_neighbors import KNNIndex

    class _Brute(KNNIndex):
        VALID_METRICS = ["cosine", "euclidean"]

        def build(self):  # pragma: no cover - never needed for placement
            raise NotImplementedError

        def query(self, query, k):
            q = np.asarray(query, dtype=np.float32)
            if self.metric == "cosine":
                d = 1.0 - q @ self.data.T  # rows are unit vectors (like openTSNE's metric="cosine")
            else:
                d = np.sqrt(np.maximum((q * q).sum(1, keepdims=True) - 2 * q @ self.data.T
                                       + (self.data * self.data).sum(1)[None], 0))
            k = min(k, self.n_samples)
            idx = np.argpartition(d, k - 1, axis=1)[:, :k] if k < self.n_samples else np.tile(
                np.arange(self.n_samples), (len(q), 1))
            dk = np.take_along_axis(d, idx, axis=1)
            order = np.argsort(dk, axis=1, kind="stable")
            idx = np.take_along_axis(idx, order, axis=1)
            dk = np.maximum(np.take_along_axis(dk, order, axis=1), 0.0)
            return idx.astype(np.int64), dk.astype(np.float64)

    class _Reference(Affinities):
        def __init__(self) -> None:
            super().__init__()
            self.knn_index = _Brute(reference, k=min(len(reference), int(3 * perplexity)), metric=metric)
            self.perplexity = perplexity
            self.n_jobs = 1
            # TSNEEmbedding only checks P's shape; the reference points never move.
            self.P = sp.csr_matrix((len(reference), len(reference)))

        def to_new(self, data, perplexity=None, return_distances=False, k_neighbors="auto"):
            perplexity = self.perplexity if perplexity is None else perplexity
            k = min(self.n_samples, int(3 * perplexity)) if k_neighbors == "auto" else int(k_neighbors)
            perplexity = min(perplexity, k / 3.0)
            neighbors, distances = self.knn_index.query(data, k)
            P = joint_probabilities_nn(neighbors, distances, [perplexity], symmetrize=False,
                                       normalization="point-wise", n_reference_samples=self.n_samples,
                                       n_jobs=1)
            return (P, neighbors, distances) if return_distances else P

    return _Reference()


def _pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (k, D)) of x, via the D x D covariance (fast for N >> D)."""
    mean = x.mean(0)
    c = x - mean
    cov = (c.T @ c) / max(len(x) - 1, 1)
    w, v = np.linalg.eigh(cov.astype(np.float64))
    comp = v[:, ::-1][:, :k].T.astype(np.float32)
    return mean.astype(np.float32), comp


# ----------------------------------------------------------------------------- the map
class EmbeddingMap:
    """2-D coordinates of a gallery plus what is needed to place new points."""

    def __init__(
        self,
        coords: np.ndarray,
        reference: np.ndarray,
        labels: Optional[Sequence[str]] = None,
        perplexity: float = 30.0,
        seed: int = 0,
        projection: Optional[tuple[np.ndarray, np.ndarray]] = None,
    ) -> None:
        """coords (N, 2); reference (N, d): the data t-SNE saw (normalised embeddings,
        or their PCA projection when `projection` = (mean (D,), components (d, D)))."""
        self.coords = np.asarray(coords, dtype=np.float32)
        self.projection = None if projection is None else (np.asarray(projection[0], np.float32),
                                                            np.asarray(projection[1], np.float32))
        self.reference = _normalize(reference) if self.projection is None else np.asarray(reference, np.float32)
        if len(self.coords) != len(self.reference):
            raise ValueError(f"{len(self.coords)} coordinates for {len(self.reference)} embeddings")
        self.labels: Optional[list[str]] = None if labels is None else [str(x) for x in labels]
        if self.labels is not None and len(self.labels) != len(self.coords):
            raise ValueError(f"{len(self.labels)} labels for {len(self.coords)} points")
        self.perplexity = float(perplexity)
        self.seed = int(seed)
        self._affinities = None  # openTSNE affinities against the reference, built on first place()

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def dim(self) -> int:
        """Dimension of the embeddings the map takes (before any projection)."""
        return int(self.projection[1].shape[1] if self.projection is not None else self.reference.shape[1])

    @property
    def metric(self) -> str:
        return "cosine" if self.projection is None else "euclidean"

    def _prepare(self, embeddings: np.ndarray) -> np.ndarray:
        x = _normalize(embeddings)
        if x.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dimension {x.shape[1]}, the map was built on {self.dim}")
        if self.projection is not None:
            mean, comp = self.projection
            x = (x - mean) @ comp.T
        return x.astype(np.float32)

    # ---- placing queries
    def _embedding(self):
        """A fresh openTSNE TSNEEmbedding over a copy of the coordinates: openTSNE's
        Barnes-Hut tree for partial embeddings moves the reference array in place,
        so each placement gets its own copy (construction is free)."""
        from openTSNE import TSNEEmbedding

        if self._affinities is None:
            self._affinities = _reference_affinities(self.reference, self.perplexity, self.metric)
        return TSNEEmbedding(self.coords.astype(np.float64), self._affinities, random_state=self.seed,
                             negative_gradient_method="bh", n_jobs=1)

    def place(self, query_embeddings: np.ndarray) -> np.ndarray:
        """(Q, D) embeddings (same space as the gallery's) -> (Q, 2) map coordinates."""
        q = self._prepare(query_embeddings)
        if len(self) < MIN_TSNE_POINTS:
            return self._place_by_neighbours(q)
        emb = self._embedding()
        # Median of the 10 nearest reference points, then openTSNE's optimisation of
        # the new points only (reference fixed). Low perplexity keeps a query close to
        # the points it really resembles.
        k_init = int(min(10, len(self)))
        before = np.asarray(emb).copy()
        otl = logging.getLogger("openTSNE")
        level = otl.level
        otl.setLevel(logging.WARNING)  # it logs an INFO line per call about the initialisation
        try:
            out = np.asarray(emb.transform(q.astype(np.float64), perplexity=min(5.0, self.perplexity), k=k_init,
                                           n_iter=100 if len(self) <= 2000 else 50,
                                           early_exaggeration_iter=0))
        finally:
            otl.setLevel(level)
        # transform() recentres the reference map in place (bounding-box centre at 0):
        # shift the result back into this map's frame.
        out = out + (before - np.asarray(emb)).mean(0)
        return out.astype(np.float32)

    def _place_by_neighbours(self, q: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            sim = q @ self.reference.T
        else:
            sim = -np.linalg.norm(q[:, None] - self.reference[None], axis=2) / 2
        w = np.exp((sim - sim.max(1, keepdims=True)) / 0.05)
        w /= w.sum(1, keepdims=True)
        return (w @ self.coords).astype(np.float32)

    # ---- persistence
    def save(self, directory: Union[str, Path]) -> Path:
        """Write `embedding_map.npz` + `embedding_map.json` into `directory` (atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (MAP_NPZ + ".tmp.npz")
        arrays = {"coords": self.coords, "reference": self.reference.astype(np.float32)}
        if self.projection is not None:
            arrays.update(pca_mean=self.projection[0], pca_components=self.projection[1])
        np.savez(tmp, **arrays)
        os.replace(tmp, d / MAP_NPZ)
        meta = {"format_version": FORMAT_VERSION, "n": len(self), "dim": self.dim,
                "perplexity": self.perplexity, "seed": self.seed, "metric": self.metric,
                "labels": self.labels}
        tmpj = d / (MAP_JSON + ".tmp")
        tmpj.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmpj, d / MAP_JSON)
        return d

    @classmethod
    def exists(cls, directory: Union[str, Path]) -> bool:
        d = Path(directory)
        return (d / MAP_NPZ).is_file() and (d / MAP_JSON).is_file()

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "EmbeddingMap":
        d = Path(directory)
        if not cls.exists(d):
            raise FileNotFoundError(f"no embedding map in {d} (expected {MAP_NPZ} and {MAP_JSON}); "
                                    "rebuild the gallery to create one")
        meta = json.loads((d / MAP_JSON).read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"embedding map in {d} has format {meta.get('format_version')}, "
                             f"this code reads {FORMAT_VERSION}: rebuild the gallery")
        with np.load(d / MAP_NPZ) as z:
            coords, reference = z["coords"], z["reference"]
            projection = (z["pca_mean"], z["pca_components"]) if "pca_components" in z.files else None
        return cls(coords, reference, labels=meta.get("labels"), perplexity=meta["perplexity"], seed=meta["seed"],
                   projection=projection)

    # ---- output for the app
    def to_plot_data(self, query_xy: Optional[np.ndarray] = None,
                     highlight: Optional[Sequence[int]] = None) -> dict[str, Any]:
        """JSON-able dict: {'points': [{x, y, label, index}], 'query': {x, y} | None,
        'highlight': [indices], 'classes': [sorted labels], 'bounds': [xmin, xmax, ymin, ymax]}."""
        labels = self.labels or [""] * len(self)
        pts = [{"x": float(x), "y": float(y), "label": lab, "index": i}
               for i, ((x, y), lab) in enumerate(zip(self.coords.tolist(), labels))]
        query = None
        if query_xy is not None:
            qa = np.asarray(query_xy, dtype=np.float64).reshape(-1, 2)
            query = [{"x": float(x), "y": float(y)} for x, y in qa]
            query = query[0] if len(query) == 1 else query
        lo = self.coords.min(0) if len(self) else np.zeros(2)
        hi = self.coords.max(0) if len(self) else np.zeros(2)
        return {
            "points": pts,
            "query": query,
            "highlight": [int(i) for i in (highlight if highlight is not None else [])],
            "classes": sorted(set(self.labels)) if self.labels else [],
            "bounds": [float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])],
        }

    def render(self, query_xy: Optional[np.ndarray] = None, highlight: Optional[Sequence[int]] = None,
               size: tuple[int, int] = (640, 640), title: Optional[str] = None) -> Image.Image:
        """The map as a PIL image of exactly `size` pixels: points coloured by class,
        `highlight` (e.g. the top-k results) ringed, the query(s) drawn as a star."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        dpi = 100
        fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 if title is None else 0.90))
        ax.set_xticks([])
        ax.set_yticks([])
        xy = self.coords
        s = float(np.clip(4000.0 / max(len(self), 1), 3, 40))
        if self.labels:
            classes = sorted(set(self.labels))
            cmap = matplotlib.colormaps["tab20" if len(classes) > 10 else "tab10"]
            idx = {c: i for i, c in enumerate(classes)}
            colors = [cmap(idx[lab] % cmap.N) for lab in self.labels]
            ax.scatter(xy[:, 0], xy[:, 1], c=colors, s=s, linewidths=0, alpha=0.85)
            if len(classes) <= 20:
                from matplotlib.lines import Line2D

                handles = [Line2D([], [], marker="o", ls="", color=cmap(i % cmap.N), label=c)
                           for i, c in enumerate(classes)]
                ax.legend(handles=handles, loc="best", fontsize=7, framealpha=0.7, markerscale=0.8)
        else:
            ax.scatter(xy[:, 0], xy[:, 1], c="#4477aa", s=s, linewidths=0, alpha=0.8)
        if highlight is not None and len(highlight):
            h = np.asarray(highlight, dtype=int)
            ax.scatter(xy[h, 0], xy[h, 1], s=s * 4 + 30, facecolors="none", edgecolors="black", linewidths=1.5,
                       label="results")
            for rank, i in enumerate(h[:10]):
                ax.annotate(str(rank + 1), xy[i], fontsize=7, xytext=(3, 3), textcoords="offset points")
        if query_xy is not None:
            q = np.asarray(query_xy, dtype=np.float64).reshape(-1, 2)
            ax.scatter(q[:, 0], q[:, 1], marker="*", s=400, c="gold", edgecolors="black", linewidths=1.2, zorder=5)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.canvas.draw()
        img = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
        if img.size != tuple(size):
            img = img.resize(tuple(size), Image.Resampling.BICUBIC)
        return img


def fit_map(embeddings: np.ndarray, labels: Optional[Sequence[str]] = None, seed: int = 0,
            perplexity: float = 30.0, n_jobs: int = 1, n_iter: Optional[int] = None) -> EmbeddingMap:
    """t-SNE map of (N, D) embeddings (cosine metric), N from a handful to ~10k.

    A few seconds for ~400 points on a 2-core CPU (Barnes-Hut, fewer iterations for
    small maps); above 2000 points a 50-d PCA first and FFT interpolation (~1 min for
    10k points). `n_iter` (default 350 up to 2000 points, else 500) counts the
    iterations after early exaggeration.
    """
    x = _normalize(embeddings)
    n = len(x)
    if n == 0:
        raise ValueError("cannot map an empty gallery")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} embeddings")
    perp = _perplexity(n, perplexity)
    if n < MIN_TSNE_POINTS:
        coords = _pca2(x) * 10.0
        return EmbeddingMap(coords, x, labels, perplexity=perp, seed=seed)
    from openTSNE import TSNE

    projection = None
    data, metric = x, "cosine"
    if n > PCA_ABOVE_POINTS and x.shape[1] > PCA_DIMS:
        # Large maps: t-SNE on a 50-d PCA of the normalised embeddings (standard
        # practice; kNN gets ~20x cheaper and the stored reference ~20x smaller).
        projection = _pca(x, PCA_DIMS)
        data, metric = (x - projection[0]) @ projection[1].T, "euclidean"
    tsne = TSNE(
        n_components=2,
        perplexity=perp,
        metric=metric,
        initialization="pca",
        neighbors="exact" if n <= 2000 else "auto",
        negative_gradient_method="bh" if n <= 3000 else "fft",
        n_iter=n_iter if n_iter is not None else (350 if n <= 2000 else 500),
        early_exaggeration_iter=100 if n <= 2000 else 250,
        random_state=seed,
        n_jobs=n_jobs,
        verbose=False,
    )
    emb = tsne.fit(data)
    return EmbeddingMap(np.asarray(emb, dtype=np.float32), data, labels, perplexity=perp, seed=seed,
                        projection=projection)


def _pca2(x: np.ndarray) -> np.ndarray:
    c = x - x.mean(0, keepdims=True)
    if len(x) < 2 or not np.any(c):
        return np.zeros((len(x), 2), np.float32)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    out = c @ vt[:2].T
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out.astype(np.float32)
