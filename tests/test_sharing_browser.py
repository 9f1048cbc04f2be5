"""A class gallery in a real browser (Debian's chromium through Playwright; skipped when it is
missing): the teacher builds it in the page, the server restarts, the teacher's browser
still owns it (the owner token is in localStorage), a student opens the class link, searches
it and cannot delete it; the teacher can."""
from __future__ import annotations

import contextlib
import re
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"chromium not installed at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
app = pytest.importorskip("sbir_app", reason="the app needs gradio")

from conftest import make_shape_image  # noqa: E402

pytestmark = pytest.mark.browser


@contextlib.contextmanager
def serving(galleries: Path, encoder, base: Path, port: int):
    from sbir_core.service import RetrievalService

    service = RetrievalService(galleries, encoder=encoder, relation=None, cache_dir=base / "cache",
                               uploads_dir=base / "home" / "class-galleries")
    demo = app.build_demo(service)
    app.launch(demo, service, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _open_build(page) -> None:
    page.locator("#build").get_by_text("Class galleries").first.click()
    page.locator("#class-code").wait_for(state="visible")


def test_teacher_builds_in_the_page_and_keeps_it_across_a_restart(app_galleries, raw_encoder, tmp_path):
    galleries = tmp_path / "galleries"
    shutil.copytree(app_galleries, galleries)
    files = []
    for i, kind in enumerate(["star", "star", "circle"]):
        p = tmp_path / f"{kind}_{i}.png"
        make_shape_image(kind, seed=900 + i).save(p)
        files.append(str(p))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        teacher = browser.new_page(viewport={"width": 1280, "height": 1000})
        with serving(galleries, raw_encoder, tmp_path, port) as url:
            teacher.goto(url)
            _open_build(teacher)
            teacher.locator("#upload-files input[type=file]").set_input_files(files)
            teacher.locator("#gallery-name textarea, #gallery-name input").first.fill("our shapes")
            teacher.wait_for_timeout(1000)  # the upload finishes
            teacher.locator("#build-button").click()
            sync_api.expect(teacher.locator("#build-report")).to_contain_text("ready", timeout=60_000)
            sync_api.expect(teacher.locator("#share .code")).to_be_visible(timeout=20_000)
            code = teacher.locator("#share .code").inner_text().strip()
            assert re.fullmatch(r"[0-9A-Z]{5}-[0-9A-Z]{5}", code)
            assert "only this browser can rename or delete" in teacher.locator("#share").inner_text()
            assert teacher.locator("#share img.qr").get_attribute("src").startswith("data:image/svg+xml")
        # The server restarts on the same address.
        with serving(galleries, raw_encoder, tmp_path, port) as url:
            student = browser.new_context().new_page()
            student.goto(f"{url}?class={code.replace('-', '').lower()}")
            sync_api.expect(student.locator("#status")).to_contain_text("3 images", timeout=30_000)
            assert "our shapes" in student.locator("#gallery-select input").input_value()
            _open_build(student)
            student.locator("#delete-button").click()
            sync_api.expect(student.locator("#manage-msg")).to_contain_text("Only the person", timeout=20_000)
            # The teacher reloads: the page still lists and owns the gallery, and deletes it.
            teacher.reload()
            _open_build(teacher)
            teacher.locator("#gallery-select input").click()
            teacher.get_by_role("option", name=re.compile(re.escape(code))).click()
            sync_api.expect(teacher.locator("#share")).to_contain_text("only this browser", timeout=20_000)
            teacher.locator("#delete-button").click()
            sync_api.expect(teacher.locator("#manage-msg")).to_contain_text("deleted", timeout=20_000)
        browser.close()
