"""The app served in-process on a free loopback port, called through gradio_client.

Checks the named API endpoints (`/search_sketch`, `/search_example`, `/search_text`,
`/search_photo`, `/explain`, `/build_gallery`, `/select_gallery`) against the tiny
generated gallery from tests/conftest.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

gradio_client = pytest.importorskip("gradio_client")
app = pytest.importorskip("app", reason="app.py needs gradio")
from gradio_client import Client, handle_file  # noqa: E402

from conftest import running_app  # noqa: E402
from sbir_core.service import EMPTY_SKETCH_MESSAGE  # noqa: E402


@pytest.fixture(scope="module")
def server(app_galleries, raw_encoder, tmp_path_factory):
    base = tmp_path_factory.mktemp("api")
    with running_app(app_galleries, raw_encoder, base) as (url, service):
        yield url, service, base


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], verbose=False)


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
    assert "Best match" in status
    for r in results:
        label, score = r["caption"].split(" · ")
        assert label in {"circle", "square", "triangle", "star"} and 0 < float(score) <= 1
    corr, synth, heat, msg = client.predict(1, api_name="/explain")  # explained from the strokes
    assert "Result 2" in msg
    for p in (corr, synth, heat):
        with Image.open(p) as im:
            assert im.width >= 200
    results, status = client.predict("", 5, "default", api_name="/search_strokes")
    assert results == [] and status == EMPTY_SKETCH_MESSAGE
    results, status = client.predict("[]", 5, "default", api_name="/search_strokes")
    assert results == [] and status == EMPTY_SKETCH_MESSAGE
    results, status = client.predict("[[[1, \"x\"]]]", 5, "default", api_name="/search_strokes")
    assert results == [] and "could not be read" in status


def test_search_sketch_then_explain(client, tmp_path):
    results, status = client.predict(_canvas(_drawing(tmp_path / "c.png")), 5, "default", api_name="/search_sketch")
    assert len(results) == 5, status
    assert "Best match" in status
    for r in results:
        assert Path(r["image"]["path"] if isinstance(r["image"], dict) else r["image"]).is_file()
        label, score = r["caption"].split(" · ")
        assert label in {"circle", "square", "triangle", "star"} and 0 < float(score) <= 1
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
    assert results == [] and status == EMPTY_SKETCH_MESSAGE
    results, status = client.predict(_canvas(None), 12, "default", api_name="/search_sketch")
    assert results == [] and "Draw something first" in status


def test_search_example_and_text(client):
    results, status = client.predict("house", 3, "default", api_name="/search_example")
    assert len(results) == 3 and "Best match" in status
    results, status = client.predict("giraffe", 3, "default", api_name="/search_text")
    assert results == [] and "needs the trained model" in status


def test_search_photo_and_bad_upload(client, tmp_path):
    from conftest import make_shape_image

    p = tmp_path / "photo.png"
    make_shape_image("square", seed=3).save(p)
    results, status = client.predict(handle_file(str(p)), 4, "default", api_name="/search_photo")
    assert len(results) == 4 and "photo → photo" in status


def test_bad_photo_is_refused_with_a_message(server, client, tmp_path):
    # Gradio itself refuses a non-image for an Image input; the service refuses what gets through
    bad = tmp_path / "fake.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    try:
        results, status = client.predict(handle_file(str(bad)), 4, "default", api_name="/search_photo")
    except Exception as exc:  # rejected before the callback: an error, not a crash of the server
        assert "error" in type(exc).__name__.lower() or str(exc)
    else:
        assert results == [] and "not an image" in status
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
    msg, dropdown = client.predict(files, "api gallery", False, api_name="/build_gallery")
    assert "ready" in msg and "3 images" in msg and "Skipped 1" in msg, msg
    value = dropdown["value"] if isinstance(dropdown, dict) else dropdown  # an update or the value
    assert value == "api_gallery"
    if isinstance(dropdown, dict):
        assert ["api_gallery", "api_gallery"] in dropdown["choices"] or "api_gallery" in dropdown["choices"]
    status, results, tsne = client.predict("api_gallery", api_name="/select_gallery")
    assert "Gallery **api_gallery**: 3 images" in status and results == []
    assert tsne is not None and Path(tsne).is_file()
    results, status = client.predict("star", 3, "api_gallery", api_name="/search_example")
    assert len(results) == 3 and {r["caption"].split(" · ")[0] for r in results} <= {"circle", "star"}


def test_concurrent_clients(server, tmp_path):
    """Several sessions at once: every call answered, each with its own state."""
    from concurrent.futures import ThreadPoolExecutor

    url = server[0]
    paths = [_drawing(tmp_path / f"d{i}.png", "circle" if i % 2 else "square") for i in range(4)]

    def one(path):
        c = Client(url, verbose=False)
        res, status = c.predict(_canvas(path), 3, "default", api_name="/search_sketch")
        corr, *_ , msg = c.predict(0, api_name="/explain")
        return len(res), msg

    with ThreadPoolExecutor(4) as ex:
        out = list(ex.map(one, paths))
    assert all(n == 3 and "Result 1" in m for n, m in out), out
