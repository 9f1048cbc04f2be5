"""The map agrees with the results (issue 31), with the shipped model and gallery: the
house example's star lands with its results, and class names are readable on the page."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def shipped(shipped_service):
    return shipped_service  # conftest: the app's service over the shipped model and gallery


def _example_query(service, name: str):
    """An example searched as the page sends it (stroke JSON with its brush)."""
    from sbir_core.data.drawing import read_stroke_json, stroke_brush
    from sbir_core.data.examples import list_examples

    e = next(x for x in list_examples() if x.name == name)
    js = json.dumps({"canvas": list(e.canvas), "strokes": [[[x, y] for x, y in s] for s in e.strokes]})
    out = service.search_sketch(read_stroke_json(js), 12, brush=stroke_brush(js))
    assert out.ok, out.message
    return out.query


def test_the_house_star_lands_with_its_results(shipped) -> None:
    query = _example_query(shipped, "house")
    top10 = [h.index for h in query.hits[:10]]
    assert [h.label for h in query.hits[:3]] == ["house"] * 3  # the search itself is right
    shown = shipped.map_image_for(query)
    assert shown.ok and shown.image.size == (640, 560)
    coords = np.array([[p["x"], p["y"]] for p in shown.plot_data["points"]])
    star = np.array([shown.plot_data["query"]["x"], shown.plot_data["query"]["y"]])
    near5 = np.argsort(np.linalg.norm(coords - star, axis=1), kind="stable")[:5]
    assert len(set(near5.tolist()) & set(top10)) >= 3, (near5, top10)
    # on the picture: the star among its framed results, the house name drawn, nothing under the caption
    mk = shown.marks
    assert mk.rows == [h.index for h in query.hits]
    star_px = mk.query[0]
    assert np.median(np.linalg.norm(mk.centres[:5] - star_px, axis=1)) < 2.5 * mk.layout.thumb_px
    assert "house" in {lab.name for lab in mk.labels}
    cap = mk.caption[2]
    assert not any(cap[0] < b[2] and b[0] < cap[2] and cap[1] < b[3] and b[1] < cap[3]
                   for b in (lab.box for lab in mk.labels))


@pytest.mark.browser
def test_class_names_are_at_least_12_css_px_on_a_1366_screen(app_galleries, raw_encoder, tmp_path) -> None:
    """The page at 1366 x 768 in Chromium: the map picture's shown width times the class
    names' font size over the picture's width is >= 12 CSS px."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not installed at {CHROMIUM} (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    pytest.importorskip("sbir_app", reason="the app needs gradio")
    from conftest import running_app

    with running_app(app_galleries, raw_encoder, tmp_path) as (url, service), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768}, device_scale_factor=1)
            page.set_default_timeout(120_000)
            page.goto(url)
            page.wait_for_function("() => { const i = document.querySelector('#map img');"
                                   " return i && i.complete && i.naturalWidth > 0 && i.clientWidth > 0; }")
            nat_w, shown_w = page.evaluate("""() => { const i = document.querySelector('#map img');
                const s = Math.min(i.clientWidth / i.naturalWidth, i.clientHeight / i.naturalHeight);
                return [i.naturalWidth, i.naturalWidth * s]; }""")  # object-fit: contain
        finally:
            browser.close()
        shown_map = service.map_image()
        assert shown_map.image.width == nat_w
        css_px = shown_map.marks.layout.label_px * shown_w / nat_w
        assert css_px >= 12, f"class names {css_px:.1f} CSS px tall (map shown {shown_w:.0f} px wide)"
