"""Explanations (correspondences, heatmap, synthesis) and the relation model / re-ranking.

Synthetic drawings only (no shared data); one raw encoder per session (conftest).
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sbir_core.explain import correspondence as E
from sbir_core.models import relation as R
from sbir_core.training import relation_training as RT
from sbir_core.explain import explanation as EXP
from sbir_core.data.preprocess import preprocess_sketch

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
    # Every line candidate (no strength threshold): a doodle against coloured blocks has
    # no confident match, and these tests check where lines may go, not how many.
    return E.explain_pair(raw_encoder, _drawing(1), _photo(), min_strength=float("-inf"))


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
    # at most LINES_PER_PHOTO_CELL lines into one photo cell
    ends = [p for _, p, _ in ex.matches]
    assert max(ends.count(p) for p in ends) <= E.LINES_PER_PHOTO_CELL
    syn = np.asarray(ex.render_synthesis(scale=1))
    # Patches cross-fade one cell beyond the ink: cells with no inked neighbour stay white.
    h, w = ex.grid
    ink = np.asarray(ex.sketch_ink).reshape(h, w)
    near = np.zeros_like(ink)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            near[max(dr, 0):h + min(dr, 0), max(dc, 0):w + min(dc, 0)] |= ink[max(-dr, 0):h + min(-dr, 0),
                                                                              max(-dc, 0):w + min(-dc, 0)]
    far = np.flatnonzero(~near.reshape(-1))
    assert len(far) > 10
    for cell in far:
        x0, y0, x1, y1 = ex.cell_box(cell)
        assert (syn[y0:y1, x0:x1] == 255).all()
    # The centre of an inked cell shows the centre of its assigned photo cell, and the
    # strokes near cell centres are painted with it.
    from sbir_core.data.preprocess import ink_mask

    field, _ = ex.synthesis_field(1)
    photo = np.asarray(ex.photo_image).astype(int)
    strokes = ink_mask(ex.sketch_image) > 200
    checked = 0
    for s in np.flatnonzero(ex.sketch_ink):
        x0, y0, x1, y1 = ex.cell_box(s)
        px0, py0, px1, py1 = ex.cell_box(int(ex.assignment[s]))
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        want = photo[(py0 + py1) // 2, (px0 + px1) // 2]
        assert np.abs(field[cy, cx] - want).max() <= 12
        qy, qx = (y1 - y0) // 4, (x1 - x0) // 4
        on = strokes[cy - qy:cy + qy, cx - qx:cx + qx]
        if on.any():
            diff = np.abs(syn[cy - qy:cy + qy, cx - qx:cx + qx].astype(int) - field[cy - qy:cy + qy, cx - qx:cx + qx])
            assert diff.max(-1)[on].max() <= 40
            checked += 1
    assert checked >= 5


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
    assert E.explain_pair(raw_encoder, strokes, pp, min_strength=float("-inf")).matches
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
    loaded = R.load_relation(path)
    assert loaded.config == model.config
    assert float(loaded.alpha) == pytest.approx(0.3)
    assert loaded.meta["encoder"] == "test" and loaded.meta["val_mAP_all"] == 0.5
    s, p = torch.randn(2, 16, 24), torch.randn(2, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(s, p), model(s, p))
    with pytest.raises(FileNotFoundError, match="train-relation"):
        R.load_relation(tmp_path / "missing.safetensors")


def test_evaluate_rerank_reports_both(model) -> None:
    rng = np.random.default_rng(0)
    Q, G = 4, 12
    res = RT.evaluate_rerank(model, rng.random((Q, G)), rng.normal(size=(Q, 16, 24)), np.ones((Q, 16), bool),
                            rng.normal(size=(G, 16, 24)), ["a", "b", "a", "b"], ["a", "b"] * 6, k=5, alphas=(0.0, 0.5))
    assert 0 <= res["base"]["mAP@all"] <= 1 and 0 <= res["with_rerank"]["mAP@all"] <= 1
    assert "0.5" in res["rerank"] and res["k"] == 5
    # the first row is reported too, and alpha 0 keeps the embedding's order
    assert set(res["base"]) >= {"hit@1", "hit@5", "P@5"}
    assert res["rerank"]["0"] == res["base"]


# ----------------------------------------------------------------------------- CLI
def test_cli_explain_writes_three_pngs(raw_encoder, tmp_path, monkeypatch, capsys) -> None:
    from sbir_core import cli
    from sbir_core.cli import main

    monkeypatch.setattr(cli.explain, "explain_encoder", lambda checkpoint: raw_encoder)
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


def test_feature_cache_is_per_item_and_ignores_the_data_root_spelling(tmp_path, monkeypatch, raw_encoder) -> None:
    """Features extracted for items listed under `../x/data` are found from `/abs/x/data`,
    and a new selection extracts only the items not seen before."""
    from conftest import make_shape_image

    from sbir_core.data.datasets import Item
    from sbir_core.eval.features import extract_features

    root = tmp_path / "shared" / "data"
    (root / "caltech101" / "cat").mkdir(parents=True)
    for i in range(4):
        make_shape_image("circle", seed=i).save(root / "caltech101" / "cat" / f"{i}.png")
    work = tmp_path / "main"
    work.mkdir()
    monkeypatch.chdir(work)
    rel = "../shared/data"

    def items(base: str, ids) -> list:
        return [Item("cat", "photo", path=f"{base}/caltech101/cat/{i}.png", key=f"{base}/caltech101/cat/{i}.png")
                for i in ids]

    first = RT.cached_features(raw_encoder, items(rel, range(3)), "photo", cache_dir=tmp_path / "cache")
    again = RT.cached_features(raw_encoder, items(str(root), range(3)), "photo", cache_dir=tmp_path / "cache",
                               allow_extract=False)
    np.testing.assert_array_equal(first["raw"], again["raw"])
    np.testing.assert_array_equal(first["tokens"], again["tokens"])
    with pytest.raises(FileNotFoundError, match="1 of 4"):
        RT.cached_features(raw_encoder, items(str(root), range(4)), "photo", cache_dir=tmp_path / "cache",
                           allow_extract=False)

    calls = []
    real = raw_encoder.backbone_features
    monkeypatch.setattr(raw_encoder, "backbone_features", lambda x: calls.append(len(x)) or real(x))
    mixed = extract_features(raw_encoder, items(rel, [3, 1, 0]), "photo", cache_dir=tmp_path / "cache")
    assert calls == [1]  # only the new item went through the backbone
    np.testing.assert_array_equal(mixed["raw"][1:], first["raw"][[1, 0]])
    assert mixed["ok"].all() and np.abs(mixed["raw"][0]).sum() > 0


# ----------------------------------------------------------------------------- correspondence benchmark
def _bench():
    """experiments/bench_correspondence.py as a module (its ground-truth helpers)."""
    from scripts_loader import load_experiment

    return load_experiment("bench_correspondence")


def test_benchmark_ground_truth_identity_and_known_maps() -> None:
    B = _bench()
    grid, size = (14, 14), (224, 224)
    ink = np.zeros(196, bool)
    ink[::3] = True
    # The identity: every cell is its own truth, and a perfect matcher scores 1.
    truth = B.true_cells(B.affine_matrix(224), grid, size)
    np.testing.assert_array_equal(truth, np.arange(196))
    s, p = B.spatial_only(ink)
    assert B.pck(s, p, truth, grid) == 1.0
    # A mirror sends column c to column w-1-c; a perfect matcher still scores 1 and the
    # spatial prior only near the middle column.
    M = B.affine_matrix(224, flip=True)
    truth = B.true_cells(M, grid, size)
    r, c = np.divmod(np.arange(196), 14)
    np.testing.assert_array_equal(truth, r * 14 + (13 - c))
    assert B.pck(s, truth[s], truth, grid) == 1.0
    assert B.pck(s, p, truth, grid) < 0.3
    # A shift by exactly one cell: truth one cell left; the same-position guess is
    # still within the one-cell tolerance, two cells is not.
    truth = B.true_cells(B.affine_matrix(224, shift=(16.0, 0.0)), grid, size)
    assert truth[14 * 5 + 6] == 14 * 5 + 5 and truth[14 * 5 + 0] == -1
    assert B.pck(s, p, truth, grid) == 1.0
    truth2 = B.true_cells(B.affine_matrix(224, shift=(32.0, 0.0)), grid, size)
    assert B.pck(s, p, truth2, grid) == 0.0
    # Any grid (a 160-px encoder's 10 x 10 one).
    np.testing.assert_array_equal(B.true_cells(B.affine_matrix(160), (10, 10), (160, 160)), np.arange(100))


def test_benchmark_warp_agrees_with_the_truth() -> None:
    """A dot drawn at a photo cell's centre, moved by a random map, lands in a sketch
    cell whose truth is that photo cell."""
    B = _bench()
    rng = np.random.default_rng(0)
    for _ in range(6):
        M, _ = B.random_affine(rng, 224)
        truth = B.true_cells(M, (14, 14), (224, 224))
        for cell in (5 * 14 + 6, 7 * 14 + 7, 9 * 14 + 4):
            img = Image.new("RGB", (224, 224), "white")
            r, c = divmod(cell, 14)
            cx, cy = (c + 0.5) * 16, (r + 0.5) * 16
            ImageDraw.Draw(img).ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill="black")
            a = np.asarray(B.warp_image(img, M).convert("L"))
            ys, xs = np.nonzero(a < 128)
            x, y = xs.mean() + 0.5, ys.mean() + 0.5
            # The dot's centre, mapped by M, is where it landed.
            want = M @ np.array([cx, cy, 1.0])
            assert abs(x - want[0]) < 1.0 and abs(y - want[1]) < 1.0
            landed = int(y // 16) * 14 + int(x // 16)
            assert B.correct([landed], [cell], truth, (14, 14))[0] == 1


def _scene(seed: int, size: int = 224) -> Image.Image:
    """A generated 'photo': distinct, asymmetric coloured shapes on a soft gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    a = np.stack([200 - 60 * y, 190 - 40 * x, 170 + 50 * y * x], -1)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = size / 224
    d.ellipse([30 * s, 30 * s, 95 * s, 95 * s], fill=(200, 40, 40), outline=(0, 0, 0), width=3)
    d.polygon([(140 * s, 20 * s), (205 * s, 90 * s), (120 * s, 100 * s)], fill=(40, 60, 180), outline=(0, 0, 0))
    d.rectangle([40 * s, 130 * s, 110 * s, 200 * s], fill=(240, 200, 30), outline=(0, 0, 0), width=3)
    d.line([(130 * s, 140 * s), (200 * s, 200 * s), (150 * s, 210 * s)], fill=(20, 120, 40), width=int(6 * s))
    for _ in range(6):
        cx, cy = rng.uniform(20, 204, 2) * s
        d.ellipse([cx - 6 * s, cy - 6 * s, cx + 6 * s, cy + 6 * s], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def test_method_beats_the_spatial_prior_on_generated_pairs(raw_encoder) -> None:
    """Edge maps of generated scenes, mirrored / rotated / shifted by a known map: the
    drawn lines land right far more often than 'same position' does."""
    from sbir_core.data.preprocess import photo_to_edges, preprocess_photo

    B = _bench()
    size = raw_encoder.image_size
    good = {"method": [], "assignment": [], "spatial": []}
    n_lines = 0
    for seed, params in enumerate([dict(angle=10.0, scale=0.9, shift=(12.0, -8.0), flip=True),
                                   dict(angle=-12.0, scale=1.05, shift=(-15.0, 10.0), flip=False),
                                   dict(angle=5.0, scale=0.85, shift=(20.0, 15.0), flip=True)]):
        scene = _scene(seed, size)
        ph = preprocess_photo(scene, size)
        M = B.affine_matrix(size, **params)
        sk = B.warp_image(photo_to_edges(scene, size), M)
        ex = E.explain_images(raw_encoder, sk, ph, min_strength=float("-inf"))
        truth = B.true_cells(M, ex.grid, sk.size)
        good["method"] += list(B.correct([m[0] for m in ex.matches], [m[1] for m in ex.matches], truth, ex.grid))
        s = np.flatnonzero(ex.sketch_ink)
        good["assignment"] += list(B.correct(s, ex.assignment[s], truth, ex.grid))
        good["spatial"] += list(B.correct(*B.spatial_only(ex.sketch_ink), truth, ex.grid))
        n_lines += len(ex.matches)
    pck = {k: np.mean([v for v in vals if v >= 0]) for k, vals in good.items()}
    assert n_lines >= 15
    assert pck["method"] >= pck["spatial"] + 0.2, pck
    assert pck["assignment"] >= pck["spatial"] + 0.1, pck


# ----------------------------------------------------------------------------- rendering quality
def _text_rows(img: Image.Image, top: int) -> np.ndarray:
    """Rows (from `top` down) holding dark text pixels."""
    a = np.asarray(img.convert("RGB")).astype(int)[top:]
    return np.flatnonzero((a.max(-1) < 90).any(1))


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_legend_text_is_large_and_below_the_images(pair_explanation, scale) -> None:
    ex = pair_explanation
    W, H = ex.image_size
    img = ex.render_correspondences(scale=scale)
    assert img.height == H * scale + ex.legend_height(scale)
    rows = _text_rows(img, H * scale)
    assert len(rows), "the legend has text"
    # Glyphs from ascender to descender ("weak", "strong", "matching parts") span at
    # least MIN_TEXT_PX pixels at the rendered resolution.
    assert rows.max() - rows.min() + 1 >= EXP.MIN_TEXT_PX >= 13
    # ... and on the page, which shows the correspondences 360 px tall, at scale 2 still >= 13 px.
    if scale == 2:
        assert (rows.max() - rows.min() + 1) * 360 / img.height >= 13
    # The legend is its own strip: text stays inside it, nothing is written over the images.
    assert rows.min() >= 1 and rows.max() < ex.legend_height(scale) - 1
    plain = ex.render_correspondences(scale=scale, legend=False)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(img)[:H * scale])


def test_legend_says_when_no_line_is_confident(pair_explanation) -> None:
    from dataclasses import replace

    ex = replace(pair_explanation, matches=[], mutual=np.zeros(0, bool))
    img = ex.render_correspondences()
    assert len(_text_rows(img, ex.image_size[1] * 2)) >= 13


def _border_energy(img: np.ndarray, ex, mask: np.ndarray) -> tuple[float, float]:
    """Mean |horizontal + vertical pixel difference| across cell borders and inside
    cells, over pixel pairs where `mask` holds on both sides."""
    a = img.astype(np.float32)
    dx = np.abs(a[:, 1:] - a[:, :-1]).sum(-1)
    dy = np.abs(a[1:] - a[:-1]).sum(-1)
    mx = mask[:, 1:] & mask[:, :-1]
    my = mask[1:] & mask[:-1]
    cw, ch = ex.cell_size
    bx = np.zeros(dx.shape[1], bool)
    bx[(np.arange(1, ex.grid[1]) * cw).astype(int) - 1] = True
    by = np.zeros(dy.shape[0], bool)
    by[(np.arange(1, ex.grid[0]) * ch).astype(int) - 1] = True
    on = np.concatenate([dx[mx & bx[None]], dy[my & by[:, None]]])
    off = np.concatenate([dx[mx & ~bx[None]], dy[my & ~by[:, None]]])
    return float(on.mean()), float(off.mean())


def test_synthesis_is_not_a_block_mosaic(pair_explanation) -> None:
    """Even with scattered assignments (every cell from a random photo cell) the patches
    cross-fade: pixel differences across cell borders are not much larger than inside
    cells, where a hard block mosaic has them several times larger."""
    from dataclasses import replace

    rng = np.random.default_rng(0)
    photo = Image.fromarray(np.asarray(_scene(3)))  # varied content, 224 px
    ink = np.zeros((14, 14), bool)
    ink[3:11, 3:11] = True
    ink = ink.reshape(-1)
    assign = np.where(ink, rng.integers(0, 196, 196), -1)
    solid = Image.new("RGB", (224, 224), "white")  # a drawing inked all over those cells
    ImageDraw.Draw(solid).rectangle([48, 48, 175, 175], fill="black")
    ex = replace(pair_explanation, sketch_image=solid, photo_image=photo, sketch_ink=ink, assignment=assign,
                 transform=None)
    syn = np.asarray(ex.render_synthesis(scale=1))
    field, cover = ex.synthesis_field(1)
    inside = cover >= 0.999
    on, off = _border_energy(syn, ex, inside)
    assert on < 1.5 * off, (on, off)
    on_f, off_f = _border_energy(field, ex, inside)
    assert on_f < 1.5 * off_f, (on_f, off_f)
    # The same assignment as hard blocks (the old rendering) is caught by this measure.
    blocks = np.full_like(syn, 255)
    ph = np.asarray(photo)
    for s in np.flatnonzero(ink):
        x0, y0, x1, y1 = ex.cell_box(s)
        px0, py0, px1, py1 = ex.cell_box(int(assign[s]))
        blocks[y0:y1, x0:x1] = ph[py0:py1, px0:px1]
    on_b, off_b = _border_energy(blocks, ex, inside)
    assert on_b > 2.5 * off_b, (on_b, off_b)


def test_other_input_size_and_grid(raw_encoder, monkeypatch) -> None:
    """Nothing assumes 224 px or 14 x 14: a 160-px encoder gives a 10 x 10 explanation."""
    monkeypatch.setattr(raw_encoder, "image_size", 160)
    ex = E.explain_pair(raw_encoder, _drawing(2), _photo())
    assert ex.grid == (10, 10) and ex.image_size == (160, 160)
    assert ex.similarity.shape == (100, 100) and ex.assignment.shape == (100,)
    assert ex.render_correspondences().size == (2 * 320 + 16, 320 + ex.legend_height(2))
    assert ex.render_synthesis().size == (320, 320) and ex.render_heatmap().size == (320, 320)
    assert all(v >= E.MATCH_THRESHOLD for _, _, v in ex.matches)


def test_relation_validates_on_the_classes_a_fine_tuned_encoder_never_trained_on() -> None:
    shared, photo_only = ["ant", "cat", "cup", "dog", "fish"], ["chair", "lamp"]
    train, val, train_po, val_po = RT.relation_split(shared, photo_only, ["fish", "lamp", "ant"], 0.15,
                                                     np.random.default_rng(0))
    assert (train, val, train_po, val_po) == (["cat", "cup", "dog"], ["ant", "fish"], ["chair"], ["lamp"])
    # a raw backbone names none: a random split, every class on one side
    train, val, _, _ = RT.relation_split(shared, photo_only, [], 0.4, np.random.default_rng(0))
    assert sorted(train + val) == shared and len(val) >= 2


def test_eval_relation_refuses_heads_whose_backbone_was_fine_tuned(tmp_path) -> None:
    """The shipped checkpoint's heads read its own fine-tuned features, not a relation model's."""
    from sbir_core.errors import InputError
    from sbir_core.paths import checkpoint_path

    with pytest.raises(InputError, match="fine-tuned its backbone"):
        RT.benchmark_rerank(tmp_path, "pacs", checkpoint_path("relation"), embedding=str(checkpoint_path("default")))


def test_a_relation_model_is_used_only_with_the_encoder_it_was_trained_for(model, tmp_path) -> None:
    from sbir_core.errors import InputError

    encoder = SimpleNamespace(image_size=32, encoder_id="efficientnet-lite0@aaaa",
                              backbone_features=lambda x: SimpleNamespace(grid=(4, 4)))
    mine = R.save_relation(tmp_path / "mine.safetensors", model, {"encoder": "efficientnet-lite0",
                                                                 "base_embedding": "efficientnet-lite0@aaaa"})
    other = R.save_relation(tmp_path / "other.safetensors", model, {"encoder": "efficientnet-lite0",
                                                                   "base_embedding": "efficientnet-lite0@bbbb"})
    old = R.save_relation(tmp_path / "old.safetensors", model, {"encoder": "efficientnet-lite0",
                                                               "base_embedding": "raw backbone cosine"})
    assert R.relation_for(encoder, mine) is not None and R.relation_for(encoder, old) is not None
    with pytest.raises(InputError, match="trained on the tokens of efficientnet-lite0@bbbb"):
        R.relation_for(encoder, other)
    with pytest.raises(InputError, match="reads 4x4 token grids"):
        R.relation_for(SimpleNamespace(**{**vars(encoder), "backbone_features": lambda x: SimpleNamespace(grid=(5, 5))}),
                       mine)
