#!/usr/bin/env python3
"""Load test: N simulated users drawing against a running app, for D seconds.

    python app.py &                                   # the app under test
    python scripts/load_test.py --users 10 --duration 60 [--url http://127.0.0.1:7860/]

Each user is its own gradio_client session: it sends a drawing to `/search_sketch`
(a jittered example sketch, so the query cache does not answer everything; some
repeats and an occasional blank canvas, as real users do), and every few searches
asks `/explain` for a result, like a click. Bounded: loopback addresses only, at most
--max-requests calls in total, each with a timeout, and it stops by itself after
--duration seconds. Prints errors and p50/p95 latency per endpoint; exits 1 if any
call failed.
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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

    from sbir_core.examples import list_examples

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


def user(uid: int, url: str, drawings: list[str], deadline: float, stats: Stats, max_requests: int,
         k: int, explain_every: int, seed: int, download: bool = False) -> None:
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
    while time.time() < deadline and stats.take(max_requests):
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


def run(url: str, users: int, duration: float, max_requests: int = 5000, k: int = 12, explain_every: int = 4,
        seed: int = 0, drawings: Optional[list[str]] = None, download: bool = False) -> dict:
    if not is_loopback(url):
        raise SystemExit(f"refusing to load-test {url}: only loopback addresses (127.0.0.0/8, localhost, ::1)")
    with tempfile.TemporaryDirectory() as tmp:
        drawings = drawings or make_drawings(Path(tmp), 40, seed)
        stats = Stats()
        deadline = time.time() + duration
        threads = [threading.Thread(target=user, args=(i, url, drawings, deadline, stats, max_requests, k,
                                                       explain_every, seed, download), daemon=True)
                   for i in range(users)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=duration + 120)  # calls in flight get a bounded grace period
        wall = time.time() - t0
    report = {"url": url, "users": users, "duration_s": round(wall, 1), "calls": stats.calls,
              "errors": len(stats.errors), "error_samples": stats.errors[:10], "endpoints": {}}
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
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    report = run(args.url, args.users, args.duration, args.max_requests, args.k, args.explain_every, args.seed,
                 download=args.download)
    print(f"{report['users']} users, {report['duration_s']} s, {report['calls']} calls, {report['errors']} errors")
    for name, s in report["endpoints"].items():
        print(f"  {name:14s} n={s['n']:5d}  p50 {s['p50_ms']:8.1f} ms  p95 {s['p95_ms']:8.1f} ms  "
              f"max {s['max_ms']:8.1f} ms  {s['per_s']:.2f}/s")
    for e in report["error_samples"]:
        print("  error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
