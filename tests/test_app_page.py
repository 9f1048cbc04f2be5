"""The page as a class uses it (issues 31 and 32), in headless Chromium at phone, tablet,
laptop and projector sizes: the explanation opens where the eye is, the first results show
on a phone without scrolling, k cannot break the page, the drawing tools work with fingers
and pens, and the page reads well (plain words, names for screen readers, contrast).
Skipped when Debian's chromium is not installed; never downloads a browser."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"chromium not installed at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytest.importorskip("sbir_app", reason="the app needs gradio")

from conftest import open_page, running_app  # noqa: E402

pytestmark = pytest.mark.browser
TIMEOUT_MS = 120_000
SCREENS = {390: 844, 768: 1024, 1366: 768, 1920: 1080}
RESULTS_SHOWN = "() => document.querySelectorAll('#results img').length >= 4"
STROKES = "() => (JSON.parse(document.querySelector('#strokes textarea').value || '{}').strokes || []).length"


@pytest.fixture(scope="module")
def url(app_galleries, raw_encoder, tmp_path_factory):
    with running_app(app_galleries, raw_encoder, tmp_path_factory.mktemp("page"), warm_up=True) as (address, _s):
        yield address


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def pointer_stroke(page, points, kind="mouse", pointer_id=7):
    """One stroke as pointer events of `kind` ("mouse", "pen" or "touch"), in page pixels."""
    page.evaluate("""([pts, kind, id]) => {
        const c = document.querySelector('#sketch canvas');
        const ev = (type, [x, y]) => c.dispatchEvent(new PointerEvent(type, {pointerId: id, pointerType: kind,
            isPrimary: true, clientX: x, clientY: y, button: 0, buttons: type === 'pointerup' ? 0 : 1,
            bubbles: true, cancelable: true}));
        ev('pointerdown', pts[0]);
        for (const p of pts.slice(1)) ev('pointermove', p);
        ev('pointerup', pts[pts.length - 1]);
    }""", [[list(p) for p in points], kind, pointer_id])


def draw_square(page, kind="mouse", scale=0.5):
    box = page.locator("#sketch canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    r = scale * min(box["width"], box["height"]) / 2
    corners = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r), (cx - r, cy - r)]
    pts = [(a[0] + (b[0] - a[0]) * t / 6, a[1] + (b[1] - a[1]) * t / 6)
           for a, b in zip(corners, corners[1:]) for t in range(6)] + [corners[-1]]
    pointer_stroke(page, pts, kind)
    return cx, cy, r


def in_viewport(page, selector):
    box = page.locator(selector).first.bounding_box()
    vw, vh = page.viewport_size["width"], page.viewport_size["height"]
    return box is not None and box["x"] >= -1 and box["y"] >= -1 and box["x"] + box["width"] <= vw + 1 \
        and box["y"] + box["height"] <= vh + 1, box


def loaded(page, selector):
    page.wait_for_function("(s) => { const i = document.querySelector(s);"
                           " return i && i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0; }",
                           arg=selector, timeout=TIMEOUT_MS)


@pytest.mark.parametrize("width", sorted(SCREENS))
def test_the_explanation_opens_in_view_and_closes(browser, url, width):
    """After a click on a result, the correspondence picture is on screen with no scrolling
    by the person (scrollY unchanged), at every width; Esc, the close button and a click
    outside close it."""
    pg = open_page(browser, url, width, SCREENS[width])
    try:
        draw_square(pg)
        pg.wait_for_function(RESULTS_SHOWN, timeout=TIMEOUT_MS)
        assert not pg.locator("#explanation").is_visible()
        y0 = pg.evaluate("() => window.scrollY")
        # phones tap the strip of first results (the grid is further down); wider screens
        # see the grid beside the canvas
        target = "#sbir-strip button" if width < 700 else "#results .thumbnail-item"
        ok, box = in_viewport(pg, target)
        assert ok, (target, box)
        pg.evaluate("(s) => document.querySelectorAll(s)[1].click()", target)  # result 2, no scrolling
        loaded(pg, "#explanation img")
        assert pg.evaluate("() => window.scrollY") == y0
        ok, box = in_viewport(pg, "#explanation img")
        assert ok, (width, box)
        # the other two pictures are in the panel, under the first (scrolling inside it)
        loaded(pg, "#synthesis img")
        panel, syn = pg.locator("#why-col").bounding_box(), pg.locator("#synthesis img").bounding_box()
        assert panel["x"] <= syn["x"] and syn["x"] + syn["width"] <= panel["x"] + panel["width"] + 1, (panel, syn)
        assert syn["y"] >= box["y"] + box["height"], (box, syn)
        assert pg.locator("#explanation-text").inner_text().startswith("Result 2")
        # (on a phone the panel fills the screen: there is no outside to click)
        for how in ("escape", "button") + (("outside",) if width >= 700 else ()):
            if how != "escape":
                pg.evaluate("(s) => document.querySelectorAll(s)[0].click()", target)
            pg.wait_for_function("() => document.body.classList.contains('sbir-why-open')")
            assert pg.locator("#explanation img").is_visible()
            if how == "escape":
                pg.keyboard.press("Escape")
            elif how == "button":
                pg.locator("#why-col .sbir-close").click()
            else:  # the page's right margin, beside the panel
                pg.mouse.click(width - 3, SCREENS[width] // 2)
            pg.wait_for_function("() => !document.body.classList.contains('sbir-why-open')")
            assert not pg.locator("#explanation img").is_visible(), how
    finally:
        pg.context.close()


def test_a_phone_shows_the_first_results_right_after_drawing(browser, url):
    pg = open_page(browser, url, 390, 844, touch=True)
    try:
        draw_square(pg, kind="touch")
        pg.wait_for_function(RESULTS_SHOWN, timeout=TIMEOUT_MS)
        loaded(pg, "#sbir-strip img")
        assert pg.evaluate("() => window.scrollY") == 0
        for i in range(2):
            ok, box = in_viewport(pg, f"#sbir-strip button:nth-child({i + 1}) img")
            assert ok and box["height"] > 40, box
        # the strip names what it shows, as the grid does
        grid = pg.locator("#results .caption-label").all_inner_texts()[:4]
        assert pg.locator("#sbir-strip span").all_inner_texts() == grid
    finally:
        pg.context.close()


def test_k_typed_out_of_range_is_clamped_quietly(browser, url):
    pg = open_page(browser, url, 1366, 768)
    try:
        draw_square(pg)
        pg.wait_for_function(RESULTS_SHOWN, timeout=TIMEOUT_MS)
        box = pg.locator("#k input[type=number]")
        for typed in ("0", "100000", "abc", "5"):
            before = pg.locator("#results img").count()
            box.fill("")
            box.type(typed)
            box.press("Tab")  # leaving the box is what sends the value (the slider's release)
            pg.wait_for_timeout(1500)
            value = int(float(box.input_value()))
            assert 1 <= value <= 48, (typed, value)
            toasts = pg.locator(".toast-body, [data-testid='toast-body']")
            assert toasts.count() == 0, (typed, toasts.all_inner_texts())
            n = pg.locator("#results img").count()
            assert n >= min(4, value), (typed, n)  # results not cleared
            if typed in ("0", "5"):
                pg.wait_for_function("(n) => document.querySelectorAll('#results img').length === n",
                                     arg=value, timeout=TIMEOUT_MS)
            else:
                assert n == before or value == 48, (typed, before, n)
        assert "Draw something" not in pg.locator("#status").inner_text()
    finally:
        pg.context.close()


def test_eraser_redo_and_undoable_clear_with_pen_and_touch(browser, url):
    """Pen and touch draw; the eraser removes a touched line from what is searched (the
    stroke JSON); Undo, Redo, and Clear that Undo brings back."""
    pg = open_page(browser, url, 768, 1024, touch=True)
    try:
        cx, cy, r = draw_square(pg, kind="pen")
        pointer_stroke(pg, [(cx - r + 2 * r * t / 8, cy) for t in range(9)], kind="touch", pointer_id=9)  # a middle line
        pg.wait_for_function(f"() => ({STROKES})() === 2")
        pg.wait_for_function(RESULTS_SHOWN, timeout=TIMEOUT_MS)
        assert pg.evaluate("() => window.scrollY") == 0
        pg.locator("#sketch button[aria-label='Eraser']").click()
        assert pg.get_attribute("#sketch button[aria-label='Eraser']", "aria-pressed") == "true"
        # a finger rubs across the middle line (and nowhere near the square's sides)
        pointer_stroke(pg, [(cx - r * 0.3, cy - 4), (cx, cy + 4), (cx + r * 0.3, cy - 4)], kind="touch")
        pg.wait_for_function(f"() => ({STROKES})() === 1")
        sent = json.loads(pg.evaluate("() => document.querySelector('#strokes textarea').value"))
        assert len(sent["strokes"]) == 1 and len(sent["strokes"][0]) > 10  # the square stayed
        pg.locator("#sketch button[aria-label='Undo']").click()
        pg.wait_for_function(f"() => ({STROKES})() === 2")
        pg.locator("#sketch button[aria-label='Redo']").click()
        pg.wait_for_function(f"() => ({STROKES})() === 1")
        pg.locator("#sketch button[aria-label='Clear canvas']").click()
        pg.wait_for_function("() => document.querySelector('#status').innerText.includes('Draw something')"
                             " && document.querySelectorAll('#results img').length === 0", timeout=TIMEOUT_MS)
        pg.locator("#sketch button[aria-label='Undo']").click()  # Clear is undone
        pg.wait_for_function(f"() => ({STROKES})() === 1")
        pg.wait_for_function(RESULTS_SHOWN, timeout=TIMEOUT_MS)
        # back to the pen: drawing adds a line again
        pg.locator("#sketch button[aria-label='Pen']").click()
        draw_square(pg, kind="touch", scale=0.3)
        pg.wait_for_function(f"() => ({STROKES})() === 2")
    finally:
        pg.context.close()


@pytest.mark.parametrize("width", [390, 1366])
def test_toolbar_targets_are_big_enough_for_fingers(browser, url, width):
    pg = open_page(browser, url, width, SCREENS[width])
    try:
        sizes = pg.evaluate("() => [...document.querySelectorAll('#sketch .sbir-tools button, "
                            "#sketch .sbir-tools input')].map(b => { const r = b.getBoundingClientRect();"
                            " return [b.getAttribute('aria-label'), r.width, r.height]; })")
        assert len(sizes) == 6, sizes
        small = [s for s in sizes if s[1] < 44 or s[2] < 44]
        assert not small, small
        ok, box = in_viewport(pg, "#sketch .sbir-tools")
        assert ok, box
    finally:
        pg.context.close()


# WCAG relative luminance and contrast, from computed colours (the background is the first
# opaque one up the tree).
CONTRAST_JS = """(sel) => {
  const rgb = s => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = c => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
                     return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); };
  return [...document.querySelectorAll(sel)].filter(e => e.getClientRects().length && e.innerText.trim())
    .map(e => {
      let fg = rgb(getComputedStyle(e).color), op = 1;
      for (let m = e; m && m.nodeType === 1; m = m.parentElement) op *= +getComputedStyle(m).opacity;
      let n = e, bg = [255, 255, 255];
      while (n && n.nodeType === 1) { const c = rgb(getComputedStyle(n).backgroundColor);
        if (c.length >= 3 && (c.length < 4 || c[3] > 0.5)) { bg = c; break; } n = n.parentElement; }
      fg = fg.slice(0, 3).map((v, i) => v * op + bg[i] * (1 - op));  // faded text is lighter
      const a = lum(fg), b = lum(bg.slice(0, 3));
      return [e.innerText.trim().slice(0, 30), (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
    });
}"""


def test_key_texts_have_enough_contrast(browser, url):
    pg = open_page(browser, url, 1366, 768)
    try:
        draw_square(pg)
        pg.wait_for_function(RESULTS_SHOWN, timeout=TIMEOUT_MS)
        pg.locator("#results .thumbnail-item").nth(0).click()  # a clicked result's caption too
        loaded(pg, "#explanation img")
        pg.keyboard.press("Escape")
        keys = ["#k .min_value", "#k .max_value", "#results [data-testid='block-label']",
                "#map [data-testid='block-label']", "#status p", "#results .caption-label", "#sketch .sbir-label",
                "#sketch .sbir-tools button", "#classes summary", "#title p"]
        measured = {k: pg.evaluate(CONTRAST_JS, k) for k in keys}
        assert all(measured[k] for k in keys), measured  # every key text was found
        low = [(k, t, round(c, 2)) for k in keys for t, c in measured[k] if c < 4.5]
        assert not low, low
    finally:
        pg.context.close()


def test_plain_words_names_for_screen_readers_and_no_share_button(browser, url):
    pg = open_page(browser, url, 1366, 768)
    try:
        banned = ("token", "t-sne", "embedding", "patch")
        text = pg.evaluate("() => document.body.innerText").lower()
        assert not [w for w in banned if w in text], [w for w in banned if w in text]
        assert pg.locator("#how").count() == 1 and "how does it work" in text
        draw_square(pg)
        pg.wait_for_function(RESULTS_SHOWN, timeout=TIMEOUT_MS)
        # results are named by their place and class, not "Thumbnail n"
        pg.wait_for_function("() => [...document.querySelectorAll('#results .thumbnail-item')]"
                             ".every(b => b.getAttribute('aria-label') && /^\\d+\\. /.test(b.getAttribute('aria-label')))")
        captions = pg.locator("#results .caption-label").all_inner_texts()
        alts = pg.evaluate("() => [...document.querySelectorAll('#results .thumbnail-item img')].map(i => i.alt)")
        assert alts == captions and captions[0].startswith("1. "), (alts, captions)
        # the captions follow the order of the list
        assert [int(c.split(".")[0]) for c in captions] == list(range(1, len(captions) + 1))
        assert pg.get_attribute("#status", "aria-live") == "polite"
        pg.locator("#how button.label-wrap").first.click()  # the pictured steps, opened
        pg.wait_for_selector("#how .how-steps svg")
        assert pg.locator("#how .how-steps li").count() == 4
        pg.locator("#results .thumbnail-item").nth(0).click()
        loaded(pg, "#explanation img")
        text = pg.evaluate("() => document.body.innerText").lower()
        assert not [w for w in banned if w in text], [w for w in banned if w in text]
        # the technical sentence is one click away
        pg.locator("#explanation-text summary").click()
        assert "similarity" in pg.locator("#explanation-text").inner_text()
        # the map offers no Share (it cannot work here); download and fullscreen stay
        labels = pg.evaluate("() => [...document.querySelectorAll('#map button')]"
                             ".map(b => (b.getAttribute('aria-label') || b.title || '').toLowerCase())")
        assert not [x for x in labels if "share" in x], labels
    finally:
        pg.context.close()
