"""Retrieval metrics for zero-shot sketch-based image retrieval (numpy only).

Conventions shared by every function here:

* ``scores`` is a (Q, G) similarity matrix, higher = better (negate distances
  before calling).  Rankings come from :func:`rank_gallery` only, so every
  metric sees the same order: descending score in float32, ties broken by
  ascending gallery index, NaN scores ranked last.
* A gallery item is relevant to a query when their labels are equal.  Labels
  may be ints or strings (not a mix of both: ``1`` and ``"1"`` would silently
  compare equal after numpy's coercion, so that raises ``TypeError``).
* A query with no relevant item in the gallery gets AP = 0 and P@K = 0 and is
  still counted in every mean.  Some published code skips such queries (or
  produces NaN and averages with ``nanmean``), which gives higher numbers; on
  the standard ZS-SBIR splits every query class is in the gallery, so the
  choice only matters for custom galleries.
* Metrics are computed per block of ``chunk_size`` queries, so a 4,000 x 8,000
  evaluation never materialises more than a (chunk_size, G) ranking and a few
  float64 arrays of that size at a time (~100 MB for 512 x 8,000).

Definitions (rel_i = 1 if the item ranked i-th, 1-based, is relevant;
P(i) = precision at rank i = (number of relevant items in ranks 1..i) / i;
R = number of relevant items in the whole gallery):

* AP (mAP@all), non-interpolated: ``sum_i P(i) rel_i / R`` over the full
  ranked list.  This is what ``sklearn.metrics.average_precision_score``
  computes for one query's scores when there are no ties.
* AP@K (mAP@K, SAKE / ZSE-SBIR convention): ``sum_{i<=K} P(i) rel_i /
  min(R, K)``.  The denominator is the best number of hits achievable in the
  top K, so a perfect top-K list scores 1 even when R > K, and missing
  relevant items in the top K are penalised.  Another common convention
  divides by the number of relevant items actually retrieved in the top K;
  that one ignores misses (a single hit at rank 1 scores 1.0) and gives
  higher, not comparable numbers.  A third divides by R, which caps the score
  at K / R when R > K.
* Interpolated ("VOC all points", VOC2010+) AP: replaces P(i) by the
  precision envelope ``max_{j >= i} P(j)`` (max precision at recall >= the
  recall at rank i; j only up to K for AP@K) and takes the area under that
  step curve, i.e. ``sum_i max_{j>=i} P(j) rel_i / denominator``.  Because
  the envelope is >= P(i) pointwise, interpolated AP >= non-interpolated AP,
  with equality when precision never rises along the list (e.g. all relevant
  items first).  The released SAKE evaluation code (``eval_AP_inner`` +
  ``VOCap``, reused by many later ZS-SBIR papers) computes this interpolated
  variant with recall normalised by min(R, K); use ``interpolated=True`` to
  compare with tables produced by it.
* P@K: (relevant items in the top K) / K, with K clipped to G.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np

__all__ = [
    "rank_gallery",
    "average_precision",
    "average_precision_batch",
    "voc_ap",
    "voc_ap_batch",
    "precision_at_k_batch",
    "map_all",
    "map_at_k",
    "precision_at_k",
    "per_query_metrics",
    "retrieval_report",
    "paired_difference",
]

DEFAULT_CHUNK_SIZE = 512


# ----------------------------------------------------------------------------
# Ranking
# ----------------------------------------------------------------------------

def _check_scores(scores: Any) -> np.ndarray:
    # np.asarray keeps memmaps lazy; float32 conversion happens per chunk.
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be a 2-D (queries, gallery) array, got shape {s.shape}")
    if s.shape[1] == 0:
        raise ValueError("scores has an empty gallery (G = 0)")
    return s


def _rank_block(block: np.ndarray) -> np.ndarray:
    # float32 first so that float64 scores differing only below float32
    # precision become exact ties and are ordered by gallery index, whatever
    # dtype the caller passed; a stable sort on the negation gives descending
    # scores with ascending index among ties (and NaN, sorted last by numpy).
    neg = -np.asarray(block, dtype=np.float32)
    return np.argsort(neg, axis=1, kind="stable")


def rank_gallery(scores: np.ndarray, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """Rank the gallery for every query.

    Args:
        scores: (Q, G) similarities, higher = better.
        chunk_size: queries sorted at a time (bounds the float32 temporary).

    Returns:
        (Q, G) integer array; row q lists gallery indices from best to worst.
        Order is by descending float32 score, ties by ascending gallery index,
        NaN scores last, so the result is deterministic and independent of the
        query order.
    """
    s = _check_scores(scores)
    q, g = s.shape
    chunk_size = _check_chunk(chunk_size)
    out = np.empty((q, g), dtype=np.intp)
    for start in range(0, q, chunk_size):
        out[start:start + chunk_size] = _rank_block(s[start:start + chunk_size])
    return out


# ----------------------------------------------------------------------------
# AP / precision from ranked relevance
# ----------------------------------------------------------------------------

def _ap_rows(rel: np.ndarray, denom: np.ndarray, interpolated: bool) -> np.ndarray:
    """AP of each row of a ranked boolean relevance matrix, given denominators."""
    n, length = rel.shape
    if length == 0:
        return np.zeros(n, dtype=np.float64)
    hits = np.cumsum(rel, axis=1, dtype=np.float64)
    prec = hits / np.arange(1, length + 1, dtype=np.float64)
    if interpolated:
        # Precision envelope: running max from the end of the (possibly
        # truncated) list.  Its value at a relevant rank equals VOC's
        # "max precision at recall >= r"; the trailing recall segment VOC adds
        # up to recall 1 has precision 0 and contributes nothing.
        prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
    num = np.einsum("ij,ij->i", prec, rel.astype(np.float64, copy=False))
    denom = np.asarray(denom, dtype=np.float64)
    out = np.zeros(n, dtype=np.float64)
    # No relevant item -> AP 0 (not NaN), so the query still counts in means.
    np.divide(num, denom, out=out, where=denom > 0)
    return out


def _as_relevance_2d(relevant_ranked: Any) -> np.ndarray:
    rel = np.asarray(relevant_ranked)
    if rel.ndim != 2:
        raise ValueError(f"relevant_ranked must be 2-D (queries, ranks), got shape {rel.shape}")
    return rel.astype(bool, copy=False)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _check_chunk(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def average_precision_batch(
    relevant_ranked: np.ndarray,
    k: int | None = None,
    *,
    n_relevant: np.ndarray | None = None,
    interpolated: bool = False,
) -> np.ndarray:
    """Per-row AP of ranked relevance lists (vectorised).

    Args:
        relevant_ranked: (Q, L) booleans (or 0/1), column i = relevance of the
            item at rank i + 1.
        k: None for AP over the whole list (mAP@all); otherwise AP@k with the
            SAKE denominator min(R, k) (see module docstring).  k > L uses L.
        n_relevant: (Q,) R = relevant items in the whole gallery.  Defaults to
            the row sums, which is only right when the rows are full rankings;
            pass it when the rows are already truncated.
        interpolated: VOC all-points interpolated AP instead of the plain one.

    Returns:
        (Q,) float64 APs; rows with R = 0 get 0.
    """
    rel = _as_relevance_2d(relevant_ranked)
    if n_relevant is None:
        r = rel.sum(axis=1).astype(np.float64)
    else:
        r = np.asarray(n_relevant, dtype=np.float64).reshape(-1)
        if r.shape[0] != rel.shape[0]:
            raise ValueError("n_relevant must have one entry per row of relevant_ranked")
    if k is not None:
        k = _check_k(k)
        rel = rel[:, :k]
        r = np.minimum(r, k)
    return _ap_rows(rel, r, interpolated)


def average_precision(
    relevant_ranked: np.ndarray,
    k: int | None = None,
    *,
    n_relevant: int | None = None,
    interpolated: bool = False,
) -> float:
    """AP of one ranked relevance list, e.g. [1, 0, 1, 0] -> (1/1 + 2/3) / 2.

    Non-interpolated by default, over the whole list; ``k`` gives AP@k with
    the min(R, k) denominator; a list with no relevant item gives 0.0.  See
    :func:`average_precision_batch` for the arguments.
    """
    rel = np.asarray(relevant_ranked)
    if rel.ndim != 1:
        raise ValueError(f"relevant_ranked must be 1-D, got shape {rel.shape}")
    nr = None if n_relevant is None else np.array([n_relevant])
    return float(average_precision_batch(rel[None, :], k, n_relevant=nr, interpolated=interpolated)[0])


def voc_ap_batch(
    relevant_ranked: np.ndarray, k: int | None = None, *, n_relevant: np.ndarray | None = None
) -> np.ndarray:
    """Per-row VOC all-points interpolated AP; ``average_precision_batch(..., interpolated=True)``.

    Area under the precision envelope (max precision at recall >= r), as in
    PASCAL VOC 2010+ and the SAKE evaluation code.  Always >= the
    non-interpolated AP of the same list; use it only to compare with
    published tables computed that way.
    """
    return average_precision_batch(relevant_ranked, k, n_relevant=n_relevant, interpolated=True)


def voc_ap(relevant_ranked: np.ndarray, k: int | None = None, *, n_relevant: int | None = None) -> float:
    """VOC all-points interpolated AP of one ranked list (see :func:`voc_ap_batch`).

    Example: [0, 1, 1] -> envelope at the two hits is 2/3, 2/3 -> AP = 2/3,
    whereas the non-interpolated AP is (1/2 + 2/3) / 2 = 7/12.
    """
    return average_precision(relevant_ranked, k, n_relevant=n_relevant, interpolated=True)


def precision_at_k_batch(relevant_ranked: np.ndarray, k: int) -> np.ndarray:
    """Per-row P@k = hits in the first k ranks / k; k larger than the list uses the list length."""
    rel = _as_relevance_2d(relevant_ranked)
    k_eff = min(_check_k(k), rel.shape[1])
    if k_eff == 0:
        return np.zeros(rel.shape[0], dtype=np.float64)
    return rel[:, :k_eff].sum(axis=1, dtype=np.float64) / k_eff


# ----------------------------------------------------------------------------
# Metrics from scores + labels
# ----------------------------------------------------------------------------

def _is_text(labels: np.ndarray) -> bool:
    if labels.dtype.kind in "US":
        return True
    return labels.dtype.kind == "O" and labels.size > 0 and isinstance(labels.flat[0], str)


def _encode_labels(query_labels: Any, gallery_labels: Any, n_q: int, n_g: int):
    ql = np.asarray(query_labels).reshape(-1)
    gl = np.asarray(gallery_labels).reshape(-1)
    if ql.shape[0] != n_q:
        raise ValueError(f"{ql.shape[0]} query labels for {n_q} score rows")
    if gl.shape[0] != n_g:
        raise ValueError(f"{gl.shape[0]} gallery labels for {n_g} score columns")
    if ql.size and gl.size and _is_text(ql) != _is_text(gl):
        raise TypeError("query and gallery labels must both be strings or both be numbers")
    # Integer codes make relevance a cheap int comparison and let bincount
    # give R for every class at once.
    uniq, inv = np.unique(np.concatenate([ql, gl]), return_inverse=True)
    inv = inv.reshape(-1)
    q_codes, g_codes = inv[:n_q], inv[n_q:]
    return ql, uniq, q_codes, g_codes


def per_query_metrics(
    scores: np.ndarray,
    query_labels: Sequence[Any] | np.ndarray,
    gallery_labels: Sequence[Any] | np.ndarray,
    *,
    map_ks: Sequence[int] = (),
    precision_ks: Sequence[int] = (),
    hit_ks: Sequence[int] = (),
    interpolated: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, np.ndarray]:
    """All per-query metrics from one ranking pass, in blocks of queries.

    Returns a dict of (Q,) float64 arrays: ``"AP@all"``, ``"AP@k"`` for each
    k in ``map_ks``, ``"P@k"`` for each k in ``precision_ks`` and ``"hit@k"``
    (1 if any relevant item is in the top k: what a person sees in the first row)
    for each k in ``hit_ks``.
    """
    s = _check_scores(scores)
    n_q, n_g = s.shape
    if n_q == 0:
        raise ValueError("scores has no queries (Q = 0)")
    chunk_size = _check_chunk(chunk_size)
    map_ks = [_check_k(k) for k in map_ks]
    precision_ks = [_check_k(k) for k in precision_ks]
    hit_ks = [_check_k(k) for k in hit_ks]
    _, uniq, q_codes, g_codes = _encode_labels(query_labels, gallery_labels, n_q, n_g)
    # R for every query from the whole gallery (not from a truncated list).
    n_rel = np.bincount(g_codes, minlength=len(uniq))[q_codes].astype(np.float64)

    out = {"AP@all": np.empty(n_q)}
    out.update({f"AP@{k}": np.empty(n_q) for k in map_ks})
    out.update({f"P@{k}": np.empty(n_q) for k in precision_ks})
    out.update({f"hit@{k}": np.empty(n_q) for k in hit_ks})
    for start in range(0, n_q, chunk_size):
        sl = slice(start, start + chunk_size)
        ranked = _rank_block(s[sl])
        rel = g_codes[ranked] == q_codes[sl, None]
        del ranked  # the (chunk, G) index array is the largest temporary
        r = n_rel[sl]
        out["AP@all"][sl] = _ap_rows(rel, r, interpolated)
        for k in map_ks:
            out[f"AP@{k}"][sl] = _ap_rows(rel[:, :k], np.minimum(r, k), interpolated)
        for k in precision_ks:
            out[f"P@{k}"][sl] = precision_at_k_batch(rel, k)
        for k in hit_ks:
            out[f"hit@{k}"][sl] = rel[:, :k].any(1)
    return out


# The single-number metrics: the mean over queries of one `per_query_metrics` column.
Labels = Union[Sequence[Any], np.ndarray]


def map_all(scores: np.ndarray, query_labels: Labels, gallery_labels: Labels, *, interpolated: bool = False,
            chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """mAP@all: mean over queries of AP over the whole ranked gallery (no-relevant queries count as 0)."""
    m = per_query_metrics(scores, query_labels, gallery_labels, interpolated=interpolated, chunk_size=chunk_size)
    return float(m["AP@all"].mean())


def map_at_k(scores: np.ndarray, query_labels: Labels, gallery_labels: Labels, k: int, *,
             interpolated: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """mAP@k, SAKE / ZSE-SBIR convention: mean of sum_{i<=k} P(i) rel_i / min(R, k).

    R counts relevant items in the whole gallery, so misses in the top k lower
    the score (unlike dividing by the hits retrieved in the top k).  k > G
    uses G, which makes mAP@k equal mAP@all.
    """
    k = _check_k(k)
    m = per_query_metrics(scores, query_labels, gallery_labels, map_ks=(k,), interpolated=interpolated,
                          chunk_size=chunk_size)
    return float(m[f"AP@{k}"].mean())


def precision_at_k(scores: np.ndarray, query_labels: Labels, gallery_labels: Labels, k: int, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Mean P@k = relevant items in the top k / k; k > G uses G (so P@k = R / G)."""
    k = _check_k(k)
    m = per_query_metrics(scores, query_labels, gallery_labels, precision_ks=(k,), chunk_size=chunk_size)
    return float(m[f"P@{k}"].mean())


def _py(label: Any) -> Any:
    # numpy scalars -> python str / int / float so the report is JSON-friendly.
    return label.item() if isinstance(label, np.generic) else label


def retrieval_report(
    scores: np.ndarray,
    query_labels: Sequence[Any] | np.ndarray,
    gallery_labels: Sequence[Any] | np.ndarray,
    ks: Sequence[int] = (100, 200),
    *,
    interpolated: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    first_row: Sequence[int] = (5, 10),
    hits: Sequence[int] = (1, 5),
    per_query: bool = False,
) -> dict[str, Any]:
    """Standard ZS-SBIR numbers in one ranking pass, with a per-class breakdown.

    With the default ks=(100, 200) the keys are ``"mAP@all"``, ``"mAP@100"``,
    ``"P@100"``, ``"mAP@200"``, ``"P@200"``, ``"n_queries"``, ``"n_gallery"``
    and ``"per_class"``: {query label: {"mAP@all", "P@100", "n_queries", plus
    the other mAP@k / P@k}}, in sorted label order. What a person sees in the
    first row is reported too: ``"P@5"``, ``"P@10"`` (``first_row``) and
    ``"hit@1"``, ``"hit@5"`` (``hits``), overall and per class.  (TU-Berlin papers report
    mAP@all + P@100, Sketchy papers mAP@200 + P@200.)  Every value is a python
    float/int, labels are python str/int; queries without any relevant gallery
    item count as 0. ``per_query=True`` adds ``"per_query"``: {name: (Q,) float64 array}
    for every overall figure that is a mean over queries, in query order (what
    `paired_difference` compares between two models).
    """
    ks = [_check_k(k) for k in ks]
    p_ks = [k for k in first_row if k not in ks]
    m = per_query_metrics(scores, query_labels, gallery_labels, map_ks=ks, precision_ks=[*ks, *p_ks],
                          hit_ks=hits, interpolated=interpolated, chunk_size=chunk_size)
    n_q, n_g = np.asarray(scores).shape
    extra = [f"P@{k}" for k in p_ks] + [f"hit@{k}" for k in hits]
    names = ["mAP@all"] + [n for k in ks for n in (f"mAP@{k}", f"P@{k}")] + extra
    keys = ["AP@all"] + [n for k in ks for n in (f"AP@{k}", f"P@{k}")] + extra

    report: dict[str, Any] = {name: float(m[key].mean()) for name, key in zip(names, keys)}
    report["n_queries"] = int(n_q)
    report["n_gallery"] = int(n_g)

    ql = np.asarray(query_labels).reshape(-1)
    classes, cls_idx = np.unique(ql, return_inverse=True)
    cls_idx = cls_idx.reshape(-1)
    counts = np.bincount(cls_idx, minlength=len(classes))
    # Per-class means via bincount sums: one pass per metric, no python loop over queries.
    sums = {key: np.bincount(cls_idx, weights=m[key], minlength=len(classes)) for key in keys}
    per_class: dict[Any, dict[str, Any]] = {}
    for c, label in enumerate(classes):
        entry: dict[str, Any] = {name: float(sums[key][c] / counts[c]) for name, key in zip(names, keys)}
        entry["n_queries"] = int(counts[c])
        per_class[_py(label)] = entry
    report["per_class"] = per_class
    if per_query:
        report["per_query"] = {name: m[key] for name, key in zip(names, keys)}
    return report


def paired_difference(a: Any, b: Any, z: float = 1.96) -> dict[str, float]:
    """How model B differs from model A on the same queries, from per-query values (e.g.
    hit@5 or AP@all of `retrieval_report(..., per_query=True)`).

    Returns ``"diff"`` (mean of b - a), ``"ci"`` (half-width of its normal-approximation
    interval, z times the standard error of the paired differences: a difference inside
    it is within what drawing other queries of the same classes could change), and the
    number of queries on which B is ``"better"`` or ``"worse"``. Paired, because both
    models answer the same queries: far tighter than comparing two separate means. It
    says nothing of the variation between training runs (seeds), which only more runs
    can measure.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired values need the same non-empty query set, got {a.size} and {b.size}")
    d = b - a
    se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else 0.0
    return {"diff": float(d.mean()), "ci": float(z * se), "better": int((d > 0).sum()),
            "worse": int((d < 0).sum()), "n": int(d.size)}
