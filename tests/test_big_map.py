"""The map and a clicked row's rank on a big gallery (issue 33 follow-up): the map is fitted
on a bounded class-stratified sample that still highlights any row, `rank_of` ranks the
shortlist only, and small galleries (the shipped one) stay exactly as they were.

A generated 16k-vector IVF-PQ gallery (clusters as classes; above CHUNK, so `rank_of` takes
the shortlist path) keeps it fast; no real data."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sbir_core.explain import embedding_map as EM
from sbir_core.explain.map_sample import MAP_MAX_POINTS, fits, label_codes, sample_rows
from sbir_core.gallery import format as F
from sbir_core.gallery.index import CHUNK, Gallery

REPO = Path(__file__).resolve().parents[1]
N, D, CLUSTERS = 16_000, 32, 40
SMALL_MAP = 200  # the sampled map fitted here: the same code path as MAP_MAX_POINTS, in a second


@pytest.fixture(scope="module")
def big() -> tuple[Gallery, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLUSTERS, D)).astype(np.float32)
    y = rng.integers(0, CLUSTERS, N)
    x = centres[y] + 0.4 * rng.standard_normal((N, D)).astype(np.float32)
    g = Gallery.from_embeddings(x, labels=[f"class{c}" for c in y], index_type="ivfpq", pq_m=4)
    assert g.index is not None and len(g) > CHUNK
    return g, y


@pytest.fixture(scope="module")
def big_map(big, tmp_path_factory):
    g, _ = big
    cache = tmp_path_factory.mktemp("map")
    t = time.perf_counter()
    m = EM.gallery_map(g, cache=cache, max_points=SMALL_MAP)
    return m, time.perf_counter() - t, cache


def test_sample_is_bounded_stratified_and_deterministic(big) -> None:
    g, y = big
    rows = sample_rows(label_codes(g))
    assert len(rows) == MAP_MAX_POINTS and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, sample_rows(label_codes(g)))
    share = np.bincount(y[rows], minlength=CLUSTERS) / len(rows)
    assert np.abs(share - np.bincount(y, minlength=CLUSTERS) / N).max() < 1.5 / len(rows) + 1e-9
    assert np.array_equal(sample_rows(np.zeros(50, int)), np.arange(50))  # few pictures: all of them


def test_classes_read_from_a_saved_big_gallery_are_its_labels(big, tmp_path, monkeypatch) -> None:
    g, y = big
    monkeypatch.setattr(F, "INLINE_ITEMS", 1_000)  # items in the Arrow file, as a million-row gallery has them
    saved = Gallery.load(g.save(tmp_path / "g"))
    assert saved.items._table is not None
    codes = label_codes(saved)  # the Arrow column, not a Python string per row
    # one code per class and one class per code
    assert len(np.unique(codes)) == CLUSTERS and len(np.unique(np.stack([codes, y]), axis=1).T) == CLUSTERS


def test_big_gallery_map_is_a_sample_that_highlights_any_row(big, big_map) -> None:
    g, y = big
    m, seconds, _ = big_map
    assert m.sampled and len(m) == SMALL_MAP and m.gallery_size == N and seconds < 30
    assert [g.labels[r] for r in m.rows] == m.labels  # each point knows its gallery row
    inside = int(m.rows[7])
    outside = int(next(r for r in range(N) if r not in set(m.rows.tolist()) and y[r] == y[inside]))
    hl = [inside, outside]
    mk = m.marks(highlight=hl, size=(320, 280), title="t")
    assert len(mk.boxes) == 2 and np.allclose(mk.places[0], mk.layout.to_pixels(m.coords[[7]])[0])
    # the row outside the sample lands among its own class's points
    xy, labels = m._resolve([outside])
    same = m.coords[np.asarray(m.labels) == f"class{y[outside]}"]
    assert labels == [f"class{y[outside]}"]
    assert np.linalg.norm(xy[0] - np.median(same, 0)) < np.linalg.norm(m.coords.max(0) - m.coords.min(0)) / 4
    star = m.place_by_results([outside, inside])
    assert np.all(np.isfinite(star))
    data = m.to_plot_data(query_xy=star, highlight=hl)
    assert [p["index"] for p in data["points"]] == m.rows.tolist() and data["pictures"] == N
    assert [p["index"] for p in data["placed"]] == [outside]
    tile = Image.new("RGB", (16, 16), (90, 160, 90))
    assert m.render(highlight=hl, size=(320, 280), thumbnails=lambda r: tile).size == (320, 280)


def test_big_gallery_map_is_read_back_from_its_cache(big, big_map, monkeypatch) -> None:
    g, _ = big
    m, _, cache = big_map
    monkeypatch.setattr(EM, "fit_map", lambda *a, **k: pytest.fail("a stored map that fits was fitted again"))
    again = EM.gallery_map(g, cache=cache, max_points=SMALL_MAP)
    assert again.sampled and np.array_equal(again.rows, m.rows) and np.array_equal(again.coords, m.coords)
    assert again.place_by_results([int(np.setdiff1d(np.arange(50), m.rows)[0])]).shape == (2,)  # attached
    other = Gallery.from_embeddings(g.raw_embeddings[:N - 1], labels=list(g.labels[:N - 1]))
    assert not fits(again, other)  # another gallery: fitted afresh


def test_rank_of_a_big_gallery_ranks_the_shortlist_only(big, monkeypatch) -> None:
    g, y = big
    q = g.raw_embeddings[5] + 0.1
    _, top = g.knn(q[None], 10)
    touched = []
    rows_of = g._raw_rows
    monkeypatch.setattr(g, "_raw_rows", lambda rows: touched.append(np.size(rows)) or rows_of(rows))
    monkeypatch.setattr(g, "score_all", lambda *a: pytest.fail("rank_of scored every picture"))
    for pos in (0, 3, 9):
        assert g.rank_of(q, int(top[0, pos])) == pos
    far = int(np.argmin(g.raw_embeddings[:2000] @ (q / np.linalg.norm(q))))
    assert g.rank_of(q, far) is None  # not among the first `shortlist`: said so, not guessed
    assert 0 < max(touched) <= g.shortlist < N


def test_rank_of_a_small_gallery_is_exact() -> None:
    x = np.random.default_rng(1).standard_normal((500, 16)).astype(np.float32)
    g = Gallery.from_embeddings(x)
    q = x[3] + 0.3
    s = g.score_all(q)[0]
    order = np.argsort(-s, kind="stable")
    for pos in (0, 17, 250, 499):
        assert g.rank_of(q, int(order[pos])) == pos


def test_the_shipped_gallery_map_is_unchanged() -> None:
    root = REPO / "galleries" / "default" / "index"
    if not EM.EmbeddingMap.exists(root):
        pytest.skip("the shipped gallery has no stored map")
    g = Gallery.load(root)
    stored = EM.EmbeddingMap.load(root)
    assert not stored.sampled and len(stored) == len(g) and np.array_equal(stored.rows, np.arange(len(g)))
    assert fits(stored, g)  # the stored files are still accepted as they are


def test_a_result_past_a_big_gallery_shortlist_is_not_given_a_place() -> None:
    from sbir_core.gallery.results import SearchResult

    far = SearchResult(rank=200, index=5, path="x.jpg", score=0.1, label="cat", past_shortlist=True)
    assert far.heading == "Not in the first 200 results"  # what the explanation says, not "Result 201"
    assert SearchResult(rank=2, index=5, path="x.jpg", score=0.1, label="cat").heading == "Result 3"
