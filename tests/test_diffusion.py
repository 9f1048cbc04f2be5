import numpy as np

from sbir_core.gallery import index as I
from sbir_core.gallery.index import PLAIN_HEAD, SHORTLIST, Gallery
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
    assert np.array_equal(i, np.argsort(-full, axis=1, kind="stable")[:, :7])
    gal.set_diffusion(0)
    assert np.isclose(map_all(gal.score_all(q), yq, y), plain)


def test_diffusion_with_an_approximate_index_ranks_its_shortlist_and_keeps_the_index(monkeypatch):
    """The index holds the vectors as encoded: turning diffusion on or off never rebuilds it
    (at 100k pictures an HNSW build takes minutes), and the shortlist it returns, ranked as
    `score_all` ranks, finds nearly what exact search finds."""
    q, yq, g, y = clustered(per=200, n_cls=8)  # 1,600 pictures: several shortlists
    assert len(g) > 4 * SHORTLIST
    exact = Gallery.from_embeddings(g, diffusion_k=5)
    approx = Gallery.from_embeddings(g, index_type="hnsw")
    index = approx.index
    monkeypatch.setattr(I, "build_index", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    approx.set_diffusion(5)
    assert approx.index is index
    _, ie = exact.knn(q, 10)
    _, ia = approx.knn(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ie, ia)])
    assert recall > 0.95
    assert np.array_equal(ia[:, :PLAIN_HEAD], ie[:, :PLAIN_HEAD])


def test_diffusion_keeps_the_first_row_plain_and_orders_the_rest():
    """The first PLAIN_HEAD results are the plain nearest pictures; diffusion orders
    the rest; every score shown is the query's cosine similarity to its result."""
    q, yq, g, y = clustered()
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    plain = np.argsort(-(qn @ gn.T), axis=1, kind="stable")
    gal = Gallery.from_embeddings(g, diffusion_k=10)
    assert gal.plain_head == PLAIN_HEAD == 5
    s, i = gal.knn(q, 12)
    assert np.array_equal(i[:, :5], plain[:, :5])
    assert not np.array_equal(i[:, 5:], plain[:, 5:12])  # diffusion did reorder the tail
    assert all(len(set(row)) == 12 for row in i)
    assert np.allclose(s, np.take_along_axis(qn @ gn.T, i, 1), atol=1e-5)
    # Pure diffusion (no plain head) ranks the tail the same way, minus the head's pictures.
    pure = Gallery.from_embeddings(g, diffusion_k=10)
    pure.plain_head = 0
    _, ip = pure.knn(q, 30)
    for row, prow in zip(i, ip):
        assert list(row[5:]) == [j for j in prow if j not in row[:5]][:7]
    # Still better than plain on the whole ranking, and evaluation ranks as search does.
    assert map_all(gal.score_all(q), yq, y) > map_all(qn @ gn.T, yq, y) + 0.02
    full = gal.score_all(q)
    assert np.array_equal(i, np.argsort(-full, axis=1, kind="stable")[:, :12])
    for r in (0, 7):
        for pos in (0, 4, 5, 11):
            assert gal.rank_of(q[r], int(i[r, pos])) == pos


def test_diffusion_with_fewer_results_than_the_plain_head():
    q, yq, g, y = clustered(n_cls=2, per=3)
    gal = Gallery.from_embeddings(g, diffusion_k=3)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    plain = np.argsort(-(qn @ gn.T), axis=1, kind="stable")
    s, i = gal.knn(q, 3)
    assert np.array_equal(i, plain[:, :3])
    s, i = gal.knn(q, 50)
    assert i.shape == (len(q), 6) and np.array_equal(i[:, :5], plain[:, :5])
    assert all(sorted(row) == list(range(6)) for row in i)
