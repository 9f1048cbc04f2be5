"""Product benchmark: doodles the model never trained on, searched against the shipped
default gallery exactly as the app searches it.

Queries (QuickDraw strokes from the shared data, `--data` or $SBIR_DATA):
- zero-shot: every doodle of the gallery classes reserved by the `pacs`/`doodle` splits
  (no training run may use these classes on any side);
- seen: the held-out doodles (the last 5 of each class, `data.HELDOUT_DOODLES`) of the
  other gallery classes; training never sees them.

Gallery: galleries/default/images (399 clip-art pictures, 68 classes), embedded with the
encoder under test and searched with `Gallery` (the class the app and `search` use;
the runner is `sbir_core.eval.product.product_benchmark`): as the app searches (the checkpoint's gallery diffusion and seen-class calibration),
without diffusion, and by the embedding alone (neither).

    python scripts/bench_product.py --json
    python scripts/bench_product.py --checkpoint none   # raw backbone
    python scripts/bench_product.py --map --json      # the map (issue 31)

`--map` measures instead whether the map agrees with the results: the share of queries
whose 5 nearest map points include at least 3 of their top-10 results, as the app ranks
them (bar: 0.80), over the page's 11 examples (as the page sends their strokes) and the
doodles above, each searched and mapped through `RetrievalService` as the page does; the
star placed as the app places it (by its results) and, for comparison, by its embedding
(openTSNE's transform, the placement before issue 31). It also times `map_image_for` (the map
drawn after every stroke; median over the examples, provisional on a busy CPU).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sbir_core.data.datasets import DATA_HELP, data_root
from sbir_core.eval.product import KEYS, RANKINGS, product_benchmark, product_queries
from sbir_core.models.encoders import create_encoder


def run(data: Path, checkpoint: str) -> dict:
    return product_benchmark(create_encoder(checkpoint=checkpoint), data)


MAP_TOP, MAP_NEAR, MAP_NEED = 10, 5, 3  # top-10 results, 5 nearest map points, at least 3 shared


def _agrees(coords: np.ndarray, xy: np.ndarray, top: list[int]) -> bool:
    near = np.argsort(np.linalg.norm(coords - np.asarray(xy, np.float64), axis=1), kind="stable")[:MAP_NEAR]
    return len(set(near.tolist()) & set(top[:MAP_TOP])) >= MAP_NEED


def run_map(data: Path, checkpoint: str) -> dict:
    """The map-agreement figures (issue 31) and the time of `map_image_for`."""
    import tempfile

    from sbir_core.data.drawing import read_stroke_json, stroke_brush
    from sbir_core.data.examples import list_examples
    from sbir_core.explain.embedding_map import gallery_map
    from sbir_core.service import DEFAULT_K, RetrievalService

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # nothing written under $SBIR_HOME or the repository
        svc = RetrievalService(checkpoint=checkpoint, cache_dir=Path(tmp) / "cache", uploads_dir=Path(tmp) / "up")
        lg = svc.gallery()
        m = gallery_map(lg.gallery, cache=Path(tmp) / "map", search=(lg.directory,))
        groups: dict[str, list] = {"examples": [], "zero-shot": [], "seen": []}
        for e in list_examples():  # as the page sends them: stroke JSON, its brush
            js = json.dumps({"canvas": list(e.canvas), "strokes": [[[x, y] for x, y in st] for st in e.strokes]})
            groups["examples"].append((e.name, svc.search_sketch(read_stroke_json(js), DEFAULT_K, brush=stroke_brush(js))))
        for group, items in product_queries(data).items():
            groups[group] += [(it.label, svc.search_sketch(it.load(), DEFAULT_K)) for it in items]
        result: dict = {"encoder": svc.encoder_id, "rule": f"{MAP_NEED} of the top-{MAP_TOP} results among the "
                        f"star's {MAP_NEAR} nearest map points", "bar": 0.80}
        every: dict[str, list[bool]] = {"app": [], "embedding": []}
        for group, outs in groups.items():
            app, emb, missed = [], [], []
            for name, out in outs:
                if not out.ok:
                    raise RuntimeError(f"{group} query {name} failed: {out.message}")
                top = [h.index for h in out.hits]
                plot = svc.map_image_for(out.query).plot_data
                coords = np.array([[p["x"], p["y"]] for p in plot["points"]])
                assert np.allclose(coords, m.coords), "the app's map is not the one measured"
                app.append(_agrees(coords, [plot["query"]["x"], plot["query"]["y"]], top))
                emb.append(_agrees(coords, m.place(out.query.embedding[None])[0], top))
                if not app[-1]:
                    missed.append(name)
            every["app"] += app
            every["embedding"] += emb
            result[group] = {"n_queries": len(outs), "by its results (the app)": round(float(np.mean(app)), 3),
                             "by its embedding (before)": round(float(np.mean(emb)), 3), "missed (the app)": missed}
        result["all"] = {"n_queries": len(every["app"]),
                         "by its results (the app)": round(float(np.mean(every["app"])), 3),
                         "by its embedding (before)": round(float(np.mean(every["embedding"])), 3)}
        marks = [getattr(svc.map_image_for(out.query), "marks", None) for _, out in groups["examples"]]
        if all(mk is not None for mk in marks):  # how far the first 5 results' tiles are drawn from the star
            result["examples_top5_tiles_from_star_px"] = {
                name: round(float(np.median(np.linalg.norm(mk.centres[:5] - mk.query[0], axis=1))))
                for (name, _), mk in zip(groups["examples"], marks)}
        ms = []
        for _, out in groups["examples"]:
            svc.map_image_for(out.query)  # the first draws the base layer and decodes thumbnails
            t = time.perf_counter()
            for _ in range(5):
                svc.map_image_for(out.query)
            ms.append(1000 * (time.perf_counter() - t) / 5)
        result["map_image_for_ms_median"] = round(float(np.median(ms)), 1)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--checkpoint", default="default", help="'default', 'none' (raw backbone) or a path")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--map", action="store_true", help="whether the map agrees with the results (issue 31)")
    args = ap.parse_args()
    r = (run_map if args.map else run)(data_root(args.data), args.checkpoint)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    if args.map:
        print(f"{r['encoder']}: {r['rule']} (bar {r['bar']}); map_image_for {r['map_image_for_ms_median']} ms")
        for group in ("examples", "zero-shot", "seen", "all"):
            g = r[group]
            print(f"{group:<10} n={g['n_queries']:<4} by its results (the app) {g['by its results (the app)']:.3f}  "
                  f"by its embedding (before) {g['by its embedding (before)']:.3f}")
        return 0
    print(f"{r['encoder']}  gallery {r['gallery']}  diffusion k={r['diffusion_k']}  "
          f"seen-class calibration {r['seen_calibration']}")
    for group in ("zero-shot", "seen"):
        for name, _, _ in RANKINGS:
            m = r[group][name]
            print(f"{group:<10} {name:<20} n={r[group]['n_queries']:<5}" + "  ".join(f"{k} {m[k]:.3f}" for k in KEYS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
