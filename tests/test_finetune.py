"""The end-to-end fine-tuning that produces the shipped encoder, on tiny generated data:
losses, knowledge preservation, resumable state."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from shared_data import SHARED, needs_shared
from sbir_core.training.config import FinetuneConfig
from sbir_core.training.finetune import Finetuner, retrieval_summary
from sbir_core.models.encoders import EfficientNetLiteBackbone
from sbir_core.training.losses import imagenet_kept, relations_kept, semantic_targets
from sbir_core.training.finetune_data import TrainData, heldout_classes, run_heldout_classes

pytestmark = pytest.mark.slow  # trains small models end to end

torch.set_num_threads(1)
SHAPES = ("circle", "square", "triangle", "cross")


def _shape_strokes(kind: str, rng: np.random.Generator) -> list:
    """A wobbly doodle of one shape, as [[xs, ys], ...] strokes."""
    j = lambda v: [float(a + rng.normal(0, 3)) for a in v]  # noqa: E731
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 24)
        return [[j(50 + 40 * np.cos(t)), j(50 + 40 * np.sin(t))]]
    if kind == "square":
        return [[j([10, 90, 90, 10, 10]), j([10, 10, 90, 90, 10])]]
    if kind == "triangle":
        return [[j([50, 90, 10, 50]), j([10, 90, 90, 10])]]
    return [[j([10, 90]), j([10, 90])], [j([90, 10]), j([10, 90])]]


def _photo(kind: str, big: int, rng: np.random.Generator) -> tuple[np.ndarray, Image.Image]:
    img = Image.new("RGB", (big, big), tuple(int(c) for c in rng.integers(150, 255, 3)))
    d = ImageDraw.Draw(img)
    fill = tuple(int(c) for c in rng.integers(0, 120, 3))
    s = big / 100
    pts = {"circle": None, "square": [(10, 10), (90, 10), (90, 90), (10, 90)],
           "triangle": [(50, 10), (90, 90), (10, 90)], "cross": [(40, 5), (60, 5), (60, 95), (40, 95)]}[kind]
    if pts is None:
        d.ellipse([10 * s, 10 * s, 90 * s, 90 * s], fill=fill)
    else:
        d.polygon([(x * s, y * s) for x, y in pts], fill=fill)
    edges = Image.new("L", (big, big), 255)
    ImageDraw.Draw(edges).rectangle([8 * s, 8 * s, 92 * s, 92 * s], outline=0, width=2)
    return np.asarray(img), edges


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    size, big = 64, 70
    photos, edges, yp, sketches, ys = [], [], [], [], []
    for c, kind in enumerate(SHAPES * 2):  # 8 classes: each shape twice, told apart by the text only
        for _ in range(6):
            a, e = _photo(kind, big, rng)
            photos.append(a), edges.append(e), yp.append(c)
        for _ in range(6):
            sketches.append(_shape_strokes(kind, rng)), ys.append(c)
    td = TrainData(photos=np.stack(photos), edges=edges, photo_labels=np.array(yp), sketches=sketches,
                   sketch_labels=np.array(ys), classes=[f"c{i}" for i in range(8)])
    text = torch.nn.functional.normalize(torch.randn(8, 24, generator=torch.Generator().manual_seed(0)), dim=-1)
    return td, text, size


def _cfg(size: int, **kw) -> FinetuneConfig:
    return FinetuneConfig(**{**dict(image_size=size, steps=4, photos_per_step=4, sketches_per_step=4,
                                    doodle_photos_per_step=2, embed_dim=16, hidden=32, warmup=1, val_every=2,
                                    val_fraction=0.25), **kw})


def test_relations_kept_is_zero_only_when_the_photo_structure_is_kept():
    feats = torch.randn(6, 32, generator=torch.Generator().manual_seed(1)).abs()
    teacher = SimpleNamespace(features=lambda x: SimpleNamespace(pooled=feats))
    photos, mean = torch.zeros(6, 3, 8, 8), torch.zeros(1, 3, 1, 1)
    kept = relations_kept(teacher, photos, feats - feats.mean(0), mean)
    shuffled = relations_kept(teacher, photos, (feats - feats.mean(0))[torch.tensor([3, 0, 5, 1, 4, 2])], mean)
    assert kept.item() == pytest.approx(0.0, abs=1e-5)
    assert shuffled.item() > 0.05


def test_a_step_computes_every_loss_and_trains_the_backbone(tiny):
    td, text, size = tiny
    cfg = _cfg(size, w_preserve=1.0)
    held = heldout_classes(td, cfg.val_fraction, cfg.seed)
    ft = Finetuner(cfg, td, text, held)
    before = {k: v.clone() for k, v in ft.model.backbone.net.blocks[5].state_dict().items()}
    frozen = {k: v.clone() for k, v in ft.model.backbone.net.blocks[0].state_dict().items()}
    logs = ft.step()
    assert set(logs) == {"text", "triplet", "pair", "preserve"}
    assert all(np.isfinite(v) for v in logs.values())
    after = ft.model.backbone.net.blocks[5].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "trainable blocks did not move"
    assert all(torch.equal(frozen[k], v) for k, v in ft.model.backbone.net.blocks[0].state_dict().items())
    # the teacher stays the ImageNet backbone
    assert not any(p.requires_grad for p in ft.teacher.parameters())


def test_imagenet_kept_is_lowest_when_the_student_predicts_as_the_teacher(tiny):
    td, text, size = tiny
    teacher = EfficientNetLiteBackbone("efficientnet-lite0", image_size=size)
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    mean = torch.full((1, 3, 1, 1), 0.5)
    with torch.no_grad():
        own = teacher.net.classifier(teacher.features((images - mean) / 0.5).raw)
    same = imagenet_kept(teacher, images, own, mean)
    # the cross-entropy of a distribution with itself is its entropy, the minimum over students
    for other in (own[[2, 0, 1]], own * 0.3, torch.zeros_like(own)):
        assert imagenet_kept(teacher, images, other, mean) > same + 0.1


def _teacher_entropy(ft: Finetuner, x: torch.Tensor) -> float:
    """The ImageNet term's value while the student still predicts as the teacher: the entropy
    of the teacher's softened predictions (temperature 2, times its square)."""
    with torch.no_grad():
        p = F.softmax(ft.teacher.net.classifier(ft.teacher.features((x - ft.model.mean) / 0.5).raw) / 2.0, -1)
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item() * 4.0


def test_imagenet_term_trains_the_classifier_and_starts_where_the_teacher_is(tiny):
    td, text, size = tiny
    cfg = _cfg(size, w_imagenet=1.0)
    ft = Finetuner(cfg, td, text, heldout_classes(td, cfg.val_fraction, cfg.seed))
    batch = ft.batches[0]
    x = torch.cat([batch[0], batch[1], batch[2]])
    entropy = _teacher_entropy(ft, x)  # at the start the student is the teacher
    w = ft.model.backbone.net.classifier.weight.clone()
    logs = ft.step(batch)
    assert set(logs) == {"text", "triplet", "pair", "imagenet"}
    assert logs["imagenet"] == pytest.approx(entropy, rel=1e-3)
    assert not torch.equal(w, ft.model.backbone.net.classifier.weight)
    assert not any(p.requires_grad for p in ft.teacher.parameters())
    off = Finetuner(_cfg(size), td, text, heldout_classes(td, cfg.val_fraction, cfg.seed))
    assert not off.model.backbone.net.classifier.weight.requires_grad
    with pytest.raises(ValueError, match="imagenet_images"):
        Finetuner(_cfg(size, w_imagenet=1.0, imagenet_images="sketches"), td, text,
                  heldout_classes(td, cfg.val_fraction, cfg.seed))
    photos = Finetuner(_cfg(size, w_imagenet=1.0, imagenet_images="photos"), td, text,
                       heldout_classes(td, cfg.val_fraction, cfg.seed))
    assert photos.step(batch)["imagenet"] == pytest.approx(_teacher_entropy(photos, batch[0]), rel=1e-3)


def test_semantic_targets_spread_over_the_classes_whose_names_are_closest():
    # Names as vectors: 0 and 1 close, 2 far from both, 3 opposite to 0.
    text = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    t = semantic_targets(text, 0.2, 0.05)
    assert torch.allclose(t.sum(1), torch.ones(4)) and torch.allclose(t.diagonal(), torch.full((4,), 0.8))
    assert t[0].argsort(descending=True)[:2].tolist() == [0, 1] and t[0, 1] > 0.19  # almost all to its neighbour
    assert t[0, 3] < 1e-6
    assert semantic_targets(text, 0.0, 0.05) is None  # one-hot: the plain cross-entropy
    with pytest.raises(ValueError, match="semantic smoothing"):
        semantic_targets(text, 1.0, 0.05)


def test_semantic_smoothing_changes_the_text_loss_only(tiny):
    td, text, size = tiny
    plain, smooth = _cfg(size), _cfg(size, semantic_smoothing=0.3)
    held = heldout_classes(td, plain.val_fraction, plain.seed)
    a, b = Finetuner(plain, td, text, held), Finetuner(smooth, td, text, held)
    batch = a.batches[0]
    torch.manual_seed(5)  # the same dropout masks in both steps
    la = a.step(batch)
    torch.manual_seed(5)
    lb = b.step(batch)
    assert la["text"] != pytest.approx(lb["text"], abs=1e-4)
    assert la["pair"] == pytest.approx(lb["pair"], rel=1e-5) and la["triplet"] == pytest.approx(lb["triplet"], rel=1e-5)


def test_preservation_off_builds_no_teacher(tiny):
    td, text, size = tiny
    cfg = _cfg(size)
    ft = Finetuner(cfg, td, text, heldout_classes(td, cfg.val_fraction, cfg.seed))
    assert ft.teacher is None and "preserve" not in ft.step()


@pytest.mark.parametrize("extra", [{"w_preserve": 0.5}, {"w_imagenet": 0.5}, {"ema": 0.9}],
                         ids=["preserve", "imagenet", "ema"])
def test_training_resumes_where_it_stopped(tiny, tmp_path, extra):
    """A run stopped after its first validation and resumed ends exactly as one uninterrupted run."""
    td, text, size = tiny
    cfg = _cfg(size, **extra)
    held = heldout_classes(td, cfg.val_fraction, cfg.seed)
    whole = Finetuner(cfg, td, text, held)
    whole.fit()

    state = tmp_path / "run.state.pt"
    first = Finetuner(cfg, td, text, held)
    real_step, calls = first.step, []

    def interrupted(batch=None) -> dict:  # the machine goes down during step 3, after the state of step 2 was saved
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(batch)

    first.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.fit(state)
    resumed = Finetuner(cfg, td, text, held)
    resumed.fit(state)
    assert resumed.step_no == whole.step_no == 4
    assert [h["step"] for h in resumed.history] == [h["step"] for h in whole.history]
    for a, b in zip(resumed.history, whole.history):
        assert a["mAP@all"] == pytest.approx(b["mAP@all"], abs=1e-5)
    for (k, a), b in zip(resumed.model.state_dict().items(), whole.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_ema_is_validated_and_kept_while_training_follows_the_raw_weights(tiny):
    """With `ema`, validation and the kept model use the weights' moving average (TensorFlow's
    warm-up ramp); training itself steps the raw weights."""
    td, text, size = tiny
    cfg = _cfg(size, val_every=4, ema=0.6)  # one validation, at the last step: it is the kept one
    held = heldout_classes(td, cfg.val_fraction, cfg.seed)
    plain, ft = Finetuner(_cfg(size, val_every=4), td, text, held), Finetuner(cfg, td, text, held)
    names = [k for k, _ in ft.model.named_parameters()]
    expect = {k: v.detach().clone() for k, v in ft.model.named_parameters()}
    real_step = ft.step

    def tracked(batch=None) -> dict:
        out = real_step(batch)
        n = ft.step_no - 1  # updates before this one
        d = min(0.6, (1 + n) / (10 + n)) if n else 0.0  # the first update copies the weights
        for k, v in ft.model.named_parameters():
            expect[k] = d * expect[k] + (1 - d) * v.detach()
        return out

    ft.step = tracked
    plain.fit()
    ft.fit()
    averaged = dict(ft.ema.module.named_parameters())
    kept = dict(ft.model.named_parameters())  # what fit() left in the model (best = step 4)
    assert ft.best["step"] == 4
    for k in names:
        assert torch.allclose(averaged[k], expect[k], atol=1e-6), k
        assert torch.allclose(kept[k], expect[k], atol=1e-6), k
    trained = [k for k in names if not torch.allclose(dict(plain.model.named_parameters())[k], expect[k], atol=1e-6)]
    assert trained, "the kept weights must be the average, not the last step's"
    with pytest.raises(ValueError, match="ema takes a decay"):  # refused by the config, before any training
        Finetuner(_cfg(size, ema=1.5), td, text, held)


def test_interpolation_with_imagenet_is_chosen_on_held_out_classes_and_applied(tiny):
    from sbir_core.models.encoders import EfficientNetLiteBackbone

    td, text, size = tiny
    cfg = _cfg(size, interpolate=(1.0, 0.5))
    ft = Finetuner(cfg, td, text, heldout_classes(td, cfg.val_fraction, cfg.seed))
    ft.fit()
    trained = {k: v.clone() for k, v in ft.model.backbone.net.state_dict().items()}
    start = EfficientNetLiteBackbone(cfg.encoder, image_size=size).net.state_dict()
    key = next(k for k in trained if k.startswith("blocks.6") and trained[k].is_floating_point()
               and not torch.equal(trained[k], start[k]))
    alpha, rows = ft.choose_interpolation()
    assert set(rows) == {"1.0", "0.5"}
    assert alpha == float(max(rows, key=lambda a: (round(rows[a]["score"], 4), float(a))))
    assert torch.allclose(ft.model.backbone.net.state_dict()[key], alpha * trained[key] + (1 - alpha) * start[key],
                          atol=1e-6)
    val = ft.validate()
    assert rows[str(alpha)]["score"] == pytest.approx(0.5 * (val["hit@5"] + val["mAP@all"]))

    ft.model.backbone.net.load_state_dict(trained)
    ft.cfg.interpolate = (0.5,)  # one choice: the model is left with that mix
    assert ft.choose_interpolation()[0] == 0.5
    assert torch.allclose(ft.model.backbone.net.state_dict()[key], 0.5 * trained[key] + 0.5 * start[key], atol=1e-6)

    before = {k: v.clone() for k, v in ft.model.backbone.net.state_dict().items()}
    ft.cfg.interpolate = (1.0,)  # off: nothing mixed, the selected step's validation reported
    assert ft.choose_interpolation() == (1.0, {"1.0": ft.best})
    assert all(torch.equal(before[k], v) for k, v in ft.model.backbone.net.state_dict().items())

    ft.cfg.interpolate = (0.0,)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        ft.choose_interpolation()


def test_zero_steps_keeps_the_initial_model(tiny, tmp_path):
    """--steps 0 with --init: select, interpolate and calibrate a trained checkpoint only."""
    td, text, size = tiny
    cfg = _cfg(size)
    cfg.steps = 0
    ft = Finetuner(cfg, td, text, heldout_classes(td, cfg.val_fraction, cfg.seed))
    before = {k: v.clone() for k, v in ft.model.state_dict().items()}
    result = ft.fit()
    assert result["best"]["step"] == 0 and result["history"] == []
    assert all(torch.equal(before[k], v) for k, v in ft.model.state_dict().items())


def test_selection_also_scores_seen_classes_on_held_out_doodles(tiny):
    """With held-out doodles of training classes, selection averages the zero-shot score with a
    seen-class one (doodles against clip-art-coloured doodles of their class); without, it is
    the zero-shot score alone."""
    td, text, size = tiny
    cfg = _cfg(size)
    held = heldout_classes(td, cfg.val_fraction, cfg.seed)
    plain = Finetuner(cfg, td, text, held).validate()
    assert not any(k.startswith("seen_") for k in plain)
    assert plain["score"] == pytest.approx(0.5 * (plain["hit@5"] + plain["mAP@all"]))

    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(8), 5)
    with_seen = TrainData(**{**td.__dict__, "val_doodles": [_shape_strokes(SHAPES[c % 4], rng) for c in labels],
                             "val_doodle_labels": labels})
    ft = Finetuner(cfg, with_seen, text, held)
    val = ft.validate()
    qs, ql, gs, gl = ft._seen_split()
    train_classes = np.flatnonzero(~held)
    # held-out classes stay out; per class 2 gallery pictures and 3 queries
    assert sorted(set(ql)) == sorted(set(gl)) == list(train_classes)
    assert len(qs) == 3 * len(train_classes) and len(gs) == 2 * len(train_classes)
    assert val["seen_n_queries"] == len(qs)
    seen = 0.5 * (val["seen_hit@5"] + val["seen_mAP@all"])
    assert val["score"] == pytest.approx(0.5 * (0.5 * (val["hit@5"] + val["mAP@all"]) + seen))
    assert ft.validate()["score"] == pytest.approx(val["score"])  # the same split every time


@needs_shared
def test_selection_doodles_are_held_out_and_outside_the_product_benchmark():
    from sbir_core.data.datasets import training_items
    from sbir_core.eval.product import product_classes, product_queries
    from sbir_core.training.finetune_data import selection_doodles

    data = SHARED
    items = training_items(data)
    classes = sorted({i.label for i in items})
    val = selection_doodles(data, classes)
    assert len(val) > 1000
    assert not {i.label for i in val} & product_classes(data)
    assert not {i.key for i in val} & {i.key for i in items}  # never trained on
    bench = {i.key for group in product_queries(data).values() for i in group}
    assert not {i.key for i in val} & bench


def test_zero_shot_selection_ignores_the_seen_doodles(tiny):
    """--select zero-shot (how the earlier runs selected) scores held-out classes only."""
    td, text, size = tiny
    labels = np.repeat(np.arange(8), 5)
    rng = np.random.default_rng(5)
    with_seen = TrainData(**{**td.__dict__, "val_doodles": [_shape_strokes(SHAPES[c % 4], rng) for c in labels],
                             "val_doodle_labels": labels})
    cfg = _cfg(size, select="zero-shot")
    val = Finetuner(cfg, with_seen, text, heldout_classes(td, cfg.val_fraction, cfg.seed)).validate()
    assert not any(k.startswith("seen_") for k in val)
    assert val["score"] == pytest.approx(0.5 * (val["hit@5"] + val["mAP@all"]))
    with pytest.raises(ValueError, match="select takes one of"):
        Finetuner(_cfg(size, select="benchmark"), with_seen, text, heldout_classes(td, 0.25, 0)).validate()


def test_batches_made_by_worker_processes_train_the_same_model(tiny):
    """A step's batch depends on its step only: two DataLoader workers give the very run of none."""
    td, text, size = tiny
    held = heldout_classes(td, 0.25, 0)
    runs = []
    for workers in (0, 2):
        ft = Finetuner(_cfg(size, workers=workers, device="cpu"), td, text, held)
        ft.fit()
        runs.append(ft)
    for (k, a), b in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b), k
    first = runs[0].batches[1]
    again = runs[1].batches[1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], runs[0].batches[2][0])  # and steps differ


def _row(rows: dict, r: dict, k: int) -> dict:
    c = r["seen_calibration"] or {"tau": 0, "beta": 0}
    return rows[f"w={r['edge_weight']},k={k},flip={int(r['flip_sketch'])},tau={c['tau']},beta={c['beta']}"]


def test_retrieval_choice_keeps_the_first_row_and_decides_by_what_follows(tiny):
    """Each setting (edge fusion, flip, seen-class calibration) is judged by the first row
    among those that keep every set's first row, the cheapest within one standard error of
    the best; diffusion only reorders what follows the first five results, so every k has
    its setting's hit@5 and P@5 and P@10 decides k, ties to the cheaper."""
    from sbir_core.training.finetune import _first_row_kept

    td, text, size = tiny
    cfg = _cfg(size)
    ft = Finetuner(cfg, td, text, heldout_classes(td, cfg.val_fraction, cfg.seed))
    chosen, rows = ft.choose_retrieval(edge_weights=(0.0, 0.5), diffusion=(0, 3, 10),
                                       calibration=((0.1,), (0.5, 1.0)))
    assert len(rows) == 2 * 2 * 3 + 2  # flip x w x (off + 2 calibrations), two more k for the winner
    plain = rows["w=0.0,k=0,flip=0,tau=0,beta=0"]
    assert plain["seen_calibration"] is None
    undiffused = [r for r in rows.values() if r["diffusion_k"] == 0]
    key = lambda r: (round(r["hit@5"], 3), round(r["P@5"], 3), round(r["P@10"], 3))  # noqa: E731
    nq = len(ft.validation_embeddings()[0])
    n = {"zero-shot": nq, "zero-shot-alone": nq} | ({"seen": len(ft._seen_split()[0])} if "seen_hit@5" in plain else {})
    kept = [r for r in undiffused if _first_row_kept(r, plain, n)]
    winner = _row(rows, chosen.as_dict(), 0)
    assert winner in kept
    # one-standard-error rule: within one SE of the best mean hit@5, nothing cheaper exists
    best = max(r["hit@5"] for r in kept)
    top = max(kept, key=key)
    se = np.sqrt(sum(top[f"{s}_hit@5"] * (1 - top[f"{s}_hit@5"]) / k for s, k in n.items())) / len(n)
    assert winner["hit@5"] >= best - se - 1e-9
    cost = lambda r: (r["flip_sketch"], r["edge_weight"], (r["seen_calibration"] or {"beta": 0})["beta"])  # noqa: E731
    assert not any(cost(r) < cost(winner) for r in kept if r["hit@5"] >= top["hit@5"] - se - 1e-9)
    for r in rows.values():
        if r["diffusion_k"]:
            base = _row(rows, r, 0)
            assert (r["hit@5"], r["P@5"]) == (base["hit@5"], base["P@5"])
    ks = [r for r in rows.values() if _row(rows, r, 0) is winner]
    assert chosen.diffusion_k == min((r for r in ks if round(r["P@10"], 3) == max(round(x["P@10"], 3) for x in ks)),
                                        key=lambda r: r["diffusion_k"])["diffusion_k"]


def test_a_setting_may_not_cost_one_gallery_kind_its_first_row():
    from sbir_core.training.finetune import _first_row_kept

    plain = {f"{s}_{m}": 0.5 for s in ("zero-shot", "seen") for m in ("hit@1", "hit@5", "P@5")}
    n = {"zero-shot": 100, "seen": 100}  # one standard error: 0.05
    better_zs = {**plain, "zero-shot_hit@1": 0.9, "zero-shot_hit@5": 0.9, "zero-shot_P@5": 0.9}
    assert _first_row_kept(better_zs, plain, n) and _first_row_kept(plain, plain, n)
    assert _first_row_kept({**better_zs, "seen_hit@5": 0.46}, plain, n)
    for m in ("hit@1", "hit@5", "P@5"):  # losing any part of one set's first row
        assert not _first_row_kept({**better_zs, f"seen_{m}": 0.44}, plain, n)


def test_a_continued_model_keeps_how_its_start_was_made(tiny, tmp_path):
    """--init: the new checkpoint's lineage names the start and its training config."""
    from sbir_core.models.checkpoint import save_checkpoint

    td, text, size = tiny
    cfg = _cfg(size)
    held = heldout_classes(td, cfg.val_fraction, cfg.seed)
    first = Finetuner(cfg, td, text, held)
    assert first.lineage == []
    path = save_checkpoint(tmp_path / "first.safetensors", first.model.head,
                           {"encoder": cfg.encoder, "config": {"steps": 4, "lr_backbone": 3e-4},
                            "selection": {"step": 2}, "heldout_classes": [c for c, h in zip(td.classes, held) if h]},
                           backbone=first.model.backbone.net)
    again = Finetuner(_cfg(size, init=str(path)), td, text, held)
    assert again.lineage == [{"checkpoint": "first.safetensors", "config": {"steps": 4, "lr_backbone": 3e-4},
                              "selection": {"step": 2}}]


def test_ablation_variants_each_remove_one_part_of_the_recipe() -> None:
    """experiments/ablate_finetune.py: every variant zeroes one real FinetuneConfig field that the
    shipped recipe uses, so a renamed field cannot silently turn a row into the full recipe."""
    import dataclasses

    mod = _script("ablate_finetune")
    fields, default = {f.name for f in dataclasses.fields(FinetuneConfig)}, FinetuneConfig()
    full, *removals = mod.VARIANTS.values()
    assert full == {} and len(removals) == 4
    for change in removals:
        (name, value), = change.items()
        assert name in fields and value == 0 and getattr(default, name) != 0, change


def _script(name: str):
    from scripts_loader import load_experiment

    return load_experiment(name)


def test_a_soup_is_the_mean_of_its_ingredients(tmp_path) -> None:
    """experiments/make_soup.py: float tensors averaged, integer ones (batch-norm counters) kept,
    the ingredients named; checkpoints of another architecture refused."""
    from sbir_core.models.checkpoint import read_tensors, write_tensors

    soup = _script("make_soup").soup
    a = write_tensors(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}, {"encoder": "x"})
    b = write_tensors(tmp_path / "b.safetensors", {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}, {"encoder": "x"})
    tensors, meta = read_tensors(soup([a, b], tmp_path / "s.safetensors"))
    assert torch.equal(tensors["w"], torch.tensor([2.0, 4.0])) and int(tensors["n"]) == 3
    assert meta["soup"] == ["a.safetensors", "b.safetensors"] and meta["encoder"] == "x"
    c = write_tensors(tmp_path / "c.safetensors", {"w": torch.zeros(3), "n": torch.tensor(1)}, {"encoder": "x"})
    with pytest.raises(SystemExit, match="not the same architecture"):
        soup([a, c], tmp_path / "bad.safetensors")


def _gallery_named(td: TrainData, tmp_path: Path) -> tuple[TrainData, Path]:
    """The tiny data with two classes renamed after default-gallery classes QuickDraw has."""
    import dataclasses

    named = dataclasses.replace(td, classes=["airplane", "apple"] + td.classes[2:])
    root = tmp_path / "data"
    (root / "quickdraw").mkdir(parents=True)
    for c in named.classes:
        (root / "quickdraw" / f"{c}.ndjson").write_text("")
    return named, root


def test_selection_classes_are_drawn_outside_the_default_gallery(tiny, tmp_path):
    """Every gallery class is trained on (a held-out gallery class, fish, was the example the
    shipped v2 model missed); --no-heldout-outside-gallery draws as the v2 runs did."""
    td, _, size = tiny
    named, root = _gallery_named(td, tmp_path)
    drawn = [set(np.asarray(named.classes)[run_heldout_classes(named, _cfg(size, seed=s), root)]) for s in range(12)]
    assert all(len(d) == 2 and not d & {"airplane", "apple"} for d in drawn)  # as many as without avoiding
    anywhere = [set(np.asarray(named.classes)[run_heldout_classes(named, _cfg(size, seed=s, heldout_outside_gallery=False),
                                                                  root)]) for s in range(12)]
    assert any(d & {"airplane", "apple"} for d in anywhere)


def test_a_continuation_may_release_held_out_classes_but_never_hold_out_trained_ones(tiny, tmp_path):
    from sbir_core.models.checkpoint import save_checkpoint

    td, text, size = tiny
    named, root = _gallery_named(td, tmp_path)
    start_held = np.isin(named.classes, ["airplane", "c3"])
    first = Finetuner(_cfg(size), named, text, start_held)
    path = save_checkpoint(tmp_path / "start.safetensors", first.model.head,
                           {"encoder": "efficientnet-lite0", "heldout_classes": ["airplane", "c3"]},
                           backbone=first.model.backbone.net)
    cfg = _cfg(size, init=str(path))
    held = run_heldout_classes(named, cfg, root)
    assert list(np.asarray(named.classes)[held]) == ["c3"]  # the gallery class is released into training
    keep = _cfg(size, init=str(path), heldout_outside_gallery=False)
    assert list(np.asarray(named.classes)[run_heldout_classes(named, keep, root)]) == ["airplane", "c3"]
    assert Finetuner(cfg, named, text, held).released == ["airplane"]  # releasing is allowed, and recorded
    with pytest.raises(ValueError, match="c5"):
        Finetuner(cfg, named, text, np.isin(named.classes, ["c3", "c5"]))  # c5 was trained on by the start


def test_a_continuation_is_selected_against_its_start(tiny, tmp_path):
    """With --init, step 0 (the start as it is) is validated, so a run that only gets worse
    hands back its start."""
    from sbir_core.models.checkpoint import save_checkpoint

    td, text, size = tiny
    cfg = _cfg(size)
    held = heldout_classes(td, cfg.val_fraction, cfg.seed)
    first = Finetuner(cfg, td, text, held)
    path = save_checkpoint(tmp_path / "first.safetensors", first.model.head,
                           {"encoder": cfg.encoder, "heldout_classes": [c for c, h in zip(td.classes, held) if h]},
                           backbone=first.model.backbone.net)
    res = Finetuner(_cfg(size, init=str(path)), td, text, held).fit()
    assert [h["step"] for h in res["history"]] == [0, 2, 4]
    assert res["best"]["score"] == max(h["score"] for h in res["history"])
    fresh = Finetuner(cfg, td, text, held).fit()
    assert [h["step"] for h in fresh["history"]] == [2, 4]


def test_retrieval_choice_also_weighs_the_clip_art_gallery(tiny):
    """With the seen split (clip-art-coloured held-out doodles: the kind of picture the
    default gallery holds), each setting is judged by the mean of both sets; its plain row is
    exactly what step selection measured on each."""
    td, text, size = tiny
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(8), 5)
    with_seen = TrainData(**{**td.__dict__, "val_doodles": [_shape_strokes(SHAPES[c % 4], rng) for c in labels],
                             "val_doodle_labels": labels})
    cfg = _cfg(size)
    ft = Finetuner(cfg, with_seen, text, heldout_classes(td, cfg.val_fraction, cfg.seed))
    val = ft.validate()
    chosen, rows = ft.choose_retrieval(edge_weights=(0.0, 0.5), diffusion=(0, 3), calibration=((0.1,), (1.0,)))
    plain = rows["w=0.0,k=0,flip=0,tau=0,beta=0"]
    assert plain["zero-shot_hit@5"] == pytest.approx(val["hit@5"])
    assert plain["seen_hit@5"] == pytest.approx(val["seen_hit@5"])
    assert plain["seen_mAP@all"] == pytest.approx(val["seen_mAP@all"], abs=1e-6)
    sets = ("zero-shot", "zero-shot-alone", "seen")
    for r in rows.values():
        assert r["hit@5"] == pytest.approx(np.mean([r[f"{s}_hit@5"] for s in sets]))
        assert r["P@5"] == pytest.approx(np.mean([r[f"{s}_P@5"] for s in sets]))
    fused = rows["w=0.5,k=0,flip=0,tau=0,beta=0"]
    assert fused["seen_hit@5"] != pytest.approx(plain["seen_hit@5"]) or \
        fused["seen_P@5"] != pytest.approx(plain["seen_P@5"])  # edge fusion reaches the clip-art
    # the held-out classes' photos alone: the gallery without any training-class photo
    q, ql, g, gl = ft.validation_embeddings()
    alone = np.isin(gl, np.unique(ql))
    assert 0 < alone.sum() < len(gl)
    assert plain["zero-shot-alone_hit@5"] == pytest.approx(retrieval_summary(q @ g[alone].T, ql, gl[alone])["hit@5"])
    only_zs = Finetuner(_cfg(size, select="zero-shot"), with_seen, text, heldout_classes(td, cfg.val_fraction, cfg.seed))
    only_row = only_zs.choose_retrieval(edge_weights=(0.0,), diffusion=(0,))[1]["w=0.0,k=0,flip=0,tau=0,beta=0"]
    assert "seen_hit@5" not in only_row and "zero-shot-alone_hit@5" in only_row


@needs_shared
def test_real_selection_classes_avoid_the_gallery_and_the_old_draw_is_reproducible():
    """On the real data: a fresh run holds out 6 classes, none of the default gallery's;
    --no-heldout-outside-gallery draws exactly the shipped model's held-out classes (its lineage's)."""
    from sbir_core.data.datasets import training_items
    from sbir_core.eval.product import product_classes
    from sbir_core.models.checkpoint import read_metadata
    from sbir_core.models.encoders import DEFAULT_CHECKPOINT

    data = SHARED
    cfg = FinetuneConfig()
    items = training_items(data, exclude=cfg.exclude, max_photos_per_class=cfg.max_photos_per_class)
    classes = sorted({i.label for i in items})
    cidx = {c: k for k, c in enumerate(classes)}
    labels = {m: np.array([cidx[i.label] for i in items if i.modality == m]) for m in ("photo", "sketch")}
    td = TrainData(photos=np.zeros((0,)), edges=[], photo_labels=labels["photo"], sketches=[],
                   sketch_labels=labels["sketch"], classes=classes)
    held = set(np.asarray(classes)[run_heldout_classes(td, cfg, data)])
    assert len(held) == 6 and not held & product_classes(data)
    old = set(np.asarray(classes)[run_heldout_classes(td, FinetuneConfig(heldout_outside_gallery=False), data)])
    if DEFAULT_CHECKPOINT.is_file():
        assert old == set(read_metadata(DEFAULT_CHECKPOINT)["heldout_classes"])
    assert {"fish", "cell phone"} <= old  # what the fix is for


def test_checkpoints_store_no_classifier_and_refuse_backbones_that_do_not_fit(tiny, tmp_path):
    """The ImageNet classifier never runs in retrieval, so it is not stored (24 -> 15 MB with
    fp16 head weights); every other backbone weight must be there and fit."""
    from sbir_core.errors import InputError
    from sbir_core.models.checkpoint import load_backbone_state, load_checkpoint, read_tensors, save_checkpoint
    from sbir_core.models.encoders import EfficientNetLiteBackbone

    td, text, size = tiny
    cfg = _cfg(size)
    ft = Finetuner(cfg, td, text, heldout_classes(td, cfg.val_fraction, cfg.seed))
    path = save_checkpoint(tmp_path / "m.safetensors", ft.model.head, {"encoder": cfg.encoder},
                           backbone=ft.model.backbone.net)
    tensors, _ = read_tensors(path)
    assert not any(k.startswith("backbone.classifier.") for k in tensors)
    assert {v.dtype for v in tensors.values() if v.dim() >= 2} == {torch.float16}
    _, meta = load_checkpoint(path)
    net = EfficientNetLiteBackbone(cfg.encoder).net
    load_backbone_state(net, meta["backbone_state"])
    assert torch.equal(net.conv_head.weight, ft.model.backbone.net.conv_head.weight.half().float())
    partial = {k: v for k, v in meta["backbone_state"].items() if k != "conv_head.weight"}
    with pytest.raises(InputError, match="conv_head.weight"):
        load_backbone_state(net, partial)
    with pytest.raises(InputError, match="extra"):
        load_backbone_state(net, {**meta["backbone_state"], "extra.weight": torch.zeros(1)})


def test_sketch_batch_norm_statistics_apply_to_the_sketch_path_only(tiny, monkeypatch):
    """experiments/with_sketch_bn.py: sketches normalise with their own statistics,
    photos keep ImageNet's, and a training step still runs backward (the statistics are
    swapped by reference: swapping them in place broke autograd)."""
    from sbir_core.training import finetune as F

    monkeypatch.setattr(F.FinetuneModel, "embed", F.FinetuneModel.embed)  # restored after the test
    monkeypatch.setattr(F.Finetuner, "__init__", F.Finetuner.__init__)
    plain_embed = F.FinetuneModel.embed
    _script("with_sketch_bn").install(alpha=1.0)
    td, text, size = tiny
    cfg = _cfg(size)
    ft = F.Finetuner(cfg, td, text, heldout_classes(td, cfg.val_fraction, cfg.seed))
    m = ft.model.eval()
    imagenet = [(b.running_mean.clone(), b.running_var.clone()) for b in _script("with_sketch_bn").batch_norms(m)]
    assert any(not torch.allclose(s[0], p[0]) for s, p in zip(m.sketch_stats, imagenet))
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(m.embed(x, "photo"), plain_embed(m, x, "photo"))
        assert not torch.allclose(m.embed(x, "sketch"), plain_embed(m, x, "sketch"), atol=1e-3)
    after = [(b.running_mean, b.running_var) for b in _script("with_sketch_bn").batch_norms(m)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(after, imagenet))
    assert all(np.isfinite(v) for v in ft.step().values())
