"""Calibrating and measuring the confidence rule (`gallery.confidence`).

Calibration (`calibrate`, CLI `calibrate-confidence`) uses training classes only: QuickDraw
classes that no benchmark split reserves and the default gallery does not hold, every
other one of them in sorted order (the rest stay unseen by the rule, for `eval`).
Per class, two of its held-out doodles (`data.HELDOUT_DOODLES`, never trained on) coloured
like clip-art three ways are its gallery pictures, the other three its queries. Galleries
of 68 classes (the default gallery's size) are drawn from the pool again and again; each
searches every pool query, so a query's class is either there (present) or removed
(absent). The thresholds are then chosen on what those searches show:

- sure: of all (agreement, margin, label mass) thresholds whose present queries called sure
  have a right first result at least SURE_PRECISION of the time and whose absent queries
  are called sure at most ABSENT_SURE of the time, the one calling the most present queries sure;
- absent: the gallery-mass below which at most FALSE_ABSENT of present queries fall, unless
  the first class's margin is one that only ABSENT_MARGIN_KEPT of absent queries reach;
- guess: the lowest posterior at which the best known class outside the gallery is the
  absent query's class at least GUESS_PRECISION of the time;
- unreadable: a logistic probe on [embedding, ink share] between trainable doodles and
  generated scribbles, dots and lines (`data.scribbles`, seed 0), its bias moved so that at
  most JUNK_FALSE of those doodles are flagged; for strokes also the turning that only
  1 - SCRIBBLE_QUANTILE of trainable doodles pass and a stroke-statistics probe fitted the
  same way (`fit_strokes`; no model needed).

`evaluate_confidence` (CLI `eval --absent-queries`) searches folders of QuickDraw files
through `RetrievalService`, exactly as the page does, and counts the levels.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from sbir_core.data.datasets import HELDOUT_DOODLES, excluded_names, load_splits, quickdraw_folder, read_ndjson, split_doodles
from sbir_core.gallery import confidence as C

log = logging.getLogger(__name__)

SURE_PRECISION = 0.85  # calibration target, above the 0.80 the page promises (a new gallery is harder)
ABSENT_SURE = 0.05
FALSE_ABSENT = 0.08
ABSENT_MARGIN_KEPT = 0.05
GUESS_PRECISION = 0.8
JUNK_FALSE = 0.01
SCRIBBLE_QUANTILE = 0.995
GALLERY_CLASSES = 68
ROUNDS = 8
TAUS = (0.05, 0.1, 0.15)


def calibration_classes(data_root: Union[str, Path], encoder: Any) -> list[str]:
    """The pool: trained-on QuickDraw classes outside the benchmarks and the default
    gallery, every other one (sorted) so the rest stay for evaluation."""
    from sbir_core.eval.product import product_classes

    data_root = Path(data_root)
    reserved = excluded_names(load_splits(data_root), ("pacs", "doodle"))["quickdraw"]
    trained = {C.class_key(n) for n in encoder.meta.get("classes_trained_on", [])}
    product = product_classes(data_root)
    names = sorted(p.stem for p in (data_root / "quickdraw").glob("*.ndjson"))
    pool = [n for n in names if n not in reserved and n not in product and C.class_key(n) in trained]
    return pool[::2]


def _embed_pool(encoder: Any, data_root: Path, classes: Sequence[str], seed: int = 0) -> dict:
    from sbir_core.data.augment import colorize_doodle

    rng = np.random.default_rng(seed)
    held = split_doodles(quickdraw_folder(data_root / "quickdraw", classes=classes))[1]
    by: dict = {}
    for it in held:
        by.setdefault(it.label, []).append(it)
    gal, gl, qs, ql = [], [], [], []
    for c in sorted(by):
        d = by[c]
        for it in d[:2]:
            for _ in range(3):
                gal.append(colorize_doodle(it.load(), encoder.image_size, rng)), gl.append(c)
        for it in d[2:]:
            qs.append(it.load()), ql.append(c)
    g = encoder.encode_photos(gal).normalized()
    q = encoder.encode_sketches(qs).normalized()
    return {"g": np.asarray(g, np.float32), "gl": np.array(gl), "q": np.asarray(q, np.float32), "ql": np.array(ql)}


def _searches(encoder: Any, pool: dict, rounds: int, seed: int = 0) -> list[dict]:
    """Each round: a gallery of GALLERY_CLASSES pool classes searched by every pool query,
    as the app searches (the checkpoint's calibration and diffusion)."""
    from sbir_core.gallery.calibration import SeenCalibration
    from sbir_core.gallery.index import Gallery

    rng = np.random.default_rng(seed)
    classes = np.unique(pool["gl"])
    cal = SeenCalibration.from_encoder(encoder)
    out = []
    for _ in range(rounds):
        chosen = set(rng.choice(classes, min(GALLERY_CLASSES, len(classes) - 1), replace=False).tolist())
        keep = np.array([c in chosen for c in pool["gl"]])
        g, gl = pool["g"][keep], pool["gl"][keep].tolist()
        gal = Gallery.from_embeddings(g, labels=gl, diffusion_k=encoder.retrieval.diffusion_k, calibration=cal)
        _, idx = gal.knn(pool["q"], C.TOP)
        out.append({"g": g, "gl": gl, "ranked": [[gl[j] for j in row] for row in idx],
                    "present": np.array([c in chosen for c in pool["ql"]])})
    return out


def _features(encoder: Any, pool: dict, rounds: list[dict], tau: float) -> dict:
    """Every (round, query) evidence as arrays."""
    cols: dict = {k: [] for k in ("agree", "margin", "label_mass", "gallery_mass", "known_p", "known_in",
                                  "right", "present", "guess_right")}
    for r in rounds:
        vocab = C.vocabulary(encoder.meta["classes_trained_on"], encoder.seen_prototypes, r["gl"])
        for i, q in enumerate(pool["q"]):
            ev = C.evidence(q, r["ranked"][i], C.class_scores(q, r["g"], r["gl"]), vocab, tau)
            cols["agree"].append(ev.agree), cols["margin"].append(ev.margin)
            cols["label_mass"].append(ev.label_mass), cols["gallery_mass"].append(ev.gallery_mass)
            cols["known_p"].append(ev.known_p), cols["known_in"].append(ev.known_in_gallery)
            cols["right"].append(ev.top_label == pool["ql"][i]), cols["present"].append(r["present"][i])
            cols["guess_right"].append(C.class_key(ev.known) == C.class_key(pool["ql"][i]))
    return {k: np.array(v) for k, v in cols.items()}


def fit_sure(f: dict) -> Optional[dict]:
    """The sure thresholds calling the most present queries sure within the targets."""
    pres, absn = f["present"], ~f["present"]
    best = None
    for a, m, lm in itertools.product((3, 4, 5), np.quantile(f["margin"], np.linspace(0, 0.95, 39)),
                                      (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)):
        sure = (f["agree"] >= a) & (f["margin"] >= m) & (f["label_mass"] >= lm)
        n = int((sure & pres).sum())
        if n < 20:
            continue
        prec = float(f["right"][sure & pres].mean())
        if prec >= SURE_PRECISION and float(sure[absn].mean()) <= ABSENT_SURE and (best is None or n > best["n"]):
            best = {"sure_agree": a, "sure_margin": round(float(m), 4), "sure_label_mass": lm, "n": n,
                    "precision": round(prec, 3), "share": round(n / int(pres.sum()), 3),
                    "sure_absent": round(float(sure[absn].mean()), 3)}
    return best


def fit_absent(f: dict) -> dict:
    """The gallery mass below which at most FALSE_ABSENT of present queries fall, and the
    margin that at most ABSENT_MARGIN_KEPT of absent queries reach (past it, no notice)."""
    t = float(np.quantile(f["gallery_mass"][f["present"]], FALSE_ABSENT))
    m = float(np.quantile(f["margin"][~f["present"]], 1 - ABSENT_MARGIN_KEPT))
    notice = (f["gallery_mass"] < t) & (f["margin"] < m)
    return {"absent_mass": round(t, 4), "absent_margin": round(m, 4),
            "notice_present": round(float(notice[f["present"]].mean()), 3),
            "notice_absent": round(float(notice[~f["present"]].mean()), 3)}


def fit_guess(f: dict) -> dict:
    """The lowest posterior whose guesses (on absent queries) are right often enough."""
    cand = ~f["present"] & ~f["known_in"]
    for t in np.linspace(0.05, 0.95, 91):
        g = cand & (f["known_p"] >= t)
        if g.sum() >= 20 and f["guess_right"][g].mean() >= GUESS_PRECISION:
            return {"guess_p": round(float(t), 3), "guess_precision": round(float(f["guess_right"][g].mean()), 3),
                    "guessed": round(float(g.sum() / (~f["present"]).sum()), 3)}
    return {"guess_p": 1.01, "guess_precision": None, "guessed": 0.0}


def _drawing_features(encoder: Any, drawings: Sequence[tuple]) -> np.ndarray:
    """[embedding, ink share] of (strokes, brush) drawings, each encoded as the page encodes it."""
    from sbir_core.gallery.query import encode_sketch_query

    rows = []
    for strokes, brush in drawings:
        sq = encode_sketch_query(encoder, strokes, brush=brush)
        rows.append(np.append(sq.embedding, C.ink_share(sq.model_input)))
    return np.asarray(rows, np.float32)


def fit_junk(encoder: Any, data_root: Path, n: int = 600, seed: int = 0) -> tuple[tuple, dict]:
    """The unreadable probe: trainable doodles (two per trained class, some with a page
    brush) against generated scribbles, dots and lines; bias set for JUNK_FALSE."""
    from sklearn.linear_model import LogisticRegression

    from sbir_core.data.scribbles import unreadable_drawings

    rng = np.random.default_rng(seed)
    reserved = excluded_names(load_splits(data_root), ("pacs", "doodle"))["quickdraw"]
    real = []
    for p in sorted((data_root / "quickdraw").glob("*.ndjson")):
        if p.stem not in reserved:
            for it in split_doodles(read_ndjson(p))[0][:2]:
                real.append((it.load(), float(rng.uniform(2, 6)) if rng.random() < 0.5 else None))
    junk = [(s, b) for kind, s, b in unreadable_drawings(n, seed) if not C.is_dot(s, b)]
    x = np.concatenate([_drawing_features(encoder, real), _drawing_features(encoder, junk)])
    y = np.r_[np.zeros(len(real)), np.ones(len(junk))]
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(x, y)
    s = clf.decision_function(x)
    shift = max(0.0, float(np.quantile(s[y == 0], 1 - JUNK_FALSE)))
    w = tuple(np.r_[clf.coef_[0], clf.intercept_[0] - shift].tolist())
    return w, {"real": len(real), "junk": len(junk), "real_flagged": round(float((s[y == 0] > shift).mean()), 3),
               "junk_flagged": round(float((s[y == 1] > shift).mean()), 3)}


def fit_strokes(data_root: Path, per_class: int = 3, n: int = 600, seed: int = 0) -> dict:
    """The stroke rules: the turning past which only 1 - SCRIBBLE_QUANTILE of trainable
    doodles go, and a logistic probe on `stroke_features` between those doodles and the
    generated drawings that are not dots (seed 0), its bias set at the same quantile."""
    from sklearn.linear_model import LogisticRegression

    from sbir_core.data.scribbles import unreadable_drawings

    reserved = excluded_names(load_splits(data_root), ("pacs", "doodle"))["quickdraw"]
    real = [it.load() for p in sorted((data_root / "quickdraw").glob("*.ndjson")) if p.stem not in reserved
            for it in split_doodles(read_ndjson(p))[0][:per_class]]
    stats = np.array([C.stroke_turning(s) for s in real])
    turn, density = np.quantile(stats, SCRIBBLE_QUANTILE, axis=0)
    junk = [s for _, s, b in unreadable_drawings(n, seed) if not C.is_dot(s, b)]
    x = np.array([C.stroke_features(s) for s in real + junk])
    y = np.r_[np.zeros(len(real)), np.ones(len(junk))]
    clf = LogisticRegression(max_iter=2000).fit(x, y)
    score = clf.decision_function(x)
    shift = float(np.quantile(score[y == 0], SCRIBBLE_QUANTILE))
    flagged = (stats[:, 0] > turn) | (stats[:, 1] > density) | (score[y == 0] > shift)
    return {"scribble_turn": round(float(turn), 2), "scribble_density": round(float(density), 3),
            "stroke_w": [round(float(v), 5) for v in np.r_[clf.coef_[0], clf.intercept_[0] - shift]],
            "doodles": len(real), "doodles_flagged": round(float(flagged.mean()), 4),
            "junk_flagged": round(float((score[y == 1] > shift).mean()), 3)}


def calibrate(encoder: Any, data_root: Union[str, Path], rounds: int = ROUNDS) -> C.Rule:
    """The rule for this encoder, from training classes only (see the module's note)."""
    data_root = Path(data_root)
    classes = calibration_classes(data_root, encoder)
    log.info("calibrating on %d training classes", len(classes))
    pool = _embed_pool(encoder, data_root, classes)
    searches = _searches(encoder, pool, rounds)
    best = None
    for tau in TAUS:
        f = _features(encoder, pool, searches, tau)
        sure = fit_sure(f)
        if sure is not None and (best is None or sure["share"] > best[1]["share"]):
            best = (tau, sure, fit_absent(f), fit_guess(f))
    if best is None:
        raise RuntimeError("no sure threshold reaches the precision target on the calibration set")
    tau, sure, absent, guess = best
    junk_w, junk = fit_junk(encoder, data_root)
    strokes = fit_strokes(data_root)
    report = {"classes": len(classes), "queries": int(len(pool["q"])), "rounds": rounds, "sure": sure,
              "absent": absent, "guess": guess, "unreadable": junk, "strokes": strokes}
    return C.Rule(tau=tau, sure_agree=int(sure["sure_agree"]), sure_margin=sure["sure_margin"],
                  sure_label_mass=sure["sure_label_mass"], absent_mass=absent["absent_mass"],
                  absent_margin=absent["absent_margin"],
                  guess_p=guess["guess_p"], junk_w=junk_w, scribble_turn=strokes["scribble_turn"],
                  scribble_density=strokes["scribble_density"], stroke_w=tuple(strokes["stroke_w"]),
                  calibration=report)


# ----------------------------------------------------------------------------- measuring
Search = Any  # (strokes, brush) -> (level, guess, first result's label); the CLI passes the app's search


def _folder_drawings(folder: Union[str, Path]) -> list[tuple[str, list]]:
    """(class, strokes) of every drawing in a folder of QuickDraw files named <class>.ndjson."""
    files = sorted(Path(folder).glob("*.ndjson"))
    if not files:
        raise FileNotFoundError(f"no <class>.ndjson files in {folder}")
    return [(p.stem, it.load()) for p in files for it in read_ndjson(p)]


def _levels(search: Search, drawings: Sequence[tuple[str, list]]) -> list[tuple[str, Optional[str], bool, bool]]:
    """(level, guess, first result right, guess right) per drawing."""
    out = []
    for label, strokes in drawings:
        level, guess, top = search(strokes, None)
        out.append((level, guess, C.class_key(top or "") == C.class_key(label),
                    guess is not None and C.class_key(guess) == C.class_key(label)))
    return out


def evaluate_confidence(search: Search, queries: Union[str, Path], absent_queries: Union[str, Path],
                        unreadable: int = 300, seed: int = 1) -> dict:
    """How the levels come out: `queries` (classes the gallery has), `absent_queries`
    (classes it lacks), and `unreadable` generated scribbles, dots and lines (`seed` 1:
    calibration used 0)."""
    from sbir_core.data.scribbles import unreadable_drawings

    pres = _levels(search, _folder_drawings(queries))
    absn = _levels(search, _folder_drawings(absent_queries))
    sure = [r for r in pres if r[0] == "sure"]
    guessed = [r for r in absn if r[1] is not None]
    junk = unreadable_drawings(unreadable, seed)
    junk_levels = [(kind, search(strokes, brush)[0]) for kind, strokes, brush in junk]
    share = lambda rows, lv: round(sum(r[0] == lv for r in rows) / max(len(rows), 1), 4)  # noqa: E731
    return {
        "n_queries": len(pres), "n_absent_queries": len(absn), "n_unreadable": len(junk),
        "first_right": round(float(np.mean([r[2] for r in pres])), 4),
        "sure_share": share(pres, "sure"),
        "sure_precision": round(float(np.mean([r[2] for r in sure])), 4) if sure else None,
        "sure_absent": share(absn, "sure"),
        "notice_present": share(pres, "absent"), "notice_absent": share(absn, "absent"),
        "levels_present": {lv: share(pres, lv) for lv in C.LEVELS},
        "levels_absent": {lv: share(absn, lv) for lv in C.LEVELS},
        "guess_share_absent": round(len(guessed) / max(len(absn), 1), 4),
        "guess_precision": round(float(np.mean([r[3] for r in guessed])), 4) if guessed else None,
        "unreadable_flagged": (round(float(np.mean([lv == "unreadable" for _, lv in junk_levels])), 4)
                               if junk_levels else None),
        "unreadable_by_kind": {k: round(float(np.mean([lv == "unreadable" for kk, lv in junk_levels if kk == k])), 4)
                               for k in sorted({k for k, _ in junk_levels})},
        "real_unreadable": round(float(np.mean([r[0] == "unreadable" for r in pres + absn])), 4),
    }


def write_query_folders(data_root: Union[str, Path], out: Union[str, Path], encoder: Any = None) -> dict:
    """The measuring folders (`eval --absent-queries`), written under `out` (never the
    repository): present/ the held-out doodles of the default gallery's classes; absent/
    those of every other QuickDraw class; absent-unseen/ the absent classes the calibration
    pool did not use (needs `encoder` for its training classes)."""
    import shutil

    from sbir_core.eval.product import product_classes

    data_root, out = Path(data_root), Path(out)
    product = product_classes(data_root)
    pool = set(calibration_classes(data_root, encoder)) if encoder is not None else set()
    counts = {"present": 0, "absent": 0, "absent-unseen": 0}
    for d in counts:
        shutil.rmtree(out / d, ignore_errors=True)
        (out / d).mkdir(parents=True)
    for p in sorted((data_root / "quickdraw").glob("*.ndjson")):
        rows = [r for r in p.read_text(encoding="utf-8").splitlines() if r.strip()]
        held = rows[-HELDOUT_DOODLES:] if len(rows) > HELDOUT_DOODLES else rows
        dests = ["present"] if p.stem in product else ["absent"] + ([] if p.stem in pool else ["absent-unseen"])
        if encoder is None and "absent-unseen" in dests:
            dests.remove("absent-unseen")
        for d in dests:
            (out / d / p.name).write_text("\n".join(held) + "\n", encoding="utf-8")
            counts[d] += len(held)
    return counts
