"""Strokes are read in one format per drawing (issue 34): point lists [[x, y], ...] and
QuickDraw's [[xs], [ys]] are told apart once for the whole drawing (or named by
`format=`), never stroke by stroke, and lists read exactly like tuples."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sbir_core.data.drawing import load_stroke_file, parse_strokes, read_stroke_json
from sbir_core.data.examples import get_example
from sbir_core.data.preprocess import render_strokes
from sbir_core.data.strokes import StrokeError, read_strokes
from sbir_core.paths import EXAMPLES_DIR

ROOT = Path(__file__).resolve().parents[1]
# A drawing whose strokes all have two points, as point lists: a "V" and a bar.
TWO_POINT_PTS = [[[10, 10], [50, 90]], [[50, 90], [90, 10]], [[20, 60], [80, 60]]]
# The same segments in QuickDraw's [[xs], [ys]] form.
TWO_POINT_QD = [[[10, 50], [10, 90]], [[50, 90], [90, 10]], [[20, 80], [60, 60]]]


def _json_strokes(name: str) -> list:
    """An example drawing as a client loads it: plain JSON lists."""
    return json.loads((EXAMPLES_DIR / f"{name}.json").read_text())["strokes"]


def _as_tuples(strokes: list) -> list:
    return [[tuple(p) for p in s] for s in strokes]


def _pixels(strokes, **kw) -> np.ndarray:
    return np.asarray(render_strokes(strokes, **kw))


# ----------------------------------------------------------------------------- the reader
def test_lists_and_tuples_read_alike_even_with_two_point_strokes():
    for strokes in (TWO_POINT_PTS, _json_strokes("guitar"), _json_strokes("tree")):
        a, b = read_strokes(strokes), read_strokes(_as_tuples(strokes))
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
        assert all(np.array_equal(x, np.asarray(s, np.float32)) for x, s in zip(a, strokes))  # points, as given
        assert np.array_equal(_pixels(strokes), _pixels(_as_tuples(strokes)))


def test_format_is_decided_once_per_drawing():
    # One long QuickDraw stroke decides for the whole drawing: its 2-point strokes are QuickDraw too.
    qd = [[[0, 40, 80], [0, 80, 0]]] + TWO_POINT_QD
    pts = [[[0, 0], [40, 80], [80, 0]]] + TWO_POINT_PTS
    assert all(np.array_equal(x, y) for x, y in zip(read_strokes(qd), read_strokes(pts)))
    # and one long point-list stroke makes the 2-point strokes point lists
    assert all(np.array_equal(x, np.asarray(s, np.float32)) for x, s in zip(read_strokes(pts), pts))


def test_all_two_point_quickdraw_drawing_is_read_when_the_format_is_given():
    got = read_strokes(TWO_POINT_QD, format="quickdraw")
    assert all(np.array_equal(x, np.asarray(s, np.float32)) for x, s in zip(got, TWO_POINT_PTS))
    assert np.array_equal(_pixels(got), _pixels(TWO_POINT_PTS))
    # Ambiguous without a format (every stroke 2 x 2): points win, the canvas' form.
    undecided = read_strokes(TWO_POINT_QD)
    assert all(np.array_equal(x, np.asarray(s, np.float32)) for x, s in zip(undecided, TWO_POINT_QD))
    # A point-list drawing named as points stays as it is.
    assert all(np.array_equal(x, np.asarray(s, np.float32))
               for x, s in zip(read_strokes(TWO_POINT_PTS, format="points"), TWO_POINT_PTS))


@pytest.mark.parametrize("bad, fmt", [
    ([[[0, 1, 2], [0, 1, 2]], [[0, 0], [1, 1], [2, 2]]], None),  # one QuickDraw stroke, one point list
    ([[[0, 1, 2], [0, 1]]], None),  # ragged QuickDraw stroke
    ([[[0, 0, 0], [1, 1, 1], [2, 2, 2]]], None),  # 3-number points
    ([[[0, 0], [1, 1], [2, 2]]], "quickdraw"),  # points named QuickDraw
    ([[[0, 1, 2], [0, 1, 2]]], "points"),  # QuickDraw named points
    (TWO_POINT_PTS, "svg"),
    ([[[0, float("inf")], [1, 1]]], None),
    ("[[0, 0]]", None),
])
def test_bad_drawings_get_one_plain_sentence(bad, fmt):
    with pytest.raises(StrokeError) as err:
        read_strokes(bad, fmt)
    assert "\n" not in str(err.value) and len(str(err.value)) < 120


# ----------------------------------------------------------------------------- entry points
def test_canvas_json_and_stroke_files_use_the_reader(tmp_path):
    canvas = json.dumps({"strokes": TWO_POINT_PTS, "brush": 6})  # what the page sends
    assert read_stroke_json(canvas) == [[tuple(map(float, p)) for p in s] for s in TWO_POINT_PTS]
    assert parse_strokes({"format": "quickdraw", "strokes": TWO_POINT_QD}) == read_stroke_json(canvas)
    assert parse_strokes(TWO_POINT_QD, format="quickdraw") == read_stroke_json(canvas)
    # QuickDraw .ndjson: every drawing is read as QuickDraw, whatever its strokes' lengths
    nd = tmp_path / "segments.ndjson"
    nd.write_text(json.dumps({"word": "v", "drawing": TWO_POINT_QD}) + "\n")
    assert load_stroke_file(nd) == read_stroke_json(canvas)
    js = tmp_path / "segments.json"
    js.write_text(canvas)
    assert load_stroke_file(js) == read_stroke_json(canvas)


def test_example_files_go_through_the_reader():
    e = get_example("tree")
    assert [list(s) for s in e.strokes] == [[tuple(map(float, p)) for p in s] for s in _json_strokes("tree")]
    assert np.array_equal(np.asarray(e.render()), _pixels(_json_strokes("tree")))


# ----------------------------------------------------------------------------- shipped model
# shipped_service: conftest (the app's service over the shipped model and gallery)


@pytest.mark.parametrize("name", ["guitar", "tree"])
def test_json_examples_embed_and_search_like_tuples_with_the_shipped_model(shipped_service, name):
    """Before issue 34, JSON lists of the guitar gave cosine 0.50 to its tuples (the tree
    0.33), and the guitar's first result was a penguin."""
    enc = shipped_service.encoder
    lists = _json_strokes(name)
    assert any(len(s) == 2 for s in lists)  # the case that used to go wrong
    a, b = enc.encode_sketch(lists), enc.encode_sketch(_as_tuples(lists))
    assert np.array_equal(a, b)
    first = shipped_service.search_sketch(lists, 5, "default")
    assert first.ok, first.message
    assert name in [h.label for h in first.hits], [h.label for h in first.hits]  # the first row
    again = shipped_service.search_sketch(_as_tuples(lists), 5, "default")
    assert [h.label for h in again.hits] == [h.label for h in first.hits]


def test_two_point_quickdraw_doodle_embeds_like_its_points_with_the_shipped_model(shipped_service):
    enc = shipped_service.encoder
    want = enc.encode_sketch(TWO_POINT_PTS)
    assert np.array_equal(enc.encode_sketch(TWO_POINT_QD, format="quickdraw"), want)
    assert np.array_equal(enc.encode_sketch(_as_tuples(TWO_POINT_PTS)), want)
    from sbir_core.gallery.query import encode_query

    assert np.allclose(encode_query(enc, sketch=TWO_POINT_QD, format="quickdraw"), want, atol=1e-6)
    assert float(enc.encode_sketch(TWO_POINT_QD) @ want) < 0.99  # read as points it is another drawing
