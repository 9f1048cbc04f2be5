"""The gallery index: embed a folder of images once, search it many times.

A gallery is a folder holding
- `gallery.json`: format version, encoder id (backbone@checkpoint), modality, index
  type and parameters, source folder, and one record per item (path relative to the
  source folder, label, size, mtime_ns) in row order;
- `embeddings.npy`: (N, D) float32, L2-normalised (cosine = inner product);
- `tokens.npy`: (N, T, C) float16 token grids for the explanations (optional);
- `index.faiss`: the approximate index, for the `hnsw` and `ivf` types only. It holds the
  embeddings as encoded (not diffused), each with two more coordinates, so that one
  inner product gives the seen-class calibrated score (`build_index`); `gallery.json` records the calibration temperature
  that column was made with (`index_seen_tau`);
- `seen_prototypes.npy`: the encoder's training-class prototypes, when its checkpoint
  prescribes seen-class calibration (`gallery.calibration`).

Builds are incremental (files are identified by relative path + size + mtime, so
unchanged files are never re-encoded, even after the folder is moved) and atomic
(everything is written to a hidden sibling folder that is then swapped in with
renames), so an interrupted build leaves the previous gallery as it was.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from sbir_core.errors import InputError, SBIRError
from sbir_core.gallery.calibration import PROTOTYPES_FILE, SeenCalibration
from sbir_core.gallery.diffusion import diffuse_gallery, expand_queries
from sbir_core.paths import PathLike

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GALLERY_FILE = "gallery.json"
EMBEDDINGS_FILE = "embeddings.npy"
TOKENS_FILE = "tokens.npy"
INDEX_FILE = "index.faiss"
INDEX_TYPES = ("flat", "hnsw", "ivf")
GALLERY_MODALITIES = ("photo", "sketch")

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 64
DEFAULT_NPROBE = 32
# faiss's k-means warns below 39 training points per centroid; fewer gives poor lists.
IVF_MIN_POINTS_PER_LIST = 39
IVF_MIN_LISTS = 8
# faiss would subsample k-means input to 256 points per list anyway; doing it here
# with a fixed seed keeps builds reproducible.
IVF_MAX_POINTS_PER_LIST = 256
FLOAT16_MAX = float(np.finfo(np.float16).max)
# With gallery diffusion on, the first results stay the query's nearest pictures.
# Diffusion raises precision further down the list but can push a lone correct match
# out of the first row (hit@5 falls), and the first row is what a person looks at.
PLAIN_HEAD = 5
# Approximate galleries fetch this many candidates through the index and rank them exactly
# (calibration, diffusion); exact ("flat") galleries rank every picture.
SHORTLIST = 256



class GalleryError(SBIRError):
    """A gallery folder is missing, incomplete or inconsistent."""


class StaleGalleryError(GalleryError):
    """The gallery was built with another encoder than the one used to query it."""


@dataclass(frozen=True)
class SearchResult:
    index: int  # row in the gallery
    path: str  # absolute path of the image
    score: float  # cosine similarity (inner product of normalised vectors)
    label: str


# ----------------------------------------------------------------------------- images


# ----------------------------------------------------------------------------- faiss
def _faiss():
    # Imported lazily: `python -m sbir_core --help` should not pay for it. faiss logs
    # which CPU build it picked at INFO, noise on every CLI call unless asked for.
    loader = logging.getLogger("faiss.loader")
    if loader.level == logging.NOTSET:
        loader.setLevel(logging.WARNING)
    import faiss

    return faiss


def auto_nlist(n: int) -> int:
    """IVF list count: ~4 sqrt(N), but never more than the data can train."""
    return int(min(max(1, round(4 * math.sqrt(n))), n // IVF_MIN_POINTS_PER_LIST))


def build_index(
    embeddings: np.ndarray,
    index_type: str = "flat",
    *,
    seen: Optional[np.ndarray] = None,
    m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef_search: int = DEFAULT_EF_SEARCH,
    nlist: Optional[int] = None,
    nprobe: int = DEFAULT_NPROBE,
    seed: int = 0,
) -> tuple[Any, str, dict[str, Any]]:
    """-> (faiss index or None for flat, the type actually built, its parameters).

    Flat needs no index: exact search runs straight on the embeddings, so the vectors
    are not held twice. Other indexes hold [g, -seen(g), sqrt(1 - seen(g)^2)] (seen: the
    pictures' seen-class confidence, `gallery.calibration`; zeros when None): a query
    [q, w, 0] then scores cos(q, g) - w * seen(g), the calibrated score for
    w = beta * (1 - s(q)) and the plain one for w = 0, so calibrated galleries search the
    index like plain ones.
    """
    if index_type not in INDEX_TYPES:
        raise InputError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
    if index_type == "flat":
        return None, "flat", {}
    e = np.asarray(embeddings, dtype=np.float32)
    s = np.zeros(len(e), np.float32) if seen is None else np.clip(np.asarray(seen, dtype=np.float32), 0, 1)
    # The last column tops every row up to norm sqrt(2) (queries put 0 there): inner products
    # stay as above, and with equal norms their order is the cosine's, the case graph and
    # list indexes are built for (Bachrach et al. 2014); unequal norms cost HNSW recall.
    x = np.ascontiguousarray(np.concatenate([e, -s[:, None], np.sqrt(1.0 - s * s)[:, None]], axis=1))
    n, d = x.shape
    faiss = _faiss()
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        index.add(x)
        index.hnsw.efSearch = int(ef_search)
        return index, "hnsw", {"M": int(m), "ef_construction": int(ef_construction), "ef_search": int(ef_search)}
    # ivf
    lists = int(nlist) if nlist else auto_nlist(n)
    if lists < IVF_MIN_LISTS or n < lists * IVF_MIN_POINTS_PER_LIST:
        log.warning(
            "%d items are too few to train an IVF index (needs >= %d); using exact flat search instead",
            n, max(lists, IVF_MIN_LISTS) * IVF_MIN_POINTS_PER_LIST,
        )
        return None, "flat", {}
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
    train = x
    if n > lists * IVF_MAX_POINTS_PER_LIST:
        rng = np.random.default_rng(seed)
        train = x[np.sort(rng.choice(n, lists * IVF_MAX_POINTS_PER_LIST, replace=False))]
    index.train(train)
    index.add(x)
    index.nprobe = min(int(nprobe), lists)
    return index, "ivf", {"nlist": lists, "nprobe": int(index.nprobe)}


def _apply_search_params(index: Any, index_type: str, ef_search: Optional[int], nprobe: Optional[int]) -> None:
    if index is None:
        return
    if index_type == "hnsw" and ef_search is not None:
        index.hnsw.efSearch = int(ef_search)
    if index_type == "ivf" and nprobe is not None:
        index.nprobe = min(int(nprobe), index.nlist)


def _ordered(s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic order: score descending, then index ascending."""
    order = np.lexsort((i, -s), axis=-1)
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1).astype(np.int64)


def _exact_knn(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-NN of q among the rows of x, in deterministic order."""
    if k < 1 or len(x) == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    faiss = _faiss()
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


# ----------------------------------------------------------------------------- the gallery
class Gallery:
    """Embeddings (+ tokens) of a set of images, searchable by cosine similarity."""

    def __init__(
        self,
        embeddings: np.ndarray,
        meta: dict[str, Any],
        *,
        tokens: Optional[np.ndarray] = None,
        index: Any = None,
        root: Optional[PathLike] = None,
        calibration: Optional[SeenCalibration] = None,
    ) -> None:
        self.meta = meta
        self.tokens = tokens
        self.root = Path(root) if root is not None else None  # the folder it was loaded from
        # What the encoder stored (embeddings.npy); `embeddings` is what searches see.
        self.raw_embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.embeddings = self.raw_embeddings
        self.index = index
        self.index_remade = False
        self.diffusion_k = int(meta.get("diffusion_k") or 0)
        self.plain_head = PLAIN_HEAD
        if self.diffusion_k and len(self.raw_embeddings) > 1:
            self._diffuse()
        self.set_calibration(calibration)
        items = meta["items"]
        src = meta.get("source_dir") or ""
        rel = meta.get("source_dir_rel")
        if self.root is not None and rel and (self.root / rel).is_dir():
            # A gallery shipped in a repository or moved with its images: the relative
            # location survives a clone to another path, the absolute one does not.
            src = str((self.root / rel).resolve())
        self._source_dir = src
        # os.path.join keeps absolute item paths as they are (in-memory galleries).
        self.paths: list[str] = [os.path.join(src, *it["path"].split("/")) if src else it["path"] for it in items]
        self.labels: list[str] = [it.get("label", "") for it in items]
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
            "items": [{"path": p, "label": lab} for p, lab in zip(paths, labels)],
        }
        return cls(x, meta, index=index, calibration=calibration)

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

        Tokens are memory-mapped by default: they can be far larger than the
        embeddings and the explanations read only a few rows.
        """
        root = Path(directory)
        _recover(root)
        hint = f"build it with: python -m sbir_core index PHOTO_DIR --out {shlex.quote(str(root))}"
        if not root.is_dir():
            raise GalleryError(f"no gallery at {root}: {hint}")
        meta_path = root / GALLERY_FILE
        if not meta_path.is_file():
            raise GalleryError(f"{root} is not a gallery (no {GALLERY_FILE}): {hint}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GalleryError(f"cannot read {meta_path}: {exc}; rebuild the gallery") from exc
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise GalleryError(
                f"{meta_path} has format version {version!r}, this version of sbir_core reads "
                f"{FORMAT_VERSION}; rebuild the gallery"
            )
        missing = [k for k in ("encoder_id", "modality", "index_type", "items", "dims", "has_tokens") if k not in meta]
        if missing:
            raise GalleryError(f"{meta_path} lacks {', '.join(missing)}; rebuild the gallery")
        try:
            n = len(meta["items"])
            d = meta["dims"]["embedding"]
            bad = [i for i, it in enumerate(meta["items"]) if not isinstance(it.get("path"), str)]
        except (KeyError, TypeError, AttributeError) as exc:
            raise GalleryError(f"{meta_path} is malformed ({exc!r}); rebuild the gallery") from exc
        if bad:
            raise GalleryError(f"{meta_path}: item {bad[0]} has no path; rebuild the gallery")
        # Item paths are relative to the source folder and must stay inside it: a gallery
        # file is data, and data must not make us open /etc/... or ../../secrets.
        escaping = [it["path"] for it in meta["items"] if not _confined(it["path"])]
        if escaping:
            raise GalleryError(f"{meta_path}: item path {escaping[0]!r} leaves the gallery's source folder; "
                               "rebuild the gallery")

        emb = _load_array(root / EMBEDDINGS_FILE)
        if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[0] != n or emb.shape[1] != d:
            raise GalleryError(
                f"{root / EMBEDDINGS_FILE} is {emb.dtype} {emb.shape}, {GALLERY_FILE} lists {n} items of "
                f"dimension {d}: the gallery is inconsistent; rebuild it"
            )
        if not np.isfinite(emb).all():
            raise GalleryError(f"{root / EMBEDDINGS_FILE} contains NaN or infinite values: it is corrupt; rebuild it")
        norms = np.linalg.norm(emb, axis=1)
        if n and not (np.abs(norms - 1.0) < 1e-2).all():
            raise GalleryError(f"{root / EMBEDDINGS_FILE} has {(np.abs(norms - 1.0) >= 1e-2).sum()} rows that are "
                               "not unit vectors (zeros or garbage): it is corrupt; rebuild it")
        tokens = None
        if meta["has_tokens"]:
            tokens = _load_array(root / TOKENS_FILE, mmap=mmap_tokens)
            g = meta.get("grid") or (0, 0)
            want = (n, int(g[0]) * int(g[1]), meta["dims"].get("token"))
            if tokens.dtype != np.float16 or tokens.shape != want:
                raise GalleryError(
                    f"{root / TOKENS_FILE} is {tokens.dtype} {tokens.shape}, expected float16 {want}: "
                    f"the gallery is inconsistent; rebuild it"
                )
        index = None
        kind = meta["index_type"]
        if kind not in INDEX_TYPES:
            raise GalleryError(f"{meta_path} names an unknown index type {kind!r}")
        if kind != "flat":
            ipath = root / INDEX_FILE
            if not ipath.is_file():
                raise GalleryError(f"{ipath} is missing (the gallery's index type is {kind}); rebuild the gallery")
            try:
                index = _faiss().read_index(str(ipath))
            except RuntimeError as exc:  # faiss reports bad files as RuntimeError
                raise GalleryError(f"cannot read {ipath}: {str(exc).splitlines()[0]}; rebuild the gallery") from exc
            if index.ntotal != n or index.d not in (d, d + 2):  # d: from before the seen column
                raise GalleryError(
                    f"{ipath} holds {index.ntotal} vectors of dimension {index.d}, {GALLERY_FILE} lists {n} "
                    f"of dimension {d}: the gallery is inconsistent; rebuild it"
                )
            _apply_search_params(index, kind, ef_search, nprobe)
        return cls(emb, meta, tokens=tokens, index=index, root=root, calibration=_load_calibration(root, meta, d))

    # ---- attributes
    def __len__(self) -> int:
        return len(self.embeddings)

    def __repr__(self) -> str:
        return (f"Gallery({len(self)} items, encoder={self.encoder_id!r}, modality={self.modality!r}, "
                f"index={self.index_type!r}, root={str(self.root) if self.root else None!r})")

    @property
    def encoder_id(self) -> str:
        return self.meta["encoder_id"]

    @property
    def modality(self) -> str:
        return self.meta["modality"]

    @property
    def index_type(self) -> str:
        return self.meta["index_type"]

    @property
    def source_dir(self) -> str:
        """Where the images are now (may differ from where they were when indexed)."""
        return self._source_dir

    @property
    def items(self) -> list[dict[str, Any]]:
        return self.meta["items"]

    def set_search_params(self, *, ef_search: Optional[int] = None, nprobe: Optional[int] = None) -> None:
        """Trade speed for recall at query time (hnsw: efSearch, ivf: nprobe)."""
        _apply_search_params(self.index, self.index_type, ef_search, nprobe)

    # ---- diffusion
    def _diffuse(self) -> None:
        """Replace searchable embeddings by their DBA version (see sbir_core.gallery.diffusion).
        An approximate index keeps the vectors as encoded and finds the neighbours."""
        k = min(self.diffusion_k, len(self.raw_embeddings))
        s, i = self._knn(self.raw_embeddings, k)
        self.embeddings = diffuse_gallery(self.raw_embeddings, s, i)

    def set_diffusion(self, k: int) -> None:
        """Turn gallery diffusion off (0) or set its neighbour count."""
        self.diffusion_k = int(k)
        self.embeddings = self.raw_embeddings
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
        self._seen = self.calibration.seen_confidence(self.raw_embeddings) if self.calibration else None
        if (self.index is not None and self.calibration is not None
                and (self.index.d != self.raw_embeddings.shape[1] + 2
                     or self.meta.get("index_seen_tau") != self.calibration.tau)):
            # The index's seen column was made for no or another temperature (a query's
            # weight carries beta, so only tau matters): remake it for this one.
            log.warning("rebuilding the %s index of %d items in memory for seen-class calibration tau=%g%s",
                        self.index_type, len(self), self.calibration.tau,
                        f"; rebuild {self.root} to store it" if self.root is not None else "")
            self.index_remade = True  # so that re-indexing an unchanged folder writes it
            params = {("m" if k == "M" else k): v for k, v in (self.meta.get("index_params") or {}).items()}
            old = self.index
            self.index, _, _ = build_index(self.raw_embeddings, self.index_type, seen=self._seen, **params)
            self.meta["index_seen_tau"] = self.calibration.tau
            # keep the search-time settings the old index was loaded with (Gallery.load(ef_search=...))
            _apply_search_params(self.index, self.index_type,
                                 getattr(getattr(old, "hnsw", None), "efSearch", None), getattr(old, "nprobe", None))

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
        picture; approximate ones (hnsw, ivf) rank the `SHORTLIST` best candidates their
        index returns for the calibrated score."""
        q = self._check_queries(queries, k)
        k = min(int(k), len(self))
        if self.calibration is None and not self.diffusion_k:
            return self._knn(q, k)
        if self.index is None:
            idx = _top_k(self.score_all(q), k)
        else:
            idx = np.stack([self._shortlist_knn(q[j:j + 1], k) for j in range(len(q))])
        return np.einsum("qd,qkd->qk", q, self.raw_embeddings[idx]).astype(np.float32), idx.astype(np.int64)

    def _shortlist_knn(self, q: np.ndarray, k: int) -> np.ndarray:
        """One query's k best rows among its index candidates, ranked as `score_all` ranks."""
        c = min(len(self), max(SHORTLIST, 2 * k))
        _, rows = self.index.search(self._index_query(q, self._query_weights(q)), c)
        rows = rows[0][rows[0] >= 0]
        if len(rows) < c:  # an IVF probe that saw too few vectors: rank everything
            rows = np.arange(len(self))
        return rows[_top_k(self._scores(q, rows), k, rows)[0]]

    def score_all(self, queries: np.ndarray) -> np.ndarray:
        """(Q, N) scores whose descending order is the order `knn` returns (for evaluation;
        exact, whatever the index). Without diffusion or calibration they are the cosine
        similarities."""
        return self._scores(self._check_queries(queries, 1))

    def _scores(self, q: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """Ranking scores of the gallery's pictures (or of `rows` only) for normalised queries."""
        raw = self.raw_embeddings if rows is None else self.raw_embeddings[rows]
        cal = self._calibrated_by(rows, q)
        plain = cal(q @ raw.T)
        if not self.diffusion_k:
            return plain
        emb = self.embeddings if rows is None else self.embeddings[rows]
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
        seen = self._seen if rows is None else self._seen[rows]
        cal = self.calibration
        return lambda scores: cal.adjust(scores, q, seen)  # the one rule, gallery.calibration

    def rank_of(self, query: np.ndarray, row: int) -> int:
        """0-based position of gallery row `row` in this gallery's ranking for one query."""
        s = self.score_all(query)[0]
        return int((s > s[row]).sum() + (s[:row] == s[row]).sum())

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

    def _index_query(self, q: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Queries as the index takes them: [q, w, 0] when it holds the seen column."""
        if self.index.d == q.shape[1]:  # an index from before the column existed
            return q
        return np.ascontiguousarray(np.concatenate([q, w[:, None], np.zeros_like(w)[:, None]], axis=1),
                                    dtype=np.float32)

    def _knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Plain k nearest of the embeddings as encoded, through the index if there is one."""
        n = len(self)
        k = min(int(k), n)
        if n == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self.index is None:
            return _exact_knn(q, self.raw_embeddings, k)
        s, i = self.index.search(self._index_query(q, np.zeros(len(q), np.float32)), k)
        # Approximate indexes can come back short (-1): an IVF probe that saw fewer
        # than k vectors. Those rows are answered exactly, so k results always come.
        short = (i < 0).any(axis=1)
        if short.any():
            s[short], i[short] = _exact_knn(q[short], self.raw_embeddings, k)
        return _ordered(s, i)

    def search(self, queries: np.ndarray, k: int = 10) -> Union[list[SearchResult], list[list[SearchResult]]]:
        """The top min(k, N) results, best first: a list for one query (D,), a list per
        query for a batch (Q, D)."""
        s, i = self.knn(queries, k)
        out = [
            [SearchResult(index=int(j), path=self.paths[j], score=float(v), label=self.labels[j])
             for v, j in zip(srow, irow)]
            for srow, irow in zip(s, i)
        ]
        return out[0] if np.ndim(queries) == 1 else out

    @classmethod
    def build(cls, source_dir: PathLike, encoder: Any, out_dir: Optional[PathLike] = None,
              **options: Any) -> "Gallery":
        """Index a folder of images (class = first-level subfolder) and return the gallery.
        `out_dir` defaults to $SBIR_HOME/galleries/<folder name>; rebuilding updates only
        what changed. Options are those of `build_gallery`."""
        from sbir_core.gallery.build import build_gallery
        from sbir_core.paths import galleries_dir

        src = Path(source_dir)
        out = Path(out_dir) if out_dir is not None else galleries_dir() / (src.resolve().name or "gallery")
        return build_gallery(src, out, encoder, progress=options.pop("progress", False), **options)[0]


def _load_calibration(root: Path, meta: dict, dim: int) -> Optional[SeenCalibration]:
    setting = meta.get("seen_calibration")
    if not setting:
        return None
    path = root / PROTOTYPES_FILE
    if not path.is_file():
        raise GalleryError(f"{path} is missing (the gallery uses seen-class calibration); rebuild the gallery")
    protos = _load_array(path)
    try:
        cal = SeenCalibration(protos.astype(np.float32), float(setting["tau"]), float(setting["beta"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise GalleryError(f"{root / GALLERY_FILE}: bad seen-class calibration ({exc}); rebuild the gallery") from exc
    if cal.prototypes.shape[1] != dim:
        raise GalleryError(f"{path} has dimension {cal.prototypes.shape[1]}, the embeddings {dim}; rebuild the gallery")
    return cal


def _confined(rel: str) -> bool:
    """A stored item path that stays inside its source folder (relative, no '..')."""
    p = rel.replace("\\", "/")
    parts = p.split("/")
    return bool(p) and not p.startswith("/") and ":" not in parts[0] and ".." not in parts


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"expected a (N, D) array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("zero vector: cannot normalise")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _load_array(path: Path, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise GalleryError(f"{path} is missing: the gallery is incomplete; rebuild it")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise GalleryError(f"cannot read {path}: {exc}; rebuild the gallery") from exc


# ----------------------------------------------------------------------------- encoder identity


# ----------------------------------------------------------------------------- queries


# ----------------------------------------------------------------------------- building


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _recover(out: Path) -> None:
    """Finish what a build killed mid-swap left: restore the backup, drop dead temp folders."""
    parent = out.parent
    if not parent.is_dir():
        return
    if not out.exists():
        backups = sorted(parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if backups:
            log.warning("restoring gallery %s from %s (a previous build was interrupted)", out, backups[-1])
            os.replace(backups[-1], out)
    for tmp in parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            log.info("removing %s, left by an interrupted build", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
