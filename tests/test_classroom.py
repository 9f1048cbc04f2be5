"""A class at once (issue 32): the launch settings that keep a long lesson bounded and a class
of searches fast, checked on a served app, and the map's pacing on a fake clock."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

app = pytest.importorskip("sbir_app", reason="the app needs gradio")
from conftest import api_client  # noqa: E402
from sbir_app import page, pacing  # noqa: E402

SQUARE = json.dumps([[[40, 40], [200, 40], [200, 200], [40, 200], [40, 40]]])


def _files(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


@pytest.fixture(scope="module")
def served(live_app):
    """conftest's page for the tests that only search it, with Gradio's temporary folder
    where they can watch it: (url, service, that folder)."""
    return live_app


def test_searches_write_no_file_and_thumbnails_are_served_where_they_lie(served):
    """A day of lessons must not fill the disk: a search hands Gradio its thumbnails where they
    are, so searching writes nothing to Gradio's temporary folder."""
    url, service, gradio_tmp = served
    client = api_client(url, download_files=False)
    client.predict(SQUARE, 4, "default", api_name="/search_strokes")  # thumbnails made once
    before = _files(gradio_tmp)
    for k in (3, 5, 7):
        results, status = client.predict(SQUARE, k, "default", api_name="/search_strokes")
        assert len(results) == k, status
        assert all(Path(r["image"]["path"]).parent.parent == service.thumbs_dir for r in results)
    assert _files(gradio_tmp) == before, "a search copied files into Gradio's temporary folder"


def test_launch_bounds_the_lesson_and_lets_searches_meet(app_galleries, raw_encoder, tmp_path, monkeypatch):
    import gradio as gr
    from gradio.data_classes import _StaticFiles

    seen: dict = {}

    def spy(self, **kwargs):  # what launch() hands Gradio, without serving
        seen.update(kwargs, delete_cache=self.delete_cache, max_size=self._queue.max_size,
                    limits={fn.concurrency_id: fn.concurrency_limit for fn in self.fns.values()})

    monkeypatch.setattr(gr.Blocks, "launch", spy)
    svc = _service(app_galleries, raw_encoder, tmp_path)
    page.launch(app.build_demo(svc), svc, port=1, temp_files_age_s=120)
    assert seen["delete_cache"] == (20, 120)  # uploads this old are deleted, checked 6 times as often
    assert seen["state_session_capacity"] == page.SESSIONS_KEPT  # visitors' page states: bounded
    assert seen["max_size"] == page.QUEUE_SIZE
    assert seen["limits"]["search"] == page.SEARCH_CONCURRENCY > 2  # searches wait together in the batcher
    assert seen["limits"]["map"] == 1
    # the thumbnails are tested first when Gradio checks a returned file (12 a search)
    ours = {Path(p).resolve() for p in (svc.thumbs_dir, app.served_folder(svc))}
    assert set(_StaticFiles.all_paths[:2]) <= ours | {Path(p).resolve() for p in page._STATIC_PATHS}
    assert _StaticFiles.all_paths[0] in page._STATIC_PATHS


def _service(galleries, encoder, base):
    from sbir_core.service import RetrievalService

    return RetrievalService(galleries, encoder=encoder, relation=None, cache_dir=base / "cache",
                            uploads_dir=base / "uploads")


class FakeClock:
    def __init__(self) -> None:
        self.now, self.slept = 100.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(round(s, 6))
        self.now += s


def test_maps_back_to_back_leave_searches_their_share(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(pacing.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(pacing.time, "sleep", clock.sleep)

    def draw_map(cost: float) -> str:
        clock.now += cost  # a map that takes `cost` seconds
        return "map"

    paced = pacing.DutyCycle(share=0.4)(draw_map)
    assert paced(0.1) == "map" and clock.slept == [0.0]  # the first map: at once
    paced(0.1)  # asked for right away: waits 0.1 * (1 / 0.4 - 1) = 0.15 s
    assert clock.slept[-1] == pytest.approx(0.15)
    clock.now += 1.0  # one visitor, a stroke a second: no wait at all
    paced(0.05)
    assert clock.slept[-1] == 0.0
    with pytest.raises(ValueError):
        pacing.DutyCycle(share=0)


@pytest.mark.slow
def test_uploads_are_deleted_even_while_more_arrive(app_galleries, raw_encoder, tmp_path, monkeypatch):
    """Gradio's own sweep stops for good when an upload lands during it; the app's keeps going,
    so a long lesson's uploads go once they are `temp_files_age_s` old."""
    import socket
    import threading
    import time

    import httpx

    gradio_tmp = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(gradio_tmp))
    svc = _service(app_galleries, raw_encoder, tmp_path)
    demo = app.build_demo(svc)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    age = 1  # seconds; swept every second
    page.launch(demo, svc, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, temp_files_age_s=age)
    try:
        stop = time.monotonic() + 3 * age + 1  # several sweeps, each while uploads arrive
        first: list = []

        def upload() -> None:  # a class building galleries: uploads all the time
            with httpx.Client() as c:
                while time.monotonic() < stop:
                    r = c.post(f"http://127.0.0.1:{port}/gradio_api/upload",
                               files=[("files", (f"b{i}.png", bytes([i]) * 64 + str(time.monotonic()).encode()))
                                      for i in range(10)])
                    first.extend(r.json()[:1] if not first else [])

        threads = [threading.Thread(target=upload) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert first and not Path(first[0]).exists(), "an upload older than the age was kept"

        def age_of(f: str) -> float:
            try:
                return time.time() - Path(f).stat().st_ctime
            except FileNotFoundError:  # swept meanwhile
                return 0.0

        uploads = [f for f in _files(gradio_tmp) if Path(f).name.startswith("b")]  # not the page's examples
        old = [f for f in uploads if age_of(f) > age + 1 + 1]  # the age, a turn, a second to spare
        assert not old, f"{len(old)} uploads outlived the age while more arrived"
    finally:
        demo.close()


def test_the_simulated_class_draws_as_the_page_does(served):
    """scripts/load_test.py --classroom: students' strokes reach /search_strokes and the map
    `.then` over plain HTTP, with the session's state, and every stroke gets results."""
    from scripts_loader import load_script

    load_test = load_script("load_test")
    url = served[0]
    search_fn, map_fn, gallery = load_test.page_fns(url)
    assert map_fn is not None and gallery == "default"
    # each student's first stroke comes within a second of the start: 4 strokes at least
    out = load_test.classroom_phase(url, students=4, seconds=1.5, server_pid=os.getpid())
    assert out["errors"] == 0, out["error_samples"]
    assert out["stroke -> results"]["n"] >= 4 and out["searches"] >= 4
    assert out["maps"] >= 1 and out["server_cpu_ms_per_search"] > 0
