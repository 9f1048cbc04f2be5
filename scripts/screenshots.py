#!/usr/bin/env python3
"""Draw a cat, a house, a bicycle and an umbrella in the app with the mouse and save screenshots.

    python scripts/screenshots.py OUT_DIR                   # starts the app in-process
    python scripts/screenshots.py OUT_DIR --url http://127.0.0.1:7860   # or use a running one
    python scripts/screenshots.py OUT_DIR --width 390 --height 844      # a phone
    python scripts/screenshots.py OUT_DIR --docs docs --readme docs/screenshot.jpg
        # the docs' pictures: docs/why-after-{1366,390}-{drawn,click}.jpg (a house drawn on a
        # laptop and a phone, then its first result clicked) and the README's picture

Each drawing is replayed stroke by stroke from the example stroke lists
(`sbir_core/examples/*.json`; the umbrella is drawn in code, CODE_DRAWINGS) with real
mouse events on `#sketch`, then the first result is clicked so the explanation and the
t-SNE map are in the picture too.
Also importable: the browser helpers here are shared by scripts/bench_app.py.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence



CHROMIUM = os.environ.get("SBIR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DRAWINGS = ("cat", "house", "bicycle", "umbrella")


def _umbrella() -> list[list[tuple[float, float]]]:
    """An umbrella drawn in code (no example file, no data set): the canopy, its scalloped
    edge, the shaft and a hooked handle, in a unit square."""
    import math

    canopy = [(0.5 - 0.44 * math.cos(math.pi * t / 24), 0.45 - 0.34 * math.sin(math.pi * t / 24)) for t in range(25)]
    edge = []
    for k in range(4):
        x0 = 0.06 + 0.22 * k
        edge += [(x0 + 0.11 - 0.11 * math.cos(math.pi * t / 8), 0.45 - 0.06 * math.sin(math.pi * t / 8))
                 for t in range(9)][(1 if k else 0):]
    shaft = [(0.5, 0.45 + 0.4 * t / 10) for t in range(11)]
    hook = [(0.56 - 0.06 * math.cos(math.pi * t / 8), 0.85 + 0.06 * math.sin(math.pi * t / 8)) for t in range(9)]
    return [canopy, edge, shaft + hook[1:]]


# Drawings made in code, for objects that have no example stroke file.
CODE_DRAWINGS = {"umbrella": _umbrella}

# Records when the last stroke ended (pointer release) and what the results grid
# showed when it began, so "new results" and their latency are measured in the page.
PAGE_PROBE = """
() => {
  if (window.__sbir) return;
  const sig = () => [...document.querySelectorAll('#results .caption-label')].map(e => e.textContent).join('|')
      + '#' + [...document.querySelectorAll('#results img')].map(i => i.src).join('|');
  window.__sbir = {up: 0, sig0: sig(), sig: sig};
  window.addEventListener('pointerdown', () => { window.__sbir.sig0 = sig(); }, true);
  window.addEventListener('pointerup', () => { window.__sbir.up = performance.now(); }, true);
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(galleries: Optional[str] = None, gallery: str = "default", checkpoint: str = "default",
                port: Optional[int] = None) -> Iterator[str]:
    """Start the app in this process on a free loopback port; yields its URL."""
    import sbir_app as app_module
    from sbir_core.paths import SHIPPED_GALLERIES as DEFAULT_GALLERIES
    from sbir_core.service import RetrievalService

    service = RetrievalService(galleries or DEFAULT_GALLERIES, gallery=gallery, checkpoint=checkpoint)
    if service.default_gallery:
        service.warm_up()
    demo = app_module.build_demo(service)
    port = port or free_port()
    app_module.launch(demo, service, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@contextlib.contextmanager
def browser_page(url: str, width: int = 1400, height: int = 1000):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise SystemExit(f"chromium not found at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_selector("#sketch canvas", timeout=60_000)
            page.wait_for_selector("#strokes textarea", state="attached", timeout=60_000)
            page.wait_for_selector("#results", state="attached", timeout=60_000)
            # the canvas script is ready once it has sized the canvas (it syncs every 300 ms)
            page.wait_for_timeout(1500)
            page.evaluate(PAGE_PROBE)
            yield page
        finally:
            browser.close()


def canvas_area(page) -> tuple[float, float, float]:
    """(x, y, side) of a square safely inside the drawable canvas, in page pixels."""
    box = page.locator("#sketch canvas").first.bounding_box()
    side = 0.62 * min(box["width"], box["height"])
    return box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2, side


def example_strokes(page, name: str) -> list[list[tuple[float, float]]]:
    from sbir_core.data.examples import get_example

    x0, y0, side = canvas_area(page)
    if name in CODE_DRAWINGS:
        return [[(x0 + x * side, y0 + y * side) for x, y in st] for st in CODE_DRAWINGS[name]()]
    return [[(x0 + x, y0 + y) for x, y in st] for st in get_example(name).scaled_strokes(side, side, margin=0.0)]


def draw_stroke(page, points: Sequence[tuple[float, float]]) -> None:
    page.mouse.move(*points[0])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(x, y, steps=2)
    if len(points) == 1:
        page.mouse.move(points[0][0] + 1, points[0][1] + 1)
    page.mouse.up()


def status_text(page) -> str:
    return page.locator("#status").inner_text()


def wait_for_new_results(page, timeout_ms: float = 30_000) -> Optional[float]:
    """After a stroke: ms from the pointer release until the results grid shows a
    different, fully loaded set of images; None if nothing new came within the timeout."""
    try:
        handle = page.wait_for_function(
            """() => { const s = window.__sbir; if (!s || !s.up) return false;
                       if (s.sig() === s.sig0) return false;
                       const imgs = [...document.querySelectorAll('#results img')];
                       if (!imgs.length || !imgs.every(i => i.complete && i.naturalWidth > 0)) return false;
                       return performance.now() - s.up; }""",
            timeout=timeout_ms, polling="raf")
    except Exception:
        return None
    return float(handle.json_value())


def busy(page) -> bool:
    """Is an event still queued or running (Gradio shows its progress in the status line)?"""
    return bool(page.evaluate(
        "() => !!document.querySelector('#status .pending, #results .pending, #status .generating, "
        "#results .generating') || /processing|queue:/.test(document.querySelector('#status').innerText)"))


def settle(page, quiet_ms: int = 800, timeout_ms: int = 60_000) -> None:
    """Wait until the results are shown and nothing has changed for `quiet_ms`."""
    t0 = time.time()
    last = None
    quiet_since = time.time()
    while (time.time() - t0) * 1000 < timeout_ms:
        page.wait_for_timeout(150)
        cur = page.evaluate("() => window.__sbir.sig()")
        if cur != last or busy(page):
            last, quiet_since = cur, time.time()
        elif (time.time() - quiet_since) * 1000 >= quiet_ms and page.locator("#results img").count() > 0:
            return


def clear_canvas(page) -> None:
    """Clear the canvas with its Clear button (the page also clears results and explanation)."""
    btn = page.locator("#sketch button[aria-label*='Clear' i], #sketch button[title*='Clear' i]").first
    btn.click()
    page.wait_for_timeout(500)


def click_first_result(page) -> None:
    """Click the first result as a person would: in the phone's strip of first results when
    it is shown, else in the results grid."""
    strip = page.locator("#sbir-strip button")
    if strip.count() and strip.first.is_visible():
        strip.first.click()
    else:
        page.locator("#results img").first.click()
    page.wait_for_function("() => { const i = document.querySelector('#explanation img');"
                           " return i && i.complete && i.naturalWidth > 0; }", timeout=60_000)
    page.wait_for_timeout(1500)


def take_screenshots(url: str, out_dir: Path, drawings: Sequence[str] = DRAWINGS, width: int = 1400,
                     height: int = 1000) -> list[Path]:
    """For each drawing: `<name>_results.png` (after drawing) and `<name>_explained.png`
    (after clicking the first result), as the screen shows them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for name in drawings:
        with browser_page(url, width=width, height=height) as page:  # a fresh page per drawing: clean state
            for stroke in example_strokes(page, name):
                draw_stroke(page, stroke)
                page.wait_for_timeout(150)
            settle(page)
            p = out_dir / f"{name}_results.png"
            page.screenshot(path=str(p))
            saved.append(p)
            y0 = page.evaluate("() => window.scrollY")
            click_first_result(page)
            box = page.locator("#explanation img").bounding_box()
            print(f"{name} at {width}x{height}: explanation picture at y={box['y']:.0f}..{box['y'] + box['height']:.0f}"
                  f" px of the {height} px screen; page scrolled {page.evaluate('() => window.scrollY') - y0:.0f} px")
            p = out_dir / f"{name}_explained.png"
            page.screenshot(path=str(p))
            saved.append(p)
            print(f"{name} at {width}x{height}: {status_text(page).strip().splitlines()[0]}")
    return saved


DOC_SCREENS = ((1366, 768), (390, 844))


def save_jpeg(src: Path, dest: Path, max_bytes: int = 150_000) -> None:
    """A small JPEG for the docs (quality lowered until it is under max_bytes)."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        for quality in (82, 74, 66, 58, 50):
            im.save(dest, quality=quality, optimize=True)
            if dest.stat().st_size <= max_bytes:
                break


def docs_screenshots(url: str, out_dir: Path, docs: Path) -> list[Path]:
    """docs/why-after-<width>-{drawn,click}.jpg: the house on a laptop and a phone."""
    saved = []
    for w, h in DOC_SCREENS:
        sub = out_dir / f"{w}x{h}"
        drawn, clicked = take_screenshots(url, sub, ["house"], width=w, height=h)
        for src, what in ((drawn, "drawn"), (clicked, "click")):
            dest = docs / f"why-after-{w}-{what}.jpg"
            save_jpeg(src, dest)
            saved.append(dest)
    return saved


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="folder for the PNG screenshots")
    ap.add_argument("--url", default=None, help="a running app (default: start one in-process)")
    ap.add_argument("--galleries", default=None, help="galleries root for the in-process app (default galleries/)")
    ap.add_argument("--gallery", default="default")
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--drawings", nargs="+", default=list(DRAWINGS))
    ap.add_argument("--width", type=int, default=1400, help="viewport width (390: a phone, 768: a tablet, 1920: a projector)")
    ap.add_argument("--height", type=int, default=1000, help="viewport height (844 with --width 390: a phone)")
    ap.add_argument("--docs", default=None, metavar="DIR",
                    help="instead: the docs' laptop and phone pictures, DIR/why-after-{1366,390}-{drawn,click}.jpg")
    ap.add_argument("--readme", default=None, metavar="JPG",
                    help="also save the house explanation here (the README's picture, docs/screenshot.jpg)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = Path(args.out_dir)
    def run(url: str) -> list[Path]:
        if args.docs:
            return docs_screenshots(url, out, Path(args.docs))
        return take_screenshots(url, out, args.drawings, args.width, args.height)

    if args.url:
        paths = run(args.url)
    else:
        with running_app(args.galleries, args.gallery, args.checkpoint) as url:
            paths = run(url)
    for p in paths:
        print(p)
    if args.readme:
        # the house explained, as the screen shows it (with --docs: on the 1366 x 768 laptop)
        src = next((p for p in paths if Path(p).name in ("house_explained.png", "why-after-1366-click.jpg")),
                   paths[-1])
        save_jpeg(Path(src), Path(args.readme))
        print(args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
