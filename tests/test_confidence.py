"""The confidence rule (gallery.confidence), its calibration (eval.confidence) and its
command-line flags, on generated data. The shipped model's own check is in
test_shipped_model.py."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw

from sbir_core.data.scribbles import KINDS, unreadable_drawings
from sbir_core.eval import confidence as E
from sbir_core.gallery import confidence as C
from sbir_core.gallery.index import Gallery

DIM = 32
RULE = C.Rule(tau=0.1, sure_agree=4, sure_margin=0.05, sure_label_mass=0.3, absent_mass=0.2, guess_p=0.5,
              junk_w=tuple([0.0] * DIM + [10.0, -3.0]),  # unreadable when more than 30% of the picture is ink
              absent_margin=0.25)


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def world(seed=0, known=10, in_gallery=5, per=6):
    """`known` training classes on random prototypes; the gallery holds pictures of the
    first `in_gallery` of them near their prototypes."""
    rng = np.random.default_rng(seed)
    protos = _unit(rng.normal(size=(known, DIM)))
    names = [f"class {i}" for i in range(known)]
    y = np.repeat(np.arange(in_gallery), per)
    g = _unit(protos[y] + rng.normal(scale=0.15, size=(len(y), DIM)))
    labels = [names[i].replace(" ", "_") for i in y]  # folder spelling
    return rng, protos, names, g, labels


def _assess(protos, names, g, labels, q, **kw):
    gal = Gallery.from_embeddings(g, labels=labels)
    vocab = C.vocabulary(names, protos, labels)
    ranked = [gal.labels[r.index] for r in gal.search(q, 5)]
    ev = C.evidence(q, ranked, C.class_scores(q, g, labels), vocab, RULE.tau)
    return ev, C.decide(RULE, ev, **kw)


def test_a_query_on_a_gallery_class_is_sure_and_names_it():
    rng, protos, names, g, labels = world()
    q = _unit(protos[2] + rng.normal(scale=0.05, size=DIM))
    ev, (level, guess) = _assess(protos, names, g, labels, q)
    assert ev.top_label == "class_2" and ev.agree == 5 and ev.margin > 0.05 and ev.label_mass > 0.9
    assert (level, guess) == ("sure", None)


def test_a_query_of_a_known_class_the_gallery_lacks_is_absent_with_a_guess():
    rng, protos, names, g, labels = world()
    q = _unit(protos[8] + rng.normal(scale=0.05, size=DIM))
    ev, (level, guess) = _assess(protos, names, g, labels, q)
    assert ev.gallery_mass < 0.2 and not ev.known_in_gallery
    assert (level, guess) == ("absent", "class 8")


def test_between_two_gallery_classes_it_claims_nothing():
    """Half one class, half another: no agreement, no margin, the posterior split: closest."""
    rng, protos, names, g, labels = world()
    q = _unit(protos[0] + protos[1])
    ev, (level, guess) = _assess(protos, names, g, labels, q)
    assert ev.gallery_mass > 0.5 and ev.label_mass < 0.7
    assert level == "closest" and guess is None


def test_each_threshold_decides():
    ev = C.Evidence("cat", agree=5, margin=0.2, label_mass=0.9, gallery_mass=0.95, known="cat", known_p=0.9,
                    known_in_gallery=True)
    assert C.decide(RULE, ev) == ("sure", None)
    assert C.decide(RULE, ev, unreadable=True) == ("unreadable", None)
    for change in ({"agree": 3}, {"margin": 0.01}, {"label_mass": 0.2}):
        assert C.decide(RULE, C.Evidence(**{**ev.__dict__, **change})) == ("closest", None), change
    away = {**ev.__dict__, "agree": 2, "gallery_mass": 0.1, "known": "giraffe", "known_in_gallery": False}
    assert C.decide(RULE, C.Evidence(**away)) == ("absent", "giraffe")
    assert C.decide(RULE, C.Evidence(**{**away, "known_p": 0.4})) == ("absent", None)  # not sure enough to guess
    # the gallery's own pictures outweigh a posterior that misses a class known only by name
    assert C.decide(RULE, C.Evidence(**{**away, "margin": 0.3})) == ("closest", "giraffe")
    assert C.decide(RULE, None) == ("closest", None)  # a gallery with no classes: no claim


def test_gallery_classes_are_matched_to_training_names_and_new_ones_embedded():
    protos = _unit(np.eye(4, DIM))
    asked = []

    def embed(names):
        asked.extend(names)
        return np.ones((len(names), DIM))

    v = C.vocabulary(["cell phone", "teddy-bear", "cat", "dog"], protos, ["mobile_phone", "teddy_bear", "kangaroo"],
                     embed)
    assert asked == ["kangaroo"]  # the other two are training classes by another spelling
    assert v.names[-1] == "kangaroo" and v.in_gallery.tolist() == [True, True, False, False, True]
    assert C.vocabulary(["cat", "dog"], protos[:2], ["kangaroo"]).in_gallery.sum() == 0  # no text head


def test_dots_by_pen_width_and_by_picture_size():
    assert C.is_dot([[[100, 100]]], None)
    assert C.is_dot([[[100, 100], [104, 102]]], 5.0)
    assert not C.is_dot([[[100, 100], [104, 102]]], None)  # without a pen width only a point is a dot
    assert not C.is_dot([[[40, 40], [200, 40], [200, 200]]], 5.0)
    img = Image.new("L", (384, 384), 255)
    ImageDraw.Draw(img).ellipse([190, 190, 196, 196], fill=0)
    assert C.is_dot(img, None)
    ImageDraw.Draw(img).line([40, 40, 300, 300], fill=0, width=4)
    assert not C.is_dot(img, None)


def test_the_probe_reads_embedding_and_ink():
    heavy = Image.new("L", (100, 100), 0)
    light = Image.new("L", (100, 100), 255)
    ImageDraw.Draw(light).line([10, 10, 90, 90], fill=0, width=3)
    assert C.ink_share(heavy) == 1.0 and 0 < C.ink_share(light) < 0.1
    e = np.zeros(DIM, np.float32)
    assert C.junk_score(RULE, e, C.ink_share(heavy)) > 0 > C.junk_score(RULE, e, C.ink_share(light))


def test_the_rule_is_stored_next_to_its_checkpoint_and_read_back(tmp_path, monkeypatch):
    ckpt = tmp_path / "mine.safetensors"
    ckpt.write_bytes(b"x")
    path = C.save_rule(RULE, ckpt)
    assert path.name == "mine.confidence.json"
    assert C.Rule.from_json(json.loads(path.read_text())) == RULE

    class Enc:
        encoder_id = "efficientnet-lite0@abc"
        checkpoint_path = str(ckpt)

    assert C.rule_for(Enc()) == RULE
    path.unlink()
    assert C.rule_for(Enc()) is None
    Enc.encoder_id, Enc.checkpoint_path = "efficientnet-lite0@none", None
    assert C.rule_for(Enc()) is None  # the raw backbone has no rule


def test_generated_unreadable_drawings():
    a, b = unreadable_drawings(30, seed=3), unreadable_drawings(30, seed=3)
    assert a == b and a != unreadable_drawings(30, seed=4)
    assert {k for k, _, _ in a} == set(KINDS) and all(brush > 0 for _, _, brush in a)
    dots = [s for k, s, _ in a if k == "dots"]
    lines = [s for k, s, _ in a if k == "lines"]
    assert all(max(np.ptp(np.concatenate(s), 0)) < 30 for s in dots)
    assert all(all(len(st) == 2 for st in s) for s in lines)


def _features(rng, n=1000):
    """Calibration features where agreement and label mass predict a right first result
    (absent queries put little posterior on the first result's class)."""
    present = rng.random(n) < 0.5
    agree = rng.integers(1, 6, n)
    label_mass = np.where(present, rng.random(n), rng.uniform(0, 0.45, n))
    right = present & (rng.random(n) < 0.2 + 0.77 * ((agree >= 4) & (label_mass > 0.5)))
    gallery_mass = np.where(present, rng.uniform(0.3, 1, n), rng.uniform(0, 0.6, n))
    known_p = rng.random(n)
    return {"present": present, "agree": agree, "margin": rng.normal(0.05, 0.05, n), "label_mass": label_mass,
            "right": right, "gallery_mass": gallery_mass, "known_p": known_p, "known_in": np.zeros(n, bool),
            "guess_right": rng.random(n) < known_p}


def test_fitted_thresholds_meet_their_targets():
    f = _features(np.random.default_rng(0))
    sure = E.fit_sure(f)
    assert sure["sure_agree"] >= 4 and sure["sure_label_mass"] >= 0.4
    called = (f["agree"] >= sure["sure_agree"]) & (f["margin"] >= sure["sure_margin"]) & (
        f["label_mass"] >= sure["sure_label_mass"])
    assert f["right"][called & f["present"]].mean() >= E.SURE_PRECISION
    assert called[~f["present"]].mean() <= E.ABSENT_SURE
    absent = E.fit_absent(f)
    assert absent["notice_present"] <= E.FALSE_ABSENT + 0.01 and absent["notice_absent"] > 0.3
    assert (f["margin"][~f["present"]] >= absent["absent_margin"]).mean() <= E.ABSENT_MARGIN_KEPT + 0.01
    guess = E.fit_guess(f)
    picked = ~f["present"] & (f["known_p"] >= guess["guess_p"])
    assert f["guess_right"][picked].mean() >= E.GUESS_PRECISION
    f["right"][:] = False  # nothing is ever right: no sure threshold exists
    assert E.fit_sure(f) is None


def test_evaluation_counts_levels_per_folder(tmp_path):
    """`eval --absent-queries`' counting, with a search that answers by class name."""
    for folder, classes in (("present", ("cat", "dog")), ("absent", ("giraffe",))):
        (tmp_path / folder).mkdir()
        for c in classes:
            rows = [json.dumps({"word": c, "drawing": [[[0, 50, 100], [0, 80, 10]]]}) for _ in range(4)]
            (tmp_path / folder / f"{c}.ndjson").write_text("\n".join(rows) + "\n")
    calls = {"n": 0}

    def search(strokes, brush):
        calls["n"] += 1
        if brush is not None:  # the generated set comes with a page brush
            return "unreadable", None, "cat"
        i = calls["n"]
        # present queries: every other one sure (cat first each time: right for cat only)
        return ("sure" if i % 2 else "closest"), None, "cat"

    r = E.evaluate_confidence(search, tmp_path / "present", tmp_path / "absent", unreadable=9)
    assert r["n_queries"] == 8 and r["n_absent_queries"] == 4 and r["n_unreadable"] == 9
    assert r["sure_share"] == 0.5 and r["sure_precision"] == 0.5 and r["first_right"] == 0.5
    assert r["unreadable_flagged"] == 1.0 and r["real_unreadable"] == 0.0
    assert set(r["unreadable_by_kind"]) == set(KINDS)


# ----------------------------------------------------------------------------- the app and the command line
DOT = [[[200, 200], [202, 201]]]
SQUARE = [[[80, 80], [300, 80], [300, 300], [80, 300], [80, 80]]]


def ink_rule(dim):
    """No class evidence (the raw backbone has no prototypes): dots and heavy ink only."""
    return C.Rule(tau=0.1, sure_agree=4, sure_margin=0.0, sure_label_mass=0.3, absent_mass=0.2, guess_p=0.5,
                  junk_w=tuple([0.0] * dim + [10.0, -3.0]))


def test_the_service_fills_the_level(app_service, raw_encoder, monkeypatch):
    assert app_service.confidence_rule is None  # the raw backbone has no rule: not assessed
    out = app_service.search_sketch(SQUARE, 3, gallery="default")
    assert out.ok and out.level == "" and not out.unsure
    monkeypatch.setattr(app_service, "confidence_rule", ink_rule(raw_encoder.embed_dim))
    out = app_service.search_sketch(DOT, 3, gallery="default", brush=6.0)
    assert out.ok and out.level == "unreadable" and out.hits  # results still show
    out = app_service.search_sketch(SQUARE, 1, gallery="default", brush=6.0)
    assert out.level == "closest" and out.unsure and len(out.hits) == 1
    assert app_service.search_photo(Image.new("RGB", (64, 64), "white"), 3).level == "closest"


def test_search_reports_the_level(app_galleries, raw_encoder, monkeypatch, tmp_path, capsys):
    from sbir_core import cli

    monkeypatch.setattr(cli.common, "load_encoder", lambda name, checkpoint: raw_encoder)
    for name, strokes in (("dot", DOT), ("square", SQUARE)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"strokes": strokes}))
    base = ["search", "--gallery", "default", "--galleries", str(app_galleries), "--checkpoint", "none", "--k", "3"]
    assert cli.main(base + ["--strokes", str(tmp_path / "square.json"), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli.main(base + ["--strokes", str(tmp_path / "square.json"), "--json", "--confidence"]) == 0
    assert json.loads(capsys.readouterr().out) == {"level": None, "guess": None, "results": plain}  # no rule
    monkeypatch.setattr(C, "rule_for", lambda encoder: ink_rule(raw_encoder.embed_dim))
    assert cli.main(base + ["--strokes", str(tmp_path / "square.json"), "--json", "--confidence"]) == 0
    assert json.loads(capsys.readouterr().out)["level"] == "closest"
    assert cli.main(base + ["--strokes", str(tmp_path / "dot.json"), "--brush", "6", "--json", "--confidence"]) == 0
    assert json.loads(capsys.readouterr().out)["level"] == "unreadable"
    assert cli.main(base + ["--strokes", str(tmp_path / "dot.json"), "--brush", "6", "--confidence"]) == 0
    assert capsys.readouterr().out.startswith("level: unreadable")


def test_eval_absent_queries(app_galleries, raw_encoder, monkeypatch, tmp_path, capsys):
    from sbir_core import cli, service

    monkeypatch.setattr(service, "create_encoder", lambda checkpoint: raw_encoder)
    for folder, classes in (("present", ("circle", "square")), ("absent", ("giraffe",))):
        (tmp_path / folder).mkdir()
        for c in classes:
            row = json.dumps({"word": c, "drawing": [[[0, 100, 100, 0, 0], [0, 0, 100, 100, 0]]]})
            (tmp_path / folder / f"{c}.ndjson").write_text(row + "\n" + row + "\n")
    args = ["eval", "--queries", str(tmp_path / "present"), "--absent-queries", str(tmp_path / "absent"),
            "--gallery", "default", "--galleries", str(app_galleries), "--checkpoint", "none", "--unreadable", "6",
            "--json"]
    assert cli.main(args) == 2  # the raw backbone has no rule
    assert "calibrate-confidence" in capsys.readouterr().err
    monkeypatch.setattr(C, "rule_for", lambda encoder: ink_rule(raw_encoder.embed_dim))
    assert cli.main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n_queries"] == 4 and r["n_absent_queries"] == 2 and r["n_unreadable"] == 6
    assert r["sure_share"] == 0.0 and r["sure_precision"] is None and r["levels_present"]["closest"] == 1.0
    assert r["unreadable_by_kind"]["dots"] == 1.0  # two taps with a page pen are dots
    assert cli.main(args[:3] + ["--absent-queries", str(tmp_path / "nope")] + args[5:]) == 2


def test_a_sharded_checkpoint_has_one_rule_file():
    for name in ("default.safetensors", "default.safetensors.index.json", "default-00001-of-00002.safetensors"):
        assert C.rule_path(f"checkpoints/{name}").as_posix() == "checkpoints/default.confidence.json"


def test_stroke_rules_tell_scrawls_and_random_lines_from_drawings():
    import math

    circle = [[[200 + 100 * math.cos(t / 40 * 6.283), 200 + 100 * math.sin(t / 40 * 6.283)] for t in range(41)]]
    house = [[[100, 300], [100, 150], [300, 150], [300, 300], [100, 300]], [[100, 150], [200, 60], [300, 150]]]
    scrawl = [s for k, s, _ in unreadable_drawings(9, seed=2) if k == "scribble"]
    lines = [[[20, 30], [370, 300]], [[10, 350], [360, 20]], [[200, 5], [150, 380]]]
    turn_circle = C.stroke_turning(circle)[0]
    assert 5.5 < turn_circle < 7.0  # one full turn, 2 pi, whatever the point density
    dense = [[[200 + 100 * math.cos(t / 400 * 6.283), 200 + 100 * math.sin(t / 400 * 6.283)] for t in range(401)]]
    assert abs(C.stroke_turning(dense)[0] - turn_circle) < 0.5
    f = C.stroke_features(lines)
    assert f[1] == 1.0 and f[2] == 1.0 and C.stroke_features(circle)[1] == 0.0
    rule = C.Rule(**{**RULE.__dict__, "scribble_turn": 40.0, "scribble_density": 15.0,
                     "stroke_w": (0, 0, 0, 10.0, 0, 0, -5.0)})  # every stroke a long straight line
    assert all(C.strokes_unreadable(rule, s) for s in scrawl + [lines])
    assert not C.strokes_unreadable(rule, circle) and not C.strokes_unreadable(rule, house)
    assert not C.strokes_unreadable(RULE, lines)  # no stroke rule calibrated: off
