"""The app served in-process on a free loopback port, called through gradio_client.

Checks the named API endpoints (`/search_sketch`, `/search_example`, `/search_text`,
`/search_photo`, `/explain`, `/build_gallery`, `/select_gallery`) against the tiny
generated gallery from tests/conftest.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw


gradio_client = pytest.importorskip("gradio_client")
app = pytest.importorskip("sbir_app", reason="the app needs gradio")
from gradio_client import handle_file  # noqa: E402

from conftest import api_client, running_app  # noqa: E402
from sbir_core.paths import checkpoint_path  # noqa: E402
from sbir_core.service import EMPTY_SKETCH_MESSAGE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(live_app):
    """(url, service, Gradio's temporary folder): conftest's page, shared with test_classroom."""
    return live_app


@pytest.fixture(scope="module")
def client(server):
    return api_client(server[0])


def _drawing(path: Path, shape: str = "circle") -> str:
    img = Image.new("RGB", (384, 384), "white")
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([80, 80, 300, 300], outline="black", width=6)
    else:
        d.rectangle([80, 80, 300, 300], outline="black", width=6)
    img.save(path)
    return str(path)


def _canvas(path: str | None) -> dict:
    f = handle_file(path) if path else None
    return {"background": None, "layers": [], "composite": f}


def test_endpoints_are_named(client):
    info = client.view_api(print_info=False, return_format="dict")
    names = set(info["named_endpoints"])
    assert {"/search_sketch", "/search_strokes", "/search_example", "/search_text", "/search_photo", "/explain",
            "/build_gallery", "/select_gallery"} <= names


def _circle_strokes(n: int = 24) -> str:
    import json
    import math

    pts = [[192 + 110 * math.cos(2 * math.pi * i / n), 192 + 110 * math.sin(2 * math.pi * i / n)]
           for i in range(n + 1)]
    return json.dumps([pts])


def test_search_strokes_then_explain(client):
    """What the page's canvas sends: stroke JSON, no image."""
    results, status = client.predict(_circle_strokes(), 5, "default", api_name="/search_strokes")
    assert len(results) == 5, status
    assert "Details" in status and "Best match" not in status
    for r in results:
        place, label = r["caption"].split(". ", 1)
        assert label in {"circle", "square", "triangle", "star"} and 1 <= int(place) <= 5
    corr, synth, heat, msg = client.predict(1, api_name="/explain")  # explained from the strokes
    assert "Result 2" in msg
    for p in (corr, synth, heat):
        with Image.open(p) as im:
            assert im.width >= 200
    results, status = client.predict("", 5, "default", api_name="/search_strokes")
    assert results == [] and EMPTY_SKETCH_MESSAGE in status
    results, status = client.predict("[]", 5, "default", api_name="/search_strokes")
    assert results == [] and EMPTY_SKETCH_MESSAGE in status
    results, status = client.predict("[[[1, \"x\"]]]", 5, "default", api_name="/search_strokes")
    assert results == [] and "could not be read" in status


def test_search_sketch_then_explain(client, tmp_path):
    results, status = client.predict(_canvas(_drawing(tmp_path / "c.png")), 5, "default", api_name="/search_sketch")
    assert len(results) == 5, status
    assert "Details" in status and "Best match" not in status
    for r in results:
        assert Path(r["image"]["path"] if isinstance(r["image"], dict) else r["image"]).is_file()
        place, label = r["caption"].split(". ", 1)
        assert label in {"circle", "square", "triangle", "star"} and 1 <= int(place) <= 5
    # the query is kept in the session: explain result 2 of it
    corr, synth, heat, msg = client.predict(1, api_name="/explain")
    assert "Result 2" in msg
    for p in (corr, synth, heat):
        with Image.open(p) as im:
            assert im.width >= 200
    with Image.open(corr) as a, Image.open(synth) as b:
        assert a.width > b.width  # side-by-side correspondences


def test_blank_canvas_message(client, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (384, 384), "white").save(blank)
    results, status = client.predict(_canvas(str(blank)), 12, "default", api_name="/search_sketch")
    assert results == [] and EMPTY_SKETCH_MESSAGE in status
    results, status = client.predict(_canvas(None), 12, "default", api_name="/search_sketch")
    assert results == [] and "Draw something first" in status


def test_search_example_and_text(client):
    results, status = client.predict("house", 3, "default", api_name="/search_example")
    assert len(results) == 3 and "Details" in status
    results, status = client.predict("giraffe", 3, "default", api_name="/search_text")
    assert results == [] and "needs the trained model" in status


def test_search_photo_and_bad_upload(client, tmp_path):
    from conftest import make_shape_image

    p = tmp_path / "photo.png"
    make_shape_image("square", seed=3).save(p)
    results, status = client.predict(handle_file(str(p)), 4, "default", api_name="/search_photo")
    assert len(results) == 4 and "photo → photo" in status


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n not really", b"just some notes\n", b""])
def test_bad_photo_is_one_plain_sentence(server, client, tmp_path, content):
    """A .txt renamed .jpg, a broken PNG or a zero-byte file as the query photo: one plain
    sentence (no exception, no temp path, no Gradio processing error) and no results."""
    bad = tmp_path / "fake.jpg"
    bad.write_bytes(content)
    results, status = client.predict(handle_file(str(bad)), 4, "default", api_name="/search_photo")
    assert results == []
    assert ("not an image" in status or "is empty" in status) and status.count(".") <= 3, status
    assert "/tmp" not in status and "Error" not in status and "preprocess" not in status
    # the server is still fine
    results, status = client.predict("cat", 2, "default", api_name="/search_example")
    assert len(results) == 2


def test_build_gallery_and_select_it(server, client, tmp_path):
    from conftest import make_shape_image

    files = []
    for i, kind in enumerate(["circle", "star", "star"]):
        p = tmp_path / f"{kind}_{i}.png"
        make_shape_image(kind, seed=70 + i).save(p)
        files.append(handle_file(str(p)))
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    files.append(handle_file(str(junk)))
    msg, dropdown, box, owner = client.predict(files, "api gallery", False, None, api_name="/build_gallery")
    assert "ready" in msg and "3 images" in msg and "Skipped 1" in msg, msg
    assert box is None  # the upload box is emptied
    value = dropdown["value"] if isinstance(dropdown, dict) else dropdown  # an update or the value
    assert value.startswith("class:") and len(owner) == 32  # a class gallery and its owner token
    status, results, map_image = client.predict(value, api_name="/select_gallery")
    assert "Gallery api gallery (class " in status and "3 images" in status and results == []
    assert map_image is not None and Path(map_image).is_file()
    results, status = client.predict("star", 3, value, api_name="/search_example")
    assert len(results) == 3 and {r["caption"].split(". ", 1)[1] for r in results} <= {"circle", "star"}


def test_concurrent_clients(server, tmp_path):
    """Several sessions at once: every call answered, each with its own state."""
    from concurrent.futures import ThreadPoolExecutor

    url = server[0]
    paths = [_drawing(tmp_path / f"d{i}.png", "circle" if i % 2 else "square") for i in range(4)]

    def one(path):
        c = api_client(url)
        res, status = c.predict(_canvas(path), 3, "default", api_name="/search_sketch")
        corr, *_ , msg = c.predict(0, api_name="/explain")
        return len(res), msg

    with ThreadPoolExecutor(4) as ex:
        out = list(ex.map(one, paths))
    assert all(n == 3 and "Result 1" in m for n, m in out), out


# ----------------------------------------------------------------------------- trust (issue 9)
def test_no_endpoint_opens_a_server_path(server, client, tmp_path):
    """A path string sent where a drawing or a photo goes: never opened, no results, and
    the answer does not tell whether the file exists."""
    secret = tmp_path / "secret.png"
    _drawing(secret, "circle")
    answers = []
    for name in (str(secret), "/etc/passwd", str(tmp_path / "missing.png")):
        results, status = client.predict(name, 3, "default", api_name="/search_strokes")
        assert results == [] and "could not be read" in status
        answers.append(status)
        corr, synth, heat, msg = client.predict(0, api_name="/explain")
        assert corr is None and "Search first" in msg
    assert len(set(answers)) == 1  # same sentence for an existing, a system and a missing file
    # A server path dressed as an upload, sent raw (gradio_client would upload a local file
    # itself): refused before any callback runs, without saying whether the file exists.
    url = server[0]
    for endpoint, value in (("search_photo", {"path": str(secret), "meta": {"_type": "gradio.FileData"}}),
                            ("search_sketch", {"background": None, "layers": [],
                                               "composite": {"path": str(secret),
                                                             "meta": {"_type": "gradio.FileData"}}})):
        event, data = raw_call(url, endpoint, [value, 3, "default"])
        assert event == "error" or data[0] == [], (endpoint, event, data)


def raw_call(url: str, api_name: str, data: list) -> tuple[str, object]:
    """POST a call the way any HTTP client can (no gradio_client file handling) and read
    its result stream: -> (last event name, its data)."""
    import json
    import urllib.request

    req = urllib.request.Request(f"{url}gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        event_id = json.loads(r.read())["event_id"]
    event, payload = "", None
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                text = line.split(":", 1)[1].strip()
                try:
                    payload = json.loads(text)
                except json.JSONDecodeError:
                    payload = text
    return event, payload


def test_only_thumbnails_are_served_from_disk(server):
    import urllib.error
    import urllib.request

    url, service, _ = server
    meta = service.gallery("default").directory / "gallery.json"
    for path in (meta, ROOT / "app.py", checkpoint_path("default"), *(ROOT / "checkpoints").glob("*.safetensors")):
        try:
            with urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=10) as r:
                code = r.status
        except urllib.error.HTTPError as exc:
            code = exc.code
        assert code in (403, 404), (path, code)


def test_visitors_never_see_each_others_gallery_or_query(server, tmp_path):
    """Visitor A builds and selects a gallery; visitor B's searches without a gallery, and
    B's explanations, are untouched."""
    from conftest import make_shape_image

    url = server[0]
    a, b = api_client(url), api_client(url)
    before, _ = b.predict("cat", 3, None, api_name="/search_example")
    files = []
    for i in range(3):
        p = tmp_path / f"blob_{i}.png"
        make_shape_image("star", seed=300 + i).save(p)
        files.append(handle_file(str(p)))
    msg, dropdown, _, _ = a.predict(files, "only mine", False, None, api_name="/build_gallery")
    gid = dropdown["value"] if isinstance(dropdown, dict) else dropdown
    a.predict(gid, api_name="/select_gallery")
    a.predict(_circle_strokes(), 3, gid, api_name="/search_strokes")
    after, _ = b.predict("cat", 3, None, api_name="/search_example")
    assert [r["caption"] for r in after] == [r["caption"] for r in before]
    assert all(r["caption"].split(". ", 1)[1] != "blob" for r in after)
    # B has no query of its own yet: nothing of A's to explain
    corr, *_, msg = b.predict(0, api_name="/explain")
    assert corr is not None and "Result 1" in msg  # B's own cat query
    c = api_client(url)
    corr, *_, msg = c.predict(0, api_name="/explain")
    assert corr is None and "Search first" in msg


def test_text_search_reaches_the_model(server, client):
    """The text tab asks the model when it has a text head (the raw backbone has none)."""
    service = server[1]
    results, status = client.predict("star", 3, "default", api_name="/search_text")
    if service.has_text:
        assert len(results) == 3
    else:
        assert results == [] and "needs the trained model" in status


def test_oversized_or_deep_drawings_are_refused_quickly(client, tmp_path, monkeypatch):
    """Refused from the image's header: its 100 megapixels are never decoded (the server runs
    in this process, so the spy sees its work)."""
    import json

    from PIL import ImageFile

    big = tmp_path / "huge.png"
    Image.new("L", (10_000, 10_000), 255).save(big)  # ~100 KB file, 100 megapixels
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    results, status = client.predict(_canvas(str(big)), 3, "default", api_name="/search_sketch")
    assert results == [] and "too large" in status
    assert (10_000, 10_000) not in decoded, "the oversized drawing was decoded before it was refused"
    for bad in ("[" * 50_000 + "]" * 50_000, json.dumps([[[[[[1, 2]]]]]])):
        results, status = client.predict(bad, 3, "default", api_name="/search_strokes")
        assert results == [] and "nested too deeply" in status


@pytest.mark.parametrize("k,n", [(0, 1), (-3, 1), (1000, 12)])
def test_k_outside_1_to_48_is_refused_or_clamped(client, tmp_path, k, n):
    """The k slider's range [1, 48] is enforced: Gradio refuses other values with a clear
    message where it validates inputs, the callbacks clamp where they decode uploads."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="(less than minimum value 1|greater than maximum value 48)"):
        client.predict(_circle_strokes(), k, "default", api_name="/search_strokes")
    from conftest import make_shape_image

    p = tmp_path / "q.png"
    make_shape_image("circle", seed=1).save(p)
    results, status = client.predict(handle_file(str(p)), k, "default", api_name="/search_photo")
    assert len(results) == n, status


def test_pictures_reach_the_page_when_the_cache_is_neither_temp_nor_the_working_folder(
        app_galleries, raw_encoder, tmp_path, monkeypatch):
    """Deployed, the cache is ~/.cache/sbir: outside the temp folder and the working folder,
    the only places Gradio takes returned files from unless the app allows the folder. The
    explanation and the map must still arrive."""
    import tempfile

    (tmp_path / "tmp").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path / "cwd")
    with running_app(app_galleries, raw_encoder, tmp_path / "home") as (url, service):
        c = api_client(url)
        results, status = c.predict(_circle_strokes(), 3, "default", api_name="/search_strokes")
        assert len(results) == 3, status
        corr, synth, heat, msg = c.predict(0, api_name="/explain")
        assert msg.startswith("Result 1") and all(p and Path(p).is_file() for p in (corr, synth, heat)), msg
        status, results, _map = c.predict("default", api_name="/select_gallery")
        assert _map and Path(_map).is_file(), status
