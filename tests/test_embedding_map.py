"""t-SNE gallery map: fit, place, save/load, render, plot data (synthetic embeddings)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sbir_core.explain.embedding_map import MAP_JSON, MAP_NPZ, EmbeddingMap, fit_map

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
    import sbir_core.explain.embedding_map as EM

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


# ----------------------------------------------------------------------------- the picture
def _grid_map(labelled=True, n_per=6, side=3, seed=0):
    """A map built straight from coordinates (no t-SNE): side x side well-separated
    class clusters, `n_per` points each, so positions are known."""
    rng = np.random.default_rng(seed)
    coords, labels = [], []
    for k in range(side * side):
        c = np.array([k % side, k // side], np.float32) * 10
        coords.append(c + rng.normal(scale=0.8, size=(n_per, 2)))
        labels += [f"class_{k}"] * n_per
    coords = np.concatenate(coords).astype(np.float32)
    ref = rng.normal(size=(len(coords), 8)).astype(np.float32)
    return EmbeddingMap(coords, ref, labels if labelled else None)


def _tiles(n, seed=0):
    """One small, distinct picture per row (a coloured square with a dark bar)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = Image.new("RGB", (64, 48), tuple(int(v) for v in rng.integers(60, 255, 3)))
        ImageDraw.Draw(im).rectangle((8, 20, 56, 28), fill=(10, 10, 10))
        out.append(im)
    return out


def _changed(a, b):
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max(axis=2) > 0


def test_thumbnail_render_has_the_size_and_is_not_the_dot_map() -> None:
    m = _grid_map()
    tiles = _tiles(len(m))
    for size in [(640, 560), (320, 240), (1200, 900)]:
        img = m.render(size=size, thumbnails=tiles, title="a title")
        assert img.size == size and img.mode == "RGB"
    dots = m.render(size=(640, 560), title="a title")
    thumbs = m.render(size=(640, 560), title="a title", thumbnails=tiles)
    assert _changed(dots, thumbs).mean() > 0.05
    lay = m.layout((640, 560), "a title", thumbnails=True)
    assert 24 <= lay.thumb_px <= 40
    assert len(lay.shown) + len(lay.dots) == len(m) and len(lay.shown) > len(m) // 2
    # paths, PIL images and a callable give the same picture; a missing file a grey tile
    m2 = _grid_map()
    same = m2.render(size=(640, 560), title="a title", thumbnails=lambda r: tiles[r])
    assert np.array_equal(np.asarray(same), np.asarray(thumbs))
    broken = list(tiles)
    broken[0] = "/nonexistent/picture.jpg"
    assert _grid_map().render(size=(320, 240), thumbnails=broken).size == (320, 240)


def test_class_names_sit_at_the_class_medians() -> None:
    m = _grid_map()
    centres = m.class_centres()
    lab = np.asarray(m.labels)
    assert sorted(centres) == sorted(set(m.labels))
    for c, xy in centres.items():
        np.testing.assert_allclose(xy, np.median(m.coords[lab == c], axis=0), rtol=1e-6)
    for thumbs in (False, True):
        lay = m.layout((640, 560), None, thumbnails=thumbs)
        assert [p.name for p in lay.labels if p.shown] and all(p.shown for p in lay.labels)
        for p in lay.labels:  # well-separated clusters: nothing to nudge
            np.testing.assert_allclose(p.anchor, lay.to_pixels(np.asarray(centres[p.name]))[0])
            np.testing.assert_allclose(p.xy, p.anchor)
            assert p.text == p.name.replace("_", " ")
        assert lay.label_px >= 12
    # Drawn: labels vs none changes the picture only where the names are.
    tiles = _tiles(len(m))
    plain = _grid_map(labelled=False)
    assert plain.layout((640, 560)).labels == [] and plain.class_centres() == {}
    for kw in ({}, {"thumbnails": tiles}):
        a = np.asarray(m.render(size=(640, 560), **kw))
        b = np.asarray(plain.render(size=(640, 560), **kw))
        diff = _changed(a, b)
        assert diff.any()
        if kw:  # dot colours also differ by class in the dot map; thumbnail frames too: check text ink
            lay = m.layout((640, 560), None, thumbnails=True)
            inside = np.zeros_like(diff)
            for p in lay.labels:
                x0, y0, x1, y1 = (int(round(v)) for v in p.box)
                inside[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = True
            frames = np.zeros_like(diff)  # thumbnail borders are drawn in class colours
            pix = lay.to_pixels(m.coords)
            h = lay.thumb_px / 2 + 2
            for x, y in pix:
                frames[int(y - h):int(y + h) + 1, int(x - h):int(x + h) + 1] = True
            assert diff[~inside & ~frames].sum() == 0
            # dark text pixels in every name box
            for p in lay.labels:
                x0, y0, x1, y1 = (int(round(v)) for v in p.box)
                assert (a[y0:y1, x0:x1].max(axis=2) < 60).sum() > 20


def test_nudged_or_dropped_labels_never_overlap() -> None:
    rng = np.random.default_rng(3)
    coords = rng.normal(size=(200, 2)).astype(np.float32)  # 40 classes all in one blob
    labels = [f"label{i % 40}" for i in range(200)]
    m = EmbeddingMap(coords, rng.normal(size=(200, 4)), labels)
    lay = m.layout((640, 560), "t", thumbnails=True)
    shown = [p for p in lay.labels if p.shown]
    assert 0 < len(shown) < 40
    for i, a in enumerate(shown):
        assert 0 <= a.box[0] and a.box[2] <= 640 and lay.title_h <= a.box[1] and a.box[3] <= 560
        for b in shown[i + 1:]:
            assert not (a.box[0] < b.box[2] and b.box[0] < a.box[2] and a.box[1] < b.box[3] and b.box[1] < a.box[3])


@pytest.mark.parametrize("thumbs", [True, False])
def test_query_and_results_change_the_map_only_near_them(thumbs) -> None:
    m = _grid_map()
    kw = {"thumbnails": _tiles(len(m))} if thumbs else {}
    size, title = (640, 560), "same title"
    base = m.render(size=size, title=title, **kw)
    lab = np.asarray(m.labels)
    rows = np.flatnonzero(lab == "class_4")  # the middle cluster
    q = m.coords[rows].mean(0)
    top = [int(r) for r in rows[np.argsort(np.linalg.norm(m.coords[rows] - q, axis=1))][:5]]
    img = m.render(query_xy=q, highlight=top, size=size, title=title, **kw)
    assert img.size == size
    diff = _changed(base, img)
    assert diff.sum() > 200
    lay = m.layout(size, title, thumbnails=thumbs)
    yy, xx = np.nonzero(diff)
    pts = np.concatenate([lay.to_pixels(q), lay.to_pixels(m.coords[top])])
    d = np.sqrt((xx[:, None] - pts[None, :, 0]) ** 2 + (yy[:, None] - pts[None, :, 1]) ** 2).min(1)
    reach = 4 * max(lay.thumb_px, 30)  # moved-apart results, rank numbers, the caption
    caption_w = 130  # "your drawing" sits to one side of the star
    assert (d <= reach + caption_w).all()
    assert np.quantile(d, 0.9) <= reach
    # the other clusters are untouched
    far = np.linalg.norm(lay.to_pixels(m.coords) - lay.to_pixels(q), axis=1) > reach + caption_w + 40
    for x, y in lay.to_pixels(m.coords[far]):
        assert not diff[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4].any()
    # results in the highlight colour, the star's gold near the query
    from sbir_core.explain.map_drawing import HIGHLIGHT, STAR_FILL

    a = np.asarray(img).astype(int)
    assert (np.abs(a - HIGHLIGHT).sum(2) < 30).sum() > 50
    qx, qy = lay.to_pixels(q)[0].astype(int)
    assert (np.abs(a[qy - 8:qy + 9, qx - 8:qx + 9] - STAR_FILL).sum(2) < 30).sum() > 20
    # the drawing itself instead of a star
    from PIL import Image

    sketch = Image.new("L", (120, 120), 255)
    with_sketch = m.render(query_xy=q, highlight=top, size=size, title=title, query_image=sketch, **kw)
    assert with_sketch.size == size and _changed(with_sketch, img).any()
    with pytest.raises(IndexError):
        m.render(highlight=[len(m)], size=size)


def test_cached_render_draws_the_base_layer_once_and_decodes_each_thumbnail_once(tmp_path, monkeypatch) -> None:
    """400 points, 400 small JPEGs: the map of a new query (or none) reuses the base layer of
    its size, so each thumbnail is decoded once and the layer laid out once. How long a map
    takes: `map_image_for_ms_median` from `scripts/bench_product.py --map` (docs/BENCHMARKS.md)."""
    rng = np.random.default_rng(0)
    n, classes = 400, 68
    labels = [f"class{i % classes}" for i in range(n)]
    centres = rng.uniform(-40, 40, size=(classes, 2))
    coords = (centres[np.arange(n) % classes] + rng.normal(scale=2.0, size=(n, 2))).astype(np.float32)
    m = EmbeddingMap(coords, rng.normal(size=(n, 16)), labels)
    paths = []
    for i, im in enumerate(_tiles(n)):
        p = tmp_path / f"{i}.jpg"
        im.resize((128, 96)).save(p, quality=85)
        paths.append(str(p))
    calls = []

    def thumb(row):
        calls.append(row)
        return paths[row]

    laid_out = []
    real_layout = m.layout
    monkeypatch.setattr(m, "layout", lambda *a, **k: laid_out.append(a) or real_layout(*a, **k))
    size, title = (640, 560), "a gallery"
    m.render(size=size, title=title, thumbnails=thumb)  # first: decodes, builds the base layer
    assert len(laid_out) == 1 and calls
    for k in range(10):
        q = coords[rng.integers(n)] + rng.normal(size=2)
        top = [int(r) for r in np.argsort(np.linalg.norm(coords - q, axis=1))[:5]]
        img = m.render(query_xy=q, highlight=top, size=size, title=title, thumbnails=thumb)
        assert img.size == size
        m.render(size=size, title=title, thumbnails=thumb)
    assert len(laid_out) == 1, "a new query's map laid out the base layer again"
    assert len(calls) == len(set(calls)) <= n  # every thumbnail decoded at most once
    # the cache of base layers is bounded
    for w in range(300, 300 + 10 * 20, 20):
        m.render(size=(w, 300), thumbnails=thumb)
    from sbir_core.explain.map_drawing import RENDER_CACHE_ENTRIES

    assert len(m._render_cache) <= RENDER_CACHE_ENTRIES


# ----------------------------------------------------------------------------- issue 31: the star with its results
def _near5(m, xy):
    return set(np.argsort(np.linalg.norm(m.coords - np.asarray(xy), axis=1), kind="stable")[:5].tolist())


def test_the_star_lands_in_the_cluster_where_most_of_its_results_are() -> None:
    """Top-10: a stray best result elsewhere, then six of the middle cluster, then three
    strays: the star joins the six (its 5 nearest points hold >= 3 results), not the best
    result alone."""
    m = _grid_map(n_per=8)
    lab = np.asarray(m.labels)
    mid = np.flatnonzero(lab == "class_4")
    top = [int(np.flatnonzero(lab == "class_0")[0])] + [int(r) for r in mid[:6]] + [
        int(np.flatnonzero(lab == c)[0]) for c in ("class_2", "class_6", "class_8")]
    xy = m.place_by_results(top)
    assert xy.shape == (2,)
    assert len(_near5(m, xy) & set(top)) >= 3 and _near5(m, xy) <= set(mid.tolist())
    assert np.linalg.norm(xy - m.coords[mid].mean(0)) < 2.5  # clusters are 10 apart, ~0.8 wide
    # ties between equal groups go to the better-ranked one; one result: on it
    a, b = np.flatnonzero(lab == "class_1")[:3], np.flatnonzero(lab == "class_7")[:3]
    assert _near5(m, m.place_by_results([*b, *a])) <= set(np.flatnonzero(lab == "class_7").tolist())
    np.testing.assert_allclose(m.place_by_results([5]), m.coords[5])
    with pytest.raises(ValueError):
        m.place_by_results([])
    with pytest.raises(IndexError):
        m.place_by_results([len(m)])


def test_a_query_placed_by_its_search_results_lands_among_them(fitted) -> None:
    """On a fitted map: a query near one cluster, its top-10 by cosine search, lands in it."""
    x, labels, m = fitted
    rng = np.random.default_rng(5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in (3, 40, 77):
        q = xn[i] + 0.05 * rng.normal(size=xn.shape[1])
        top = [int(r) for r in np.argsort(-(xn @ q))[:10]]
        xy = m.place_by_results(top)
        assert len(_near5(m, xy) & set(top)) >= 3
        assert {labels[r] for r in _near5(m, xy)} == {labels[i]}


def _boxes_meet(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("thumbs", [True, False])
def test_the_caption_and_star_never_cover_a_class_name(thumbs) -> None:
    """A crowded map (40 classes in one blob, names everywhere): wherever the star lands,
    the caption's box and the star's box meet no drawn name's box, names do not meet each
    other, and no other class's name sits on a result."""
    rng = np.random.default_rng(3)
    coords = rng.normal(size=(200, 2)).astype(np.float32)
    labels = [f"label{i % 40}" for i in range(200)]
    m = EmbeddingMap(coords, rng.normal(size=(200, 4)), labels)
    kw = {"thumbnails": _tiles(len(m))} if thumbs else {}
    checked = 0
    for row in range(0, 200, 13):
        top = [int(r) for r in np.argsort(np.linalg.norm(coords - coords[row], axis=1))[:10]]
        xy = m.place_by_results(top)
        mk = m.marks(query_xy=xy, highlight=top, size=(640, 560), title="t", **kw)
        assert mk.caption is not None and mk.labels
        star = mk.marker_box()
        for lab in mk.labels:
            assert not _boxes_meet(mk.caption[2], lab.box), (lab.name, mk.caption)
            assert not _boxes_meet(star, lab.box), lab.name
            if lab.name not in {labels[r] for r in top}:
                assert not any(_boxes_meet(lab.box, b) for b in mk.boxes), lab.name
        for i, a in enumerate(mk.labels):
            assert not any(_boxes_meet(a.box, b.box) for b in mk.labels[i + 1:])
        # the picture is what the marks say: the caption's frame is drawn where its box is
        img = np.asarray(m.draw(mk)).astype(int)
        x0, y0, x1, y1 = (int(round(v)) for v in mk.caption[2])
        assert (np.abs(img[y0 + 1:y1 - 1, x0 + 2:x1 - 2] - 255).sum(2) == 0).mean() > 0.5  # white inside
        checked += 1
    assert checked >= 15


def test_class_names_are_big_enough_to_read_on_the_page() -> None:
    """16 px at 640 px wide: >= 12 CSS px where the page shows the map 500 px wide (1366 x 768,
    measured in tests/test_map_agreement.py), and they keep that size on bigger pictures."""
    from sbir_core.explain.map_drawing import LABEL_PX

    m = _grid_map()
    for size in ((640, 560), (1280, 1120)):
        lay = m.layout(size, "t", thumbnails=True)
        assert lay.label_px == round(LABEL_PX * size[0] / 640) and lay.label_px * 500 / size[0] >= 12
