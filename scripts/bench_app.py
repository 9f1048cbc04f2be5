#!/usr/bin/env python3
"""How fast does the app answer a stroke?

    python scripts/bench_app.py [--galleries galleries] [--gallery default] [--browser-strokes 20]

1. Search callback alone (in-process): `RetrievalService.search_sketch` (what the
   /search_sketch callback runs once it has decoded the upload) on canvas images (384 px
   composites of the example drawings, jittered so no call hits the query cache),
   median over repeated calls, next to two baselines
   measured in the same process on the same inputs, interleaved so background load
   hits all three alike: the encoder alone (`SBIREncoder.encode_sketches`: sketch
   preprocessing + forward pass) and the bare forward pass. callback - encoder = what
   the app adds (canvas decoding, cache key, search, thumbnails). Also the cached
   answer to a repeated drawing, and the page's per-stroke handler
   (`Callbacks.search_strokes`) on the same drawings as stroke JSON (what the canvas sends).
2. End of stroke -> visible results in a real browser: the app runs in-process,
   headless Chromium draws the example drawings stroke by stroke with the mouse on
   the canvas in `#sketch`; for each stroke, the time from the pointer release to new, fully
   loaded images in `#results` (measured inside the page), p50 over the strokes.

Targets: callback p50 <= 60 ms on the 2-core CPU (~350-image gallery), stroke to
results <= 300 ms. The load average is printed: on a shared machine, numbers scale
with it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Optional



def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": round(statistics.median(xs), 2), "p95_ms": round(pct(xs, 95), 2),
            "min_ms": round(min(xs), 2)}


def jittered_canvases(n: int, seed: int = 0, size: int = 384) -> list[dict]:
    import numpy as np

    from sbir_core.data.examples import list_examples

    rng = random.Random(seed)
    ex = list_examples()
    out = []
    for i in range(n):
        arr = np.asarray(ex[i % len(ex)].jittered_canvas(rng, size))
        out.append({"background": np.full_like(arr, 255), "layers": [arr], "composite": arr})
    return out


def jittered_strokes(n: int, seed: int = 0, size: int = 384) -> list[str]:
    """The example drawings as the page's canvas sends them: stroke JSON in canvas pixels,
    scaled and shifted at random (no two alike, so no call hits the query cache)."""
    from sbir_core.data.examples import list_examples

    rng = random.Random(seed)
    ex = list_examples()
    out = []
    for i in range(n):
        e = ex[i % len(ex)]
        side = size * rng.uniform(0.55, 0.9)
        dx, dy = rng.uniform(0, size - side), rng.uniform(0, size - side)
        st = e.scaled_strokes(side, side, margin=0.05)
        out.append(json.dumps([[[round(x + dx, 1), round(y + dy, 1)] for x, y in s] for s in st]))
    return out


def bench_callback(service, n: int = 40, k: int = 12, warmup: int = 5) -> dict:
    import torch

    import sbir_app as app_module

    cb = app_module.Callbacks(service)
    enc = service.encoder
    canvases = jittered_canvases(n + warmup, seed=1)
    strokes = jittered_strokes(n + warmup, seed=1)
    for st in strokes[:warmup]:
        cb.search_strokes(st, k, None)
    for c in canvases[:warmup]:  # warm caches, allocator, thumbnails of common results
        service.search_sketch(c, k)
        enc.encode_sketches([c["composite"]])
    t_cb, t_enc, t_fwd, t_cached, t_strokes = [], [], [], [], []
    for c, st in zip(canvases[warmup:], strokes[warmup:]):
        comp = c["composite"]
        t0 = time.perf_counter()
        out = service.search_sketch(c, k)
        t1 = time.perf_counter()
        assert out.hits, out.message
        enc.encode_sketches([comp])
        t2 = time.perf_counter()
        x = enc.sketch_transform(comp)[None]
        t3 = time.perf_counter()
        enc.encode(x, "sketch")
        t4 = time.perf_counter()
        service.search_sketch({"composite": comp.copy()}, k)  # the same drawing again
        t5 = time.perf_counter()
        items, msg, q = cb.search_strokes(st, k, None)  # what the page sends per stroke
        t6 = time.perf_counter()
        assert items, msg
        t_strokes.append(1000 * (t6 - t5))
        t_cb.append(1000 * (t1 - t0))
        t_enc.append(1000 * (t2 - t1))
        t_fwd.append(1000 * (t4 - t3))
        t_cached.append(1000 * (t5 - t4))
    res = {"callback": summary(t_cb), "encoder_only": summary(t_enc), "forward_only": summary(t_fwd),
           "cached_callback": summary(t_cached), "stroke_callback": summary(t_strokes), "torch_threads": torch.get_num_threads(),
           "gallery_size": len(service.gallery(None))}
    res["app_overhead_p50_ms"] = round(res["callback"]["p50_ms"] - res["encoder_only"]["p50_ms"], 2)
    return res


def bench_browser(url: str, strokes: int = 20, timeout_ms: float = 60_000) -> dict:
    # scripts/screenshots.py: running this file puts scripts/ on the path
    from screenshots import browser_page, draw_stroke, example_strokes, settle, wait_for_new_results

    lat, missed, clicks = [], 0, []
    names = ["house", "cat", "bicycle", "car", "fish", "cup", "tree", "guitar"]
    done = 0
    for name in names:
        if done >= strokes:
            break
        with browser_page(url) as page:  # a fresh canvas per drawing
            for st in example_strokes(page, name):
                if done >= strokes:
                    break
                draw_stroke(page, st[::2] + [st[-1]] if len(st) > 8 else st)  # fewer mouse events, same shape
                ms = wait_for_new_results(page, timeout_ms)
                done += 1
                if ms is None:
                    missed += 1  # identical results (nothing new to show) or too slow
                else:
                    lat.append(ms)
                settle(page, quiet_ms=300)
            clicks.append(click_to_explanation_ms(page, timeout_ms))  # then a click on the first result
    res = {"strokes": done, "no_new_results": missed}
    if lat:
        res.update(summary(lat))
    res["click_to_explanation"] = summary(clicks)
    return res


def click_to_explanation_ms(page, timeout_ms: float = 60_000) -> float:
    """A click on the first result -> its explanation picture loaded on screen (ms)."""
    t0 = time.perf_counter()
    page.locator("#results img").first.click()
    page.wait_for_function("() => { const i = document.querySelector('#explanation img');"
                           " return i && i.complete && i.naturalWidth > 0; }", timeout=timeout_ms)
    ms = (time.perf_counter() - t0) * 1000
    page.keyboard.press("Escape")  # close the panel, as a person would before drawing on
    return ms


def profile_stroke(service, calls: int = 20, k: int = 12, top: int = 15) -> None:
    """cProfile of what the server runs per stroke: the /search_strokes callback, then the
    map `.then` as the page runs it (drawn, paced and written as a served file); the top
    functions by cumulative time and each part's CPU time per call."""
    import cProfile
    import io
    import pstats

    import sbir_app as app_module
    from sbir_app.pacing import DutyCycle
    from sbir_app.page import MAP_SHARE

    cb = app_module.Callbacks(service)
    map_panel = app_module.ServedImages(app_module.served_folder(service), webp_method=0)(
        DutyCycle(MAP_SHARE)(cb.map_panel))
    strokes = jittered_strokes(calls + 3, seed=5)
    for st in strokes[:3]:
        map_panel(cb.search_strokes(st, k, None)[2])
    queries, profiles = [], {}
    for name in ("search_strokes", "map"):
        prof, c0 = cProfile.Profile(), time.process_time()
        for st in strokes[3:]:
            if name == "search_strokes":
                prof.runcall(lambda: queries.append(cb.search_strokes(st, k, None)[2]))
            else:
                time.sleep(0.3)  # a stroke's pause, as on the page: the map's pacing does not wait
                prof.runcall(map_panel, queries.pop(0))
        profiles[name] = (prof, 1000 * (time.process_time() - c0) / calls)
    # What batching buys (gallery.batching): CPU time per drawing by batch size, one torch thread.
    import torch

    enc = service.encoder
    x = torch.rand(16, 3, enc.image_size, enc.image_size)
    per = {b: [] for b in (1, 4, 8, 16)}
    for _ in range(5):  # interleaved, so background load hits every size alike
        for b in per:
            c0 = time.process_time()
            for _ in range(16 // b):
                enc.encode(x[:b], "sketch")
            per[b].append(1000 * (time.process_time() - c0) / 16)
    print("forward pass, CPU ms per drawing by batch size (median of 5): "
          + ", ".join(f"{b}: {statistics.median(v):.1f}" for b, v in per.items()))
    for name, (prof, cpu_ms) in profiles.items():
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
        print(f"--- {name}: {cpu_ms:.1f} ms CPU per call (n={calls})")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--galleries", default=None, help="galleries root (default galleries/)")
    ap.add_argument("--gallery", default="default")
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--calls", type=int, default=40, help="callback calls to time")
    ap.add_argument("--browser-strokes", type=int, default=20, help="strokes to time in the browser (0: skip)")
    ap.add_argument("--url", default=None, help="time strokes against a running app instead of an in-process one")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the app's default is 1)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", action="store_true",
                    help="only profile one stroke's server work (search callback, then the map) and exit")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from sbir_core.paths import SHIPPED_GALLERIES as DEFAULT_GALLERIES
    from sbir_core.service import RetrievalService

    t0 = time.time()
    service = RetrievalService(args.galleries or DEFAULT_GALLERIES, gallery=args.gallery, checkpoint=args.checkpoint)
    if service.default_gallery is None:
        print("no gallery to search:", *service.notices, file=sys.stderr)
        return 2
    service.warm_up()
    print(f"loaded {service.encoder_id}, gallery {service.default_gallery} ({len(service.gallery(None))} items) "
          f"in {time.time() - t0:.1f} s; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if args.profile:
        profile_stroke(service, args.calls)
        return 0
    out = {"loadavg_before": os.getloadavg()[0], "encoder": service.encoder_id}
    out["callback"] = cb = bench_callback(service, args.calls)
    print(f"search callback   p50 {cb['callback']['p50_ms']:7.1f} ms  p95 {cb['callback']['p95_ms']:7.1f} ms  "
          f"(n={cb['callback']['n']}, gallery {cb['gallery_size']}, {cb['torch_threads']} torch thread(s))")
    print(f"  encoder only    p50 {cb['encoder_only']['p50_ms']:7.1f} ms  (preprocess + forward)")
    print(f"  forward only    p50 {cb['forward_only']['p50_ms']:7.1f} ms")
    print(f"  app overhead    p50 {cb['app_overhead_p50_ms']:7.1f} ms  (callback - encoder)")
    print(f"  cached repeat   p50 {cb['cached_callback']['p50_ms']:7.1f} ms")
    print(f"stroke callback   p50 {cb['stroke_callback']['p50_ms']:7.1f} ms  (stroke JSON, as the page sends it)")
    if args.browser_strokes > 0:
        if args.url:
            br = bench_browser(args.url, args.browser_strokes)
        else:
            import sbir_app as app_module
            from screenshots import free_port

            demo = app_module.build_demo(service)

            port = free_port()
            app_module.launch(demo, service, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
            try:
                br = bench_browser(f"http://127.0.0.1:{port}/", args.browser_strokes)
            finally:
                demo.close()
        out["browser"] = br
        if "p50_ms" in br:
            print(f"stroke -> results p50 {br['p50_ms']:7.1f} ms  p95 {br['p95_ms']:7.1f} ms  "
                  f"(n={br['n']} of {br['strokes']} strokes; {br['no_new_results']} without new results)")
        else:
            print(f"stroke -> results: no measurement ({br})")
        ce = br["click_to_explanation"]
        print(f"click -> explanation p50 {ce['p50_ms']:7.1f} ms  p95 {ce['p95_ms']:7.1f} ms  (n={ce['n']})")
    out["loadavg_after"] = os.getloadavg()[0]
    print(f"load average after: {out['loadavg_after']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
