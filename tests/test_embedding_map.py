"""t-SNE gallery map: fit, place, save/load, render, plot data (synthetic embeddings)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sbir_core.embedding_map import MAP_JSON, MAP_NPZ, EmbeddingMap, fit_map

torch.set_num_threads(1)


def _clusters(n_per=30, classes=4, dim=32, seed=0):
    """Classes as noisy curves in `dim` dimensions: local structure t-SNE can keep
    (like real embeddings; pure isotropic blobs have none to keep)."""
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(classes):
        center = rng.normal(size=dim) * 4
        a, b = rng.normal(size=(2, dim))
        t = np.linspace(0, 2 * np.pi, n_per)[:, None]
        xs.append(center + 2 * np.cos(t) * a + 2 * np.sin(t) * b + 0.05 * rng.normal(size=(n_per, dim)))
    labels = [f"class{i}" for i in range(classes) for _ in range(n_per)]
    return np.concatenate(xs).astype(np.float32), labels


@pytest.fixture(scope="module")
def fitted():
    x, labels = _clusters(n_per=25)
    return x, labels, fit_map(x, labels, seed=0, n_iter=200)


def test_fit_shapes_and_labels(fitted) -> None:
    x, labels, m = fitted
    assert m.coords.shape == (len(x), 2)
    assert np.isfinite(m.coords).all()
    assert m.labels == labels
    assert len(m) == len(x)
    # Clusters stay clusters: a point's nearest map neighbour is usually of its class.
    d = np.linalg.norm(m.coords[:, None] - m.coords[None], axis=2)
    np.fill_diagonal(d, np.inf)
    same = np.array(labels)[d.argmin(1)] == np.array(labels)
    assert same.mean() > 0.9


def test_gallery_item_placed_among_its_own_neighbours(fitted) -> None:
    x, _, m = fitted
    idx = np.arange(0, len(x), 7)
    q = m.place(x[idx])
    assert q.shape == (len(idx), 2)
    for i, qi in zip(idx, q):
        own5 = set(np.argsort(np.linalg.norm(m.coords - m.coords[i], axis=1))[:5])
        nearest_to_q = int(np.linalg.norm(m.coords - qi, axis=1).argmin())
        assert nearest_to_q in own5


def test_place_accepts_a_single_vector_and_checks_dimension(fitted) -> None:
    x, _, m = fitted
    assert m.place(x[3]).shape == (1, 2)
    with pytest.raises(ValueError, match="dimension"):
        m.place(np.zeros((1, 5), np.float32))


def test_save_load_round_trip(fitted, tmp_path) -> None:
    x, labels, m = fitted
    m.save(tmp_path)
    assert (tmp_path / MAP_NPZ).is_file() and (tmp_path / MAP_JSON).is_file()
    assert EmbeddingMap.exists(tmp_path)
    m2 = EmbeddingMap.load(tmp_path)
    np.testing.assert_array_equal(m2.coords, m.coords)
    assert m2.labels == labels
    np.testing.assert_allclose(m2.place(x[:3]), m.place(x[:3]), atol=1e-4)


def test_load_missing_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no embedding map"):
        EmbeddingMap.load(tmp_path)


def test_render_and_plot_data(fitted) -> None:
    x, _, m = fitted
    q = m.place(x[:1])[0]
    img = m.render(query_xy=q, highlight=[0, 1, 2], size=(320, 240))
    assert img.size == (320, 240)
    a = np.asarray(img).astype(np.float32)
    assert a.std() > 0 and (a < 250).any()
    data = m.to_plot_data(query_xy=q, highlight=[0, 1, 2])
    json.dumps(data)  # JSON-able
    assert len(data["points"]) == len(x)
    assert set(data["points"][0]) == {"x", "y", "label", "index"}
    assert data["highlight"] == [0, 1, 2]
    assert data["query"]["x"] == pytest.approx(float(q[0]))


def test_unlabelled_and_tiny_maps(tmp_path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    m = fit_map(x)  # too few points for t-SNE: a PCA layout, still placeable
    assert m.coords.shape == (5, 2) and m.labels is None
    q = m.place(x[2:3])
    assert int(np.linalg.norm(m.coords - q[0], axis=1).argmin()) == 2
    img = m.render()
    assert img.size == (640, 640)
    m.save(tmp_path)
    assert EmbeddingMap.load(tmp_path).labels is None
    with pytest.raises(ValueError):
        fit_map(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="labels"):
        fit_map(x, ["a"])


def test_large_map_path_uses_pca_and_round_trips(tmp_path, monkeypatch) -> None:
    """Big galleries get a PCA projection first (forced here on a small set)."""
    import sbir_core.embedding_map as EM

    monkeypatch.setattr(EM, "PCA_ABOVE_POINTS", 50)
    monkeypatch.setattr(EM, "PCA_DIMS", 8)
    x, labels = _clusters(n_per=20, dim=32, seed=2)
    m = fit_map(x, labels, n_iter=200)
    assert m.projection is not None and m.reference.shape == (len(x), 8) and m.dim == 32
    assert m.metric == "euclidean"
    q = m.place(x[::9])
    for i, qi in zip(range(0, len(x), 9), q):
        own5 = set(np.argsort(np.linalg.norm(m.coords - m.coords[i], axis=1))[:5])
        assert int(np.linalg.norm(m.coords - qi, axis=1).argmin()) in own5
    m.save(tmp_path)
    m2 = EmbeddingMap.load(tmp_path)
    assert m2.projection is not None and m2.metric == "euclidean"
    np.testing.assert_allclose(m2.place(x[:2]), m.place(x[:2]), atol=1e-4)
