"""Every user-facing query mode, with the shipped checkpoint and the shipped default
gallery, the way the app runs them: the first row of results must make sense.

No shared data needed: the queries are the app's own example drawings, words, and
pictures made here.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


from sbir_core.models.encoders import DEFAULT_CHECKPOINT  # noqa: E402
from sbir_core.data.examples import list_examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no shipped checkpoint")
app = pytest.importorskip("sbir_app", reason="the app needs gradio")


@pytest.fixture(scope="module")
def shipped(shipped_service):
    """The page's callbacks over the app's service as `python app.py` builds it (conftest)."""
    svc = shipped_service
    assert svc.notices == [], svc.notices  # loaded the shipped index, nothing rebuilt or missing
    assert svc.has_text
    return app.Callbacks(svc)


def top_labels(query, n: int = 5) -> list[str]:
    return [h.label for h in query.hits[:n]]


# Known miss of the shipped model (measured, see docs/BENCHMARKS.md): the fish example's
# first row is dolphins, a pig, a ladybug and a cow (fish at rank 9; scripts/compare_checkpoints.py --examples default).
# Fish is one of the classes held out of training to select the model (its
# `heldout_classes`): unseen to it.
KNOWN_MISSES = {"fish"}


KNOWN_MISS = pytest.mark.xfail(reason="known miss of the shipped model: fish is a held-out class, found at rank 9",
                               strict=True)  # passing it fails the run: then take fish out of KNOWN_MISSES


@pytest.mark.parametrize("name", [pytest.param(e.name, marks=KNOWN_MISS) if e.name in KNOWN_MISSES else e.name
                                  for e in list_examples()])
def test_every_example_finds_its_class_in_the_first_five(shipped, name):
    """The examples on the page (cat included) find their class in the top 5."""
    items, msg, query = shipped.search_example(name, 12, "default")
    assert query is not None, msg
    assert name in top_labels(query), (name, top_labels(query, 12))


@pytest.mark.parametrize("name", ["cat", "bicycle"])
def test_the_first_five_are_the_nearest_pictures_and_diffusion_orders_the_rest(shipped, name):
    """The first row is the sketch's own nearest pictures (by the seen-class-calibrated
    score, when the checkpoint prescribes calibration) whatever the diffusion setting; the
    shipped checkpoint's diffusion (chosen on held-out classes) orders the rest. Each
    caption's score is the sketch's cosine similarity to that picture."""
    from sbir_core.gallery.calibration import SeenCalibration

    svc = shipped.service
    items, msg, query = shipped.search_example(name, 12, "default")
    g = svc.gallery("default").gallery
    # the shipped index searches as the shipped checkpoint prescribes
    assert g.diffusion_k == svc.encoder.retrieval.diffusion_k
    cal = SeenCalibration.from_encoder(svc.encoder)
    assert (g.calibration.setting if g.calibration else None) == (cal.setting if cal else None)
    if cal is not None:
        np.testing.assert_allclose(g.calibration.prototypes, cal.prototypes, atol=1e-6)
    sims = g.raw_embeddings @ query.embedding
    order = sims if cal is None else cal.adjust(sims[None], query.embedding[None],
                                                cal.seen_confidence(g.raw_embeddings))[0]
    plain = [int(i) for i in np.argsort(-order, kind="stable")]
    idx = [h.index for h in query.hits]
    assert len(idx) == 12 and idx[:5] == plain[:5]
    assert np.allclose([h.score for h in query.hits], sims[idx], atol=1e-5)
    if g.diffusion_k:
        assert idx[5:] != plain[5:12]
    # An explanation says why its result sits above one with a higher similarity, and only then.
    scores = [h.score for h in query.hits]
    for r in (0, 4, 7):
        above = any(later > scores[r] for later in scores[r + 1:])
        msg = svc.explain(query, r).message
        assert ("A result with a higher similarity comes later" in msg) == above, (r, msg)
        assert ("resemble your best matches" in msg) == (above and r >= 5 and bool(g.diffusion_k)), (r, msg)


def test_strokes_as_the_canvas_sends_them(shipped):
    strokes = json.loads(app.example_strokes("bicycle"))
    items, msg, query = shipped.search_strokes(json.dumps(strokes), 5, "default")
    assert top_labels(query, 1) == ["bicycle"], top_labels(query)


def test_a_drawn_image_as_an_api_client_sends_it(shipped, tmp_path):
    ex = next(e for e in list_examples() if e.name == "house")
    p = tmp_path / "house.png"
    ex.render(size=384, line_width=6, margin=0.12).save(p)
    items, msg, query = shipped.search_sketch({"background": None, "layers": [], "composite": {"path": str(p)}},
                                              5, "default")
    assert query is not None and "house" in top_labels(query, 3), (msg, top_labels(query))


@pytest.mark.parametrize("word", ["bicycle", "cat", "airplane"])
def test_text_search_returns_the_class(shipped, word):
    items, msg, query = shipped.search_text(word, 5, "default")
    assert query is not None, msg
    assert top_labels(query, 1) == [word] and top_labels(query).count(word) >= 2, (word, top_labels(query))


def test_typed_class_names_find_their_class_as_the_training_text_was_embedded():
    """Every default-gallery class name typed as a query (experiments/bench_text_queries.py): the
    prompt-ensembled text the head trained on (0.735 hit@5 when measured) must stay clearly
    ahead of the bare phrase (0.662), which text search embedded before."""
    from scripts_loader import load_experiment

    r = load_experiment("bench_text_queries").run()
    assert r["gallery"]["classes"] == 68
    app_way, bare = r["as the class text (the app)"], r["bare phrase"]
    assert app_way["hit@5"] >= 0.70 and app_way["mAP@all"] > bare["mAP@all"] + 0.03, r


def test_photo_query_finds_its_class(shipped, tmp_path):
    """A gallery picture, flipped and shrunk (so it is not the identical file), as the query."""
    src = sorted((ROOT / "galleries" / "default" / "images" / "truck").glob("*.jpg"))[0]
    p = tmp_path / "truck.png"
    with Image.open(src) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((120, 120)).save(p)
    items, msg, query = shipped.search_photo({"path": str(p)}, 5, "default")
    assert query is not None and top_labels(query, 1) == ["truck"], (msg, top_labels(query))
    assert set(top_labels(query)) <= {"truck", "car", "bus"}, top_labels(query)


def test_sketch_to_sketch_gallery(shipped, tmp_path):
    """A gallery of drawings, searched with another drawing of one of its classes."""
    files = []
    for e in list_examples():
        for i, (w, m) in enumerate(((3, 0.1), (6, 0.2))):
            p = tmp_path / f"{e.name}_{i}.png"
            e.render(size=200, line_width=w, margin=m).save(p)
            files.append({"path": str(p), "orig_name": p.name})
    msg, dd, _, owner, mine = shipped.build_gallery(files, "doodles", True, None, [],
                                                    progress=lambda *a, **k: None)
    assert "ready" in msg, msg
    strokes = app.example_strokes("star")
    items, msg, query = shipped.search_strokes(strokes, 3, dd["value"])
    assert "sketch → sketch" in msg and top_labels(query, 2) == ["star", "star"], top_labels(query)


def test_explanation_and_map_for_a_result(shipped):
    _, _, query = shipped.search_example("cat", 5, "default")
    corr, synth, heat, msg = shipped.explain(query, 0)
    assert all(isinstance(x, Image.Image) for x in (corr, synth, heat)), msg
    assert isinstance(shipped.map_image(query), Image.Image)


def test_shipped_encoder_is_fine_tuned_and_none_is_the_raw_backbone():
    import torch

    from sbir_core.models.encoders import create_encoder, load_lite_state_dict

    enc = create_encoder()
    raw = create_encoder(checkpoint="none")
    assert enc.meta.get("backbone_trained") and enc.image_size == enc.meta["image_size"]
    assert raw.head is None and raw.image_size == 224
    _, imagenet = load_lite_state_dict("efficientnet-lite0")
    ours = enc.backbone.net.state_dict()
    assert any(not torch.equal(ours[k].float(), v.float()) for k, v in imagenet.items())
    assert all(torch.equal(raw.backbone.net.state_dict()[k], v) for k, v in imagenet.items())
    emb = enc.encode_sketches([list_examples()[0].strokes]).normalized()
    assert emb.shape == (1, enc.embed_dim) and np.isfinite(emb).all()


def _umbrella() -> str:
    """An umbrella (the default gallery has none): a dome, its scalloped rim and a hooked handle."""
    import math

    dome = [[150 + 110 * math.cos(math.pi + math.pi * i / 20), 150 + 90 * math.sin(math.pi + math.pi * i / 20)]
            for i in range(21)]
    rim = [[40 + 220 * i / 8, 150 - 14 * abs(math.sin(math.pi * i / 2))] for i in range(9)]
    hook = [[150 - 18 + 18 * math.cos(math.pi * i / 6), 260 + 18 * math.sin(math.pi * i / 6)] for i in range(7)]
    handle = [[150, 60], [150, 260]] + hook
    return json.dumps([dome, rim, handle])


def test_how_sure_the_shipped_model_is(shipped):
    """The calibrated confidence rule (gallery.confidence, checkpoints/default.confidence.json):
    a dot and a scribble are "unreadable", the house example is not "absent", and the
    examples (classes the gallery has) are never called absent."""
    from sbir_core.data.scribbles import unreadable_drawings

    svc = shipped.service
    assert svc.confidence_rule is not None
    dot = svc.search_sketch([[[190, 200], [192, 201]]], 5, "default", brush=6.0)
    assert dot.ok and dot.hits and dot.level == "unreadable", dot.level
    scribble = next(s for kind, s, _ in unreadable_drawings(3, seed=5) if kind == "scribble")
    out = svc.search_sketch(scribble, 5, "default", brush=6.0)
    assert out.level == "unreadable", out.level
    levels = {e.name: svc.search_sketch(e.render(), 5, "default").level for e in list_examples()}
    assert levels["house"] in ("sure", "closest"), levels
    assert "absent" not in levels.values() and "unreadable" not in levels.values(), levels


def test_the_command_line_searches_and_explains_as_the_page_does(shipped, tmp_path, capsys):
    """`search --gallery default --strokes` with the shipped model: the page's first row,
    scores included; `explain --strokes` writes the three pictures."""
    from sbir_core import cli

    strokes = json.loads(app.example_strokes("house"))
    f = tmp_path / "house.json"
    f.write_text(json.dumps(strokes))
    assert cli.main(["search", "--gallery", "default", "--galleries", str(ROOT / "galleries"), "--strokes", str(f),
                     "--k", "5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    _items, _msg, query = shipped.search_strokes(json.dumps(strokes), 5, "default")
    assert [Path(r["path"]).name for r in got] == [Path(h.path).name for h in query.hits]
    assert [round(r["score"], 4) for r in got] == [round(h.score, 4) for h in query.hits]
    assert "house" in [r["label"] for r in got]
    out = tmp_path / "why"
    assert cli.main(["explain", "--strokes", str(f), "--photo", got[0]["path"], "--out", str(out)]) == 0
    assert all((out / n).stat().st_size > 1000 for n in ("correspondences.png", "heatmap.png", "synthesis.png"))


def test_the_shipped_gallery_searched_through_hnsw_finds_what_exact_search_finds():
    """The shipped gallery's vectors, calibration and diffusion, indexed with hnsw: the index
    holds the calibrated score, so the first rows agree with exact search."""
    from sbir_core.gallery.index import Gallery

    flat = Gallery.load(Path(__file__).resolve().parents[1] / "galleries" / "default" / "index")
    assert flat.calibration is not None and flat.diffusion_k
    approx = Gallery.from_embeddings(flat.raw_embeddings, index_type="hnsw", diffusion_k=flat.diffusion_k,
                                     calibration=flat.calibration)
    q = flat.raw_embeddings[::7] + 0.05  # pictures as queries, nudged off their own rows
    assert np.array_equal(approx.knn(q, 5)[1], flat.knn(q, 5)[1])
