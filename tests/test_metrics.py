"""Tests for sbir_core.eval.metrics: hand-computed cases, tie-breaking, sklearn agreement."""
from __future__ import annotations

import numpy as np
import pytest

from sbir_core.eval import metrics as M

EPS = 1e-12


def scores_from_ranking(order: list[int]) -> np.ndarray:
    """A (1, G) score row whose descending order is exactly `order` (no ties)."""
    g = len(order)
    row = np.empty(g, dtype=np.float32)
    row[np.asarray(order)] = np.arange(g, 0, -1, dtype=np.float32)
    return row[None, :]


def voc_ap_reference(rel: np.ndarray, k: int | None = None, n_relevant: int | None = None) -> float:
    """Literal VOC all-points AP as in the SAKE code (eval_AP_inner + VOCap), 0 when R = 0."""
    rel = np.asarray(rel, dtype=bool)
    tot_pos = int(rel.sum()) if n_relevant is None else n_relevant
    if k is not None:
        rel = rel[:k]
        tot_pos = min(k, tot_pos)
    if tot_pos == 0:
        return 0.0
    tp = np.cumsum(rel)
    fp = np.cumsum(~rel)
    rec = tp / tot_pos
    prec = tp / (tp + fp)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


# --------------------------------------------------------------------------
# AP on ranked relevance lists
# --------------------------------------------------------------------------

def test_average_precision_hand_computed():
    # hits at ranks 1 and 3: (1/1 + 2/3) / 2 = 5/6
    assert M.average_precision([1, 0, 1, 0]) == pytest.approx(5 / 6, abs=EPS)
    # hits at ranks 2 and 3: (1/2 + 2/3) / 2 = 7/12
    assert M.average_precision([0, 1, 1]) == pytest.approx(7 / 12, abs=EPS)
    # hits at ranks 1, 4, 5: (1 + 2/4 + 3/5) / 3 = 0.7
    assert M.average_precision([1, 0, 0, 1, 1]) == pytest.approx(0.7, abs=EPS)
    # all relevant first -> 1
    assert M.average_precision([1, 1, 0, 0]) == pytest.approx(1.0, abs=EPS)


def test_average_precision_no_relevant_is_zero():
    assert M.average_precision([0, 0, 0]) == 0.0
    assert M.voc_ap([0, 0, 0]) == 0.0
    assert M.average_precision([0, 0, 0], k=2) == 0.0


def test_voc_ap_hand_computed():
    # [0, 1, 1]: precision 0, 1/2, 2/3; envelope at the hits = 2/3, 2/3 -> 2/3
    assert M.voc_ap([0, 1, 1]) == pytest.approx(2 / 3, abs=EPS)
    # [1, 0, 0, 1, 1]: envelope at hits 1, max(2/4, 3/5), 3/5 -> (1 + 0.6 + 0.6) / 3
    assert M.voc_ap([1, 0, 0, 1, 1]) == pytest.approx(2.2 / 3, abs=EPS)
    # precision never rises -> identical to non-interpolated
    assert M.voc_ap([1, 0, 1, 0]) == pytest.approx(5 / 6, abs=EPS)
    assert M.average_precision([0, 1, 1], interpolated=True) == M.voc_ap([0, 1, 1])


def test_ap_at_k_on_lists():
    # [1, 0, 1, 0, 1, 1], R = 4, k = 3: (1 + 2/3) / min(4, 3) = 5/9
    assert M.average_precision([1, 0, 1, 0, 1, 1], k=3) == pytest.approx(5 / 9, abs=EPS)
    # truncated list with R passed explicitly gives the same
    assert M.average_precision([1, 0, 1], k=3, n_relevant=4) == pytest.approx(5 / 9, abs=EPS)
    # without n_relevant a truncated list only sees R = 2: (1 + 2/3) / 2
    assert M.average_precision([1, 0, 1], k=3) == pytest.approx(5 / 6, abs=EPS)


def test_batch_matches_single_and_reference_voc():
    rng = np.random.default_rng(0)
    rel = rng.random((30, 25)) < 0.3
    rel[0] = False  # a row without relevant items
    for k in (None, 1, 5, 25, 40):
        plain = M.average_precision_batch(rel, k)
        interp = M.voc_ap_batch(rel, k)
        for i in range(rel.shape[0]):
            assert plain[i] == pytest.approx(M.average_precision(rel[i], k), abs=EPS)
            assert interp[i] == pytest.approx(voc_ap_reference(rel[i], k), abs=EPS)


def test_precision_at_k_batch():
    rel = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    np.testing.assert_allclose(M.precision_at_k_batch(rel, 2), [1 / 2, 0.0], atol=EPS)
    np.testing.assert_allclose(M.precision_at_k_batch(rel, 3), [2 / 3, 0.0], atol=EPS)
    # k > list length -> divide by 4, not 10
    np.testing.assert_allclose(M.precision_at_k_batch(rel, 10), [2 / 4, 1 / 4], atol=EPS)


# --------------------------------------------------------------------------
# Ranking and tie-breaking
# --------------------------------------------------------------------------

def test_rank_gallery_descending_and_ties_by_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1],
                       [1.0, 1.0, 1.0, 1.0, 1.0]])
    expected = np.array([[1, 3, 0, 2, 4],
                         [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(M.rank_gallery(scores), expected)
    # repeated calls and tiny chunks give the same result
    np.testing.assert_array_equal(M.rank_gallery(scores), M.rank_gallery(scores, chunk_size=1))


def test_rank_gallery_many_ties_matches_lexsort():
    # long rows with 3 distinct values: an unstable sort (numpy's introsort is
    # only stable below ~16 elements) would scramble indices within ties
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 3, size=(4, 300)).astype(np.float32)
    idx = np.arange(300)
    expected = np.stack([np.lexsort((idx, -row)) for row in scores])
    np.testing.assert_array_equal(M.rank_gallery(scores), expected)


def test_rank_gallery_float32_ties():
    # these differ in float64 but are equal in float32 -> tie -> lower index first
    scores = np.array([[1.0, 1.0 + 1e-12, 0.0]], dtype=np.float64)
    np.testing.assert_array_equal(M.rank_gallery(scores), [[0, 1, 2]])


def test_rank_gallery_nan_last():
    scores = np.array([[np.nan, 0.2, 0.7]])
    np.testing.assert_array_equal(M.rank_gallery(scores), [[2, 1, 0]])


def test_ties_deterministic_under_query_permutation():
    rng = np.random.default_rng(1)
    # coarse scores -> many ties
    scores = rng.integers(0, 3, size=(12, 20)).astype(np.float32)
    ql = rng.integers(0, 3, size=12)
    gl = rng.integers(0, 3, size=20)
    ranked = M.rank_gallery(scores)
    perm = rng.permutation(12)
    np.testing.assert_array_equal(M.rank_gallery(scores[perm]), ranked[perm])
    np.testing.assert_array_equal(M.rank_gallery(scores), ranked)

    a = M.per_query_metrics(scores, ql, gl, map_ks=(5,), precision_ks=(5,))
    b = M.per_query_metrics(scores[perm], ql[perm], gl, map_ks=(5,), precision_ks=(5,), chunk_size=5)
    for key in a:
        np.testing.assert_array_equal(b[key], a[key][perm])


def test_tie_order_decides_metric():
    # equal scores, gallery labels [b, a]: rank order [0, 1] -> rel [0, 1] -> AP 1/2 every time
    scores = np.zeros((1, 2), dtype=np.float32)
    for _ in range(3):
        assert M.map_all(scores, ["a"], ["b", "a"]) == pytest.approx(0.5, abs=EPS)
    assert M.map_all(scores, ["a"], ["a", "b"]) == pytest.approx(1.0, abs=EPS)


# --------------------------------------------------------------------------
# Metrics from scores + labels
# --------------------------------------------------------------------------

def test_map_at_k_r_smaller_than_k():
    # ranked labels [a, b, a, b, b], query a: R = 2, k = 4, top 4 rel [1, 0, 1, 0]
    # (1 + 2/3) / min(2, 4) = 5/6
    gl = np.array(["b", "b", "a", "b", "a"])
    scores = scores_from_ranking([4, 0, 2, 1, 3])
    assert list(gl[M.rank_gallery(scores)[0]]) == ["a", "b", "a", "b", "b"]
    assert M.map_at_k(scores, ["a"], gl, 4) == pytest.approx(5 / 6, abs=EPS)


def test_map_at_k_r_larger_than_k():
    # ranked labels [a, b, a, a, a, b], query a: R = 4, k = 3, top 3 rel [1, 0, 1]
    # SAKE: (1 + 2/3) / min(4, 3) = 5/9
    # (dividing by hits in top 3 would give 5/6, dividing by R would give 5/12)
    gl = np.array(["a", "b", "a", "a", "a", "b"])
    scores = scores_from_ranking([0, 1, 2, 3, 4, 5])
    assert M.map_at_k(scores, ["a"], gl, 3) == pytest.approx(5 / 9, abs=EPS)
    # interpolated: envelope at the hits = 1, 2/3 -> (1 + 2/3) / 3 = 5/9 as well
    assert M.map_at_k(scores, ["a"], gl, 3, interpolated=True) == pytest.approx(5 / 9, abs=EPS)
    # perfect top 3 with R = 4 > 3 -> 1
    gl2 = np.array(["a", "a", "a", "b", "a", "b"])
    assert M.map_at_k(scores, ["a"], gl2, 3) == pytest.approx(1.0, abs=EPS)


def test_map_at_k_larger_than_gallery_is_map_all():
    gl = np.array(["a", "b", "a", "b"])
    scores = scores_from_ranking([1, 0, 3, 2])  # rel [0, 1, 0, 1] -> (1/2 + 2/4) / 2 = 1/2
    assert M.map_at_k(scores, ["a"], gl, 100) == pytest.approx(0.5, abs=EPS)
    assert M.map_all(scores, ["a"], gl) == pytest.approx(0.5, abs=EPS)


def test_precision_at_k_larger_than_gallery():
    # G = 5, R = 2, k = 10 -> k clipped to 5 -> 2/5
    gl = np.array([0, 1, 0, 1, 1])
    scores = scores_from_ranking([0, 1, 2, 3, 4])
    assert M.precision_at_k(scores, [0], gl, 10) == pytest.approx(2 / 5, abs=EPS)
    # k = 2: top 2 rel [1, 0] -> 1/2
    assert M.precision_at_k(scores, [0], gl, 2) == pytest.approx(1 / 2, abs=EPS)


def test_query_without_relevant_items_counts_as_zero():
    gl = np.array([1, 2, 1])
    scores = np.array([[0.9, 0.1, 0.5],    # label 1: rel [1, 1, 0] -> AP 1
                       [0.9, 0.1, 0.5]],   # label 7: nothing relevant -> AP 0
                      dtype=np.float32)
    assert M.map_all(scores, [1, 7], gl) == pytest.approx(0.5, abs=EPS)
    assert M.map_at_k(scores, [1, 7], gl, 2) == pytest.approx(0.5, abs=EPS)
    assert M.precision_at_k(scores, [1, 7], gl, 2) == pytest.approx(0.5, abs=EPS)
    assert M.map_all(scores, [1, 7], gl, interpolated=True) == pytest.approx(0.5, abs=EPS)


def test_interpolated_at_least_non_interpolated():
    rng = np.random.default_rng(2)
    scores = rng.random((40, 60)).astype(np.float32)
    ql = rng.integers(0, 5, size=40)
    gl = rng.integers(0, 5, size=60)
    plain = M.per_query_metrics(scores, ql, gl, map_ks=(10, 30))
    interp = M.per_query_metrics(scores, ql, gl, map_ks=(10, 30), interpolated=True)
    for key in ("AP@all", "AP@10", "AP@30"):
        assert np.all(interp[key] >= plain[key] - EPS)
        assert np.any(interp[key] > plain[key] + 1e-6)  # random rankings: strictly larger somewhere
        # and equal to the literal SAKE/VOC code
        k = None if key == "AP@all" else int(key[3:])
        ranked = M.rank_gallery(scores)
        for q in range(5):
            rel = gl[ranked[q]] == ql[q]
            ref = voc_ap_reference(rel, k, int((gl == ql[q]).sum()))
            assert interp[key][q] == pytest.approx(ref, abs=EPS)


def test_agrees_with_sklearn_average_precision():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    n_q, n_g = 25, 80
    # distinct float32 values -> no ties, so ranking is unambiguous for both
    scores = (rng.permutation(n_q * n_g).reshape(n_q, n_g) / (n_q * n_g)).astype(np.float32)
    gl = np.arange(n_g) % 6
    ql = rng.integers(0, 6, size=n_q)
    ap = M.per_query_metrics(scores, ql, gl, chunk_size=7)["AP@all"]
    expected = np.array([average_precision_score(gl == ql[q], scores[q]) for q in range(n_q)])
    np.testing.assert_allclose(ap, expected, rtol=0, atol=1e-12)
    assert M.map_all(scores, ql, gl) == pytest.approx(expected.mean(), abs=1e-12)


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(4)
    scores = rng.random((13, 30)).astype(np.float32)
    ql = rng.integers(0, 4, size=13)
    gl = rng.integers(0, 4, size=30)
    a = M.per_query_metrics(scores, ql, gl, map_ks=(5,), precision_ks=(5,))
    b = M.per_query_metrics(scores, ql, gl, map_ks=(5,), precision_ks=(5,), chunk_size=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

REPORT_GALLERY = ["cat", "dog", "cat", "dog"]
REPORT_QUERIES = ["cat", "dog", "cat", "fox"]
REPORT_SCORES = np.array([
    [0.9, 0.8, 0.1, 0.7],  # cat: rank [0,1,3,2] -> rel [1,0,0,1]: AP (1 + 2/4)/2 = 3/4
    [0.1, 0.2, 0.3, 0.4],  # dog: rank [3,2,1,0] -> rel [1,0,1,0]: AP 5/6
    [0.5, 0.5, 0.5, 0.5],  # cat: ties -> rank [0,1,2,3] -> rel [1,0,1,0]: AP 5/6
    [0.3, 0.2, 0.1, 0.0],  # fox: no relevant item -> 0 everywhere
], dtype=np.float32)


def test_retrieval_report_values():
    rep = M.retrieval_report(REPORT_SCORES, REPORT_QUERIES, REPORT_GALLERY, ks=(2, 3))
    # mAP@all = (3/4 + 5/6 + 5/6 + 0) / 4 = 29/48
    assert rep["mAP@all"] == pytest.approx(29 / 48, abs=EPS)
    # P@2: 1/2, 1/2, 1/2, 0 -> 3/8 ; mAP@2 (R = 2 for all real queries): 1/2, 1/2, 1/2, 0 -> 3/8
    assert rep["P@2"] == pytest.approx(3 / 8, abs=EPS)
    assert rep["mAP@2"] == pytest.approx(3 / 8, abs=EPS)
    # P@3: 1/3, 2/3, 2/3, 0 -> 5/12 ; mAP@3: 1/2, 5/6, 5/6, 0 -> 13/24
    assert rep["P@3"] == pytest.approx(5 / 12, abs=EPS)
    assert rep["mAP@3"] == pytest.approx(13 / 24, abs=EPS)
    assert rep["n_queries"] == 4 and rep["n_gallery"] == 4

    pc = rep["per_class"]
    assert list(pc) == ["cat", "dog", "fox"]
    assert pc["cat"]["mAP@all"] == pytest.approx((3 / 4 + 5 / 6) / 2, abs=EPS)
    assert pc["cat"]["P@2"] == pytest.approx(1 / 2, abs=EPS)
    assert pc["cat"]["n_queries"] == 2
    assert pc["dog"]["mAP@all"] == pytest.approx(5 / 6, abs=EPS)
    assert pc["dog"]["n_queries"] == 1
    assert pc["fox"] == {"mAP@all": 0.0, "mAP@2": 0.0, "P@2": 0.0, "mAP@3": 0.0, "P@3": 0.0,
                         "P@5": 0.0, "P@10": 0.0, "hit@1": 0.0, "hit@5": 0.0, "n_queries": 1}
    # First row: every query but fox has a relevant item at rank 1.
    assert rep["hit@1"] == pytest.approx(3 / 4, abs=EPS)
    assert rep["hit@5"] == pytest.approx(3 / 4, abs=EPS)
    assert rep["P@5"] == pytest.approx(3 / 8, abs=EPS)  # k > G uses G: R/G = 2/4 for three queries


def test_retrieval_report_keeps_each_querys_figures_on_request():
    rep = M.retrieval_report(REPORT_SCORES, REPORT_QUERIES, REPORT_GALLERY, ks=(2,), per_query=True)
    pq = rep["per_query"]
    assert pq["mAP@all"] == pytest.approx([3 / 4, 5 / 6, 5 / 6, 0.0], abs=EPS)
    assert pq["hit@1"].tolist() == [1, 1, 1, 0]
    for name, values in pq.items():  # every overall figure is the mean of its per-query values
        assert rep[name] == pytest.approx(values.mean(), abs=EPS)
    assert "per_query" not in M.retrieval_report(REPORT_SCORES, REPORT_QUERIES, REPORT_GALLERY)


def test_paired_difference_counts_queries_and_bounds_the_mean():
    a = np.array([1, 1, 0, 0, 1, 0, 1, 0], dtype=float)
    b = np.array([1, 1, 1, 1, 1, 0, 0, 1], dtype=float)  # 3 queries gained, 1 lost
    d = M.paired_difference(a, b)
    assert (d["better"], d["worse"], d["n"]) == (3, 1, 8)
    assert d["diff"] == pytest.approx(2 / 8)
    diffs = b - a
    assert d["ci"] == pytest.approx(1.96 * diffs.std(ddof=1) / np.sqrt(8))
    same = M.paired_difference(a, a)
    assert same == {"diff": 0.0, "ci": 0.0, "better": 0, "worse": 0, "n": 8}
    # Pairing: a constant gain on every query is certain however noisy the queries are.
    noisy = np.random.default_rng(0).random(50)
    assert M.paired_difference(noisy, noisy + 0.1)["ci"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same non-empty query set"):
        M.paired_difference(a, b[:5])


def test_hit_at_k_counts_queries_with_any_relevant_item_in_top_k():
    g = ["a", "b", "b", "b"]
    scores = np.array([[0.1, 0.9, 0.8, 0.7],   # a ranked last: hit@1 0, hit@3 0
                       [0.1, 0.2, 0.9, 0.3]], dtype=np.float32)  # b at rank 1
    m = M.per_query_metrics(scores, ["a", "b"], g, hit_ks=(1, 3, 4))
    assert m["hit@1"].tolist() == [0, 1]
    assert m["hit@3"].tolist() == [0, 1]
    assert m["hit@4"].tolist() == [1, 1]


def test_retrieval_report_default_keys_and_types():
    rep = M.retrieval_report(REPORT_SCORES, REPORT_QUERIES, REPORT_GALLERY)
    for key in ("mAP@all", "P@100", "mAP@200", "P@200", "n_queries", "n_gallery", "per_class"):
        assert key in rep
    for key in ("mAP@all", "P@100", "mAP@200", "P@200"):
        assert type(rep[key]) is float
    assert type(rep["n_queries"]) is int and type(rep["n_gallery"]) is int
    # k > G = 4: P@100 = R/G = 2/4 for the three real queries, 0 for fox -> 3/8
    assert rep["P@100"] == pytest.approx(3 / 8, abs=EPS)
    assert rep["mAP@200"] == pytest.approx(29 / 48, abs=EPS)
    for label, entry in rep["per_class"].items():
        assert type(label) is str
        assert {"mAP@all", "P@100", "n_queries"} <= set(entry)
        assert type(entry["mAP@all"]) is float and type(entry["n_queries"]) is int


def test_retrieval_report_int_labels():
    gl = np.array([0, 1, 0, 1])
    ql = np.array([0, 1, 0, 2])
    rep = M.retrieval_report(REPORT_SCORES, ql, gl, ks=(2,))
    assert rep["mAP@all"] == pytest.approx(29 / 48, abs=EPS)
    assert all(type(label) is int for label in rep["per_class"])
    assert rep["per_class"][2]["mAP@all"] == 0.0


def test_input_validation():
    with pytest.raises(TypeError):
        M.map_all(np.zeros((1, 2)), ["1"], [1, 2])
    with pytest.raises(ValueError):
        M.map_all(np.zeros((2, 2)), [1], [1, 2])
    with pytest.raises(ValueError):
        M.map_at_k(np.zeros((1, 2)), [1], [1, 2], 0)
    with pytest.raises(ValueError):
        M.rank_gallery(np.zeros(3))
