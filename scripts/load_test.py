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

Bounded: loopback addresses only, at most --max-requests calls per round, each with a
timeout, and it stops by itself after --duration seconds. Prints errors and p50/p95
latency per endpoint; exits 1 if any call failed or any reference answer differed.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional
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
        side = int(CANVAS * rng.uniform(0.55, 0.9))
        img = e.render(size=side, line_width=rng.uniform(4, 8), margin=0.05)
        canvas = Image.new("RGB", (CANVAS, CANVAS), "white")
        canvas.paste(img, (rng.randint(0, CANVAS - side), rng.randint(0, CANVAS - side)))
        p = folder / f"drawing_{i:03d}_{e.name}.png"
        canvas.save(p)
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
    n = 0
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
            msg, dropdown, _ = client.predict(files, f"mine{n % 3}", False, api_name="/build_gallery")
            gid = dropdown["value"] if isinstance(dropdown, dict) else dropdown
            if "ready" not in msg or not str(gid).startswith("upload:"):
                raise AssertionError(f"build failed: {msg}")
            stats.ok("build_gallery", time.perf_counter() - t0)
            results, status = client.predict(reference_strokes(), 3, gid, api_name="/search_strokes")
            if not results or any(r["caption"].split(" · ")[0] != "blob" for r in results):
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
    args = ap.parse_args(argv)
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
