"""Shared test fixtures. Tests run on a busy 2-core CPU: one torch thread, one encoder."""
from __future__ import annotations

import contextlib
import gc
import shutil
import socket
import threading
import time

import pytest
import torch

torch.set_num_threads(1)


# What is imported to run the tests (torch, gradio, sbir_core: ~1M objects) lives to the end,
# yet each full garbage collection walked all of it again: ~15 while the test files are
# imported, ~2 s of a quick run, and more during the tests. Importing makes next to no garbage,
# so the collector waits until the tests are collected, then leaves all of that out (frozen).
gc.disable()


def pytest_collection_finish(session) -> None:
    gc.enable()
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config) -> None:
    gc.freeze()  # the interpreter's collections at exit: everything created since (~1.5 s)


@pytest.fixture(scope="session")
def raw_encoder():
    """The raw EfficientNet-Lite0 backbone (no checkpoint), loaded once per session."""
    from sbir_core.models.encoders import create_encoder

    enc = create_encoder(checkpoint="none")
    enc.backbone.fuse_for_inference()  # as the app serves it (RetrievalService): a cheaper forward pass
    return enc


@pytest.fixture(scope="session")
def shipped_service(tmp_path_factory):
    """The app's service exactly as `python app.py` builds it (shipped checkpoint, shipped
    galleries, no relation re-ranking), caches in a temporary folder; loaded once per session.
    Tests only search, explain and map with it: none changes it."""
    from sbir_core.paths import SHIPPED_GALLERIES, checkpoint_path
    from sbir_core.service import RetrievalService

    if not checkpoint_path("default").is_file() or not (SHIPPED_GALLERIES / "default").is_dir():
        pytest.skip("no shipped checkpoint or default gallery")
    base = tmp_path_factory.mktemp("shipped")
    return RetrievalService(SHIPPED_GALLERIES, gallery="default", checkpoint="default", relation=None,
                            cache_dir=base / "cache", uploads_dir=base / "user")


# ----------------------------------------------------------------------------- app fixtures
# (tests/test_app_*.py) A tiny generated gallery: 4 shape classes x 3 images, built once.
APP_SHAPES = ("circle", "square", "triangle", "star")


def make_shape_image(kind: str, seed: int, size: int = 96):
    """A small 'photo' of a coloured shape on a light, slightly noisy background."""
    import math

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(215, 250, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    fill = tuple(int(v) for v in rng.integers(20, 200, 3))
    c, r = size / 2 + rng.uniform(-6, 6), size * rng.uniform(0.28, 0.38)
    if kind == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=fill, outline=(0, 0, 0), width=2)
    elif kind == "square":
        d.rectangle([c - r, c - r, c + r, c + r], fill=fill, outline=(0, 0, 0), width=2)
    elif kind == "triangle":
        d.polygon([(c, c - r), (c + r, c + r), (c - r, c + r)], fill=fill, outline=(0, 0, 0))
    else:
        pts = [(c + (r if i % 2 == 0 else r * 0.45) * math.cos(math.radians(-90 + 36 * i)),
                c + (r if i % 2 == 0 else r * 0.45) * math.sin(math.radians(-90 + 36 * i))) for i in range(10)]
        d.polygon(pts, fill=fill, outline=(0, 0, 0))
    noise = rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype("uint8"))


def write_shapes(src, seed_step: int = 100):
    """APP_SHAPES x 3 shape pictures under src/<kind>/ (a folder gallery); returns src."""
    for kind in APP_SHAPES:
        (src / kind).mkdir(parents=True)
        for i in range(3):
            make_shape_image(kind, seed=seed_step * APP_SHAPES.index(kind) + i).save(src / kind / f"{kind}_{i}.png")
    return src


def at_once(fn, items: list, timeout: float = 120.0) -> list:
    """fn(item) for every item, each in its own thread, released together; the first error raised."""
    out: list = [None] * len(items)
    gate = threading.Barrier(len(items))

    def work(i: int) -> None:
        gate.wait()
        try:
            out[i] = fn(items[i])
        except BaseException as exc:  # handed back to the test
            out[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


# The longest one HTTP request of a test's client may take. httpx's default, 5 s, failed
# test_concurrent_clients on a saturated shared machine (load 10+ on 2 cores): four sessions at
# once made POST /queue/join wait 1.5 s at load 9 and past 5 s at load 13, with no event-loop
# callback over 0.1 s (PYTHONASYNCIODEBUG), so the server was starved, not stuck. These tests
# check answers; how fast they come is scripts/load_test.py's and scripts/bench_app.py's.
CLIENT_TIMEOUT_S = 120


def api_client(url: str, **kwargs):
    """A gradio_client Client for a served page, with CLIENT_TIMEOUT_S per request.

    ssl_verify=False: the pages are plain http on loopback, so no certificate is ever checked,
    but with it on httpx loads the CA bundle for every request gradio_client makes (~30 ms each,
    ~100 calls in the quick subset)."""
    import gradio_client.utils
    from gradio_client import Client

    assert url.startswith("http://127.0.0.1:"), url  # never a remote or TLS page without checks
    # The client polls its queue of server messages every 50 ms, about 25 ms added to every
    # call; on loopback 5 ms does. Only the client's polling is changed, not what it sends.
    gradio_client.utils.time = _FAST_POLL
    return Client(url, verbose=False, ssl_verify=False, httpx_kwargs={"timeout": CLIENT_TIMEOUT_S}, **kwargs)


class _FastPollTime:
    """`time` as gradio_client.utils sees it in the tests: its 50 ms polling sleep is 5 ms."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, 0.005))


_FAST_POLL = _FastPollTime()


@contextlib.contextmanager
def serve(service):
    """The page over `service` on a free loopback port; yields its URL."""
    import sbir_app as app

    demo = app.build_demo(service)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.launch(demo, service, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="session")
def app_galleries(tmp_path_factory, raw_encoder):
    """A galleries root holding one built gallery, `default` (12 shape images, raw
    backbone), with its source images outside the galleries root."""
    from sbir_core.gallery.index import build_gallery

    base = tmp_path_factory.mktemp("app")
    src = write_shapes(base / "shapes")
    root = base / "galleries"
    build_gallery(src, root / "default", raw_encoder, checkpoint="none", progress=False)
    return root


@pytest.fixture(scope="session")
def app_service(app_galleries, raw_encoder, tmp_path_factory):
    """A RetrievalService over `app_galleries` sharing the session's raw encoder."""
    from sbir_core.service import RetrievalService

    return RetrievalService(app_galleries, gallery="default", encoder=raw_encoder, relation=None,
                            cache_dir=tmp_path_factory.mktemp("app_cache"),
                            uploads_dir=tmp_path_factory.mktemp("app_uploads"))


@pytest.fixture(scope="session")
def live_app(app_galleries, raw_encoder, tmp_path_factory):
    """One page served for the session (test_app_api.py, test_classroom.py), with Gradio's
    temporary folder where tests can watch it: (url, service, that folder). Starting a page
    costs ~1 s, so the tests that only call it share one; each gradio_client is its own
    visitor (own session state and class galleries), which is what they check. A test that
    needs other settings or a restart serves its own (running_app, serve)."""
    base = tmp_path_factory.mktemp("live_app")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(base / "gradio"))
        with running_app(app_galleries, raw_encoder, base / "home") as (url, service):
            yield url, service, base / "gradio"


@contextlib.contextmanager
def running_app(galleries, encoder, base, warm_up: bool = False):
    """Serve app.py over a copy of `galleries` on a free loopback port; yields (url, service)."""
    from sbir_core.service import RetrievalService

    root = base / "galleries"
    shutil.copytree(galleries, root)
    service = RetrievalService(root, encoder=encoder, relation=None, cache_dir=base / "cache",
                               uploads_dir=base / "user")
    if warm_up:
        service.warm_up()
    with serve(service) as url:
        yield url, service


def open_page(browser, url: str, width: int, height: int, touch: bool = False, timeout_ms: int = 120_000):
    """A new visitor (browser context) on the page, once its canvas and panels are there."""
    ctx = browser.new_context(viewport={"width": width, "height": height}, has_touch=touch)
    pg = ctx.new_page()
    pg.set_default_timeout(timeout_ms)
    pg.goto(url)
    pg.wait_for_selector("#sketch canvas")
    for sel in ("#strokes textarea", "#results", "#map img"):
        pg.wait_for_selector(sel, state="attached")
    pg.wait_for_function("() => window.sbirSketch && window.sbirSketch.w > 0")
    return pg
