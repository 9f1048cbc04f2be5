"""The approximate indexes a gallery may carry (faiss): which one for which size, and building it.

- `flat`: none; exact search straight on the embeddings (the default up to `AUTO_FLAT_MAX`).
- `hnsw`: a graph over the full vectors: fast and accurate, but it holds every vector
  (about 1.3 KB a picture at D=256), so it stops fitting in memory around 10M pictures.
- `ivf`: inverted lists over the full vectors.
- `ivfpq`: inverted lists over product-quantised codes (`pq_m` bytes a picture, optionally
  after an OPQ rotation). Its scores are approximate, so the gallery only takes a shortlist
  from it and ranks that with the exact vectors, read from the memory-mapped embeddings.

Every index holds [g, -seen(g), sqrt(1 - seen(g)^2)] (seen: the picture's seen-class
confidence, `gallery.calibration`; zeros when None), zero-padded for PQ: a query [q, w, 0]
then scores cos(q, g) - w * seen(g), the calibrated score for w = beta * (1 - s(q)) and the
plain one for w = 0, so calibrated galleries search the index like plain ones.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np

from sbir_core.errors import InputError

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq")
REQUESTABLE = ("auto", "flat", "hnsw", "ivf", "ivfpq")  # what a build may ask for
# `auto` by size (scripts/bench_index.py on 2 cores, docs/BENCHMARKS.md I33b): exact search
# stays under ~10 ms to 50k pictures; past that IVF-PQ + exact re-scoring. HNSW is never
# chosen: on clustered vectors ranked as the app ranks (calibration, diffusion) its shortlist
# misses (recall@10 0.50-0.61 at 100k against IVF-PQ's 1.00, I33b), and it holds every
# vector again in memory. It stays available by name.
AUTO_FLAT_MAX = 50_000

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
# IVF-PQ: one byte per PQ_DIMS_PER_CODE dimensions, coarse lists ~ sqrt(N), k-means on a sample.
PQ_DIMS_PER_CODE = 4
PQ_TRAIN_POINTS_PER_LIST = 64
PQ_MIN_TRAIN = 10_000  # PQ's own k-means (256 centroids a sub-space) wants this many points
DEFAULT_SHORTLIST = 256


def faiss_module() -> Any:
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


def choose_index_type(n: int, requested: str = "auto") -> str:
    """The index type for a gallery of n pictures ('auto' picks by size)."""
    if requested not in REQUESTABLE:
        raise InputError(f"unknown index type {requested!r}; choose from {', '.join(REQUESTABLE)}")
    if requested != "auto":
        return requested
    return "flat" if n <= AUTO_FLAT_MAX else "ivfpq"


def index_vectors(embeddings: np.ndarray, seen: Optional[np.ndarray], width: Optional[int] = None) -> np.ndarray:
    """[g, -seen, sqrt(1 - seen^2)] rows, zero-padded to `width` columns."""
    e = np.asarray(embeddings, dtype=np.float32)
    s = np.zeros(len(e), np.float32) if seen is None else np.clip(np.asarray(seen, dtype=np.float32), 0, 1)
    # The last column tops every row up to norm sqrt(2) (queries put 0 there): inner products
    # stay as above, and with equal norms their order is the cosine's, the case graph and
    # list indexes are built for (Bachrach et al. 2014); unequal norms cost HNSW recall.
    parts = [e, -s[:, None], np.sqrt(1.0 - s * s)[:, None]]
    d = e.shape[1] + 2
    if width and width > d:
        parts.append(np.zeros((len(e), width - d), np.float32))
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def query_vectors(q: np.ndarray, w: np.ndarray, width: int) -> np.ndarray:
    """Queries as an index of `width` columns takes them: [q, w, 0, 0...] (just q for an index
    from before the seen column existed)."""
    if width == q.shape[1]:
        return q
    out = np.zeros((len(q), width), np.float32)
    out[:, :q.shape[1]] = q
    out[:, q.shape[1]] = w
    return out


def _train_sample(x: np.ndarray, count: int, seed: int) -> np.ndarray:
    if len(x) <= count:
        return x
    rng = np.random.default_rng(seed)
    return x[np.sort(rng.choice(len(x), count, replace=False))]


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
    pq_m: Optional[int] = None,
    opq: bool = False,
    shortlist: int = DEFAULT_SHORTLIST,
    seed: int = 0,
) -> tuple[Any, str, dict[str, Any]]:
    """-> (faiss index or None for flat, the type actually built, its parameters).

    Flat needs no index: exact search runs straight on the embeddings, so the vectors
    are not held twice. `index_type` may be 'auto' (`choose_index_type`)."""
    n = len(embeddings)
    index_type = choose_index_type(n, index_type)
    if index_type == "flat":
        return None, "flat", {}
    faiss = faiss_module()
    if index_type == "hnsw":
        x = index_vectors(embeddings, seen)
        index = faiss.IndexHNSWFlat(x.shape[1], int(m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        index.add(x)
        index.hnsw.efSearch = int(ef_search)
        return index, "hnsw", {"M": int(m), "ef_construction": int(ef_construction), "ef_search": int(ef_search)}
    lists = int(nlist) if nlist else (auto_nlist(n) if index_type == "ivf" else
                                      int(min(max(IVF_MIN_LISTS, round(math.sqrt(n))), n // IVF_MIN_POINTS_PER_LIST)))
    if lists < IVF_MIN_LISTS or n < lists * IVF_MIN_POINTS_PER_LIST:
        log.warning("%d items are too few to train an IVF index (needs >= %d); using exact flat search instead",
                    n, max(lists, IVF_MIN_LISTS) * IVF_MIN_POINTS_PER_LIST)
        return None, "flat", {}
    if index_type == "ivf":
        x = index_vectors(embeddings, seen)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
        index.train(_train_sample(x, lists * IVF_MAX_POINTS_PER_LIST, seed))
        index.add(x)
        index.nprobe = min(int(nprobe), lists)
        return index, "ivf", {"nlist": lists, "nprobe": int(index.nprobe)}
    # ivfpq: pad to whole PQ sub-spaces; the codes are trained on a sample, added in chunks
    # so that a memory-mapped input is never copied whole.
    d = embeddings.shape[1] + 2
    codes = int(pq_m) if pq_m else math.ceil(d / PQ_DIMS_PER_CODE)
    width = math.ceil(d / codes) * codes
    spec = f"{'OPQ%d,' % codes if opq else ''}IVF{lists},PQ{codes}np"  # np: no polysemous training (slow, unused)
    # L2, not inner product: every row has norm sqrt(2), so for a given query the L2 order is the
    # inner-product order, and k-means lists and residual codes are made for L2 (with inner
    # product the coarse step favours long centroids and misses a query's own lists).
    index = faiss.index_factory(width, spec, faiss.METRIC_L2)
    rows = _train_sample(np.arange(n), max(lists * PQ_TRAIN_POINTS_PER_LIST, PQ_MIN_TRAIN), seed)
    train_seen = None if seen is None else np.asarray(seen)[rows]
    index.train(index_vectors(np.asarray(embeddings[rows]), train_seen, width))
    for s in range(0, n, 65_536):
        chunk = np.asarray(embeddings[s:s + 65_536])
        index.add(index_vectors(chunk, None if seen is None else np.asarray(seen)[s:s + 65_536], width))
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = min(int(nprobe), lists)
    return index, "ivfpq", {"nlist": lists, "nprobe": int(ivf.nprobe), "pq_m": codes, "opq": bool(opq),
                            "shortlist": int(shortlist)}


def apply_search_params(index: Any, index_type: str, ef_search: Optional[int], nprobe: Optional[int]) -> None:
    if index is None:
        return
    if index_type == "hnsw" and ef_search is not None:
        index.hnsw.efSearch = int(ef_search)
    if index_type in ("ivf", "ivfpq") and nprobe is not None:
        ivf = faiss_module().extract_index_ivf(index)
        ivf.nprobe = min(int(nprobe), ivf.nlist)


def search_params(index: Any, index_type: str) -> tuple[Optional[int], Optional[int]]:
    """(efSearch, nprobe) an index is set to, to carry them over to a rebuilt one."""
    if index is None:
        return None, None
    if index_type == "hnsw":
        return int(index.hnsw.efSearch), None
    if index_type in ("ivf", "ivfpq"):
        return None, int(faiss_module().extract_index_ivf(index).nprobe)
    return None, None
