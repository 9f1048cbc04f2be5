"""The app's callbacks and the RetrievalService behind them, called as plain functions.

Everything runs on a tiny generated gallery (tests/conftest.py: `app_galleries`) with
the raw backbone, so no trained checkpoint and no shared data are needed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw


from sbir_core.service import EMPTY_SKETCH_MESSAGE, MAX_K, RetrievalService  # noqa: E402
from sbir_core.errors import InputError  # noqa: E402
from sbir_core.data.images import check_upload  # noqa: E402
from sbir_core.gallery.store import label_from_filename, sanitize_gallery_name  # noqa: E402

OWNER = "0123456789abcdef0123456789abcdef"  # a visitor's session token

app = pytest.importorskip("sbir_app", reason="the app needs gradio")


def drawn_canvas(shape: str = "circle", size: int = 384) -> dict:
    """A drawn image as an API client (or the old Sketchpad) sends it: black lines on white."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([90, 90, 290, 290], outline="black", width=6)
    elif shape == "square":
        d.rectangle([90, 90, 290, 290], outline="black", width=6)
    else:
        d.line([(60, 300), (190, 70), (320, 300), (60, 300)], fill="black", width=6)
    arr = np.asarray(img)
    return {"background": np.full_like(arr, 255), "layers": [arr], "composite": arr}


_UPLOADS = Path(__import__("tempfile").mkdtemp(prefix="sbir-test-uploads-"))


def drawn_upload(shape: str = "circle") -> dict:
    """The same drawing as /search_sketch receives it from Gradio: an editor value whose
    images are uploads (FileData dicts; the callbacks decode them)."""
    p = _UPLOADS / f"{shape}.png"
    Image.fromarray(drawn_canvas(shape)["composite"]).save(p)
    return {"background": None, "layers": [], "composite": {"path": str(p), "orig_name": p.name}}


def upload(path) -> dict:
    return {"path": str(path), "orig_name": Path(path).name}


@pytest.fixture()
def cb(app_service):
    return app.Callbacks(app_service)


# ----------------------------------------------------------------------------- sketch search
def test_search_with_drawn_canvas_returns_k_captioned_results(cb, app_service):
    items, msg, query = cb.search_sketch(drawn_upload("circle"), 5, "default")
    assert len(items) == 5
    assert "Best match" not in msg and "sketch → photo" in msg  # the technical sentence, under Details
    labels = {h.label for h in query.hits}
    assert labels <= {"circle", "square", "triangle", "star"}
    scores = [h.score for h in query.hits]
    assert scores == sorted(scores, reverse=True)
    for (thumb, caption), hit in zip(items, query.hits):
        assert Path(thumb).is_file() and Path(hit.path).is_file()
        assert caption == f"{hit.rank + 1}. {hit.label}"  # place and class: never out of order
    # the thumbnail is a small image, not the original
    assert max(Image.open(items[0][0]).size) <= 256
    assert query.kind == "sketch" and query.embedding.shape == (app_service.encoder.embed_dim,)
    assert abs(float(np.linalg.norm(query.embedding)) - 1) < 1e-4


def test_search_matches_library_search(app_service):
    """The service adds nothing to the ranking: same order as index.Gallery.search."""
    from sbir_core.gallery.query import encode_query

    canvas = drawn_canvas("square")
    out = app_service.search_sketch(canvas, 12)
    g = app_service.gallery("default").gallery
    ref = g.search(encode_query(app_service.encoder, sketch=canvas["composite"]), 12)
    assert [h.index for h in out.hits] == [r.index for r in ref]
    assert np.allclose([h.score for h in out.hits], [r.score for r in ref], atol=1e-5)


def test_search_accepts_arrays_images_and_strokes_but_never_paths(app_service, tmp_path):
    canvas = drawn_canvas("triangle")
    arr = canvas["composite"]
    path = tmp_path / "drawing.png"
    Image.fromarray(arr).save(path)
    strokes = [[(60, 300), (190, 70), (320, 300), (60, 300)]]
    rgba = np.zeros((384, 384, 4), np.uint8)  # a transparent canvas with dark ink
    rgba[..., 3] = 255 - arr[..., 0]
    for value in (arr, Image.fromarray(arr), strokes, rgba, {"composite": None, "background": arr, "layers": []}):
        out = app_service.search_sketch(value, 3)
        assert out.ok, (type(value), out.message)
        assert len(out.hits) == 3
    # a file name is never opened, however it is wrapped
    for value in (str(path), path, {"path": str(path)}, {"composite": str(path)}, {"composite": {"path": str(path)}}):
        out = app_service.search_sketch(value, 3)
        assert not out.ok and out.hits == [] and "not as a file name" in out.message, value


def _strokes_json(shape: str = "circle") -> str:
    """What the page's canvas sends: the strokes as JSON point lists (canvas pixels)."""
    import math

    if shape == "circle":
        st = [[[190 + 100 * math.cos(2 * math.pi * i / 32), 190 + 100 * math.sin(2 * math.pi * i / 32)]
               for i in range(33)]]
    else:
        st = [[[90, 90], [290, 90]], [[290, 90], [290, 290]], [[290, 290], [90, 290]], [[90, 290], [90, 90]]]
    return json.dumps(st)


def test_search_with_stroke_json_matches_the_stroke_list(cb, app_service):
    items, msg, query = cb.search_strokes(_strokes_json("circle"), 5, "default")
    assert len(items) == 5 and "Details" in msg and query.kind == "sketch"
    # the same as the service on the stroke list itself (two-point strokes stay point lists)
    pts = [[tuple(p) for p in s] for s in json.loads(_strokes_json("square"))]
    ref = app_service.search_sketch(pts, 5, "default")
    items2, msg2, query2 = cb.search_strokes(_strokes_json("square"), 5, "default")
    assert [h.index for h in query2.hits] == [h.index for h in ref.hits]
    assert np.allclose(query2.embedding, ref.query.embedding, atol=1e-5)
    # {"strokes": ...} (an example's form) and QuickDraw [[xs], [ys]] strokes are read too
    qd = json.dumps({"canvas": [384, 384], "strokes": [[[p[0] for p in s], [p[1] for p in s]] for s in
                                                       json.loads(_strokes_json("circle"))]})
    items3, _, query3 = cb.search_strokes(qd, 5, "default")
    assert [h.index for h in query3.hits] == [h.index for h in query.hits]
    # a stroke query is explained like any drawing
    corr, synth, heat, emsg = cb.explain(query, 1)
    assert corr is not None and synth is not None and heat is not None and emsg.startswith("Result 2")


@pytest.mark.parametrize("value", ["", "  ", "[]", "[[]]", '{"strokes": []}', None])
def test_empty_stroke_json_gives_friendly_message(cb, value):
    items, msg, query = cb.search_strokes(value, 12, "default")
    assert items == [] and query is None and EMPTY_SKETCH_MESSAGE in msg


@pytest.mark.parametrize("value", ["[[[1, 2, 3]]]", '[[[1, "a"]]]', "[[[NaN, 1]]]", "[1, 2", '{"strokes": 5}',
                                   json.dumps([[[i, i] for i in range(60_000)]]),
                                   "[" * 100_000 + "]" * 100_000,  # RecursionError in json.loads
                                   json.dumps([[[1, 1], [2, 2]]] * 3000),  # too many strokes
                                   "/etc/passwd", "~/.ssh/id_rsa.png", "galleries/default/index/gallery.json", 5],
                         ids=lambda v: repr(v)[:24])  # short ids: some values are 100 kB
def test_bad_stroke_json_is_a_message(cb, value):
    items, msg, query = cb.search_strokes(value, 12, "default")
    assert items == [] and query is None and "could not be read" in msg
    assert "Traceback" not in msg and "/" not in msg.split("read:")[0]


def test_example_click_loads_strokes_and_searches(cb):
    import gradio as gr

    evt = gr.SelectData(None, {"index": 1, "value": None, "selected": True})
    strokes = cb.load_example(evt)  # the page draws it, then searches with it as with strokes
    items, msg, query = cb.search_strokes(strokes, 4, "default")
    data = json.loads(strokes)
    assert data["canvas"] == [256, 256] and len(data["strokes"]) >= 1
    from sbir_core.data.examples import list_examples

    assert len(data["strokes"]) == len(list_examples()[1].strokes)
    assert len(items) == 4 and "Details" in msg and query.kind == "sketch"
    # the canvas' Clear sends an empty stroke list the way strokes go: no results, no query
    items, msg, query_after = cb.search_strokes(json.dumps({"strokes": [], "brush": 6}), 4, "default")
    assert items == [] and "Draw something" in msg and query_after is None
    # k changed: the last sketch search runs again with the strokes
    items, msg, _ = cb.rerun(query, strokes, "", None, 2, "default")
    assert len(items) == 2
    # an index that names no example (any client can send one): no drawing, no error
    for bad in (99, -1, "x", None, [], [1.5]):
        assert cb.load_example(gr.SelectData(None, {"index": bad, "value": None, "selected": True})) == ""


def test_same_drawing_is_answered_from_cache(app_service, monkeypatch):
    """The same drawing again (a copy of it, as a new request brings) is not encoded again.
    How much time that saves: scripts/bench_app.py."""
    import sbir_core.service as service_module

    encoded = []
    real = service_module.encode_sketch_query
    monkeypatch.setattr(service_module, "encode_sketch_query", lambda *a, **k: encoded.append(1) or real(*a, **k))
    def drawing(row: int) -> dict:  # a circle with a bar no other test draws
        arr = drawn_canvas("circle")["composite"].copy()
        arr[row:row + 6, 40:340] = 0
        return {"composite": arr}

    first = app_service.search_sketch(drawing(20), 4)
    again = app_service.search_sketch(drawing(20), 4)
    assert len(encoded) == 1, "the same drawing was encoded twice"
    assert [h.index for h in again.hits] == [h.index for h in first.hits]
    app_service.search_sketch(drawing(340), 4)
    assert len(encoded) == 2  # another drawing is encoded


@pytest.mark.parametrize("value", [
    None,
    {"background": None, "layers": [], "composite": None},
    {"background": None, "layers": [], "composite": np.full((384, 384, 3), 255, np.uint8)},
    np.zeros((64, 64, 4), np.uint8),  # fully transparent
    [],  # no strokes
])
def test_empty_canvas_gives_friendly_message(app_service, value):
    out = app_service.search_sketch(value, 12, "default")
    assert out.hits == [] and out.query is None
    assert out.message == EMPTY_SKETCH_MESSAGE and "Draw something first" in out.message
    assert out.problem == "blank"  # what the page words it from


@pytest.mark.parametrize("k,n", [(0, 1), (-3, 1), (1, 1), (5, 5), (10_000, 12), ("7", 7), ("x", 12), (None, 12)])
def test_k_is_clamped_to_1_and_max_k(cb, k, n):
    """k outside [1, MAX_K] is clamped (the tiny gallery has 12 images); junk gives the default."""
    items, msg, _ = cb.search_strokes(_strokes_json("circle"), k, "default")
    assert len(items) == n, msg


def test_max_k_caps_results():
    from sbir_core.service import clamp_k

    assert clamp_k(10 ** 9) == MAX_K and clamp_k(float("inf")) == 12 and clamp_k(-1e9) == 1


def test_unknown_gallery_is_a_message(app_service):
    out = app_service.search_sketch(drawn_canvas(), 3, gallery="nope")
    assert not out.ok and "No gallery named “nope”" in out.message


def test_example_drawings_search(cb):
    items, msg, query = cb.search_example("cat", 4, "default")
    assert len(items) == 4 and query is not None
    items, msg, query = cb.search_example("no-such-example", 4, "default")
    assert items == [] and "No example" in msg


# ----------------------------------------------------------------------------- text and photo
def test_text_search_without_text_head_explains_itself(cb):
    items, msg, query = cb.search_text("cat", 12, "default")
    assert items == [] and query is None
    assert "needs the trained model" in msg
    items, msg, _ = cb.search_text("   ", 12, "default")
    assert items == [] and "Type a word" in msg


def test_text_search_with_a_text_encoder(app_galleries, raw_encoder, tmp_path, monkeypatch):
    """With a text-capable encoder the text query goes through index.encode_query."""
    svc = RetrievalService(app_galleries, encoder=raw_encoder, relation=None, cache_dir=tmp_path)
    g = svc.gallery("default").gallery
    target = g.embeddings[g.labels.index("star")]
    monkeypatch.setattr(RetrievalService, "has_text", property(lambda self: True))
    import sbir_core.service as index_mod  # the service calls gallery.query.encode_query

    calls = []

    def fake_encode_query(encoder, *, text=None, **kw):
        calls.append(text)
        return target

    monkeypatch.setattr(index_mod, "encode_query", fake_encode_query)
    out = svc.search_text("star", 3)
    assert out.ok and calls == ["star"]
    assert out.hits[0].label == "star" and out.hits[0].score > 0.999
    assert "text “star”" in out.message


def test_photo_query(cb, tmp_path):
    from conftest import make_shape_image

    p = tmp_path / "query.png"
    make_shape_image("star", seed=999).save(p)
    items, msg, query = cb.search_photo(upload(p), 3, "default")
    assert len(items) == 3 and query.kind == "photo", msg
    assert "photo → photo" in msg


def test_bad_uploads_give_clear_messages(app_galleries, raw_encoder, tmp_path):
    svc = RetrievalService(app_galleries, encoder=raw_encoder, relation=None, cache_dir=tmp_path,
                           max_upload_bytes=50_000, max_upload_pixels=250_000)
    c = app.Callbacks(svc)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not a picture")  # a .txt renamed .jpg
    items, msg, query = c.search_photo(upload(not_image), 3, "default")
    assert items == [] and query is None and "not an image" in msg and str(tmp_path) not in msg
    big_file = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(big_file)
    items, msg, _ = c.search_photo(upload(big_file), 3, "default")
    assert items == [] and "too large" in msg and "MB" in msg
    many_pixels = tmp_path / "wide.png"
    Image.new("RGB", (1000, 400), "white").save(many_pixels)  # small file, 0.4 MP > 0.25 MP
    items, msg, _ = c.search_photo(upload(many_pixels), 3, "default")
    assert items == [] and "megapixels" in msg
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "empty" in c.search_photo(upload(empty), 3, "default")[1]
    assert "Upload a photo first" in c.search_photo(None, 3, "default")[1]
    # the service itself takes image data only, never a file name
    out = svc.search_photo(str(many_pixels), 3)
    assert not out.ok and "not as a file name" in out.message


def test_check_upload_refuses_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("L", (5000, 5000)).save(p)  # tiny file, 25 MP
    with pytest.raises(InputError, match="megapixels"):
        check_upload(p, max_pixels=1_000_000)
    check_upload(p)  # within the default limits


# ----------------------------------------------------------------------------- explanations, map
def test_explanation_returns_three_images(cb):
    _, _, query = cb.search_sketch(drawn_upload("circle"), 4, "default")
    corr, synth, heat, msg = cb.explain(query, 1)
    assert all(isinstance(x, Image.Image) for x in (corr, synth, heat)), msg
    assert corr.width > 2 * synth.width * 0.9  # sketch and photo side by side
    assert synth.size == heat.size
    assert "Result 2" in msg and query.hits[1].label in msg
    # the synthesis is made of photo patches: not just black lines on white
    assert len(np.unique(np.asarray(synth).reshape(-1, 3), axis=0)) > 20


def test_explanation_of_a_photo_query(cb, tmp_path):
    from conftest import make_shape_image

    p = tmp_path / "q.png"
    make_shape_image("square", seed=5).save(p)
    _, _, query = cb.search_photo(upload(p), 3, "default")
    corr, synth, heat, msg = cb.explain(query, 0)
    assert corr is not None and "photo outline" in msg


def test_explanation_without_a_usable_query(cb):
    corr, synth, heat, msg = cb.explain(None, 0)
    assert corr is None and "Search first" in msg
    _, _, query = cb.search_sketch(drawn_upload(), 3, "default")
    corr, _, _, msg = cb.explain(query, 7)
    assert corr is None and "no result number 8" in msg


def test_map_image_returns_a_map_with_the_query(cb, app_service):
    _, _, query = cb.search_sketch(drawn_upload("square"), 4, "default")
    img = cb.map_image(query)
    assert isinstance(img, Image.Image) and img.width >= 400
    m = app_service.map_image_for(query)
    assert m.ok and m.plot_data["query"] is not None
    assert m.plot_data["highlight"] == [h.index for h in query.hits]
    assert len(m.plot_data["points"]) == 12
    plain = cb.map_image(None)  # before any search: the gallery alone
    assert isinstance(plain, Image.Image)
    assert not np.array_equal(np.asarray(plain), np.asarray(img))


# ----------------------------------------------------------------------------- galleries
def _svc(app_galleries, raw_encoder, tmp_path) -> RetrievalService:
    root = tmp_path / "galleries"
    shutil.copytree(app_galleries, root)
    return RetrievalService(root, encoder=raw_encoder, relation=None, cache_dir=tmp_path / "cache",
                            uploads_dir=tmp_path / "user")


def test_build_gallery_from_uploads_reports_skipped_files(app_galleries, raw_encoder, tmp_path):
    from conftest import make_shape_image

    svc = _svc(app_galleries, raw_encoder, tmp_path)
    up = tmp_path / "uploads"
    up.mkdir()
    files = []
    for i, kind in enumerate(["circle", "circle", "square", "star"]):
        p = up / f"{kind}_{i}.png"
        make_shape_image(kind, seed=50 + i).save(p)
        files.append(str(p))
    (up / "readme.txt").write_text("hello")
    truncated = up / "broken_1.jpg"
    good = up / "tmp.jpg"
    make_shape_image("circle", seed=1).save(good)
    truncated.write_bytes(good.read_bytes()[:200])
    files += [str(up / "readme.txt"), str(truncated)]
    progress = []
    out = svc.build_gallery_from_uploads(files, "My Shapes!", OWNER, progress=lambda f, d: progress.append(f))
    assert out.ok, out.message
    code = out.name.removeprefix("class:")  # a class gallery, opened only by its code
    assert out.name.startswith("class:") and len(code) == 10 and code.isalnum()
    assert out.report.total == 4
    skipped = dict(out.skipped)
    assert set(skipped) == {"readme.txt", "broken_1.jpg"}
    assert "Skipped 2" in out.message and "readme.txt" in out.message
    assert progress and progress == sorted(progress)
    # private: not listed for other visitors, and stored in the class galleries folder, not the repository
    assert svc.list_galleries() == ["default"]
    assert not any(svc.store.root.rglob("*my_shapes*"))
    assert (svc.store.uploads_dir / code / "images").is_dir()
    res = svc.search_sketch(drawn_canvas(), 10, gallery=out.name)
    assert res.ok and {h.label for h in res.hits} == {"circle", "square", "star"}
    # another code cannot name it
    other = svc.search_sketch(drawn_canvas(), 10, gallery="class:" + "23456789AB")
    assert not other.ok and "No gallery" in other.message


def test_uploads_with_the_same_name_are_all_kept(app_galleries, raw_encoder, tmp_path):
    """image_0001.jpg from two folders: both kept (renamed), an identical copy kept once."""
    from conftest import make_shape_image

    svc = _svc(app_galleries, raw_encoder, tmp_path)
    files = []
    for i, folder in enumerate(("a", "b")):
        (tmp_path / folder).mkdir()
        p = tmp_path / folder / "circle_0001.png"
        make_shape_image("circle", seed=70 + i).save(p)
        files.append(upload(p))
    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / "a" / "circle_0001.png", tmp_path / "c" / "circle_0001.png")
    files.append(upload(tmp_path / "c" / "circle_0001.png"))
    out = svc.build_gallery_from_uploads(files, "dupes", OWNER)
    assert out.ok and out.report.total == 2, out.message
    assert "renamed circle_0001-2.png" in out.message and "identical to circle/circle_0001.png" in out.message


def test_build_gallery_refusals(app_galleries, raw_encoder, tmp_path):
    svc = _svc(app_galleries, raw_encoder, tmp_path)
    assert "Choose some images" in svc.build_gallery_from_uploads([], "x", OWNER).message
    assert "name" in svc.build_gallery_from_uploads(["a.png"], "???", OWNER).message
    assert "session" in svc.build_gallery_from_uploads(["a.png"], "x", "../../etc").message
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    out = svc.build_gallery_from_uploads([str(bad)], "bad", OWNER)
    assert not out.ok and "None of the uploaded files" in out.message
    # an upload named like a shipped gallery does not touch it
    good = tmp_path / "circle_1.png"
    Image.new("RGB", (50, 50), "red").save(good)
    out = svc.build_gallery_from_uploads([str(good)], "default", OWNER)
    assert out.ok and out.name != "default"
    assert len(svc.gallery("default")) == 12


def test_callbacks_build_gallery_updates_dropdown(app_galleries, raw_encoder, tmp_path):
    from conftest import make_shape_image

    svc = _svc(app_galleries, raw_encoder, tmp_path)
    c = app.Callbacks(svc)
    files = []
    for i in range(2):
        p = tmp_path / f"triangle_{i}.png"
        make_shape_image("triangle", seed=i).save(p)
        files.append(str(p))
    msg, dd, box, owner, mine = c.build_gallery([upload(f) for f in files], "tri", False, None, [],
                                                progress=lambda *a, **k: None)
    assert "ready" in msg and box is None  # the upload box is emptied for the next build
    gid = dd["value"]
    label = f"tri (class {gid[6:11]}-{gid[11:]})"
    assert len(owner) == 32 and mine == [gid] and gid.startswith("class:")
    assert (label, gid) in dd["choices"] and ("default", "default") in dd["choices"]
    status, results, query, map_image = c.choose_gallery(gid, progress=lambda *a, **k: None)
    assert f"Gallery {label}: 2 images, 1 class." in status and results == [] and query is None
    status, *_ = c.choose_gallery("missing", progress=lambda *a, **k: None)
    assert status.startswith("⚠️") and "missing" in status
    # another visitor (no token, no galleries of their own) sees only the shipped gallery
    assert c.load_page(None, None, [], None)[0]["choices"] == [("default", "default")]
    assert c.service.default_gallery == "default"


def test_sketch_gallery_searches_sketch_to_sketch(app_galleries, raw_encoder, tmp_path):
    from sbir_core.data.examples import list_examples

    src = tmp_path / "doodles"
    for e in list_examples()[:4]:
        (src / e.name).mkdir(parents=True)
        e.render(size=128).save(src / e.name / f"{e.name}.png")
    svc = _svc(app_galleries, raw_encoder, tmp_path)
    out = svc.build_gallery_from_folder(src, "doodles", modality="sketch")
    assert out.ok, out.message
    res = svc.search_sketch({"composite": np.asarray(list_examples()[0].render(size=300))}, 2, gallery="doodles")
    assert "sketch → sketch" in res.message
    assert res.hits[0].label == list_examples()[0].name and res.hits[0].score > 0.85


def test_stale_gallery_is_rebuilt_from_its_sources(app_galleries, raw_encoder, tmp_path):
    svc0 = _svc(app_galleries, raw_encoder, tmp_path)
    meta_path = svc0.store.root / "default" / "gallery.json"
    meta = json.loads(meta_path.read_text())
    meta["encoder_id"] = "some-other-model@123"
    meta_path.write_text(json.dumps(meta))
    svc = RetrievalService(svc0.store.root, encoder=raw_encoder, relation=None, cache_dir=tmp_path / "cache2")
    assert svc.default_gallery == "default"
    msg = svc.describe_gallery("default")
    assert "indexed for the current model" in msg and "some-other-model@123" in msg
    # Re-indexed into the cache: the galleries folder (the shipped one) is never rewritten,
    # so running another checkpoint cannot replace the index the default model ships.
    assert json.loads(meta_path.read_text())["encoder_id"] == "some-other-model@123"
    assert (tmp_path / "cache2" / "rebuilt").is_dir()
    assert svc.search_sketch(drawn_canvas(), 3).ok


def test_stale_gallery_without_sources_gives_a_message(app_galleries, raw_encoder, tmp_path):
    svc0 = _svc(app_galleries, raw_encoder, tmp_path)
    meta_path = svc0.store.root / "default" / "gallery.json"
    meta = json.loads(meta_path.read_text())
    meta["encoder_id"] = "some-other-model@123"
    meta["source_dir"] = str(tmp_path / "gone")
    meta_path.write_text(json.dumps(meta))
    svc = RetrievalService(svc0.store.root, encoder=raw_encoder, relation=None, cache_dir=tmp_path / "cache2")
    assert svc.default_gallery is None
    assert any("built with another model" in n for n in svc.notices)
    out = svc.search_sketch(drawn_canvas(), 3)
    assert not out.ok and "No gallery yet" in out.message


def test_images_inside_gallery_folder_are_never_deleted_by_a_rebuild(raw_encoder, tmp_path):
    """galleries/<name>/images with no index: indexed into the cache, images untouched."""
    from conftest import make_shape_image

    root = tmp_path / "galleries"
    for kind in ("circle", "square"):
        (root / "shipped" / "images" / kind).mkdir(parents=True)
        make_shape_image(kind, seed=3).save(root / "shipped" / "images" / kind / "a.jpg")
    svc = RetrievalService(root, gallery="shipped", encoder=raw_encoder, relation=None, cache_dir=tmp_path / "c")
    assert svc.default_gallery == "shipped"
    assert len(list((root / "shipped" / "images").rglob("*.jpg"))) == 2
    assert svc.search_sketch(drawn_canvas(), 2).ok


def test_missing_checkpoint_falls_back_with_a_warning(app_galleries, raw_encoder, tmp_path, monkeypatch):
    import sbir_core.service as enc  # the service calls models.encoders.create_encoder

    def fake_create(name=None, checkpoint="default", device="cpu"):
        if str(checkpoint).lower() != "none":
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        return raw_encoder

    monkeypatch.setattr(enc, "create_encoder", fake_create)
    svc = RetrievalService(app_galleries, checkpoint="default", relation=None, cache_dir=tmp_path)
    assert svc.checkpoint == "none" and svc.encoder is raw_encoder
    assert any("raw backbone" in n for n in svc.notices)
    assert svc.search_sketch(drawn_canvas(), 3).ok
    demo = app.build_demo(svc)  # the warning is shown in the page
    notice = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "notice")
    assert "raw backbone" in notice.value and notice.visible


def test_list_galleries(app_galleries, raw_encoder, tmp_path):
    svc = _svc(app_galleries, raw_encoder, tmp_path)
    (svc.store.root / "empty_dir").mkdir()
    (svc.store.root / ".hidden" / "x").mkdir(parents=True)
    assert svc.list_galleries() == ["default"]


# ----------------------------------------------------------------------------- helpers, examples
@pytest.mark.parametrize("filename,label", [
    ("cat_01.jpg", "cat"), ("Red Car-3.PNG", "red_car"), ("dog (2).png", "dog"), ("123.jpg", "uploaded"),
    ("ice_cream.webp", "ice_cream"),
])
def test_label_from_filename(filename, label):
    assert label_from_filename(filename) == label


def test_sanitize_gallery_name():
    assert sanitize_gallery_name("My Shapes!") == "my_shapes"
    assert sanitize_gallery_name("../../etc") == "etc"
    assert sanitize_gallery_name("???") == ""


def test_examples_are_authored_stroke_lists():
    from sbir_core.data.examples import EXAMPLES_DIR, example_names, render_example

    names = example_names()
    assert {"cat", "house", "bicycle", "fish", "tree", "car", "cup", "star", "sun", "flower", "guitar"} <= set(names)
    for n in names:
        data = json.loads((EXAMPLES_DIR / f"{n}.json").read_text())
        assert data["format"] == "points" and len(data["strokes"]) >= 1
        img = np.asarray(render_example(n, size=128).convert("L"))
        ink = (img < 128).mean()
        assert 0.01 < ink < 0.5, (n, ink)
    value, img = app.example_canvas("house")
    assert value["background"] is img and img.size == app.CANVAS


def test_click_explains_the_clicked_image_even_if_results_moved_on(cb, app_service):
    import gradio as gr

    items, _, query = cb.search_sketch(drawn_upload("circle"), 3, "default")
    thumb, caption = items[2]
    # the page hands over what was clicked: position 0 (stale), but the image of result 3
    evt = gr.SelectData(None, {"index": 0, "value": {"image": {"path": thumb}, "caption": caption},
                               "selected": True})
    corr, synth, heat, msg = cb.on_select(query, evt)
    assert corr is not None and msg.startswith("Result 3:")
    # a gallery row that is not among the hits is still explained, with its own rank and score
    g = app_service.gallery("default").gallery
    outside = next(i for i in range(len(g)) if i not in query.highlight)
    ex = app_service.explain(query, 0, gallery_row=outside)
    assert ex.ok and ex.hit.index == outside and ex.hit.rank >= 3
    assert abs(ex.hit.score - float(g.embeddings[outside] @ query.embedding)) < 1e-5
    # a class that does not fit the thumbnail's row is not trusted, nor a caption no result had
    assert app_service.row_of_thumbnail("default", thumb, "unicorn") is None
    assert app_service.row_of_thumbnail("default", thumb, query.hits[2].label) == query.hits[2].index
    evt = gr.SelectData(None, {"index": 1, "value": {"image": {"path": thumb}, "caption": "3. unicorn"},
                               "selected": True})
    assert cb.on_select(query, evt)[3].startswith("Result 2:")  # by its position instead
    assert app_service.row_of_thumbnail("default", "/x/not-a-row.jpg") is None


def test_gallery_index_in_a_subfolder_is_found(app_galleries, raw_encoder, tmp_path):
    root = tmp_path / "galleries"
    shutil.copytree(app_galleries / "default", root / "shipped" / "index")
    (root / "shipped" / "images").mkdir()
    svc = RetrievalService(root, gallery="shipped", encoder=raw_encoder, relation=None, cache_dir=tmp_path / "c")
    assert svc.default_gallery == "shipped" and svc.notices == []
    assert svc.gallery_info()["directory"].endswith("index") and svc.gallery_info()["count"] == 12
    assert svc.list_galleries() == ["shipped"]


def test_brush_size_reaches_the_model_within_the_trained_range(app_service):
    """A thicker brush draws thicker lines in what the model sees, clamped to the widths
    the encoder was trained with."""
    from sbir_core.data.preprocess import LINE_WIDTH_RANGE, brush_line_width, preprocess_sketch

    square = [[(0, 0), (300, 0), (300, 300), (0, 300), (0, 0)]]
    size = app_service.encoder.image_size
    widths = [brush_line_width(square, b, size) for b in (1, 6, 12, 200)]
    assert widths == sorted(widths) and widths[0] == LINE_WIDTH_RANGE[0] and widths[-1] == LINE_WIDTH_RANGE[1]
    ink = [(np.asarray(preprocess_sketch(square, size, brush=b).convert("L")) < 128).sum() for b in (2, 12)]
    assert ink[1] > ink[0] * 1.5
    thin = app.Callbacks(app_service).search_strokes(json.dumps({"strokes": square, "brush": 2}), 3, "default")[2]
    thick = app.Callbacks(app_service).search_strokes(json.dumps({"strokes": square, "brush": 12}), 3, "default")[2]
    assert not np.allclose(thin.embedding, thick.embedding)


# ----------------------------------------------------------------------------- pictures handed to Gradio
def test_pictures_reach_gradio_as_files_written_whole(cb, tmp_path):
    """Gradio rewrites a returned PIL image's file on every call, so two visitors getting the
    same picture at once could be sent half of it; the page hands it files written once,
    atomically, named by content, and keeps at most `limit` of them."""
    import inspect

    served = app.ServedImages(tmp_path / "served", limit=3)
    _, _, query = cb.search_sketch(drawn_upload("circle"), 4, "default")
    corr, synth, heat, msg = served(cb.explain)(query, 1)
    assert all(isinstance(x, str) and Path(x).is_file() for x in (corr, synth, heat)) and msg.startswith("Result 2")
    again = served(cb.explain)(query, 1)
    assert again[:3] == (corr, synth, heat)  # same pictures, same files, not rewritten
    ref = cb.explain(query, 1)[0]
    sent = np.asarray(Image.open(corr).convert("RGB"), dtype=float)
    assert sent.shape[:2] == ref.size[::-1] and np.abs(sent - np.asarray(ref.convert("RGB"))).mean() < 0.5  # lossless WebP
    assert not list((tmp_path / "served").glob(".*.tmp"))
    # a map panel's gr.update(value=picture) is converted too; Gradio still sees the signature
    map_image, heading, seen = served(cb.map_panel)(query)
    assert Path(map_image).is_file() and Path(seen["value"]).is_file()
    assert "evt" in inspect.signature(served(cb.on_select)).parameters
    assert len(list((tmp_path / "served").glob("*.webp"))) == 3  # bounded: the oldest went
    assert served(cb.explain)(None, 0)[0] is None  # nothing to convert
