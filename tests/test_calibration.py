"""Seen-class calibration (gallery.calibration): the ranking rule, galleries that carry it,
checkpoints that prescribe it. Generated data only; the shipped model's own check is in
test_shipped_model.py."""
import dataclasses
import json

import numpy as np
import pytest

from sbir_core.gallery import ann
from sbir_core.gallery import index as I
from sbir_core.gallery.calibration import PROTOTYPES_FILE, SeenCalibration
from sbir_core.gallery.index import Gallery, GalleryError
from sbir_core.eval.metrics import retrieval_report
from sbir_core.models.settings import RetrievalSettings, SeenCalibrationSetting
from tests.test_index import CountingEncoder, make_source


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def generalized(seed=0, dim=32, n_seen=8, n_new=3, per=12):
    """Seen classes sit on their prototypes; new classes lie between them (like a dog among
    cats and wolves), and their queries are drawn a little towards the seen classes, as a
    model trained on text prototypes draws them."""
    rng = np.random.default_rng(seed)
    protos = _unit(rng.normal(size=(n_seen, dim)))
    new = _unit(rng.normal(size=(n_new, dim)) + 0.3 * protos[rng.integers(0, n_seen, n_new)])
    centers = np.concatenate([protos, new])
    y = np.repeat(np.arange(n_seen + n_new), per)
    g = _unit(centers[y] + rng.normal(scale=0.12, size=(len(y), dim)))
    yq = np.repeat(np.arange(n_seen, n_seen + n_new), 10)  # queries of the new classes only
    pull = protos[rng.integers(0, n_seen, len(yq))]
    q = _unit(centers[yq] + 0.8 * pull + rng.normal(scale=0.35, size=(len(yq), dim)))
    return protos, q, yq, g, y


def test_the_rule_is_cosine_minus_a_seen_discount_and_search_follows_it():
    protos, q, yq, g, y = generalized()
    cal = SeenCalibration(protos, tau=0.1, beta=0.8)
    s_q, s_g = cal.seen_confidence(q), cal.seen_confidence(g)
    # max softmax, by hand
    logits = g @ protos.T / 0.1
    assert np.allclose(s_g, np.exp(logits).max(1) / np.exp(logits).sum(1), atol=1e-5)
    want = q @ g.T - 0.8 * (1 - s_q)[:, None] * s_g[None, :]
    for index_type in ("flat", "hnsw"):
        gal = Gallery.from_embeddings(g, calibration=cal, index_type=index_type)
        assert np.allclose(gal.score_all(q), want, atol=1e-5)
        sims, idx = gal.knn(q, 9)
        assert np.array_equal(idx, np.argsort(-want, axis=1, kind="stable")[:, :9])
        # what a caption shows is still the cosine similarity
        assert np.allclose(sims, np.take_along_axis(q @ g.T, idx, 1), atol=1e-5)
    assert gal.meta["seen_calibration"] == {"tau": 0.1, "beta": 0.8}


def test_beta_zero_or_none_is_plain_search():
    protos, q, yq, g, y = generalized()
    plain = Gallery.from_embeddings(g)
    for cal in (None, SeenCalibration(protos, tau=0.1, beta=0.0)):
        gal = Gallery.from_embeddings(g, calibration=cal)
        assert gal.calibration is None and gal.meta["seen_calibration"] is None
        assert np.array_equal(gal.knn(q, 10)[1], plain.knn(q, 10)[1])


def test_new_classes_reach_the_first_row_in_a_mixed_gallery():
    """What it is for: queries of unseen classes among many seen-class pictures."""
    protos, q, yq, g, y = generalized()
    before = retrieval_report(Gallery.from_embeddings(g).score_all(q), yq, y)
    after = retrieval_report(Gallery.from_embeddings(g, calibration=SeenCalibration(protos, 0.1, 1.0)).score_all(q),
                             yq, y)
    assert after["hit@1"] > before["hit@1"] + 0.15 and after["mAP@all"] > before["mAP@all"] + 0.1


def test_a_drawing_of_a_seen_class_keeps_its_pictures():
    """A query that sits on a training class's prototype discounts almost nothing."""
    protos, _, _, g, y = generalized()
    q = protos[:4]
    cal = SeenCalibration(protos, tau=0.1, beta=1.0)
    assert (cal.query_weight(q) < 0.05).all()
    gal = Gallery.from_embeddings(g, calibration=cal)
    assert all(set(y[gal.knn(q[i], 5)[1][0]]) == {i} for i in range(4))


def test_with_diffusion_the_first_row_is_the_calibrated_nearest():
    protos, q, yq, g, y = generalized(per=20)
    cal = SeenCalibration(protos, tau=0.1, beta=1.0)
    gal = Gallery.from_embeddings(g, diffusion_k=5, calibration=cal)
    calibrated = np.argsort(-(q @ g.T - cal.query_weight(q)[:, None] * cal.seen_confidence(g)[None]), 1, kind="stable")
    _, idx = gal.knn(q, 12)
    assert np.array_equal(idx[:, :I.PLAIN_HEAD], calibrated[:, :I.PLAIN_HEAD])
    assert np.array_equal(idx, np.argsort(-gal.score_all(q), 1, kind="stable")[:, :12])


def test_bad_settings_are_refused():
    protos = generalized()[0]
    for tau, beta in ((0.0, 1.0), (0.1, -1.0)):
        with pytest.raises(ValueError):
            SeenCalibration(protos, tau, beta)
    for bad in (protos[:1], np.zeros_like(protos), np.full_like(protos, np.nan)):
        with pytest.raises(ValueError):
            SeenCalibration(bad, 0.1, 1.0)
    with pytest.raises(GalleryError, match="dimension"):
        Gallery.from_embeddings(np.eye(4, 16, dtype=np.float32), calibration=SeenCalibration(protos, 0.1, 1.0))


class Calibrating(CountingEncoder):
    """The raw test encoder with prototypes and a calibration setting, as a checkpoint gives."""

    def __init__(self, inner, protos):
        super().__init__(inner)
        self.seen_prototypes = protos
        self.retrieval = RetrievalSettings(seen_calibration=SeenCalibrationSetting(tau=0.1, beta=0.5))


def test_a_gallery_stores_the_calibration_its_encoder_prescribes(tmp_path, raw_encoder):
    src = make_source(tmp_path / "photos")
    protos = _unit(np.random.default_rng(1).normal(size=(5, raw_encoder.embed_dim)))
    built, _ = I.build_gallery(src, tmp_path / "g", Calibrating(raw_encoder, protos), progress=False)
    assert built.calibration is not None
    loaded = Gallery.load(tmp_path / "g")
    assert loaded.calibration.setting == {"tau": 0.1, "beta": 0.5}
    np.testing.assert_allclose(loaded.calibration.prototypes, protos, atol=1e-6)
    q = loaded.raw_embeddings[:3]
    assert np.array_equal(loaded.knn(q, 5)[1], built.knn(q, 5)[1])
    plain, _ = I.build_gallery(src, tmp_path / "p", CountingEncoder(raw_encoder), progress=False)
    assert plain.calibration is None and not (tmp_path / "p" / PROTOTYPES_FILE).exists()
    # a damaged gallery says so instead of searching another way
    (tmp_path / "g" / PROTOTYPES_FILE).unlink()
    with pytest.raises(GalleryError, match="seen_prototypes.npy is missing"):
        Gallery.load(tmp_path / "g")
    np.save(tmp_path / "g" / PROTOTYPES_FILE, protos)
    meta = json.loads((tmp_path / "g" / I.GALLERY_FILE).read_text())
    meta["seen_calibration"] = {"tau": -1, "beta": 0.5}
    (tmp_path / "g" / I.GALLERY_FILE).write_text(json.dumps(meta))
    with pytest.raises(GalleryError, match="bad seen-class calibration"):
        Gallery.load(tmp_path / "g")


def test_a_checkpoint_carries_its_prototypes_to_the_encoder(tmp_path):
    import torch

    from sbir_core.models.checkpoint import save_checkpoint
    from sbir_core.models.encoders import create_encoder
    from sbir_core.models.heads import SBIRHead

    head = SBIRHead(1280 + 112 + 320 + 704, 384, 256, 64)
    protos = torch.nn.functional.normalize(torch.randn(7, 256), dim=-1)
    meta = {"encoder": "efficientnet-lite0", "retrieval": {"diffusion_k": 0, "seen_calibration": {"tau": 0.07, "beta": 1.0}}}
    path = save_checkpoint(tmp_path / "c.safetensors", head, meta, prototypes=protos)
    enc = create_encoder(checkpoint=str(path))
    np.testing.assert_allclose(enc.seen_prototypes, protos.half().float().numpy())
    cal = SeenCalibration.from_encoder(enc)
    assert cal is not None and cal.setting == {"tau": 0.07, "beta": 1.0}
    # without the setting (or with beta 0) there is nothing to apply
    enc.retrieval = dataclasses.replace(enc.retrieval, seen_calibration=None)
    assert SeenCalibration.from_encoder(enc) is None


def test_query_expansion_uses_the_calibrated_results():
    """With diffusion, a query is expanded with its top results as the gallery ranks them:
    the calibrated ones, not the plain ones calibration moved down."""
    from sbir_core.gallery.diffusion import expand_queries

    protos, q, yq, g, y = generalized(per=20)
    cal = SeenCalibration(protos, tau=0.1, beta=1.0)
    gal = Gallery.from_embeddings(g, diffusion_k=5, calibration=cal)
    d = gal.embeddings  # the diffused gallery
    calibrated = q @ d.T - cal.query_weight(q)[:, None] * cal.seen_confidence(g)[None]
    top = np.argsort(-calibrated, axis=1, kind="stable")[:, :5]
    plain_top = np.argsort(-(q @ d.T), axis=1, kind="stable")[:, :5]
    assert (top != plain_top).any()  # calibration changes which results expand the query
    expanded = expand_queries(q, d, np.take_along_axis(q @ d.T, top, 1), top)
    want = expanded @ d.T - cal.query_weight(q)[:, None] * cal.seen_confidence(g)[None]
    scores = gal.score_all(q)
    head = np.argsort(-(q @ g.T - cal.query_weight(q)[:, None] * cal.seen_confidence(g)[None]), 1, kind="stable")[:, :5]
    rest = np.ones_like(scores, dtype=bool)
    np.put_along_axis(rest, head, False, 1)
    assert np.allclose(scores[rest], want[rest], atol=1e-5)


def test_index_says_how_the_gallery_is_searched():
    from sbir_core.cli import format_search_settings

    protos = generalized()[0]
    g = np.random.default_rng(0).normal(size=(20, protos.shape[1])).astype(np.float32)
    gal = Gallery.from_embeddings(g, diffusion_k=3, calibration=SeenCalibration(protos, 0.15, 0.75))
    assert format_search_settings(gal) == ("searched with gallery diffusion k=3 after the first 5 results, "
                                           "seen-class calibration tau=0.15 beta=0.75")


def _recall(a, b):
    return float(np.mean([len(set(x) & set(z)) / len(x) for x, z in zip(a, b)]))


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_an_approximate_index_searches_the_calibrated_score(index_type):
    """Approximate galleries keep their index with calibration on: it holds [g, -s(g), sqrt(1 - s(g)^2)], a
    query goes in as [q, w(q), 0], and the shortlist it returns is ranked exactly."""
    protos, q, yq, g, y = generalized(per=300)  # 3,300 pictures: more than one shortlist
    assert len(g) > I.SHORTLIST * 4
    cal = SeenCalibration(protos, tau=0.1, beta=1.0)
    exact = Gallery.from_embeddings(g, calibration=cal)
    approx = Gallery.from_embeddings(g, calibration=cal, index_type=index_type)
    assert approx.index.d == g.shape[1] + 2 and approx.meta["index_seen_tau"] == 0.1
    # the index's inner product is the calibrated score
    w = cal.query_weight(q[:3])
    s, i = approx.index.search(np.concatenate([q[:3], w[:, None], 0 * w[:, None]], 1), 5)
    want = q[:3] @ g.T - w[:, None] * cal.seen_confidence(g)[None]
    assert np.allclose(s, np.take_along_axis(want, i, 1), atol=1e-4)
    _, ie = exact.knn(q, 10)
    _, ia = approx.knn(q, 10)
    assert _recall(ie, ia) > 0.95
    # the index's own top 10 for [q, w, 0] are the calibrated ones; for a plain query they are not
    w = cal.query_weight(q)[:, None]
    assert _recall(ie, approx.index.search(np.concatenate([q, w, 0 * w], 1), 10)[1]) > 0.9
    assert _recall(ie, approx.index.search(np.concatenate([q, 0 * w, 0 * w], 1), 10)[1]) < 0.7


def test_the_index_column_follows_the_temperature_not_the_strength():
    protos, q, yq, g, y = generalized(per=40)
    gal = Gallery.from_embeddings(g, calibration=SeenCalibration(protos, 0.1, 1.0), index_type="hnsw")
    index = gal.index
    gal.set_calibration(SeenCalibration(protos, 0.1, 0.3))  # beta rides on the query
    assert gal.index is index
    gal.set_calibration(None)  # plain search: the query's weight is 0
    assert gal.index is index
    exact = Gallery.from_embeddings(g, calibration=SeenCalibration(protos, 0.2, 1.0))
    gal.set_calibration(SeenCalibration(protos, 0.2, 1.0))
    assert gal.index is not index and gal.meta["index_seen_tau"] == 0.2
    assert _recall(exact.knn(q, 10)[1], gal.knn(q, 10)[1]) > 0.95


def test_a_gallery_with_an_index_from_before_the_seen_column_still_loads(tmp_path, raw_encoder):
    src = make_source(tmp_path / "photos")
    protos = _unit(np.random.default_rng(1).normal(size=(5, raw_encoder.embed_dim)))
    built, _ = I.build_gallery(src, tmp_path / "g", Calibrating(raw_encoder, protos), index_type="hnsw",
                               progress=False)
    d = raw_encoder.embed_dim
    assert built.index.d == d + 2
    # an index as earlier versions wrote it: d columns, no seen column
    plain = ann.faiss_module().IndexHNSWFlat(d, ann.HNSW_M, ann.faiss_module().METRIC_INNER_PRODUCT)
    plain.add(built.raw_embeddings)
    ann.faiss_module().write_index(plain, str(tmp_path / "g" / I.INDEX_FILE))
    meta = json.loads((tmp_path / "g" / I.GALLERY_FILE).read_text())
    meta.pop("index_seen_tau")
    (tmp_path / "g" / I.GALLERY_FILE).write_text(json.dumps(meta))
    loaded = Gallery.load(tmp_path / "g", ef_search=17)  # remade in memory for the calibration
    assert loaded.index.d == d + 2 and loaded.index_remade and loaded.index.hnsw.efSearch == 17
    assert np.array_equal(loaded.knn(built.raw_embeddings, 3)[1], built.knn(built.raw_embeddings, 3)[1])
    # indexing the unchanged folder again writes the new index instead of keeping the old one
    _, report = I.build_gallery(src, tmp_path / "g", Calibrating(raw_encoder, protos), index_type="hnsw",
                                progress=False)
    assert report.written and not Gallery.load(tmp_path / "g").index_remade
