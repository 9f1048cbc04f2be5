import numpy as np

from sbir_core.gallery.index import Gallery
from sbir_core.eval.metrics import map_all


def clustered(n_cls=6, per=20, dim=32, noise=1.6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_cls, dim))
    y = np.repeat(np.arange(n_cls), per)
    g = centers[y] + rng.normal(scale=noise, size=(len(y), dim))
    # Queries come from a shifted "modality": same classes, offset and noisier.
    yq = np.repeat(np.arange(n_cls), 5)
    q = centers[yq] + rng.normal(size=dim) * 0.8 + rng.normal(scale=noise * 1.2, size=(len(yq), dim))
    return q.astype(np.float32), yq, g.astype(np.float32), y


def test_diffusion_off_is_plain_cosine_ranking():
    q, yq, g, y = clustered()
    gal = Gallery.from_embeddings(g, diffusion_k=0)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    assert np.allclose(gal.score_all(q), qn @ gn.T, atol=1e-5)
    s, i = gal.knn(q, 5)
    assert np.array_equal(i, np.argsort(-(qn @ gn.T), axis=1, kind="stable")[:, :5])


def test_diffusion_helps_on_clustered_cross_modal_data_and_search_agrees_with_scores():
    q, yq, g, y = clustered()
    plain = map_all(Gallery.from_embeddings(g).score_all(q), yq, y)
    gal = Gallery.from_embeddings(g, diffusion_k=10)
    diffused = map_all(gal.score_all(q), yq, y)
    assert diffused > plain + 0.02
    s, i = gal.knn(q, 7)
    full = gal.score_all(q)
    assert np.allclose(s, np.take_along_axis(full, i, 1), atol=1e-5)
    gal.set_diffusion(0)
    assert np.isclose(map_all(gal.score_all(q), yq, y), plain)


def test_diffusion_with_hnsw_index_rebuilds_on_diffused_vectors():
    q, yq, g, y = clustered(per=40)
    exact = Gallery.from_embeddings(g, diffusion_k=5)
    approx = Gallery.from_embeddings(g, diffusion_k=5, index_type="hnsw")
    _, ie = exact.knn(q, 10)
    _, ia = approx.knn(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ie, ia)])
    assert recall > 0.9
