"""How sure is a search? The rule behind the page's "sure / closest / not here / can't read it".

The top-1 similarity alone does not say whether the first result is right (issue 32: on
doodles of new classes the first result is right ~40% of the time whatever it is). What
does, measured on held-out doodles of training classes:

- **agreement**: how many of the first five results share the first one's class;
- **margin**: the first result's class against the next class (each class scored by its
  best picture);
- **the drawing's class posterior** over every class the model knows (the checkpoint's
  training-class prototypes plus the gallery's own class names through the text head):
  how much of it falls on classes the gallery has (`gallery_mass`), and on the first
  result's class (`label_mass`). A drawing of a kangaroo in a gallery without kangaroos
  puts its posterior on classes the gallery lacks; the best of those is the `guess`.
- **the drawing itself** for "unreadable": a dot too small for its pen; for strokes, a
  turning far past any doodle's (a scrawl) or a linear probe on stroke statistics (straight
  lines spanning the drawing: random lines); and a linear probe on the embedding and the
  ink share that tells scribbles and random lines from doodles (images too).

Levels: "unreadable", else "sure" (agreement, margin and label mass all past their
thresholds), else "absent" (little posterior on the gallery's classes, and no class of the
gallery standing out by its margin), else "closest".
Every threshold comes from `eval.confidence.calibrate` (training classes only) and is
stored next to the checkpoint (`<checkpoint>.confidence.json`), read by `rule_for`.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from cachetools import LRUCache

from sbir_core.data.preprocess import INK_THRESHOLD
from sbir_core.data.strokes import read_strokes

LEVELS = ("sure", "closest", "absent", "unreadable")
TOP = 5  # agreement is counted over the first row
# Gallery folder names spelled differently from the training class they are.
ALIASES = {"mobile phone": "cell phone", "smiley": "smiley face"}
DOT_EXTENT = 3.0  # a drawing no wider than this many pen widths is a dot


def class_key(name: str) -> str:
    """A class name compared across galleries and training: lower case, no separators."""
    k = " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())
    return ALIASES.get(k, k)


@dataclass(frozen=True)
class Rule:
    """The calibrated thresholds (see `eval.confidence.calibrate` for how each is chosen)."""

    tau: float  # posterior temperature over the known classes
    sure_agree: int  # first-row results of the first result's class, at least
    sure_margin: float  # class margin, at least
    sure_label_mass: float  # posterior on the first result's class, at least
    absent_mass: float  # posterior on the gallery's classes below this: "absent" ...
    guess_p: float  # a known class outside the gallery with at least this posterior is the guess
    junk_w: tuple  # linear probe over [embedding, ink share, 1]: > 0 means unreadable
    scribble_turn: float = float("inf")  # strokes turning more than this in all (radians): a scribble
    scribble_density: float = float("inf")  # ... or more than this per drawing-width of line
    stroke_w: tuple = ()  # linear probe over `stroke_features` + 1: > 0 means unreadable (empty: off)
    # ... unless the first result's class stands out by this margin: the gallery's pictures
    # outweigh a posterior that misses a class the model only knows by name (a drawn house
    # in a gallery of houses: its posterior goes to "barn", a class it trained on).
    absent_margin: float = float("inf")
    calibration: Optional[dict] = None  # what the thresholds gave on the calibration set

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("junk_w", "stroke_w"):
            d[k] = [round(float(v), 5) for v in getattr(self, k)]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Rule":
        d = dict(d)
        for k in ("junk_w", "stroke_w"):
            d[k] = tuple(float(v) for v in d.get(k, ()))
        return cls(**d)


@dataclass(frozen=True)
class Vocabulary:
    """Every class the model can name for one gallery: (C,) names, (C, D) unit embeddings,
    and which of them the gallery holds."""

    names: tuple
    embeddings: np.ndarray
    in_gallery: np.ndarray  # (C,) bool
    gallery_row: dict  # class_key of a gallery label -> its row


@dataclass(frozen=True)
class Evidence:
    top_label: str
    agree: int
    margin: float
    label_mass: float
    gallery_mass: float
    known: str  # the known class with the most posterior
    known_p: float
    known_in_gallery: bool


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def vocabulary(known_names: Sequence[str], known: np.ndarray, gallery_labels: Sequence[str],
               embed_text: Any = None) -> Vocabulary:
    """Training classes (`known`, their prototypes) plus the gallery's classes: a gallery
    class with no training class of its name is embedded by `embed_text(names) -> (n, D)`
    (the text head); without it that class has no posterior of its own."""
    names = list(known_names)
    keys = [class_key(n) for n in names]
    emb = [_unit(known)]
    wanted = sorted({class_key(lab) for lab in gallery_labels if lab})
    new = [k for k in wanted if k not in keys]
    if new and embed_text is not None:
        emb.append(_unit(embed_text(new)))
        names += new
        keys += new
    row = {k: i for i, k in enumerate(keys)}
    in_gal = np.zeros(len(names), bool)
    in_gal[[row[k] for k in wanted if k in row]] = True
    return Vocabulary(tuple(names), np.concatenate(emb).astype(np.float32), in_gal,
                      {k: row[k] for k in wanted if k in row})


def class_scores(q: np.ndarray, embeddings: np.ndarray, labels: Sequence[str]) -> dict:
    """{class: best cosine of its pictures} for one (D,) query."""
    sims = np.asarray(embeddings, dtype=np.float32) @ np.asarray(q, dtype=np.float32)
    names, inv = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    best = np.full(len(names), -2.0, np.float32)
    np.maximum.at(best, inv, sims)
    return dict(zip(names.tolist(), best.tolist()))


def evidence(q: np.ndarray, ranked_labels: Sequence[str], per_class: dict, vocab: Vocabulary,
             tau: float) -> Evidence:
    """One query's evidence: `ranked_labels` as the search ranks results (at least the
    first row), `per_class` from `class_scores`."""
    top = ranked_labels[0] if len(ranked_labels) else ""
    agree = sum(1 for lab in ranked_labels[:TOP] if lab == top)
    others = [s for c, s in per_class.items() if c != top]
    margin = float(per_class.get(top, 0.0) - (max(others) if others else -1.0))
    logits = vocab.embeddings @ np.asarray(q, dtype=np.float32) / tau
    p = np.exp(logits - logits.max())
    p /= p.sum()
    r = vocab.gallery_row.get(class_key(top)) if top else None
    best = int(p.argmax())
    return Evidence(top, agree, margin, float(p[r]) if r is not None else 0.0, float(p[vocab.in_gallery].sum()),
                    vocab.names[best], float(p[best]), bool(vocab.in_gallery[best]))


def ink_share(model_input: Any) -> float:
    """Share of the model input's pixels that are ink (what the encoder saw)."""
    a = np.asarray(model_input.convert("L") if hasattr(model_input, "convert") else model_input, dtype=np.float32)
    if a.ndim == 3:
        a = a.mean(-1)
    return float(((255.0 - a) > INK_THRESHOLD).mean())


def is_dot(drawing: Any, brush: Optional[float]) -> bool:
    """Too small to be a drawing: all ink within DOT_EXTENT pen widths. Strokes need the
    pen width (`brush`, as the page sends it; without it only a single point is a dot);
    an image's own pen width is its ink's thinnest extent, so the ink's box against the
    image's side is used instead (a 384 px canvas: under ~12 px)."""
    if isinstance(drawing, (list, tuple)):
        pts = read_strokes(drawing)
        if not pts:
            return False
        allp = np.concatenate(pts)
        extent = float((allp.max(0) - allp.min(0)).max())
        return extent <= (DOT_EXTENT * brush if brush else 0.0)
    from sbir_core.data.preprocess import ink_mask

    on = ink_mask(drawing) > INK_THRESHOLD
    if not on.any():
        return False
    ys, xs = np.nonzero(on)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    return extent <= 0.03 * max(on.shape)


def _simplify(p: np.ndarray, eps: float) -> np.ndarray:
    """Ramer-Douglas-Peucker: the corners of a stroke, so that dense mouse points and
    QuickDraw's simplified strokes give the same turning."""
    if len(p) < 3:
        return p
    a, b = p[0], p[-1]
    d = b - a
    n = float(np.hypot(*d))
    dist = (np.abs(d[0] * (p[:, 1] - a[1]) - d[1] * (p[:, 0] - a[0])) / n if n > 0
            else np.linalg.norm(p - a, axis=1))
    i = int(dist.argmax())
    if dist[i] <= eps:
        return np.stack([a, b])
    return np.concatenate([_simplify(p[:i + 1], eps)[:-1], _simplify(p[i:], eps)])


def _simplified(strokes: Any) -> tuple[list[np.ndarray], float]:
    """Each stroke's corners (simplified at 1% of the drawing's width) and that width."""
    pts = [np.asarray(p, np.float64) for p in read_strokes(strokes) if len(p)]
    if not pts:
        return [], 1.0
    ext = float(np.ptp(np.concatenate(pts), 0).max()) or 1.0
    return [_simplify(p, 0.01 * ext) for p in pts], ext


def _turning(simple: list[np.ndarray], ext: float) -> tuple[float, float]:
    turn = length = 0.0
    for q in simple:
        seg = np.diff(q, axis=0)
        seg = seg[np.hypot(seg[:, 0], seg[:, 1]) > 0]
        length += float(np.hypot(seg[:, 0], seg[:, 1]).sum()) / ext
        if len(seg) > 1:
            ang = np.arctan2(seg[:, 1], seg[:, 0])
            turn += float(np.abs((np.diff(ang) + np.pi) % (2 * np.pi) - np.pi).sum())
    return turn, turn / max(length, 1e-6)


def stroke_turning(strokes: Any) -> tuple[float, float]:
    """(total turning in radians, turning per drawing-width of line) of strokes simplified
    at 1% of the drawing's width: a scrawl turns far more than any drawing."""
    simple, ext = _simplified(strokes)
    return _turning(simple, ext) if simple else (0.0, 0.0)


def _features(simple: list[np.ndarray], ext: float, turn: float, density: float) -> np.ndarray:
    straight = float(np.mean([len(q) <= 2 for q in simple]))
    spanning = float(np.mean([np.hypot(*(q[-1] - q[0])) / ext > 0.5 for q in simple]))
    return np.array([np.log1p(len(simple)), straight, spanning, straight * spanning, np.log1p(turn),
                     np.log1p(density)], np.float32)


def stroke_features(strokes: Any) -> np.ndarray:
    """What the stroke probe reads: log stroke count, the share of strokes that are one
    straight segment, of those spanning half the drawing, their product, log turning and
    log turning per width (strokes simplified at 1% of the drawing's width)."""
    simple, ext = _simplified(strokes)
    if not simple:
        return np.zeros(6, np.float32)
    return _features(simple, ext, *_turning(simple, ext))


def strokes_unreadable(rule: Rule, strokes: Any) -> bool:
    """A scrawl (turning past any doodle's) or random lines (the stroke probe). Runs on
    every stroke a class draws, so the strokes are simplified once."""
    simple, ext = _simplified(strokes)
    if not simple:
        return False
    turn, density = _turning(simple, ext)
    if turn > rule.scribble_turn or density > rule.scribble_density:
        return True
    w = np.asarray(rule.stroke_w, dtype=np.float32)
    return bool(len(w)) and float(np.dot(w[:-1], _features(simple, ext, turn, density)) + w[-1]) > 0


def junk_score(rule: Rule, embedding: np.ndarray, ink: float) -> float:
    """The unreadable probe's score (> 0: a scribble or random lines, not a drawing)."""
    w = np.asarray(rule.junk_w, dtype=np.float32)
    return float(np.dot(w[:-2], embedding) + w[-2] * ink + w[-1])


def decide(rule: Rule, ev: Optional[Evidence], unreadable: bool = False) -> tuple[str, Optional[str]]:
    """(level, guess). `ev` None (no labelled gallery): only "unreadable" or "closest"."""
    if unreadable:
        return "unreadable", None
    if ev is None or not ev.top_label:
        return "closest", None
    guess = ev.known if (not ev.known_in_gallery and ev.known_p >= rule.guess_p) else None
    if ev.agree >= rule.sure_agree and ev.margin >= rule.sure_margin and ev.label_mass >= rule.sure_label_mass:
        return "sure", None
    if ev.gallery_mass < rule.absent_mass and ev.margin < rule.absent_margin:
        return "absent", guess
    return "closest", guess


# ----------------------------------------------------------------------------- stored rule
def rule_path(checkpoint: Path) -> Path:
    """Where a checkpoint's rule lives: next to it, `<name>.confidence.json` (for
    `default.safetensors`, its shards or their index: `default.confidence.json`)."""
    p = Path(checkpoint)
    stem = p.name.split(".safetensors")[0] if ".safetensors" in p.name else p.stem
    return p.with_name(re.sub(r"-\d{5}-of-\d{5}$", "", stem) + ".confidence.json")


def save_rule(rule: Rule, checkpoint: Path) -> Path:
    p = rule_path(checkpoint)
    p.write_text(json.dumps(rule.to_json(), indent=1) + "\n")
    return p


def rule_for(encoder: Any) -> Optional[Rule]:
    """The one place the calibrated rule is read: the file next to the encoder's
    checkpoint (None for the raw backbone, or a checkpoint never calibrated)."""
    from sbir_core.gallery.identity import checkpoint_spec
    from sbir_core.paths import checkpoint_path

    spec = checkpoint_spec(encoder)
    path = None if spec == "none" or spec.startswith("<") else (checkpoint_path() if spec == "default" else spec)
    if path is None or not rule_path(Path(path)).is_file():
        return None
    return Rule.from_json(json.loads(rule_path(Path(path)).read_text()))


_VOCABS: LRUCache = LRUCache(16)  # per (encoder, gallery classes): the text head is slow
_VOCAB_LOCK = threading.Lock()


def gallery_vocabulary(encoder: Any, labels: Sequence[str]) -> Optional[Vocabulary]:
    """The vocabulary of a gallery searched with this encoder (cached, bounded); None when
    the encoder has no training-class prototypes or the gallery no labels."""
    protos = getattr(encoder, "seen_prototypes", None)
    names = (getattr(encoder, "meta", None) or {}).get("classes_trained_on")
    if protos is None or not names or len(names) != len(protos) or not any(labels):
        return None
    key = (str(getattr(encoder, "encoder_id", id(encoder))), tuple(sorted(set(labels))))
    with _VOCAB_LOCK:
        v = _VOCABS.get(key)
    if v is None:
        embed = None
        if getattr(getattr(encoder, "head", None), "embed_text", None) is not None:
            embed = lambda ns: encoder.encode_text(ns).float().cpu().numpy()  # noqa: E731
        v = vocabulary(names, np.asarray(protos), labels, embed)
        with _VOCAB_LOCK:
            _VOCABS[key] = v
    return v


# Up to this many pictures every one is scored for the evidence (O(N) a search); beyond, the
# best SHORTLIST results stand in (a class absent from them scores below all of them anyway).
EVERY_PICTURE_MAX = 50_000
EVERY_PICTURE_SHORTLIST = 256


def assess(rule: Optional[Rule], encoder: Any, gallery: Any, query: np.ndarray, ranked_labels: Sequence[str], *,
           kind: str = "sketch", drawing: Any = None, brush: Optional[float] = None, model_input: Any = None,
           text: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(level, guess) of one search: `gallery` a `gallery.index.Gallery`, `ranked_labels` its
    results' classes in order. Drawings can be "unreadable" (`drawing` as given, `model_input`
    as the encoder saw it); a typed word that names a class the model knows and the gallery
    lacks is "absent" (no guess: the word is the guess). ("", None) without a rule."""
    if rule is None:
        return "", None
    if kind == "sketch" and drawing is not None and (
            is_dot(drawing, brush) or (isinstance(drawing, (list, tuple)) and strokes_unreadable(rule, drawing))
            or (model_input is not None and junk_score(rule, query, ink_share(model_input)) > 0)):
        return "unreadable", None
    if len(gallery) <= EVERY_PICTURE_MAX:
        labels, emb, row_labels = gallery.labels, gallery.raw_embeddings, gallery.labels
    else:  # a big gallery: its distinct classes, and each class's best among the query's shortlist
        _, rows = gallery.knn(np.asarray(query)[None], EVERY_PICTURE_SHORTLIST)
        labels, emb = gallery.items.distinct("label"), gallery.raw_embeddings[rows[0]]
        row_labels = [gallery.labels[r] for r in rows[0]]
    vocab = gallery_vocabulary(encoder, labels)
    if vocab is None or not len(ranked_labels):
        return decide(rule, None)
    ev = evidence(query, ranked_labels, class_scores(query, emb, row_labels), vocab, rule.tau)
    level, guess = decide(rule, ev)
    if kind == "text" and text:
        key = class_key(text)
        if key in vocab.gallery_row:
            level = "closest" if level == "absent" else level  # the gallery has what was typed
        elif key in {class_key(n) for n in vocab.names}:
            level = "absent"
        guess = None
    return level, guess
