"""The gallery: embeddings of a set of pictures, searched by cosine similarity as the model
prescribes (seen-class calibration, gallery diffusion), exactly or through an approximate
index whose shortlist is ranked with the exact vectors.

The folder format is `gallery.format`; the indexes are `gallery.ann`; building a folder is
`gallery.build` (`build_gallery` here writes one with it and opens it).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from sbir_core.errors import InputError
from sbir_core.gallery.ann import (DEFAULT_SHORTLIST, INDEX_TYPES, apply_search_params, build_index, faiss_module,
                                   query_vectors, search_params)
from sbir_core.gallery.calibration import PROTOTYPES_FILE, SeenCalibration
from sbir_core.gallery.diffusion import diffuse_gallery, expand_queries
# The file names and errors are re-exported: callers of the gallery know them from here.
from sbir_core.gallery.format import (MetaFields, EMBEDDINGS_FILE, FORMAT_VERSION, GALLERY_FILE, INDEX_FILE,  # noqa: F401
                                      SEEN_FILE, TOKENS_FILE, GalleryError, Items, StaleGalleryError, diffused_file,
                                      load_array, random_access, read_gallery, rows_of, write_items)
from sbir_core.gallery.results import SearchResult
from sbir_core.paths import PathLike

log = logging.getLogger(__name__)

# With gallery diffusion on, the first results stay the query's nearest pictures.
# Diffusion raises precision further down the list but can push a lone correct match
# out of the first row (hit@5 falls), and the first row is what a person looks at.
PLAIN_HEAD = 5
# Approximate galleries fetch this many candidates through the index and rank them exactly
# (calibration, diffusion); exact ("flat") galleries rank every picture. IVF-PQ galleries
# keep their own count in their index parameters ("shortlist").
SHORTLIST = DEFAULT_SHORTLIST
# Exact work is done this many rows at a time, so big galleries never make (N, ...) temporaries.
CHUNK = 8192


def _ordered(s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic order: score descending, then index ascending."""
    order = np.lexsort((i, -s), axis=-1)
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1).astype(np.int64)


def _exact_knn(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-NN of q among the rows of x, in deterministic order."""
    if k < 1 or len(x) == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    faiss = faiss_module()
    s, i = faiss.knn(q, x, min(int(k), len(x)), metric=faiss.METRIC_INNER_PRODUCT)
    return _ordered(s, i)


def _top_k(scores: np.ndarray, k: int, ids: Optional[np.ndarray] = None) -> np.ndarray:
    """Column positions of each row's k best scores, best first, ties by ascending id
    (`ids[col]`, the column itself when None); partial selection, so O(C) a row."""
    c = scores.shape[1]
    ids = np.arange(c) if ids is None else ids
    k = min(int(k), c)
    out = np.empty((len(scores), k), np.int64)
    for r, s in enumerate(scores):
        # Every column at least as good as the k-th best: k of them or more (ties), so the
        # boundary ties are settled by id rather than by argpartition's arbitrary pick.
        cand = np.flatnonzero(s >= np.partition(s, c - k)[c - k]) if k < c else np.arange(c)
        out[r] = cand[np.lexsort((ids[cand], -s[cand]))[:k]]
    return out


class _Column(Sequence):
    """One field of every item, read on demand (a million-item gallery builds no list at open)."""

    def __init__(self, items: Items, get: Callable[[int], str]) -> None:
        self._items, self._get = items, get

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(len(self)))]
        return self._get(int(i) + (len(self) if int(i) < 0 else 0))


# ----------------------------------------------------------------------------- the gallery
class Gallery(MetaFields):
    """Embeddings (+ tokens) of a set of images, searchable by cosine similarity."""

    def __init__(
        self,
        embeddings: np.ndarray,
        meta: dict[str, Any],
        *,
        items: Optional[Items] = None,
        tokens: Optional[np.ndarray] = None,
        index: Any = None,
        root: Optional[PathLike] = None,
        calibration: Optional[SeenCalibration] = None,
        diffused: Optional[np.ndarray] = None,
        seen: Optional[np.ndarray] = None,
    ) -> None:
        self.meta = meta
        self._items = items if items is not None else Items(records=meta.pop("items"))
        self.tokens = tokens
        self.root = Path(root) if root is not None else None  # the folder it was loaded from
        # What the encoder stored (embeddings.npy); `embeddings` is what searches see. A
        # memory-mapped file stays mapped: searches read only the rows they rank.
        mapped = isinstance(embeddings, np.memmap)
        self.raw_embeddings = embeddings if mapped else np.ascontiguousarray(embeddings, dtype=np.float32)
        self.embeddings = self.raw_embeddings
        self._raw_rows = rows_of(self.raw_embeddings)  # rows of a mapped file read without the map
        self._rows = self._raw_rows  # rows of `embeddings`
        self.index = index
        self.index_remade = False
        self.diffusion_k = int(meta.get("diffusion_k") or 0)
        self.plain_head = PLAIN_HEAD
        if self.diffusion_k and diffused is not None:
            self.embeddings = diffused  # stored with the gallery (`save_diffused`)
            self._rows = rows_of(diffused)
        elif self.diffusion_k and len(self.raw_embeddings) > 1:
            self._diffuse()
        self._stored_seen = seen  # seen confidences at meta["index_seen_tau"], if known
        self.set_calibration(calibration)
        src = meta.get("source_dir") or ""
        rel = meta.get("source_dir_rel")
        if self.root is not None and rel and (self.root / rel).is_dir():
            # A gallery shipped in a repository or moved with its images: the relative
            # location survives a clone to another path, the absolute one does not.
            src = str((self.root / rel).resolve())
        self._source_dir = src

        # os.path.join keeps absolute item paths as they are (in-memory galleries).
        def path(i: int) -> str:
            rel = self._items.value(i, "path")
            return os.path.join(src, *rel.split("/")) if src else rel

        if self._items._table is None:  # small: plain lists, as they always were
            self.paths: Sequence[str] = [path(i) for i in range(len(self._items))]
            self.labels: Sequence[str] = self._items.column("label")
        else:
            self.paths = _Column(self._items, path)
            self.labels = _Column(self._items, lambda i: self._items.value(i, "label") or "")
        g = meta.get("grid")
        self.grid: Optional[tuple[int, int]] = (int(g[0]), int(g[1])) if g else None

    # ---- construction
    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray,
        *,
        paths: Optional[Sequence[str]] = None,
        labels: Optional[Sequence[str]] = None,
        index_type: str = "flat",
        encoder_id: str = "synthetic",
        modality: str = "photo",
        diffusion_k: int = 0,
        calibration: Optional[SeenCalibration] = None,
        **index_params: Any,
    ) -> "Gallery":
        """An in-memory gallery from vectors (normalised here), e.g. for benchmarks and tests."""
        x = _normalize_rows(np.asarray(embeddings, dtype=np.float32))
        n = len(x)
        paths = list(paths) if paths is not None else [str(i) for i in range(n)]
        labels = list(labels) if labels is not None else [""] * n
        if len(paths) != n or len(labels) != n:
            raise ValueError(f"{n} embeddings but {len(paths)} paths and {len(labels)} labels")
        usable = calibration is not None and calibration.beta > 0 and calibration.prototypes.shape[1] == x.shape[1]
        seen = calibration.seen_confidence(x) if usable else None  # a mismatch is reported by set_calibration
        index, kind, params = build_index(x, index_type, seen=seen, **index_params)
        meta = {
            "format_version": FORMAT_VERSION, "encoder_id": encoder_id, "modality": modality,
            "index_type": kind, "requested_index_type": index_type, "index_params": params,
            "source_dir": "", "count": n, "dims": {"embedding": int(x.shape[1]), "token": None},
            "grid": None, "has_tokens": False, "diffusion_k": int(diffusion_k),
            "index_seen_tau": calibration.tau if seen is not None and index is not None else None,
        }
        items = Items(records=[{"path": p, "label": lab} for p, lab in zip(paths, labels)])
        return cls(x, meta, items=items, index=index, calibration=calibration, seen=seen)

    @classmethod
    def load(
        cls,
        directory: PathLike,
        *,
        ef_search: Optional[int] = None,
        nprobe: Optional[int] = None,
        mmap_tokens: bool = True,
    ) -> "Gallery":
        """Load a gallery folder; raises GalleryError when anything is missing or inconsistent.

        Tokens are memory-mapped by default: they can be far larger than the embeddings and
        the explanations read only a few rows. Galleries with an approximate index also keep
        their embeddings (and stored diffused embeddings) memory-mapped: searches read only
        the shortlisted rows, so a million-picture gallery opens in seconds.
        """
        root = Path(directory)
        stored = read_gallery(root, mmap_embeddings=True, mmap_tokens=mmap_tokens)
        meta, n, d = stored.meta, len(stored.items), stored.embeddings.shape[1]
        index = None
        kind = meta["index_type"]
        if kind not in INDEX_TYPES:
            raise GalleryError(f"{root / GALLERY_FILE} names an unknown index type {kind!r}")
        emb = stored.embeddings if kind != "flat" else np.array(stored.embeddings)  # exact search reads every row
        if kind != "flat":
            ipath = root / INDEX_FILE
            if not ipath.is_file():
                raise GalleryError(f"{ipath} is missing (the gallery's index type is {kind}); rebuild the gallery")
            try:
                index = faiss_module().read_index(str(ipath))
            except RuntimeError as exc:  # faiss reports bad files as RuntimeError
                raise GalleryError(f"cannot read {ipath}: {str(exc).splitlines()[0]}; rebuild the gallery") from exc
            if index.ntotal != n or index.d < d or (kind != "ivfpq" and index.d not in (d, d + 2)):
                raise GalleryError(  # d: from before the seen column
                    f"{ipath} holds {index.ntotal} vectors of dimension {index.d}, {GALLERY_FILE} lists {n} "
                    f"of dimension {d}: the gallery is inconsistent; rebuild it")
            apply_search_params(index, kind, ef_search, nprobe)
        diffused = None
        k = int(meta.get("diffusion_k") or 0)
        if k and kind != "flat" and (root / diffused_file(k)).is_file():
            diffused = load_array(root / diffused_file(k), mmap=True)
            if diffused.shape != stored.embeddings.shape or diffused.dtype != np.float32:
                raise GalleryError(f"{root / diffused_file(k)} does not match the embeddings; rebuild the gallery")
            random_access(diffused)
        seen = None
        if index is not None and (root / SEEN_FILE).is_file():
            seen = load_array(root / SEEN_FILE)
            if seen.shape != (n,) or seen.dtype != np.float32:
                raise GalleryError(f"{root / SEEN_FILE} does not match the embeddings; rebuild the gallery")
        return cls(emb, meta, items=stored.items, tokens=stored.tokens, index=index, root=root,
                   calibration=_load_calibration(root, meta, d), diffused=diffused, seen=seen)

    def save(self, directory: PathLike) -> Path:
        """Write this gallery as a folder `Gallery.load` opens (in-memory galleries, benchmarks):
        embeddings, items, index, calibration prototypes and, for approximate galleries with
        diffusion, the diffused embeddings. Images are not copied; item paths stay as they are."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        emb = np.lib.format.open_memmap(out / EMBEDDINGS_FILE, mode="w+", dtype=np.float32,
                                        shape=self.raw_embeddings.shape)
        for s in range(0, len(self), 65_536):
            emb[s:s + 65_536] = self.raw_embeddings[s:s + 65_536]
        emb.flush()
        del emb
        if self.index is not None:
            faiss_module().write_index(self.index, str(out / INDEX_FILE))
        if self.calibration is not None:
            np.save(out / PROTOTYPES_FILE, self.calibration.prototypes)
            if self.index is not None:
                np.save(out / SEEN_FILE, self._seen_of(None))
        if self.diffusion_k and self.index is not None:
            self.save_diffused(out)
        write_items(out, {**self.meta, "has_tokens": False, "grid": self.meta.get("grid")},
                    [{"path": p, "label": lab} for p, lab in zip(self._items.column("path"), self._items.column("label"))])
        return out

    def save_diffused(self, directory: Optional[PathLike] = None) -> None:
        """Store the diffused embeddings beside an approximate gallery's, so that opening it
        maps them instead of running N neighbour searches (written once, atomically)."""
        out = Path(directory) if directory is not None else self.root
        if out is None or not self.diffusion_k or self.index is None:
            return
        final = out / diffused_file(self.diffusion_k)
        if final.is_file():
            return
        tmp = out / f".{final.name}.{os.getpid()}.tmp"
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=self.embeddings.shape)
        for s in range(0, len(self), 65_536):
            arr[s:s + 65_536] = self.embeddings[s:s + 65_536]
        arr.flush()
        del arr
        os.replace(tmp, final)

    # ---- attributes
    def __len__(self) -> int:
        return len(self.embeddings)

    def __repr__(self) -> str:
        return (f"Gallery({len(self)} items, encoder={self.encoder_id!r}, modality={self.modality!r}, "
                f"index={self.index_type!r}, root={str(self.root) if self.root else None!r})")

    @property
    def source_dir(self) -> str:
        """Where the images are now (may differ from where they were when indexed)."""
        return self._source_dir

    @property
    def items(self) -> Items:
        """The item records (dicts: path relative to the source folder, label, size, mtime_ns)."""
        return self._items

    def set_search_params(self, *, ef_search: Optional[int] = None, nprobe: Optional[int] = None) -> None:
        """Trade speed for recall at query time (hnsw: efSearch, ivf and ivfpq: nprobe)."""
        apply_search_params(self.index, self.index_type, ef_search, nprobe)

    # ---- diffusion
    def _diffuse(self) -> None:
        """Replace searchable embeddings by their DBA version (see sbir_core.gallery.diffusion).
        An approximate index keeps the vectors as encoded and finds the neighbours, so this is
        N index searches (never N x N), done in chunks; `save_diffused` stores the result."""
        k = min(self.diffusion_k, len(self.raw_embeddings))
        out = np.empty(self.raw_embeddings.shape, np.float32)
        for s in range(0, len(out), CHUNK):
            sc, i = self._knn(np.ascontiguousarray(self.raw_embeddings[s:s + CHUNK]), k)
            out[s:s + CHUNK] = diffuse_gallery(self.raw_embeddings, sc, i)
        self.embeddings = out
        self._rows = rows_of(out)

    def set_diffusion(self, k: int) -> None:
        """Turn gallery diffusion off (0) or set its neighbour count."""
        self.diffusion_k = int(k)
        self.embeddings = self.raw_embeddings
        self._rows = self._raw_rows
        if self.diffusion_k and len(self.raw_embeddings) > 1:
            self._diffuse()

    # ---- seen-class calibration
    def set_calibration(self, calibration: Optional[SeenCalibration]) -> None:
        """Turn seen-class calibration on (see `gallery.calibration`) or off (None)."""
        if calibration is not None and calibration.prototypes.shape[1] != self.raw_embeddings.shape[1]:
            raise GalleryError(f"seen-class prototypes have dimension {calibration.prototypes.shape[1]}, "
                               f"the gallery's embeddings {self.raw_embeddings.shape[1]}")
        self.calibration = calibration if calibration is not None and calibration.beta > 0 else None
        self.meta["seen_calibration"] = self.calibration.setting if self.calibration else None
        # Exact galleries score every picture, so every picture's seen confidence is kept; indexed
        # ones hold it in the index and compute it for the shortlisted rows only (`_seen_of`).
        stored = self._stored_seen if (self.calibration is not None and self._stored_seen is not None
                                       and self.meta.get("index_seen_tau") == self.calibration.tau) else None
        self._seen = stored if stored is not None else (
            self.calibration.seen_confidence(self.raw_embeddings) if self.calibration and self.index is None else None)
        if (self.index is not None and self.calibration is not None
                and (self.index.d == self.raw_embeddings.shape[1]
                     or self.meta.get("index_seen_tau") != self.calibration.tau)):
            # The index's seen column was made for no or another temperature (a query's
            # weight carries beta, so only tau matters): remake it for this one.
            log.warning("rebuilding the %s index of %d items in memory for seen-class calibration tau=%g%s",
                        self.index_type, len(self), self.calibration.tau,
                        f"; rebuild {self.root} to store it" if self.root is not None else "")
            self.index_remade = True  # so that re-indexing an unchanged folder writes it
            params = {("m" if k == "M" else k): v for k, v in (self.meta.get("index_params") or {}).items()}
            old = self.index
            self._seen = self._stored_seen = self.calibration.seen_confidence(self.raw_embeddings)
            self.index, _, _ = build_index(self.raw_embeddings, self.index_type, seen=self._seen, **params)
            self.meta["index_seen_tau"] = self.calibration.tau
            # keep the search-time settings the old index was loaded with (Gallery.load(ef_search=...))
            apply_search_params(self.index, self.index_type, *search_params(old, self.index_type))

    def _seen_of(self, rows: Optional[np.ndarray]) -> np.ndarray:
        if self._seen is not None:
            return self._seen if rows is None else self._seen[rows]
        return self.calibration.seen_confidence(self.raw_embeddings if rows is None else self._raw_rows(rows))

    def _query_weights(self, q: np.ndarray) -> np.ndarray:
        """(Q,) how much each query discounts seen pictures (0 without calibration)."""
        return self.calibration.query_weight(q) if self.calibration else np.zeros(len(q), np.float32)

    # ---- search
    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (cosine similarities, indices), both (Q, min(k, N)), best first, ties by ascending index.

        The order is that of `score_all`: with diffusion on, the first `plain_head` results
        are still the query's nearest pictures and diffusion orders the ones after them
        (queries expanded with their top results, aQE); with seen-class calibration the
        calibrated scores decide. The scores returned are always the query's cosine
        similarity to each result, so they need not decrease. Exact galleries rank every
        picture; approximate ones (hnsw, ivf, ivfpq) rank the shortlist (`SHORTLIST`, or the
        IVF-PQ gallery's own) their index returns for the calibrated score, with the exact
        vectors."""
        q = self._check_queries(queries, k)
        k = min(int(k), len(self))
        if self.calibration is None and not self.diffusion_k:
            return self._knn(q, k)
        if self.index is None:
            idx = _top_k(self.score_all(q), k)
        else:
            idx = np.stack([self._shortlist_knn(q[j:j + 1], k) for j in range(len(q))])
        return np.einsum("qd,qkd->qk", q, self._raw_rows(idx)).astype(np.float32), idx.astype(np.int64)

    @property
    def shortlist(self) -> int:
        return int((self.meta.get("index_params") or {}).get("shortlist") or SHORTLIST)

    def _candidates(self, q: np.ndarray, w: np.ndarray, c: int) -> np.ndarray:
        """(Q, <=c) index candidates for the (calibrated, weight w) score, -1 where short."""
        _, rows = self.index.search(query_vectors(q, w, self.index.d), min(c, len(self)))
        return rows

    def _shortlist_knn(self, q: np.ndarray, k: int) -> np.ndarray:
        """One query's k best rows among its index candidates, ranked as `score_all` ranks."""
        c = min(len(self), max(self.shortlist, 2 * k))
        rows = self._candidates(q, self._query_weights(q), c)[0]
        rows = rows[rows >= 0]
        if len(rows) < c and len(self) <= CHUNK:  # an IVF probe that saw too few vectors: rank everything
            rows = np.arange(len(self))
        return rows[_top_k(self._scores(q, rows), k, rows)[0]]

    def score_all(self, queries: np.ndarray) -> np.ndarray:
        """(Q, N) scores whose descending order is the order `knn` returns (for evaluation;
        exact, whatever the index). Without diffusion or calibration they are the cosine
        similarities."""
        return self._scores(self._check_queries(queries, 1))

    def _scores(self, q: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """Ranking scores of the gallery's pictures (or of `rows` only) for normalised queries."""
        raw = self.raw_embeddings if rows is None else self._raw_rows(rows)
        cal = self._calibrated_by(rows, q)
        plain = cal(q @ raw.T)
        if not self.diffusion_k:
            return plain
        emb = self.embeddings if rows is None else (raw if self.embeddings is self.raw_embeddings else self._rows(rows))
        # aQE with the top k as this gallery ranks them: with calibration the calibrated top k,
        # or expanding would pull back the training-class pictures calibration moved down.
        sims = q @ emb.T
        kd = min(self.diffusion_k, emb.shape[0])
        top = _top_k(cal(sims), kd)
        scores = cal(expand_queries(q, emb, np.take_along_axis(sims, top, 1), top) @ emb.T)
        head = min(self.plain_head, emb.shape[0])
        if head:
            first = _top_k(plain, head)
            # Above every diffused score (cosines lie in [-1, 1], calibration subtracts at most
            # beta), in their own order.
            lift = 4.0 + (self.calibration.beta if self.calibration else 0.0)
            np.put_along_axis(scores, first, np.take_along_axis(plain, first, 1) + lift, 1)
        return scores

    def _calibrated_by(self, rows: Optional[np.ndarray], q: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """scores (Q, len(rows)) -> calibrated scores (identity without calibration)."""
        if self.calibration is None:
            return lambda scores: scores
        seen = self._seen_of(rows)
        cal = self.calibration
        return lambda scores: cal.adjust(scores, q, seen)  # the one rule, gallery.calibration

    def rank_of(self, query: np.ndarray, row: int) -> Optional[int]:
        """0-based position of gallery row `row` in this gallery's ranking for one query.

        Exact for galleries without an index or of at most CHUNK pictures (every picture is
        scored). A bigger indexed gallery ranks only its shortlist, as `knn` does, so a
        click never reads every row: None means "not among the first `shortlist` results"."""
        if self.index is None or len(self) <= CHUNK:
            s = self.score_all(query)[0]
            return int((s > s[row]).sum() + (s[:row] == s[row]).sum())
        q = self._check_queries(query, 1)
        rows = self._candidates(q, self._query_weights(q), min(len(self), self.shortlist))[0]
        rows = rows[rows >= 0]
        at = np.flatnonzero(rows[_top_k(self._scores(q, rows), len(rows), rows)[0]] == int(row))
        return int(at[0]) if len(at) else None

    def _check_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.embeddings.shape[1]:
            raise InputError(
                f"query vectors have shape {tuple(np.shape(queries))}, the gallery's dimension is "
                f"{self.embeddings.shape[1]}: were they embedded with the gallery's encoder?"
            )
        if not np.isfinite(q).all():
            raise InputError("query vectors contain NaN or infinity")
        if int(k) < 1:
            raise InputError(f"k must be at least 1, got {k}")
        return _normalize_rows(q)  # cosine scores whatever the caller passed

    def _knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Plain k nearest of the embeddings as encoded, through the index if there is one
        (IVF-PQ's approximate scores only choose candidates: they are re-scored exactly)."""
        n = len(self)
        k = min(int(k), n)
        if n == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self.index is None:
            return _exact_knn(q, self.raw_embeddings, k)
        zero = np.zeros(len(q), np.float32)
        if self.index_type == "ivfpq":
            rows = self._candidates(q, zero, max(self.shortlist, k))
            s = np.empty(rows.shape, np.float32)
            for b in range(0, len(q), 256):  # (256, shortlist, D) gathered at a time
                # Missing candidates (-1) point at row 0 and score below any real one.
                s[b:b + 256] = np.einsum("qd,qcd->qc", q[b:b + 256], self._raw_rows(np.maximum(rows[b:b + 256], 0)))
            s[rows < 0] = -np.inf
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            s, i = np.take_along_axis(s, top, 1), np.take_along_axis(rows, top, 1)
        else:
            s, i = self.index.search(query_vectors(q, zero, self.index.d), k)
        # Approximate indexes can come back short (-1): an IVF probe that saw fewer
        # than k vectors. Those rows are answered exactly, so k results always come.
        short = (i < 0).any(axis=1)
        if short.any():
            s[short], i[short] = _exact_knn(q[short], self.raw_embeddings, k)
        return _ordered(s.astype(np.float32), i)

    def search(self, queries: np.ndarray, k: int = 10) -> Union[list[SearchResult], list[list[SearchResult]]]:
        """The top min(k, N) results, best first: a list for one query (D,), a list per
        query for a batch (Q, D)."""
        s, i = self.knn(queries, k)
        out = [
            [SearchResult(rank=r, index=int(j), path=self.paths[j], score=float(v), label=self.labels[j])
             for r, (v, j) in enumerate(zip(srow, irow))]
            for srow, irow in zip(s, i)
        ]
        return out[0] if np.ndim(queries) == 1 else out

    @classmethod
    def build(cls, source_dir: PathLike, encoder: Any, out_dir: Optional[PathLike] = None,
              **options: Any) -> "Gallery":
        """Index a folder of images (class = first-level subfolder) and return the gallery.
        `out_dir` defaults to $SBIR_HOME/galleries/<folder name>; rebuilding updates only
        what changed. Options are those of `build_gallery`."""
        from sbir_core.paths import galleries_dir

        src = Path(source_dir)
        out = Path(out_dir) if out_dir is not None else galleries_dir() / (src.resolve().name or "gallery")
        return build_gallery(src, out, encoder, progress=options.pop("progress", False), **options)[0]


def build_gallery(source_dir: PathLike, out_dir: PathLike, encoder: Any, **options: Any) -> tuple[Gallery, Any]:
    """Index the images under `source_dir` into the gallery folder `out_dir` (see
    `gallery.build.write_gallery` for the options) -> (the gallery, opened; its BuildReport).

    An approximate gallery with diffusion also gets its diffused embeddings stored, so
    that opening it later maps them instead of recomputing them."""
    from sbir_core.gallery.build import write_gallery  # the writer never imports this module

    report = write_gallery(source_dir, out_dir, encoder, **options)
    gallery = Gallery.load(report.out_dir)
    gallery.save_diffused()
    return gallery, report


def _load_calibration(root: Path, meta: dict, dim: int) -> Optional[SeenCalibration]:
    setting = meta.get("seen_calibration")
    if not setting:
        return None
    path = root / PROTOTYPES_FILE
    if not path.is_file():
        raise GalleryError(f"{path} is missing (the gallery uses seen-class calibration); rebuild the gallery")
    protos = load_array(path)
    try:
        cal = SeenCalibration(protos.astype(np.float32), float(setting["tau"]), float(setting["beta"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise GalleryError(f"{root / GALLERY_FILE}: bad seen-class calibration ({exc}); rebuild the gallery") from exc
    if cal.prototypes.shape[1] != dim:
        raise GalleryError(f"{path} has dimension {cal.prototypes.shape[1]}, the embeddings {dim}; rebuild the gallery")
    return cal


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"expected a (N, D) array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("zero vector: cannot normalise")
    return np.ascontiguousarray(x / norms, dtype=np.float32)
