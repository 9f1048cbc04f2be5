"""Big galleries (issue 33): IVF-PQ with exact re-scoring, `auto` index choice, memory-mapped
opening, the columnar item file, and that small and shipped galleries still load as before.

Small generated vectors (8k x 64, a Gaussian mixture like real classes) keep it fast; the
million-vector figures come from scripts/bench_index.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sbir_core.gallery import ann
from sbir_core.gallery import format as F
from sbir_core.gallery.calibration import SeenCalibration
from sbir_core.gallery.index import Gallery, GalleryError

REPO = Path(__file__).resolve().parents[1]
N, D, CLUSTERS = 8_000, 64, 100


def mixture(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((CLUSTERS, D)).astype(np.float32)
    x = centres[rng.integers(0, CLUSTERS, n)] + 0.5 * rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    """(gallery vectors, queries, calibration whose 'seen' classes are half the clusters)."""
    faiss = ann.faiss_module()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # on a shared 2-core machine OpenMP contention costs more than it gives
    centres = np.random.default_rng(0).standard_normal((CLUSTERS, D)).astype(np.float32)
    yield mixture(N, 1), mixture(100, 2), SeenCalibration(centres[::2], 0.15, 0.75)
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def ivfpq(data):
    x, _, cal = data
    # 4 codes of 16+ dimensions (the default is one per 4): the same code path at a tenth of the
    # PQ training (1.5 s -> 0.2 s), and coarser codes leave more to the exact re-scoring the
    # recall test checks (measured overlap with exact search: 1.0, as with 8 codes)
    return Gallery.from_embeddings(x, index_type="ivfpq", calibration=cal, diffusion_k=3, pq_m=4)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(u) & set(v)) / len(u) for u, v in zip(a, b)]))


def test_ivfpq_recall_against_exact_search_as_ranked(data, ivfpq) -> None:
    x, q, cal = data
    assert ivfpq.index_type == "ivfpq" and ivfpq.calibration is not None and ivfpq.diffusion_k == 3
    exact = Gallery.from_embeddings(x, calibration=cal, diffusion_k=3)  # calibration and diffusion, every picture
    _, want = exact.knn(q, 10)
    _, got = ivfpq.knn(q, 10)
    assert overlap(got, want) >= 0.95
    # calibration matters here: plain cosine ranks differently, so the check above is not vacuous
    _, plain = Gallery.from_embeddings(x).knn(q, 10)
    assert overlap(plain, want) < 0.9


def test_ivfpq_shortlist_is_rescored_with_exact_vectors(data, ivfpq) -> None:
    x, q, _ = data
    scores, rows = ivfpq.knn(q[:20], 10)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q[:20], x[rows]), atol=1e-5)
    # ...which the PQ codes alone do not give: their inner products are approximations
    approx, _ = ivfpq.index.search(ann.query_vectors(q[:20], np.zeros(20, np.float32), ivfpq.index.d), 10)
    exact_top = np.sort(q[:20] @ x.T, axis=1)[:, ::-1][:, :10]
    assert np.abs(approx - exact_top).max() > 1e-3


def test_auto_picks_the_index_by_size(data, monkeypatch) -> None:
    assert ann.choose_index_type(399) == "flat"
    assert ann.choose_index_type(ann.AUTO_FLAT_MAX) == "flat"
    assert ann.choose_index_type(ann.AUTO_FLAT_MAX + 1) == "ivfpq"
    assert ann.choose_index_type(10 ** 9, "flat") == "flat"  # an explicit choice wins
    with pytest.raises(Exception, match="unknown index type"):
        ann.choose_index_type(10, "annoy")
    x, _, _ = data
    monkeypatch.setattr(ann, "AUTO_FLAT_MAX", 500)
    assert Gallery.from_embeddings(x[:400], index_type="auto").index_type == "flat"
    g = Gallery.from_embeddings(x[:2000], index_type="auto", pq_m=4)  # few codes: only the choice is tested
    assert g.index_type == "ivfpq" and g.meta["requested_index_type"] == "auto"


def test_ivfpq_gallery_opens_memory_mapped_and_searches_the_same(data, ivfpq, tmp_path, monkeypatch) -> None:
    _, q, _ = data
    monkeypatch.setattr(F, "INLINE_ITEMS", 1000)  # so that 20k items go to the columnar file
    out = ivfpq.save(tmp_path / "g")
    meta = json.loads((out / F.GALLERY_FILE).read_text())
    assert "items" not in meta and (out / F.ITEMS_FILE).is_file()
    assert (out / F.diffused_file(3)).is_file()  # diffusion stored, not recomputed at open
    assert (out / F.SEEN_FILE).is_file()  # seen confidences stored, not computed per search
    g = Gallery.load(out)
    np.testing.assert_allclose(g._seen, ivfpq.calibration.seen_confidence(data[0]), atol=1e-6)
    assert isinstance(g.raw_embeddings, np.memmap) and isinstance(g.embeddings, np.memmap)
    assert not isinstance(g.paths, list) and g.paths[5] == "5" and len(g.labels) == N
    s0, i0 = ivfpq.knn(q, 10)
    s1, i1 = g.knn(q, 10)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_allclose(s1, s0, atol=1e-6)
    assert [r.index for r in g.search(q[0], 5)] == list(i0[0, :5])


def test_big_gallery_checks_a_sample_of_rows_and_its_item_paths(data, tmp_path, monkeypatch) -> None:
    x, _, _ = data
    monkeypatch.setattr(F, "INLINE_ITEMS", 1000)
    monkeypatch.setattr(F, "CHECKED_ROWS", 500)
    out = Gallery.from_embeddings(x[:5000], index_type="hnsw").save(tmp_path / "g")
    emb = np.load(out / F.EMBEDDINGS_FILE, mmap_mode="r+")
    emb[0] = np.nan  # the first row is always in the sample
    emb.flush()
    del emb
    with pytest.raises(GalleryError, match="NaN"):
        Gallery.load(out)
    bad = Gallery.from_embeddings(x[:5000], paths=[f"a/{i}.jpg" for i in range(4999)] + ["../../etc/passwd"],
                                  index_type="hnsw").save(tmp_path / "bad")
    with pytest.raises(GalleryError, match="leaves the gallery's source folder"):
        Gallery.load(bad)


def test_small_gallery_keeps_items_readable_and_old_versions_get_a_clear_message(data, tmp_path) -> None:
    x, _, _ = data
    out = Gallery.from_embeddings(x[:300], labels=["cat"] * 300).save(tmp_path / "small")
    meta = json.loads((out / F.GALLERY_FILE).read_text())
    assert len(meta["items"]) == 300 and not (out / F.ITEMS_FILE).exists()
    g = Gallery.load(out)
    assert isinstance(g.paths, list) and g.labels[0] == "cat" and not isinstance(g.raw_embeddings, np.memmap)
    meta["format_version"] = 0
    (out / F.GALLERY_FILE).write_text(json.dumps(meta))
    with pytest.raises(GalleryError, match="rebuild the gallery"):
        Gallery.load(out)


# Top-10 rows of the shipped default gallery for five fixed queries, recorded before the
# format and index changes of issue 33 (calibration and diffusion on, as the app searches).
DEFAULT_TOP10 = [[0, 4, 2, 129, 3, 127, 1, 392, 393, 328], [57, 58, 55, 56, 223, 81, 370, 224, 50, 52],
                 [123, 213, 86, 125, 216, 217, 99, 374, 212, 101], [250, 248, 249, 253, 251, 252, 230, 234, 131, 232],
                 [398, 190, 193, 192, 189, 64, 191, 32, 194, 199]]


def test_shipped_default_gallery_loads_and_ranks_as_before() -> None:
    root = REPO / "galleries" / "default" / "index"
    g = Gallery.load(root)
    assert len(g) == 399 and g.index_type == "flat" and g.calibration is not None and g.diffusion_k == 3
    e = np.load(root / F.EMBEDDINGS_FILE)
    rng = np.random.default_rng(7)
    q = e[[0, 57, 123, 250, 398]] + 0.05 * rng.standard_normal((5, e.shape[1])).astype(np.float32)
    _, rows = g.knn(q, 10)
    assert rows.tolist() == DEFAULT_TOP10


def test_the_faiss_gallery_is_a_gallery_backend(data) -> None:
    from sbir_core.gallery.backend import GalleryBackend

    x, _, _ = data
    assert isinstance(Gallery.from_embeddings(x[:100]), GalleryBackend)
    assert not isinstance(object(), GalleryBackend)
