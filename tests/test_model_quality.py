"""Real inference with the shipped checkpoint: it must beat the raw backbone on real,
unseen-class sketches (a PACS subset), and the eval command must run end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from shared_data import SHARED, needs_shared
from sbir_core.cli import main
from sbir_core.data.datasets import benchmark
from sbir_core.models.encoders import DEFAULT_CHECKPOINT, create_encoder
from sbir_core.eval.evaluate import evaluate
from sbir_core.eval.metrics import paired_difference

pytestmark = pytest.mark.slow  # benchmarks the shipped model on the shared data

torch.set_num_threads(1)


@needs_shared
@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no shipped checkpoint")
def test_shipped_checkpoint_beats_raw_backbone_on_unseen_pacs_subset(tmp_path):
    q, g = benchmark(SHARED, "pacs")
    # 6 sketches and 12 photos per class, spread over each class (not the first files only).
    def pick(items, n):
        out = []
        for label in sorted({i.label for i in items}):
            group = [i for i in items if i.label == label]
            out += [group[j] for j in np.linspace(0, len(group) - 1, n).astype(int)]
        return out
    q, g = pick(q, 6), pick(g, 12)
    trained = evaluate(create_encoder(checkpoint="default"), q, g, cache_dir=tmp_path, per_query=True)
    raw = evaluate(create_encoder(checkpoint="none"), q, g, cache_dir=tmp_path, per_query=True)
    assert trained["mAP@all"] > raw["mAP@all"] + 0.05, (trained["mAP@all"], raw["mAP@all"])
    # Query by query, the gain is beyond what other queries of these classes could change.
    gain = paired_difference(raw["per_query"]["mAP@all"], trained["per_query"]["mAP@all"])
    assert gain["n"] == len(q) and gain["diff"] - gain["ci"] > 0, gain


def test_eval_command_on_folders(tmp_path, capsys):
    """`eval --queries --gallery` with .ndjson queries and an image-folder gallery."""
    qd = tmp_path / "queries"
    qd.mkdir()
    shapes = {"circle": [[[50, 80, 50, 20, 50], [20, 50, 80, 50, 20]]], "bar": [[[10, 90], [50, 50]]]}
    for word, strokes in shapes.items():
        (qd / f"{word}.ndjson").write_text(json.dumps({"word": word, "key_id": 1, "drawing": strokes}) + "\n")
        d = tmp_path / "gallery" / word
        d.mkdir(parents=True)
        for k in range(2):
            img = Image.new("RGB", (64, 64), "white")
            draw = ImageDraw.Draw(img)
            if word == "circle":
                draw.ellipse((10 + k, 10, 54, 54), outline="black", width=3)
            else:
                draw.line((5, 32 + k, 59, 32), fill="black", width=4)
            img.save(d / f"{k}.png")
    rc = main(["eval", "--queries", str(qd), "--gallery", str(tmp_path / "gallery"), "--checkpoint", "none",
               "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_queries"] == 2 and out["n_gallery"] == 4
    assert set(out) >= {"mAP@all", "P@100", "mAP@200", "P@200"}
    assert 0.0 < out["mAP@all"] <= 1.0


def test_eval_wrong_split_is_a_clear_error(capsys):
    if not (SHARED / "splits.json").is_file():
        pytest.skip(f"shared data not found at {SHARED}")
    rc = main(["eval", "--data", str(SHARED), "--split", "sketchy", "--checkpoint", "none"])
    assert rc == 2
    assert "unknown split 'sketchy'" in capsys.readouterr().err


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no shipped checkpoint")
def test_text_queries_land_near_their_class_in_the_shipped_model():
    enc = create_encoder(checkpoint="default")
    t = torch.nn.functional.normalize(enc.encode_text(["a bicycle", "a cat"]), dim=-1)
    assert t.shape == (2, enc.embed_dim)
    bike = [[[20, 60, 100, 60, 20], [120, 80, 120, 160, 120]], [[140, 180, 220, 180, 140], [120, 80, 120, 160, 120]],
            [[60, 100, 180], [120, 60, 120]], [[100, 90], [60, 40]]]
    s = torch.nn.functional.normalize(enc.encode_sketches([bike]).embedding, dim=-1)
    sims = (s @ t.T)[0]
    assert sims[0] > sims[1]  # the bicycle drawing is closer to "a bicycle" than to "a cat"


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no shipped checkpoint")
def test_shipped_gallery_matches_shipped_checkpoint_and_finds_a_bicycle(capsys):
    """The committed default index must be built with the committed checkpoint (else the
    app would re-index on every fresh clone), and a drawn bicycle must find bicycles."""
    root = Path(__file__).resolve().parents[1]
    strokes = json.loads((root / "sbir_core" / "examples" / "bicycle.json").read_text())
    strokes = strokes["strokes"] if isinstance(strokes, dict) else strokes
    from sbir_core.data.preprocess import render_strokes

    sketch = root / "cache" / "test_bicycle.png"  # cache/ is git-ignored scratch space
    sketch.parent.mkdir(exist_ok=True)
    render_strokes(strokes).save(sketch)
    rc = main(["search", "--gallery", str(root / "galleries" / "default" / "index"), "--sketch", str(sketch),
               "--k", "3", "--json"])
    assert rc == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and hits[0]["label"] == "bicycle"


@needs_shared
@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no shipped checkpoint")
def test_seen_class_calibration_lifts_unseen_classes_among_training_class_photos(tmp_path):
    """The generalized setting on a subset: unseen PACS classes' sketches against their photos
    mixed with photos of the training classes. The shipped checkpoint's seen-class
    calibration (chosen on held-out training classes) must bring the unseen classes forward;
    without the training-class photos it must not cost the first row."""
    from sbir_core.data.datasets import training_items
    from sbir_core.gallery.calibration import SeenCalibration

    enc = create_encoder(checkpoint="default")
    if SeenCalibration.from_encoder(enc) is None:
        pytest.skip("the shipped checkpoint prescribes no seen-class calibration")
    q, g = benchmark(SHARED, "pacs")
    seen = [i for i in training_items(SHARED, hold_out_doodles=False) if i.modality == "photo"]

    def pick(items, n):
        out = []
        for label in sorted({i.label for i in items}):
            group = [i for i in items if i.label == label]
            out += [group[j] for j in np.unique(np.linspace(0, len(group) - 1, n).astype(int))]
        return out
    q, g, seen = pick(q, 8), pick(g, 12), pick(seen, 4)
    on, off = (evaluate(enc, q, g + seen, cache_dir=tmp_path, diffusion=False, calibration=c) for c in (True, False))
    assert on["hit@5"] > off["hit@5"] + 0.1 and on["mAP@all"] > off["mAP@all"] + 0.08, (on["hit@5"], off["hit@5"])
    alone_on, alone_off = (evaluate(enc, q, g, cache_dir=tmp_path, diffusion=False, calibration=c) for c in (True, False))
    assert alone_on["hit@5"] >= alone_off["hit@5"] - 0.05, (alone_on["hit@5"], alone_off["hit@5"])


@needs_shared
@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no shipped checkpoint")
def test_embedded_benchmarks_are_the_product_benchmark_as_the_encoder_embeds_it():
    """What the scoring-rule sweeps start from: every product query and gallery picture, labelled
    as bench_product labels them, embedded as `encode` embeds them (shipped model)."""
    from sbir_core.data.datasets import image_folder
    from sbir_core.eval.evaluate import embedded_benchmarks
    from sbir_core.eval.product import DEFAULT_GALLERY, product_queries

    enc = create_encoder(checkpoint="default")
    sets = embedded_benchmarks(enc, SHARED, splits=())
    queries, photos = product_queries(SHARED), image_folder(DEFAULT_GALLERY)
    assert list(sets) == ["product zero-shot", "product seen"]
    for group, (q, ql, g, gl) in sets.items():
        items = queries[group.removeprefix("product ")]
        assert ql == [it.label for it in items] and gl == [it.label for it in photos]
        assert q.shape == (len(items), enc.embed_dim) and g.shape[0] == len(photos)
        assert np.allclose(q[:3], enc.encode_sketches([it.load() for it in items[:3]]).normalized(), atol=1e-4)
    assert np.allclose(g[:3], enc.encode_photos([it.load() for it in photos[:3]]).normalized(), atol=1e-4)
