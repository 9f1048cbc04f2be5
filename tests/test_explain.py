"""Explanations (correspondences, heatmap, synthesis) and the relation model / re-ranking.

Synthetic drawings only (no shared data); one raw encoder per session (conftest).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sbir_core import explain as E
from sbir_core import relation as R
from sbir_core.preprocess import preprocess_sketch

torch.set_num_threads(1)


def _drawing(seed: int = 0, size: int = 300) -> Image.Image:
    """A black-on-white doodle: a house-like outline with a few strokes."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([60, 120, 240, 260], outline="black", width=5)
    d.line([(50, 125), (150, 40), (250, 125)], fill="black", width=5)
    d.ellipse([100, 160, 140, 200], outline="black", width=4)
    for _ in range(3):
        x0, y0 = rng.integers(70, 230, size=2)
        d.line([(int(x0), int(y0)), (int(x0) + 20, int(y0) + 30)], fill="black", width=4)
    return img


def _photo(size: int = 260) -> Image.Image:
    rng = np.random.default_rng(3)
    a = np.zeros((size, size, 3), np.uint8)
    a[:] = (90, 140, 200)
    a[size // 2:] = (60, 150, 70)
    a[80:200, 60:200] = (180, 60, 40)
    a = np.clip(a.astype(int) + rng.integers(-20, 20, size=a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def sketch_image(raw_encoder):
    return preprocess_sketch(_drawing(), raw_encoder.image_size)


@pytest.fixture(scope="module")
def self_explanation(raw_encoder, sketch_image):
    st, pt, grid = E.encode_pair_tokens(raw_encoder, sketch_image, sketch_image)
    return E.explain_tokens(sketch_image, sketch_image, st, pt, grid)


@pytest.fixture(scope="module")
def pair_explanation(raw_encoder):
    return E.explain_pair(raw_encoder, _drawing(1), _photo())


# ----------------------------------------------------------------------------- ink cells
def test_ink_cells_marks_only_cells_with_ink() -> None:
    img = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(img).line([(0, 40), (223, 40)], fill="black", width=3)  # row 2 of 16-px cells
    cells = R.ink_cells(img, (14, 14))
    assert cells.shape == (14, 14) and cells.dtype == bool
    assert cells[2].all() and cells.sum() == 14
    assert not R.ink_cells(Image.new("RGB", (224, 224), "white"), (14, 14)).any()
    # Uneven geometry still partitions the image.
    assert R.ink_cells(img.resize((100, 90)), (7, 7)).shape == (7, 7)


# ----------------------------------------------------------------------------- explanations
def test_grid_geometry_matches_the_encoder(raw_encoder, self_explanation) -> None:
    ex = self_explanation
    out = raw_encoder.encode_sketches([ex.sketch_image])
    assert ex.grid == tuple(out.grid) == (14, 14)
    cw, ch = ex.cell_size
    assert cw * ex.grid[1] == ex.image_size[0] == raw_encoder.image_size
    assert ch * ex.grid[0] == ex.image_size[1] == raw_encoder.image_size
    assert ex.similarity.shape == (196, 196)
    assert ex.cell_box(0) == (0, 0, 16, 16) and ex.cell_box(195) == (208, 208, 224, 224)


def test_image_explained_against_itself_maps_every_inked_cell_to_itself(raw_encoder, sketch_image,
                                                                        self_explanation) -> None:
    st, pt, grid = E.encode_pair_tokens(raw_encoder, sketch_image, sketch_image)
    for ex in (self_explanation, E.explain_tokens(sketch_image, sketch_image, st, pt, grid, prior_weight=0.0)):
        ink = np.flatnonzero(ex.sketch_ink)
        assert len(ink) > 10
        np.testing.assert_array_equal(ex.assignment[ink], ink)
        assert (ex.assignment[~ex.sketch_ink] == -1).all()
        assert ex.matches and all(s == p for s, p, _ in ex.matches)
        assert ex.mutual.all()


def test_blank_cells_draw_no_lines_and_stay_white(pair_explanation) -> None:
    ex = pair_explanation
    assert ex.matches
    assert all(ex.sketch_ink[s] for s, _, _ in ex.matches)
    assert len({s for s, _, _ in ex.matches}) == len(ex.matches)  # one line per sketch cell
    syn = np.asarray(ex.render_synthesis(scale=1))
    for cell in np.flatnonzero(~ex.sketch_ink)[:20]:
        x0, y0, x1, y1 = ex.cell_box(cell)
        assert (syn[y0:y1, x0:x1] == 255).all()
    # Inked cells carry the pixels of their assigned photo cell.
    s = int(np.flatnonzero(ex.sketch_ink)[0])
    x0, y0, x1, y1 = ex.cell_box(s)
    px0, py0, px1, py1 = ex.cell_box(int(ex.assignment[s]))
    np.testing.assert_array_equal(syn[y0:y1, x0:x1], np.asarray(ex.photo_image)[py0:py1, px0:px1])


def test_renders_have_expected_size_and_are_not_blank(pair_explanation, tmp_path) -> None:
    ex = pair_explanation
    W, H = ex.image_size
    corr = ex.render_correspondences(scale=2, gap=16, legend=True)
    assert corr.size == (2 * W * 2 + 16, H * 2 + 34)
    assert ex.render_correspondences(scale=1, legend=False).size == (2 * W + 16, H)
    for img, size in ((corr, corr.size), (ex.render_heatmap(), (W * 2, H * 2)), (ex.render_synthesis(), (W * 2, H * 2))):
        a = np.asarray(img).astype(np.float32)
        assert img.size == size
        assert a.std() > 0 and (a < 250).any()
    assert ex.heatmap.shape == ex.grid and 0 <= ex.heatmap.min() and ex.heatmap.max() <= 1
    paths = ex.save(tmp_path / "out")
    for name in ("correspondences.png", "heatmap.png", "synthesis.png"):
        assert (tmp_path / "out" / name).is_file()
    info = json.loads(paths["json"].read_text())
    assert info["grid"] == [14, 14] and len(info["matches"]) == len(ex.matches)


def test_explain_pair_accepts_paths_and_strokes(raw_encoder, tmp_path) -> None:
    sp, pp = tmp_path / "s.png", tmp_path / "p.jpg"
    _drawing(2).save(sp)
    _photo().save(pp)
    ex = E.explain_pair(raw_encoder, str(sp), pp)
    assert ex.token_source == "backbone" and ex.relation_score is None
    strokes = [[[10, 100, 200, 60], [10, 120, 30, 200]], [[50, 150], [150, 50]]]
    assert E.explain_pair(raw_encoder, strokes, pp).matches
    with pytest.raises(FileNotFoundError):
        E.explain_pair(raw_encoder, tmp_path / "missing.png", pp)


def test_explain_with_relation_model(raw_encoder) -> None:
    torch.manual_seed(0)
    model = R.RelationModel(token_dim=raw_encoder.backbone.token_dim, grid=(14, 14)).eval()
    ex = E.explain_pair(raw_encoder, _drawing(0), _photo(), relation=model)
    assert ex.token_source == "relation"
    assert 0.0 <= ex.relation_score <= 1.0
    assert all(ex.sketch_ink[s] for s, _, _ in ex.matches)
    assert ex.similarity.shape == (196, 196)


def test_match_cells_falls_back_to_top_matches() -> None:
    rng = np.random.default_rng(0)
    sim = rng.random((16, 16)).astype(np.float32)
    sim[:, 0] += 5  # every sketch cell prefers photo cell 0: only one mutual pair
    ink = np.zeros(16, bool)
    ink[:10] = True
    matches, mutual, assignment = E.match_cells(sim, ink, min_matches=6)
    assert len(matches) == 6 and mutual.sum() == 1
    assert all(ink[s] for s, _, _ in matches)
    assert (assignment[~ink] == -1).all() and (assignment[ink] == 0).all()
    assert E.match_cells(sim, np.zeros(16, bool))[0] == []


# ----------------------------------------------------------------------------- relation model
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return R.RelationModel(token_dim=24, dim=32, heads=4, grid=(4, 4)).eval()


def test_relation_forward_shapes_and_mask_handling(model) -> None:
    torch.manual_seed(1)
    s, p = torch.randn(3, 16, 24), torch.randn(3, 16, 24)
    ink = torch.zeros(3, 16, dtype=torch.bool)
    ink[:, :6] = True
    with torch.no_grad():
        out = model(s, p, ink)
        assert out.shape == (3,) and torch.isfinite(out).all()
        # Blank cells get no vote: changing their tokens changes nothing.
        s2 = s.clone()
        s2[:, 6:] = torch.randn(3, 10, 24) * 10
        torch.testing.assert_close(model(s2, p, ink), out)
        # (B, h, w) masks work too; an all-blank sketch does not produce NaN.
        torch.testing.assert_close(model(s, p, ink.view(3, 4, 4)), out)
        assert torch.isfinite(model(s, p, torch.zeros(3, 16, dtype=torch.bool))).all()
        # One sketch against many photos (the re-ranking path) == the batched path.
        one = model(s[:1], p, ink[:1])
        many = model(s[:1].expand(3, -1, -1), p, ink[:1].expand(3, -1))
        torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
        sim = model.similarity(s, p, ink)
        assert sim.shape == (3, 16, 16) and sim.abs().max() <= 1 + 1e-5


def test_cross_attention_uses_the_other_sides_values(model) -> None:
    """Textbook cross-attention: the sketch side's output depends on the photo's values."""
    torch.manual_seed(2)
    s, p = torch.randn(1, 16, 24), torch.randn(1, 16, 24)
    with torch.no_grad():
        a, _ = model.embed_pair(s, p)
        b, _ = model.embed_pair(s, p * 3 + 1)
    assert not torch.allclose(a, b)


def test_masked_quantiles() -> None:
    x = torch.tensor([[5.0, 1.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, True, False]])
    q = R.masked_quantiles(x, m, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(q, torch.tensor([[5.0, 3.0, 1.0]]))


def test_rerank_only_touches_the_top_k(model) -> None:
    rng = np.random.default_rng(0)
    G, k = 40, 7
    scores = rng.random(G).astype(np.float32)
    tokens = rng.normal(size=(G, 16, 24)).astype(np.float32)
    q = rng.normal(size=(16, 24)).astype(np.float32)
    ink = np.ones(16, bool)
    asked = []

    def fetch(idx):
        asked.append(np.array(idx))
        return tokens[idx]

    new = R.rerank_gallery(model, q, ink, fetch, scores, k=k, alpha=0.7)
    top = np.argsort(-scores)[:k]
    assert len(asked) == 1 and set(asked[0].tolist()) == set(top.tolist())
    rest = np.setdiff1d(np.arange(G), top)
    np.testing.assert_array_equal(new[rest], scores[rest])
    assert new[top].min() >= scores[rest].max()
    assert new[top].min() >= scores[top].min() - 1e-6 and new[top].max() <= scores[top].max() + 1e-6
    # An array works the same as a fetch function; alpha 0 changes nothing.
    np.testing.assert_allclose(R.rerank_gallery(model, q, ink, tokens, scores, k=k, alpha=0.7), new, atol=1e-6)
    np.testing.assert_array_equal(R.rerank_gallery(model, q, ink, tokens, scores, k=k, alpha=0.0), scores)
    with pytest.raises(ValueError):
        R.rerank(model, q, ink, tokens[:3], scores[:4], 0.5)


def test_relation_save_load_round_trip(model, tmp_path) -> None:
    model.alpha.fill_(0.3)
    path = R.save_relation(tmp_path / "rel.safetensors", model, {"encoder": "test", "val_mAP_all": 0.5})
    loaded = E.load_relation(path)
    assert loaded.config == model.config
    assert float(loaded.alpha) == pytest.approx(0.3)
    assert loaded.meta["encoder"] == "test" and loaded.meta["val_mAP_all"] == 0.5
    s, p = torch.randn(2, 16, 24), torch.randn(2, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(s, p), model(s, p))
    with pytest.raises(FileNotFoundError, match="train-relation"):
        E.load_relation(tmp_path / "missing.safetensors")


def test_evaluate_rerank_reports_both(model) -> None:
    rng = np.random.default_rng(0)
    Q, G = 4, 12
    res = R.evaluate_rerank(model, rng.random((Q, G)), rng.normal(size=(Q, 16, 24)), np.ones((Q, 16), bool),
                            rng.normal(size=(G, 16, 24)), ["a", "b", "a", "b"], ["a", "b"] * 6, k=5, alphas=(0.5,))
    assert 0 <= res["base"]["mAP@all"] <= 1 and 0 <= res["with_rerank"]["mAP@all"] <= 1
    assert "0.5" in res["rerank"] and res["k"] == 5


# ----------------------------------------------------------------------------- CLI
def test_cli_explain_writes_three_pngs(raw_encoder, tmp_path, monkeypatch, capsys) -> None:
    from sbir_core import cli
    from sbir_core.cli import main

    monkeypatch.setattr(cli, "_explain_encoder", lambda checkpoint: raw_encoder)
    sp, pp = tmp_path / "s.png", tmp_path / "p.png"
    _drawing(4).save(sp)
    _photo().save(pp)
    rc = main(["explain", "--sketch", str(sp), "--photo", str(pp), "--out", str(tmp_path / "o"), "--relation", "none"])
    assert rc == 0
    for name in ("correspondences.png", "heatmap.png", "synthesis.png"):
        assert (tmp_path / "o" / name).is_file()
    assert main(["explain", "--sketch", str(tmp_path / "nope.png"), "--photo", str(pp), "--out",
                 str(tmp_path / "o2"), "--relation", "none"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cached_features_found_under_another_spelling_of_the_data_root(tmp_path, monkeypatch) -> None:
    """A cache written for items listed under `../x/data` is found from `/abs/x/data`."""
    from types import SimpleNamespace

    from sbir_core.data import Item
    from sbir_core.features import cache_path

    root = tmp_path / "shared" / "data"
    (root / "caltech101" / "cat").mkdir(parents=True)
    work = tmp_path / "main"
    work.mkdir()
    monkeypatch.chdir(work)
    rel = "../shared/data"
    items_rel = [Item("cat", "photo", path=f"{rel}/caltech101/cat/{i}.jpg", key=f"{rel}/caltech101/cat/{i}.jpg")
                 for i in range(3)]
    enc = SimpleNamespace(backbone=SimpleNamespace(name="fake-net"))
    p = cache_path(tmp_path / "cache", "fake-net", "photo", items_rel, 0, True)
    p.parent.mkdir(parents=True)
    np.savez(p, raw=np.arange(3.0), ok=np.ones(3, bool))
    items_abs = [Item(it.label, it.modality, path=str(root) + it.path[len(rel):], key=str(root) + it.key[len(rel):])
                 for it in items_rel]
    out = R.cached_features(enc, items_abs, "photo", str(root), cache_dir=tmp_path / "cache", allow_extract=False)
    np.testing.assert_array_equal(out["raw"], np.arange(3.0))
    with pytest.raises(FileNotFoundError):
        R.cached_features(enc, items_abs[:2], "photo", str(root), cache_dir=tmp_path / "cache", allow_extract=False)
