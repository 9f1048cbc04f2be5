"""A 2-D t-SNE map of a gallery, with new queries placed into it.

`fit_map(embeddings, labels)` runs openTSNE once (at gallery build time) and keeps
what placing new points needs: the map coordinates and the reference embeddings.
A query with results is placed by them (`place_by_results`: where most of its best
results sit together), so its star lands with what the search found; without
results, `place(queries)` positions it with openTSNE's own `TSNEEmbedding.transform`
(the reference points stay fixed). Either way the map is never recomputed per search.

A gallery above `MAP_MAX_POINTS` pictures is mapped on a class-stratified sample
(`map_sample`); the map knows each point's gallery row, and places result rows outside
the sample by their embeddings, so highlights and `place_by_results` take any row.

Storage (`save(dir)`): `embedding_map.npz` (coords, the reference data t-SNE saw:
normalised embeddings, or above 2000 points their 50-d PCA projection plus the PCA
mean/components; a sample's gallery rows) and `embedding_map.json` (labels, parameters;
a sample's gallery size). No pickle: loading
is two file reads; the openTSNE objects `place` needs are rebuilt on the fly
(exact brute-force kNN against the reference, fast for the ~10k points a gallery
map is for). Timings on the shared 2-core CPU: ~1-2 s to fit 400 points, ~1.5 min
for 10k; placing a query ~0.1 s (400) / ~0.5 s (10k).

Rendering (`render`, PIL only) is in two layers: a base layer (the gallery as small
thumbnails at their map positions, or dots), built once per size and cached on the
map, thumbnails decoded once per row; and per render, on a copy of it, the title, the
results' frames, the class names (none under the query's star or caption), the star and
rank numbers (`marks()` says where each goes; `map_overlay` draws them): a few ms per
query for a 400-image gallery (~0.2 s the first time, decoding included).

Typical use::

    m = fit_map(gallery_embeddings, gallery_labels)        # build time
    m.save(gallery_dir)
    m = EmbeddingMap.load(gallery_dir)                       # search time
    q = m.place_by_results(top_k_indices)                    # (2,); m.place(emb[None])[0] without
    img = m.render(query_xy=q, highlight=top_k_indices,      # PIL image: the gallery as
                   thumbnails=image_paths)                   # thumbnails, class names, query
    data = m.to_plot_data(query_xy=q, highlight=top_k_indices)  # JSON for the app
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from sbir_core.explain.map_drawing import (BACKGROUND, LABEL_PX, MAX_STRETCH, MapLayout, MapMarks, PALETTE, RENDER_CACHE_ENTRIES, RESULT_MAX_MOVE, RESULT_ZOOM, THUMB_KEEP, ThumbnailSource, UNLABELLED, canvas_size, caption_spot, choose_thumbnails, fit, paste_dot, small_image, spread)
from sbir_core.explain.map_labels import clear_labels, place_labels
from sbir_core.explain.map_overlay import draw_marks
from sbir_core.explain.map_sample import MAP_MAX_POINTS, fits, read_rows, sample_of

log = logging.getLogger(__name__)

MAP_NPZ = "embedding_map.npz"
MAP_JSON = "embedding_map.json"
FORMAT_VERSION = 1
# Maps with fewer points than this skip t-SNE (perplexity needs neighbours).
MIN_TSNE_POINTS = 8
# Above this many points, t-SNE runs on a PCA_DIMS-d PCA projection of the embeddings.
PCA_ABOVE_POINTS = 2000
PCA_DIMS = 50
# A query's star joins the largest group among its STAR_RESULTS best results that sit
# together (within one result's STAR_NEIGHBOURS nearest map points): `place_by_results`.
STAR_RESULTS = 10
STAR_NEIGHBOURS = 5


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


def _pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (k, D)) of x (scikit-learn's PCA)."""
    from sklearn.decomposition import PCA

    p = PCA(n_components=min(k, *x.shape), random_state=0).fit(x)
    return p.mean_.astype(np.float32), p.components_.astype(np.float32)


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
        rows: Optional[np.ndarray] = None,
        gallery_size: Optional[int] = None,
    ) -> None:
        """coords (N, 2); reference (N, d): the data t-SNE saw (normalised embeddings,
        or their PCA projection when `projection` = (mean (D,), components (d, D))).
        A map of a sample of a big gallery (`map_sample`) has each point's gallery row
        (`rows`, ascending) and the gallery's size; else point i is row i. Methods take
        gallery rows; rows outside the sample are placed by their embeddings (`attach`)."""
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
        self.rows = np.arange(len(self.coords), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        self.gallery_size = len(self.coords) if gallery_size is None else int(gallery_size)
        if len(self.rows) != len(self.coords) or np.any(np.diff(self.rows) <= 0) or (
                len(self.rows) and not 0 <= self.rows[0] <= self.rows[-1] < self.gallery_size):
            raise ValueError(f"map rows must be {len(self.coords)} ascending rows of a {self.gallery_size}-row gallery")
        self._source: Optional[tuple[Any, Any]] = None  # (rows -> embeddings, row -> label), from `attach`
        self._affinities = None  # openTSNE affinities against the reference, built on first place()
        # render(): decoded thumbnails (row -> small RGB image) and base layers, built on demand
        self._render_lock = threading.RLock()
        self._render_cache: OrderedDict = OrderedDict()
        self._thumb_small: dict[int, Image.Image] = {}
        self._thumb_source: Any = None

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def sampled(self) -> bool:
        """Whether the map shows only a sample of its gallery's pictures."""
        return self.gallery_size != len(self.coords)

    def attach(self, embeddings_of: Any, label_of: Any) -> None:
        """How to read rows outside the sample: `embeddings_of(rows)` -> (k, D), `label_of(row)`."""
        self._source = (embeddings_of, label_of)

    def points_of(self, rows: Sequence[int]) -> np.ndarray:
        """(k,) the map point of each gallery row, -1 for rows outside the sample."""
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(r) and (r.min() < 0 or r.max() >= self.gallery_size):
            raise IndexError(f"rows must lie in [0, {self.gallery_size})")
        if not self.sampled:
            return r
        at = np.minimum(np.searchsorted(self.rows, r), len(self.rows) - 1)  # a sampled map has points
        return np.where(self.rows[at] == r, at, -1)

    def _resolve(self, rows: Sequence[int]) -> tuple[np.ndarray, Optional[list[str]]]:
        """((k, 2) map positions, classes or None) of gallery rows; rows off the map by neighbours."""
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        pts = self.points_of(r)
        xy, out = self.coords[np.maximum(pts, 0)], pts < 0
        if out.any():
            if self._source is None:
                raise IndexError(f"row {int(r[out][0])} is not on this sampled map (no gallery attached)")
            xy[out] = self._place_by_neighbours(self._prepare(self._source[0](r[out])))
        if self.labels is None:
            return xy, None
        labels = [self.labels[p] if p >= 0 else str(self._source[1](int(row)) or "") for p, row in zip(pts, r)]
        return xy, labels

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

        if self._affinities is None:  # the reference points' kNN graph, built once per map
            from openTSNE.affinity import PerplexityBasedNN

            self._affinities = PerplexityBasedNN(self.reference, perplexity=self.perplexity, metric=self.metric,
                                                 method="exact" if len(self) <= 5000 else "auto", n_jobs=1,
                                                 random_state=self.seed, verbose=False)
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

    def place_by_results(self, rows: Sequence[int]) -> np.ndarray:
        """(2,) where a query goes, given its results (gallery rows, best first, as the
        search ranked them): among its STAR_RESULTS best, the largest group that sits
        together (the results among one result's STAR_NEIGHBOURS nearest map points; ties
        to the better-ranked group), at their rank-weighted mean.

        The search, not the map, decides what a query matches (calibration and diffusion
        rank pictures that raw embeddings put apart, and a drawing is not a picture), so
        the star lands with what the page shows as its results (issue 31)."""
        top = np.asarray([int(r) for r in rows][:STAR_RESULTS], dtype=int)
        if not len(top):
            raise ValueError("placing by results needs at least one result")
        if top.min() < 0 or top.max() >= self.gallery_size:
            raise IndexError(f"result rows must lie in [0, {self.gallery_size})")
        at, _ = self._resolve(top)
        # Results outside a sampled map join its points where they were placed.
        out = self.points_of(top) < 0
        pts, ids = np.concatenate([self.coords, at[out]]), np.concatenate([self.rows, top[out]])
        d = np.linalg.norm(at[:, None] - pts[None], axis=2)  # (k, N)
        near = ids[np.argsort(d, axis=1, kind="stable")[:, :STAR_NEIGHBOURS]]
        member = (top[None, :, None] == near[:, None, :]).any(2)  # member[i, j]: result j by result i
        w = 1.0 / (1.0 + np.arange(len(top)))
        best = max(range(len(top)), key=lambda i: (int(member[i].sum()), float(member[i] @ w), -i))
        g = member[best]
        return ((w[g, None] * at[g]).sum(0) / w[g].sum()).astype(np.float32)

    # ---- persistence
    def save(self, directory: Union[str, Path]) -> Path:
        """Write `embedding_map.npz` + `embedding_map.json` into `directory` (atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (MAP_NPZ + ".tmp.npz")
        arrays = {"coords": self.coords, "reference": self.reference.astype(np.float32)}
        if self.projection is not None:
            arrays.update(pca_mean=self.projection[0], pca_components=self.projection[1])
        if self.sampled:  # a whole gallery's map stays the files it always was
            arrays.update(rows=self.rows)
        np.savez(tmp, **arrays)
        os.replace(tmp, d / MAP_NPZ)
        meta = {"format_version": FORMAT_VERSION, "n": len(self), "dim": self.dim,
                "perplexity": self.perplexity, "seed": self.seed, "metric": self.metric,
                "labels": self.labels}
        if self.sampled:
            meta["gallery_size"] = self.gallery_size
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
            rows = z["rows"] if "rows" in z.files else None
        return cls(coords, reference, labels=meta.get("labels"), perplexity=meta["perplexity"], seed=meta["seed"],
                   projection=projection, rows=rows, gallery_size=meta.get("gallery_size"))

    # ---- output for the app
    def to_plot_data(self, query_xy: Optional[np.ndarray] = None,
                     highlight: Optional[Sequence[int]] = None) -> dict[str, Any]:
        """JSON-able dict: {'points': [{x, y, label, index (gallery row)}], 'query': {x, y} | None,
        'highlight': [rows], 'classes': [sorted labels], 'bounds': [xmin, xmax, ymin, ymax]};
        a sampled map adds 'pictures' (the gallery's size) and 'placed' (highlighted rows
        outside the sample, as points)."""
        labels = self.labels or [""] * len(self)
        pts = [{"x": float(x), "y": float(y), "label": lab, "index": int(i)}
               for i, (x, y), lab in zip(self.rows.tolist(), self.coords.tolist(), labels)]
        hl = [int(i) for i in (highlight if highlight is not None else [])]
        placed = []
        if self.sampled and hl:
            out = [r for r, p in zip(hl, self.points_of(hl)) if p < 0]
            if out:
                xy, labs = self._resolve(out)
                placed = [{"x": float(x), "y": float(y), "label": lab, "index": r}
                          for r, (x, y), lab in zip(out, xy.tolist(), labs or [""] * len(out))]
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
            "highlight": hl,
            "classes": sorted(set(self.labels)) if self.labels else [],
            "bounds": [float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])],
            **({"pictures": self.gallery_size, "placed": placed} if self.sampled else {}),
        }

    # ---- the picture
    def class_centres(self) -> dict[str, tuple[float, float]]:
        """{class: (x, y)}: the median map position of each class's points ({} if unlabelled)."""
        if not self.labels:
            return {}
        lab = np.asarray(self.labels)
        return {c: tuple(float(v) for v in np.median(self.coords[lab == c], axis=0)) for c in sorted(set(self.labels))}

    def layout(self, size: tuple[int, int] = (640, 640), title: Optional[str] = None,
               thumbnails: bool = False) -> "MapLayout":
        """Where `render` puts things at `size`: the map -> pixel transform, the thumbnail
        size, which rows get a thumbnail (the others a dot) and where the class names go."""
        W, H = canvas_size(size)
        u = min(W / 640.0, H / 560.0)
        title_px = max(12, round(15 * u))
        title_h = int(round(title_px * 1.9)) if title else 0
        n = max(len(self), 1)
        free = max(W - 8, 1) * max(H - title_h - 8, 1)
        if thumbnails:
            px = float(np.clip(1.15 * np.sqrt(free / n), 24, 40 * max(1.0, u)))
            px = int(round(min(px, max(8, min(W, H - title_h) // 5))))
            dot_r = max(2.0, 2.5 * u)
            pad = px / 2 + 3
        else:
            px = 0
            dot_r = float(np.clip(0.12 * np.sqrt(free / n), 2.5, 6 * max(1.0, u)))
            pad = dot_r + 6
        plot = (pad, title_h + pad, W - pad, H - pad)
        lo = self.coords.min(0) if len(self) else np.zeros(2, np.float32)
        hi = self.coords.max(0) if len(self) else np.zeros(2, np.float32)
        span = np.maximum(hi - lo, 1e-6)
        pw, ph = max(plot[2] - plot[0], 1.0), max(plot[3] - plot[1], 1.0)
        # Fill the plot, but stretch one axis at most MAX_STRETCH x the other (t-SNE axes
        # mean nothing, its local distances do).
        sx, sy = pw / span[0], ph / span[1]
        if not np.any(hi > lo):
            sx = sy = 1.0
        elif hi[0] <= lo[0] or hi[1] <= lo[1]:
            sx = sy = min(sx, sy)
        else:
            sx, sy = min(sx, MAX_STRETCH * sy), min(sy, MAX_STRETCH * sx)
        scale = (float(sx), float(sy))
        lay = MapLayout(size=(W, H), plot=plot, scale=scale, centre=((lo + hi) / 2).astype(np.float64),
                        thumb_px=px, dot_r=dot_r, unit=u, title_px=title_px, title_h=title_h,
                        label_px=max(12, round(LABEL_PX * u)))
        pix = lay.to_pixels(self.coords) if len(self) else np.zeros((0, 2))
        if thumbnails and len(self):
            lay.shown, lay.dots = choose_thumbnails(pix, px, (W, H), self.labels)
        else:
            lay.shown, lay.dots = np.zeros(0, int), np.arange(len(self))
        lay.labels = place_labels(self.class_centres(), lay, self.labels) if self.labels else []
        return lay

    def clear_render_cache(self) -> None:
        """Forget the decoded thumbnails and the pre-rendered base layers."""
        with self._render_lock:
            self._render_cache.clear()
            self._thumb_small.clear()

    def _use_thumbnails(self, thumbnails: Any) -> None:
        old = self._thumb_source
        if old is not None and not callable(old) and not callable(thumbnails):
            same = len(old) == len(thumbnails) and all(
                a is b or (isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)) and str(a) == str(b))
                for a, b in zip(old, thumbnails))
            if not same:
                self.clear_render_cache()
        self._thumb_source = thumbnails

    def _small_thumb(self, row: int) -> Image.Image:
        im = self._thumb_small.get(row)
        if im is None:
            src = self._thumb_source
            try:
                im = small_image(src(row) if callable(src) else src[row])
            except Exception as exc:  # a missing/corrupt file: a grey tile, the map still draws
                log.warning("no thumbnail for map row %d: %s", row, exc)
                im = Image.new("RGB", (THUMB_KEEP, THUMB_KEEP), (200, 200, 200))
            if not self.sampled or self.points_of([row])[0] >= 0:  # kept for the map's own rows only: bounded
                self._thumb_small[row] = im
        return im

    def _base(self, size: tuple[int, int], title: Optional[str], thumbs: bool) -> tuple["MapLayout", Image.Image]:
        """The query-independent layer (thumbnails or dots; room for the title and the
        class names, drawn per render), cached per (size, with title or not, thumbnails or dots)."""
        key = (size, bool(title), thumbs)
        with self._render_lock:
            hit = self._render_cache.get(key)
            if hit is not None:
                self._render_cache.move_to_end(key)
                return hit
            lay = self.layout(size, title, thumbs)
            W, H = lay.size
            img = Image.new("RGB", (W, H), BACKGROUND)
            draw = ImageDraw.Draw(img)
            pix = lay.to_pixels(self.coords) if len(self) else np.zeros((0, 2))
            colours = self._colours()
            for i in lay.dots:
                paste_dot(img, pix[i], lay.dot_r, colours[i])
            px = lay.thumb_px
            for i in lay.shown:  # bottom to top
                t = fit(self._small_thumb(int(self.rows[i])), px)
                x0, y0 = int(round(pix[i, 0] - t.width / 2)), int(round(pix[i, 1] - t.height / 2))
                img.paste(t, (x0, y0))
                draw.rectangle((x0 - 1, y0 - 1, x0 + t.width, y0 + t.height), outline=colours[i], width=1)
            self._render_cache[key] = (lay, img)
            while len(self._render_cache) > RENDER_CACHE_ENTRIES:
                self._render_cache.popitem(last=False)
            return lay, img

    def _colours(self) -> list[tuple[int, int, int]]:
        if not self.labels:
            return [UNLABELLED] * len(self)
        classes = sorted(set(self.labels))
        pal = PALETTE[::2] if len(classes) <= 10 else PALETTE
        idx = {c: i for i, c in enumerate(classes)}
        return [pal[idx[c] % len(pal)] for c in self.labels]

    def marks(self, query_xy: Optional[np.ndarray] = None, highlight: Optional[Sequence[int]] = None,
              size: tuple[int, int] = (640, 640), title: Optional[str] = None,
              thumbnails: Optional[ThumbnailSource] = None, query_image: Any = None,
              query_label: str = "your drawing") -> MapMarks:
        """Where `render` (same arguments) draws the query's marker, its caption, the
        results and the class names: the drawn picture's geometry, for checking it."""
        size = canvas_size(size)
        if thumbnails is not None:
            with self._render_lock:
                self._use_thumbnails(thumbnails)
        thumbs = thumbnails is not None
        hl = [int(i) for i in (highlight if highlight is not None else [])]
        for i in hl:
            if not 0 <= i < self.gallery_size:
                raise IndexError(f"highlight row {i} is outside the map's {self.gallery_size} rows")
        at, hl_labels = self._resolve(hl) if hl else (np.zeros((0, 2)), [])
        lay = self._base(size, title, thumbs)[0]  # cached with the base layer
        u, (W, H) = lay.unit, lay.size
        # The query marker first (drawn last): the results are arranged around it.
        q = None if query_xy is None else np.asarray(query_xy, dtype=np.float64).reshape(-1, 2)
        mk = MapMarks(layout=lay, title=title, thumbnails=thumbs, rows=hl, query=np.zeros((0, 2)),
                      query_r=max(13, round(17 * u)))
        if q is not None and len(q):
            qpix = np.clip(lay.to_pixels(q), [lay.plot[0], lay.plot[1]], [lay.plot[2], lay.plot[3]])
            mk.query = qpix[np.isfinite(qpix).all(1)]
            if query_image is not None:
                mk.query_image = fit(small_image(query_image, 160), max(48, round(1.9 * max(lay.thumb_px, 28 * u))))
                mk.query_r = max(mk.query_image.size) / 2 + max(3, round(3 * u)) + 2
        r_q = mk.query_r
        fixed = [(p[0] - r_q, p[1] - r_q, p[0] + r_q, p[1] + r_q) for p in mk.query]
        pix = lay.to_pixels(at) if hl else np.zeros((0, 2))
        mk.places = pix
        if thumbs and hl:
            # Results as framed thumbnails, moved apart (and off the query) a little, never
            # far: pictures that sit together on the map stay together.
            fw = max(3, round(3 * u))
            hp = int(round(lay.thumb_px * RESULT_ZOOM))
            mk.tiles = [fit(self._small_thumb(r), hp) for r in hl]
            half = hp / 2 + fw + 1
            mk.centres = spread(pix, half, fixed, (half, lay.title_h + half, W - half, H - half),
                                max_move=RESULT_MAX_MOVE * half)
            for c, t in zip(mk.centres, mk.tiles):
                x0, y0 = int(round(c[0] - t.width / 2)), int(round(c[1] - t.height / 2))
                mk.boxes.append((x0 - fw, y0 - fw, x0 + t.width + fw, y0 + t.height + fw))
        elif hl:
            rr = lay.dot_r + max(3.0, 3 * u)
            mk.centres = pix
            mk.boxes = [(p[0] - rr, p[1] - rr, p[0] + rr, p[1] + rr) for p in pix]
        if len(mk.query) and query_label:
            mk.caption = caption_spot(mk.query[0], r_q, lay, mk.boxes + fixed[1:], query_label)
        # No class name under the marker or its caption, none on another class's result.
        mk.labels = clear_labels(lay.labels, lay, fixed + ([mk.caption[2]] if mk.caption else []), mk.boxes,
                                 hl_labels if self.labels else ())
        return mk

    def render(self, query_xy: Optional[np.ndarray] = None, highlight: Optional[Sequence[int]] = None,
               size: tuple[int, int] = (640, 640), title: Optional[str] = None,
               thumbnails: Optional[ThumbnailSource] = None, query_image: Any = None,
               query_label: str = "your drawing") -> Image.Image:
        """The map as a PIL image of exactly `size` pixels.

        `thumbnails` (one image per gallery row: a sequence of PIL images / file paths, or
        a callable row -> image or path) lays the gallery out as small pictures; without
        it, points are dots coloured by class. Class names sit at their classes' median
        positions (overlapping names are nudged or left out; none under the query's
        marker or caption). `highlight` (the top-k rows, best first) get a coloured frame
        (ring for dots), ranks 1-5 a number; the query is a star captioned `query_label`,
        or `query_image` (the drawing itself) framed. `marks()` says where each goes.

        Thumbnails are decoded once per map and row (only those that end up visible), and
        the query-independent layer is cached per size, so a new query costs a
        copy plus a few pastes (a few ms). Rows must keep the same images for the life of
        the map object (`clear_render_cache()` otherwise).
        """
        return self.draw(self.marks(query_xy, highlight, size, title, thumbnails, query_image, query_label))

    def draw(self, mk: MapMarks) -> Image.Image:
        """The picture of `marks()`'s answer (what `render` returns)."""
        _, base = self._base(mk.layout.size, mk.title, mk.thumbnails)
        return draw_marks(base, mk)


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
    """A 2-d PCA layout for maps too small for t-SNE."""
    c = x - x.mean(0, keepdims=True)
    if len(x) < 2 or not np.any(c):
        return np.zeros((len(x), 2), np.float32)
    mean, comp = _pca(x, 2)
    out = (x - mean) @ comp.T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1]))).astype(np.float32)


def gallery_map(gallery: Any, cache: Optional[Union[str, Path]] = None,
                search: Sequence[Union[str, Path]] = (), max_points: int = MAP_MAX_POINTS) -> "EmbeddingMap":
    """The one map pipeline (app and command line): a gallery's t-SNE map, read from the
    gallery folder, `search` or `cache` when one there was fitted on these embeddings,
    else fitted once (on the raw, undiffused embeddings) and saved to `cache`, or to
    the gallery folder when no cache is given. Above `max_points` pictures it is fitted
    on a class-stratified sample of them (`map_sample`); rows outside it are placed by
    their embeddings, read from the gallery one row at a time."""
    places = [p for p in (gallery.root, *search, cache) if p is not None]
    m = None
    for d in places:
        if EmbeddingMap.exists(d):
            try:
                found = EmbeddingMap.load(d)
            except (ValueError, OSError) as exc:
                log.warning("ignoring the map in %s: %s", d, exc)
                continue
            if fits(found, gallery, max_points):
                m = found
                break
    if m is None:
        m = _fit_gallery(gallery, max_points)
        target = cache if cache is not None else gallery.root
        if target is not None:
            try:
                m.save(target)
            except OSError as exc:
                log.warning("could not save the map in %s: %s", target, exc)
    m.attach(lambda rows: read_rows(gallery, rows), lambda row: gallery.labels[row])
    return m


def _fit_gallery(gallery: Any, max_points: int) -> "EmbeddingMap":
    log.info("fitting the t-SNE map of %s (%d pictures, at most %d points)", gallery.root, len(gallery), max_points)
    if len(gallery) <= max_points:  # the whole gallery, as maps always were
        return fit_map(gallery.raw_embeddings, gallery.labels if any(gallery.labels) else None)
    rows, emb, labels = sample_of(gallery, max_points)
    f = fit_map(emb, labels)
    return EmbeddingMap(f.coords, f.reference, f.labels, perplexity=f.perplexity, seed=f.seed,
                        projection=f.projection, rows=rows, gallery_size=len(gallery))
