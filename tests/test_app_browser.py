"""The page in a real (headless) Chromium: draw with the mouse, see results, click one,
see the explanation. Skipped when Debian's chromium is not installed
(`apt-get install -y chromium`); never downloads a browser.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"chromium not installed at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
app = pytest.importorskip("app", reason="app.py needs gradio")

from conftest import running_app  # noqa: E402

TIMEOUT_MS = 120_000  # the CPU is shared and slow; the page is still expected to get there


@pytest.fixture(scope="module")
def url(app_galleries, raw_encoder, tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    with running_app(app_galleries, raw_encoder, base, warm_up=True) as (address, _service):
        yield address


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(TIMEOUT_MS)
        external = []
        pg.on("request", lambda r: external.append(r.url)
              if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
        pg.goto(url)
        pg.wait_for_selector("#sketch canvas")
        # the light canvas can appear before the rest of the page has rendered: wait for it all
        for sel in ("#strokes textarea", "#results", "#tsne img", "#examples img"):
            pg.wait_for_selector(sel, state="attached")
        pg.external_requests = external
        yield pg
        browser.close()


def _stroke(page, points):
    page.mouse.move(*points[0])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(x, y)
    page.mouse.up()


def test_page_has_the_stable_ids(page):
    for sel in ("#sketch", "#results", "#search-button", "#explanation", "#tsne"):
        assert page.locator(sel).count() == 1, sel
    assert "Sketch Search" in page.title() or page.locator("h1").first.inner_text().startswith("Sketch Search")
    assert page.locator("#tsne img").count() == 1  # the gallery map is there before any search


def test_draw_see_results_click_see_explanation(page):
    box = page.locator("#sketch canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    r = 0.22 * min(box["width"], box["height"])
    circle = [(cx + r * math.cos(t / 8 * 2 * math.pi), cy + r * math.sin(t / 8 * 2 * math.pi)) for t in range(9)]
    _stroke(page, circle)
    _stroke(page, [(cx - r, cy), (cx + r, cy)])
    # results appear after the strokes, with no button press
    page.wait_for_function("() => document.querySelectorAll('#results img').length >= 4", timeout=TIMEOUT_MS)
    captions = page.locator("#results .caption-label").all_inner_texts()
    assert captions and all(" · " in c for c in captions), captions
    assert "Best match" in page.locator("#status").inner_text()
    page.wait_for_timeout(1000)  # let any re-run of the last stroke land
    captions = page.locator("#results .caption-label").all_inner_texts()
    page.locator("#results img").nth(1).click()  # the second result
    page.wait_for_selector("#explanation img", timeout=TIMEOUT_MS)
    page.wait_for_function("() => { const i = document.querySelector('#explanation img');"
                           " return i && i.complete && i.naturalWidth > 200; }", timeout=TIMEOUT_MS)
    text = page.locator("#explanation-text").inner_text()
    label = captions[1].rsplit(" · ", 1)[0]
    assert "Result 2" in text and label in text, (text, captions)
    assert page.locator("#synthesis img").count() == 1 and page.locator("#heatmap img").count() == 1
    # works offline: nothing was fetched from outside this machine
    assert page.external_requests == []


def test_clear_keeps_the_brush_and_examples_load(page):
    """After the clear button the canvas is white again and drawing works at once;
    clicking an example loads it and searches with it."""
    page.locator("#sketch button[aria-label='Clear canvas']").first.click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Draw something')",
                           timeout=TIMEOUT_MS)
    page.wait_for_function("() => document.querySelectorAll('#results img').length === 0", timeout=TIMEOUT_MS)
    box = page.locator("#sketch canvas").first.bounding_box()
    x, y, w = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3, box["height"] * 0.4
    _stroke(page, [(x, y + w), (x + w / 2, y), (x + w, y + w)])
    page.wait_for_function("() => document.querySelectorAll('#results img').length >= 4", timeout=TIMEOUT_MS)
    before = page.locator("#status").inner_text()
    page.locator("#examples img").nth(2).click()  # the bicycle
    page.wait_for_function("(b) => { const t = document.querySelector('#status').innerText;"
                           " return t !== b && t.includes('Best match'); }", arg=before, timeout=TIMEOUT_MS)
    assert page.locator("#results img").count() >= 4
    # the example's strokes are drawn on the canvas (after the search answer: wait for them)
    # and kept as strokes, not as an image
    page.wait_for_function("() => window.sbirSketch.strokes.length >= 2"
                           " && document.querySelector('#strokes textarea').value.includes('\"strokes\"')",
                           timeout=TIMEOUT_MS)
    assert _ink(page) > 0.002


def _ink(page) -> float:
    """The share of dark pixels on the drawing canvas."""
    return page.evaluate("""() => { const c = document.querySelector('#sketch canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] < 128 && d[i + 3] > 0) n++; return n / (d.length / 4); }""")


def test_strokes_are_sent_as_points_and_undo_works(page):
    """Each stroke goes to the server as a point list in #strokes; Undo removes the last one
    and searches again; Undo of the only stroke clears."""
    page.locator("#sketch button[aria-label='Clear canvas']").first.click()
    page.wait_for_function("() => document.querySelectorAll('#results img').length === 0", timeout=TIMEOUT_MS)
    assert _ink(page) == 0
    box = page.locator("#sketch canvas").first.bounding_box()
    x, y, w = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3, box["height"] * 0.4
    _stroke(page, [(x, y), (x + w, y), (x + w, y + w)])
    page.wait_for_function("() => document.querySelectorAll('#results img').length >= 4", timeout=TIMEOUT_MS)
    _stroke(page, [(x + w, y + w), (x, y + w), (x, y)])
    page.wait_for_function("() => (JSON.parse(document.querySelector('#strokes textarea').value || '{}').strokes"
                           " || []).length === 2", timeout=TIMEOUT_MS)
    import json

    sent = json.loads(page.evaluate("() => document.querySelector('#strokes textarea').value"))
    assert [len(s) >= 3 and all(len(p) == 2 for p in s) for s in sent["strokes"]] == [True, True]
    assert sent["brush"] == 6  # the brush size travels with the strokes (the server draws that wide)
    ink2 = _ink(page)
    page.locator("#sketch button[aria-label='Undo']").first.click()
    page.wait_for_function("() => (JSON.parse(document.querySelector('#strokes textarea').value || '{}').strokes"
                           " || []).length === 1", timeout=TIMEOUT_MS)
    assert 0 < _ink(page) < ink2
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Best match')",
                           timeout=TIMEOUT_MS)
    page.locator("#sketch button[aria-label='Undo']").first.click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Draw something')",
                           timeout=TIMEOUT_MS)
    assert _ink(page) == 0 and page.locator("#results img").count() == 0


@pytest.fixture(scope="module")
def touch_page(url, page):
    """A tablet-sized page with touch input (real touch events through the DevTools protocol),
    in its own browser context (another visitor) of the same browser."""
    ctx = page.context.browser.new_context(viewport={"width": 768, "height": 1000}, has_touch=True)
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(url)
    pg.wait_for_selector("#sketch canvas")
    for sel in ("#strokes textarea", "#results", "#tsne img"):
        pg.wait_for_selector(sel, state="attached")
    yield pg
    ctx.close()


def _touch_stroke(page, points):
    cdp = page.context.new_cdp_session(page)
    (x, y), rest = points[0], points[1:]
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for x, y in rest:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def test_draw_with_touch_without_scrolling_then_undo_with_ctrl_z(touch_page):
    """A finger draws (pointer events from touch), the page does not scroll while drawing,
    results and the class list show; Ctrl+Z removes the last stroke."""
    page = touch_page
    canvas = page.locator("#sketch canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
    w = min(box["width"], box["height"]) * 0.35
    scroll_before = page.evaluate("() => window.scrollY")
    _touch_stroke(page, [(x0, y0 + w * i / 10) for i in range(11)])  # a vertical swipe on the canvas
    _touch_stroke(page, [(x0 + w * i / 10, y0 + w) for i in range(11)])
    assert page.evaluate("() => window.scrollY") == scroll_before  # drawing, not scrolling
    page.wait_for_function("() => window.sbirSketch.strokes.length === 2")
    page.wait_for_function("() => document.querySelectorAll('#results img').length >= 4", timeout=TIMEOUT_MS)
    assert page.locator("#classes .chip").count() == 4  # the tiny gallery's classes, listed
    page.keyboard.press("Control+z")
    page.wait_for_function("() => window.sbirSketch.strokes.length === 1")
    page.wait_for_function("() => (JSON.parse(document.querySelector('#strokes textarea').value || '{}').strokes"
                           " || []).length === 1", timeout=TIMEOUT_MS)
