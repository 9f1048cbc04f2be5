#!/usr/bin/env python3
"""Load test: N simulated users drawing against a running app, for D seconds.

    python app.py &                                   # the app under test
    python scripts/load_test.py --users 10 --duration 60 [--url http://127.0.0.1:7860/]

Each user is its own gradio_client session: it sends a drawing to `/search_sketch`
(a jittered example sketch, so the query cache does not answer everything; some
repeats and an occasional blank canvas, as real users do), and every few searches
asks `/explain` for a result, like a click.

Correctness, not just answers: every few searches a user sends one fixed reference
drawing (the house example's strokes, no gallery named) and its top result must be
the one measured before the run, while every --builder-every-th user keeps building
and searching galleries of its own from uploads. With --server-pid the server's memory
(RSS) is sampled, and --rounds repeats the whole run against the same server, so the
report shows whether memory levels off.

A class at once (`--classroom N`, issue 32): N students each add a stroke a second to their
own drawing through `/search_strokes` and ask for the map after each answer, over plain HTTP
as the page does; p50/p95 from the end of a stroke to results that include it, after one
student alone (the baseline), and with --server-pid the server's CPU time per search.
A long lesson (`--soak MINUTES`): the visitors above for MINUTES, the server's RSS and the
files under each --watch folder (default Gradio's temporary folder) every 30 s:

    python scripts/load_test.py --classroom 30 --duration 30 --server-pid PID
    python scripts/load_test.py --soak 30 --server-pid PID --watch $GRADIO_TEMP_DIR --watch $SBIR_HOME

Bounded: loopback addresses only, at most --max-requests calls per round, each with a
timeout, and it stops by itself after --duration seconds. Prints errors and p50/p95
latency per endpoint; exits 1 if any call failed or any reference answer differed.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse


CANVAS = 384


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_drawings(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n PNG canvases: example drawings, randomly scaled and shifted, black on white."""
    from PIL import Image

    from sbir_core.data.examples import list_examples

    rng = random.Random(seed)
    ex = list_examples()
    paths = []
    for i in range(n):
        e = ex[i % len(ex)]
        p = folder / f"drawing_{i:03d}_{e.name}.png"
        e.jittered_canvas(rng, CANVAS).save(p)
        paths.append(str(p))
    blank = folder / "blank.png"
    Image.new("RGB", (CANVAS, CANVAS), "white").save(blank)
    return paths + [str(blank)]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.calls = 0
        self.checked = 0  # reference answers compared

    def take(self, limit: int) -> bool:
        with self.lock:
            if self.calls >= limit:
                return False
            self.calls += 1
            return True

    def ok(self, name: str, seconds: float) -> None:
        with self.lock:
            self.lat[name].append(seconds)

    def fail(self, name: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")


REFERENCE_EXAMPLE = "house"


def reference_strokes() -> str:
    from sbir_core.data.examples import list_examples

    e = next(x for x in list_examples() if x.name == REFERENCE_EXAMPLE)
    return json.dumps([[[x, y] for x, y in st] for st in e.strokes])


def reference_answer(url: str) -> str:
    """The top result (caption) of the reference drawing, asked once before the load."""
    from gradio_client import Client

    results, status = Client(url, verbose=False).predict(reference_strokes(), 5, None, api_name="/search_strokes")
    if not results:
        raise SystemExit(f"the reference drawing found nothing: {status}")
    return _top(results)


def _top(results: list) -> str:
    """The first row as a person reads it: labels and scores of the top three (file URLs
    differ between sessions, so they are not compared)."""
    return " | ".join(r["caption"] for r in results[:3])


def builder(uid: int, url: str, deadline: float, stats: Stats, max_requests: int, seed: int, folder: Path) -> None:
    """A visitor who keeps building galleries from uploads and searching them."""
    from gradio_client import Client, handle_file
    from PIL import Image, ImageDraw

    rng = random.Random(seed + 1000 + uid)
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    n, owner = 0, None
    while time.time() < deadline and stats.take(max_requests):
        files = []
        for i in range(4):
            img = Image.new("RGB", (160, 160), tuple(rng.randint(180, 255) for _ in range(3)))
            d = ImageDraw.Draw(img)
            r = rng.randint(30, 70)
            d.ellipse((80 - r, 80 - r, 80 + r, 80 + r), outline="black", width=4)
            p = folder / f"u{uid}_{n}_{i}" / f"blob_{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            img.save(p)
            files.append(handle_file(str(p)))
        t0 = time.perf_counter()
        try:
            # The visitor's owner token comes back from the first build and goes with the next
            # (a browser keeps it in localStorage), so mine0..mine2 are rebuilt in place.
            msg, dropdown, _, owner = client.predict(files, f"mine{n % 3}", False, owner, api_name="/build_gallery")
            gid = dropdown["value"] if isinstance(dropdown, dict) else dropdown
            if "ready" not in msg or not str(gid).startswith("class:"):
                raise AssertionError(f"build failed: {msg}")
            stats.ok("build_gallery", time.perf_counter() - t0)
            results, status = client.predict(reference_strokes(), 3, gid, api_name="/search_strokes")
            if not results or any(r["caption"].split(". ", 1)[-1] != "blob" for r in results):
                raise AssertionError(f"own gallery search returned {status}")
        except Exception as exc:
            stats.fail("build_gallery", exc)
        n += 1
        time.sleep(rng.uniform(1.0, 3.0))


def user(uid: int, url: str, drawings: list[str], deadline: float, stats: Stats, max_requests: int,
         k: int, explain_every: int, seed: int, download: bool = False, reference: Optional[str] = None,
         check_every: int = 3) -> None:
    from gradio_client import Client, handle_file

    rng = random.Random(seed + uid)
    try:
        # download=False: result images are not fetched (the client shares the CPU with the server)
        client = Client(url, verbose=False, analytics_enabled=False,
                        download_files=tempfile.mkdtemp(prefix="load_test_") if download else False)
    except Exception as exc:
        stats.fail("connect", exc)
        return
    n = 0
    ref = reference_strokes()
    while time.time() < deadline and stats.take(max_requests):
        if reference is not None and n % check_every == 0:
            t0 = time.perf_counter()
            try:
                results, status = client.predict(ref, 5, None, api_name="/search_strokes")
                if not results or _top(results) != reference:
                    raise AssertionError(f"reference drawing: top result changed ({status})")
                stats.ok("reference", time.perf_counter() - t0)
                stats.checked += 1
            except Exception as exc:
                stats.fail("reference", exc)
            n += 1
            continue
        path = rng.choice(drawings)
        t0 = time.perf_counter()
        try:
            results, status = client.predict({"background": None, "layers": [], "composite": handle_file(path)},
                                             k, None, api_name="/search_sketch")
            status = status.strip()
            if "blank" in path:
                if results:
                    raise AssertionError("a blank canvas returned results")
            elif len(results) == 0:
                raise AssertionError(f"no results: {status}")
            stats.ok("search_sketch", time.perf_counter() - t0)
            m = re.search(r"· (\d+) ms$", status or "")
            if m:  # the service's own time for the search, without queueing and transfer
                stats.ok("search (server)", int(m.group(1)) / 1000)
        except Exception as exc:
            stats.fail("search_sketch", exc)
            continue
        n += 1
        if explain_every and n % explain_every == 0 and results and time.time() < deadline \
                and stats.take(max_requests):
            t0 = time.perf_counter()
            try:
                corr, synth, heat, msg = client.predict(rng.randrange(min(3, len(results))), api_name="/explain")
                if corr is None:
                    raise AssertionError(f"no explanation: {msg}")
                stats.ok("explain", time.perf_counter() - t0)
            except Exception as exc:
                stats.fail("explain", exc)
        time.sleep(rng.uniform(0.1, 0.6))  # a person takes a moment between strokes


def rss_mb(pid: Optional[int]) -> Optional[float]:
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def run(url: str, users: int, duration: float, max_requests: int = 5000, k: int = 12, explain_every: int = 4,
        seed: int = 0, drawings: Optional[list[str]] = None, download: bool = False, builder_every: int = 5,
        server_pid: Optional[int] = None) -> dict:
    if not is_loopback(url):
        raise SystemExit(f"refusing to load-test {url}: only loopback addresses (127.0.0.0/8, localhost, ::1)")
    reference = reference_answer(url)
    with tempfile.TemporaryDirectory() as tmp:
        drawings = drawings or make_drawings(Path(tmp), 40, seed)
        stats = Stats()
        deadline = time.time() + duration
        threads = []
        for i in range(users):
            if builder_every and i % builder_every == builder_every - 1:
                threads.append(threading.Thread(target=builder, args=(i, url, deadline, stats, max_requests, seed,
                                                                      Path(tmp)), daemon=True))
            else:
                threads.append(threading.Thread(target=user, args=(i, url, drawings, deadline, stats, max_requests,
                                                                   k, explain_every, seed, download, reference),
                                                daemon=True))
        memory = [rss_mb(server_pid)]
        t0 = time.time()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and time.time() < deadline + 120:
            time.sleep(5)  # calls in flight get a bounded grace period
            memory.append(rss_mb(server_pid))
        wall = time.time() - t0
    report = {"url": url, "users": users, "builders": sum(1 for i in range(users) if builder_every and
                                                          i % builder_every == builder_every - 1),
              "duration_s": round(wall, 1), "calls": stats.calls, "reference_checks": stats.checked,
              "reference_top": reference, "errors": len(stats.errors), "error_samples": stats.errors[:10],
              "server_rss_mb": [m for m in memory if m is not None], "endpoints": {}}
    for name, xs in stats.lat.items():
        report["endpoints"][name] = {"n": len(xs), "p50_ms": round(1000 * statistics.median(xs), 1),
                                     "p95_ms": round(1000 * percentile(xs, 95), 1),
                                     "max_ms": round(1000 * max(xs), 1), "per_s": round(len(xs) / wall, 2)}
    return report


# ----------------------------------------------------------------------------- a class drawing at once
# What the page does per stroke, over plain HTTP as the browser sends it: the stroke JSON
# joins Gradio's queue as the #strokes input event (fn of `/search_strokes`), and when its
# results arrive the map `.then` (a private event, reached by its fn index like the page
# reaches it) is asked for with the same session, whose state holds the query. Both follow
# `trigger_mode="always_last"` as the browser does: while an event runs, only the latest
# request waits. One asyncio loop drives every student, so the simulation costs the shared
# CPU little next to the server.

def page_fns(url: str) -> tuple[int, Optional[int], str]:
    """(fn of /search_strokes, fn of its map `.then` or None, the default gallery) from /config."""
    import httpx

    cfg = httpx.get(url.rstrip("/") + "/config", timeout=30).json()
    deps = cfg["dependencies"]
    search = next(d for d in deps if d.get("api_name") == "search_strokes")
    then = next((d for d in deps if d.get("trigger_after") == search["id"]), None)
    gallery = next((c.get("props", {}).get("value") for c in cfg["components"]
                    if c.get("props", {}).get("elem_id") == "gallery-select"), None)
    return search["id"], (then["id"] if then else None), gallery


class PageSession:
    """One browser tab: a Gradio session hash, its event stream, events joined by fn index."""

    def __init__(self, client: Any, url: str) -> None:
        self.client, self.base = client, url.rstrip("/") + "/gradio_api"
        self.session = uuid.uuid4().hex[:11]
        self.waiting: dict[str, asyncio.Future] = {}
        self.reader: Optional[asyncio.Task] = None

    async def call(self, fn: int, data: list, timeout: float) -> list:
        r = await self.client.post(self.base + "/queue/join", json={
            "data": data, "fn_index": fn, "session_hash": self.session, "event_data": None, "trigger_id": None})
        r.raise_for_status()
        fut = asyncio.get_running_loop().create_future()
        self.waiting[r.json()["event_id"]] = fut
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read())
        msg = await asyncio.wait_for(fut, timeout)
        if not msg.get("success"):
            raise RuntimeError(f"event failed: {str(msg.get('output'))[:200]}")
        return msg["output"]["data"]

    async def _read(self) -> None:
        # The server closes the stream when the session has no event left; reopen while one waits.
        while self.waiting:
            try:
                async with self.client.stream("GET", self.base + "/queue/data",
                                              params={"session_hash": self.session}) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        msg = json.loads(line[5:])
                        fut = self.waiting.pop(msg.get("event_id"), None) if msg.get("msg") == "process_completed" \
                            else None
                        if fut is not None and not fut.done():
                            fut.set_result(msg)
                        if msg.get("msg") in ("close_stream", "unexpected_error"):
                            break
            except Exception as exc:  # the stream broke: every waiting call fails with it
                for fut in self.waiting.values():
                    if not fut.done():
                        fut.set_exception(exc)
                self.waiting.clear()


def student_drawings(rng: random.Random, size: float = 384.0) -> Any:
    """Endless drawings, stroke by stroke: the examples at a random size and place, every point
    nudged a little, so no two students (and no two drawings) are alike, as in a real class."""
    from sbir_core.data.examples import list_examples

    ex = list_examples()
    while True:
        e = rng.choice(ex)
        side = size * rng.uniform(0.55, 0.9)
        dx, dy = rng.uniform(0, size - side), rng.uniform(0, size - side)
        yield [[[round(x + dx + rng.uniform(-1.5, 1.5), 1), round(y + dy + rng.uniform(-1.5, 1.5), 1)] for x, y in s]
               for s in e.scaled_strokes(side, side, margin=0.05)]


async def student(uid: int, url: str, fns: tuple, stop_at: float, record: Callable[..., None], seed: int,
                  stroke_every: float = 1.0, k: int = 12, timeout: float = 60.0) -> None:
    """Adds a stroke to its drawing every `stroke_every` seconds (a new drawing when one is
    finished); records, for each stroke, the seconds from the stroke to the first results that
    include it, and each map's seconds after its results."""
    import httpx

    search_fn, map_fn, gallery = fns
    rng = random.Random(seed * 1000 + uid)
    drawings = student_drawings(rng)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, read=None),
                                 limits=httpx.Limits(max_connections=4)) as client:
        page = PageSession(client, url)
        strokes: list = []
        drawing = next(drawings)
        unsent: list[float] = []  # times of strokes no search has carried yet
        searching = asyncio.Event()
        map_task: Optional[asyncio.Task] = None
        map_again = False

        async def draw_map() -> None:
            nonlocal map_again
            while True:
                map_again = False
                t0 = time.perf_counter()
                try:
                    await page.call(map_fn, [None], timeout)
                    record("map", time.perf_counter() - t0)
                except Exception as exc:
                    record("map", None, exc)
                if not map_again:
                    return

        async def search_loop() -> None:
            nonlocal map_task, map_again
            while True:
                await searching.wait()
                searching.clear()
                if not unsent:
                    if time.time() >= stop_at:
                        return
                    continue
                carried, value = list(unsent), json.dumps({"strokes": strokes, "brush": 6})
                unsent.clear()
                t_send = time.perf_counter()
                try:
                    results, _status, *_ = await page.call(search_fn, [value, k, gallery], timeout)
                    if not results:
                        raise AssertionError(f"no results: {_status}")
                    now = time.perf_counter()
                    for t in carried:
                        record("stroke -> results", now - t)
                    record("search request", now - t_send)
                except Exception as exc:
                    record("stroke -> results", None, exc)
                if map_fn is not None:  # the page's `.then`, always_last
                    if map_task is None or map_task.done():
                        map_task = asyncio.create_task(draw_map())
                    else:
                        map_again = True
                if unsent:
                    searching.set()  # strokes drawn meanwhile: the latest drawing goes next

        loop_task = asyncio.create_task(search_loop())
        await asyncio.sleep(rng.uniform(0, stroke_every))  # students do not start in step
        while time.time() < stop_at and not loop_task.done():
            if len(strokes) == len(drawing):
                strokes, drawing = [], next(drawings)
            strokes = strokes + [drawing[len(strokes)]]
            unsent.append(time.perf_counter())
            searching.set()
            await asyncio.sleep(stroke_every)
        searching.set()
        await asyncio.wait([loop_task] + ([map_task] if map_task else []), timeout=timeout)
        if page.reader:
            page.reader.cancel()


def cpu_seconds(pid: Optional[int]) -> Optional[float]:
    """CPU time (user + system) the process has used so far."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def classroom_phase(url: str, students: int, seconds: float, seed: int = 0, k: int = 12,
                    server_pid: Optional[int] = None, maps: bool = True) -> dict:
    """`students` at once for `seconds`; per measure: n, p50/p95/max, errors; with the server's
    pid, the CPU time it spent per search (a figure a busy machine disturbs less than latency)."""
    fns = page_fns(url)
    fns = fns if maps else (fns[0], None, fns[2])
    cpu0 = cpu_seconds(server_pid)
    lat: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []

    def record(name: str, seconds_: Optional[float], exc: Optional[BaseException] = None) -> None:
        if exc is not None:
            errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
        elif seconds_ is not None:
            lat[name].append(seconds_)

    async def main() -> None:
        stop_at = time.time() + seconds
        await asyncio.gather(*(student(i, url, fns, stop_at, record, seed, k=k) for i in range(students)))

    asyncio.run(main())
    out = {"students": students, "seconds": seconds, "errors": len(errors), "error_samples": errors[:5],
           "searches": len(lat.get("search request", [])), "maps": len(lat.get("map", []))}
    cpu1 = cpu_seconds(server_pid)
    if cpu0 is not None and cpu1 is not None and out["searches"]:
        out["server_cpu_ms_per_search"] = round(1000 * (cpu1 - cpu0) / out["searches"], 1)
    for name, xs in lat.items():
        out[name] = {"n": len(xs), "p50_s": round(statistics.median(xs), 3), "p95_s": round(percentile(xs, 95), 3),
                     "max_s": round(max(xs), 3)}
    return out


def classroom(url: str, students: int, seconds: float, baseline_seconds: float, seed: int = 0,
              server_pid: Optional[int] = None, maps: bool = True) -> list[dict]:
    """One student alone first (the baseline), then the whole class, against the same server."""
    if not is_loopback(url):
        raise SystemExit(f"refusing to load-test {url}: only loopback addresses (127.0.0.0/8, localhost, ::1)")
    phases = [classroom_phase(url, 1, baseline_seconds, seed, server_pid=server_pid, maps=maps)] \
        if baseline_seconds > 0 else []
    return phases + [classroom_phase(url, students, seconds, seed + 1, server_pid=server_pid, maps=maps)]


# ----------------------------------------------------------------------------- a long lesson
def folder_usage(folder: Path) -> tuple[int, float]:
    """(files, MB) under `folder` (0, 0 when it does not exist)."""
    n, size = 0, 0
    for root, _dirs, files in os.walk(folder):  # folders removed while walked are skipped
        for f in files:
            try:
                size += os.stat(os.path.join(root, f), follow_symlinks=False).st_size
                n += 1
            except OSError:  # removed while counted
                pass
    return n, round(size / 2**20, 1)


def soak(url: str, minutes: float, server_pid: Optional[int], folders: list[str], users: int = 10,
         builder_every: int = 5, sample_every: float = 30.0, seed: int = 0) -> dict:
    """`users` visitors (every `builder_every`-th building galleries) for `minutes` against one
    server, sampling its memory and the size of `folders` (Gradio's temporary folder...)."""
    samples: list[dict] = []
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(run(
        url, users, minutes * 60, max_requests=10**7, seed=seed, builder_every=builder_every)), daemon=True)
    t0 = time.time()
    worker.start()
    while True:
        row = {"t_min": round((time.time() - t0) / 60, 2), "rss_mb": rss_mb(server_pid)}
        for f in folders:
            row[f] = folder_usage(Path(f))
        samples.append(row)
        if not worker.is_alive():
            break
        worker.join(sample_every)
    report = {"minutes": minutes, "users": users, "samples": samples, "load": box}
    rss = [(s["t_min"], s["rss_mb"]) for s in samples if s["rss_mb"] is not None]
    if rss:
        end_t = rss[-1][0]
        window = min(10.0, end_t / 3)  # the last 10 minutes (the last third of a shorter soak)
        before = [m for t, m in rss if t <= end_t - window]
        report["rss_growth_window_min"] = round(window, 1)
        report["rss_growth_mb"] = round(max(m for t, m in rss if t >= end_t - window) - before[-1], 1) \
            if before else None
        report["rss_peak_mb"] = max(m for _, m in rss)
    return report


def print_classroom(phases: list[dict], json_path: Optional[str]) -> int:
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| students | strokes | stroke -> results p50 | p95 | max | searches | maps (p50 after results) "
          "| server CPU per search | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for ph in phases:
        s, m = ph.get("stroke -> results", {}), ph.get("map", {})
        print(f"| {ph['students']} | {s.get('n', 0)} | {s.get('p50_s', nan):.2f} s | {s.get('p95_s', nan):.2f} s | "
              f"{s.get('max_s', nan):.2f} s | {ph['searches']} | {ph['maps']} ({m.get('p50_s', nan):.2f} s) | "
              f"{ph.get('server_cpu_ms_per_search', '-')} ms | {ph['errors']} |")
        for e in ph["error_samples"]:
            print("  error:", e)
    if json_path:
        Path(json_path).write_text(json.dumps(phases, indent=2))
    return 1 if any(ph["errors"] for ph in phases) else 0


def print_soak(report: dict, json_path: Optional[str]) -> int:
    folders = [k for k in report["samples"][0] if k not in ("t_min", "rss_mb")]
    print("| minute | server RSS (MB) | " + " | ".join(f"{f}: files, MB" for f in folders) + " |")
    print("|---|---|" + "---|" * len(folders))
    for row in report["samples"]:
        print(f"| {row['t_min']:.1f} | {row['rss_mb']} | " + " | ".join(f"{row[f][0]}, {row[f][1]}" for f in folders)
              + " |")
    load = report["load"]
    print(f"{load.get('calls', 0)} calls, {load.get('errors', '?')} errors; RSS peak {report.get('rss_peak_mb')} MB, "
          f"growth over the last {report.get('rss_growth_window_min')} min: {report.get('rss_growth_mb')} MB")
    for name, s in load.get("endpoints", {}).items():
        print(f"  {name:14s} n={s['n']:5d}  p50 {s['p50_ms']:8.1f} ms  p95 {s['p95_ms']:8.1f} ms")
    for e in load.get("error_samples", []):
        print("  error:", e)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return 1 if load.get("errors", 1) else 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860/", help="the running app (loopback only)")
    ap.add_argument("--users", "-n", type=int, default=10, help="concurrent simulated users (default 10)")
    ap.add_argument("--duration", "-d", type=float, default=60, help="seconds to run (default 60)")
    ap.add_argument("--max-requests", type=int, default=5000, help="hard cap on calls in total")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--explain-every", type=int, default=4, help="ask for an explanation every N searches (0: never)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--download", action="store_true", help="also fetch the result images, as a browser would")
    ap.add_argument("--builder-every", type=int, default=5,
                    help="every Nth user builds galleries from uploads instead of drawing (0: none)")
    ap.add_argument("--server-pid", type=int, default=None, help="sample this process' memory (RSS)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the run against the same server")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--classroom", type=int, default=None, metavar="N",
                    help="N students each adding a stroke a second to their own drawing for --duration "
                         "seconds, as the page sends them (after one student alone, --baseline seconds)")
    ap.add_argument("--baseline", type=float, default=20, help="seconds of the 1-student baseline (0: none)")
    ap.add_argument("--no-map", action="store_true", help="--classroom: searches only, not the map the page asks "
                                                          "for after each (to tell their costs apart)")
    ap.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                    help="--users visitors (every --builder-every-th building galleries) for MINUTES against one "
                         "server: its RSS (--server-pid) and the size of Gradio's temporary folder over time")
    ap.add_argument("--watch", action="append", default=None, metavar="DIR",
                    help="folders whose files --soak counts (default: $GRADIO_TEMP_DIR or <tmp>/gradio)")
    args = ap.parse_args(argv)
    if args.classroom:
        return print_classroom(classroom(args.url, args.classroom, args.duration, args.baseline, args.seed,
                                         args.server_pid, maps=not args.no_map), args.json)
    if args.soak:
        watch = args.watch or [os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")]
        return print_soak(soak(args.url, args.soak, args.server_pid, watch, args.users, args.builder_every,
                               seed=args.seed), args.json)
    reports = []
    for r in range(args.rounds):
        report = run(args.url, args.users, args.duration, args.max_requests, args.k, args.explain_every,
                     args.seed + r, download=args.download, builder_every=args.builder_every,
                     server_pid=args.server_pid)
        reports.append(report)
        mem = report["server_rss_mb"]
        print(f"round {r + 1}: {report['users']} users ({report['builders']} building galleries), "
              f"{report['duration_s']} s, {report['calls']} calls, {report['errors']} errors, "
              f"{report['reference_checks']} reference answers checked"
              + (f", server RSS {mem[0]:.0f} -> {max(mem):.0f} MB (peak)" if mem else ""))
        for name, s in report["endpoints"].items():
            print(f"  {name:14s} n={s['n']:5d}  p50 {s['p50_ms']:8.1f} ms  p95 {s['p95_ms']:8.1f} ms  "
                  f"max {s['max_ms']:8.1f} ms  {s['per_s']:.2f}/s")
        for e in report["error_samples"]:
            print("  error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps(reports if args.rounds > 1 else reports[0], indent=2))
    return 1 if any(r["errors"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
