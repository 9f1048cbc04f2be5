"""What the page says, in words a class of 12-year-olds reads (issues 31 and 32): the status
is worded from the search's fields (level, guess, hits), never claims a match the search
did not assess, and never says the canvas is empty while it holds lines; captions follow
the order of the results; no technical word is shown by default."""
from __future__ import annotations

import re

import pytest

app = pytest.importorskip("sbir_app", reason="the app needs gradio")

from sbir_app.callbacks import UNREADABLE, Callbacks, explanation_markdown, status_markdown  # noqa: E402
from sbir_core.gallery.results import SearchResult  # noqa: E402
from sbir_core.service import EMPTY_SKETCH_MESSAGE, ExplanationImages, SearchOutcome  # noqa: E402

BANNED = re.compile(r"token|t-sne|embedding|patch", re.I)


def _hits(*labels):
    return [SearchResult(rank=i, index=i, path=f"/g/{i}.jpg", thumb=f"/t/{i}.jpg", score=0.5 - 0.01 * i, label=lab)
            for i, lab in enumerate(labels)]


def _shown(md: str) -> str:
    """What the page shows before anyone opens "Details"."""
    return md.split("<details", 1)[0]


def _out(level="", guess=None, labels=("ice_cream", "cat")):
    return SearchOutcome(True, "First result: ice cream (similarity 0.50) · 2 results · sketch → photo · 9 ms",
                         _hits(*labels), level=level, guess=guess)


@pytest.mark.parametrize("level,guess,want", [
    ("sure", None, "This looks like an **ice cream**."),
    ("closest", None, "Not sure it's here"),
    ("absent", "kangaroo", "This looks like a **kangaroo**; this gallery has none."),
    ("unreadable", None, UNREADABLE),
    ("", None, "Closest pictures: an **ice cream** comes first."),  # not assessed: no claim
])
def test_status_is_worded_from_the_fields(level, guess, want):
    md = status_markdown(_out(level, guess))
    shown = _shown(md)
    assert want in shown, shown
    assert "Best match" not in md and not BANNED.search(shown)
    assert "<summary>Details</summary>" in md and "similarity 0.50" in md.split("<details", 1)[1]
    if level != "sure":  # only a sure search names the object as what was drawn
        assert "This looks like an" not in shown


def test_absent_without_a_guess_and_no_results():
    shown = _shown(status_markdown(_out("absent")))
    assert "Not in this gallery?" in shown and "has none" not in shown
    assert "No pictures" in status_markdown(SearchOutcome(True, "No results (sketch → photo).", []))


def test_an_empty_answer_for_a_canvas_with_lines_never_says_it_is_empty():
    out = SearchOutcome(False, EMPTY_SKETCH_MESSAGE, problem="blank")
    assert "empty" in status_markdown(out) and "empty" not in status_markdown(out, drew=True)
    assert UNREADABLE in status_markdown(out, drew=True)


def test_a_tiny_drawing_through_the_callback_is_called_unreadable_not_empty(app_service):
    """A dot on the canvas: whatever the service answers, the status does not say "empty"."""
    cb = Callbacks(app_service)
    _items, msg, _q = cb.search_strokes('{"strokes": [[[100, 100]]], "brush": 1}')
    assert "canvas is empty" not in msg, msg
    _items, msg, _q = cb.search_strokes('{"strokes": [], "brush": 6}')
    assert "canvas is empty" in msg  # nothing drawn: that is what it says


def test_explanation_in_plain_words_with_details():
    hit = _hits("cat", "dog")[1]
    ex = ExplanationImages(True, "Result 2: dog (similarity 0.49). Lines join the parts of your drawing ...",
                           hit=hit)
    md = explanation_markdown(ex)
    assert md.startswith("Result 2: **dog**.") and "your drawing" in _shown(md)
    assert "your photo" in explanation_markdown(ex, "photo")
    assert "similarity 0.49" in md.split("<details", 1)[1] and not BANNED.search(_shown(md))
    assert explanation_markdown(ExplanationImages(False, "Click one of the results.")) == "Click one of the results."


def test_captions_follow_the_order_and_name_the_class(cb, app_service):
    items, _msg, query = cb.search_strokes('[[[40, 40], [200, 40], [200, 200], [40, 200], [40, 40]]]', 6, "default")
    assert [c for _t, c in items] == [f"{i + 1}. {h.label}" for i, h in enumerate(query.hits)]
    # a clicked thumbnail is found by its row; the class shown with it must be that row's
    thumb, _caption = items[2]
    row = app_service.row_of_thumbnail("default", thumb, query.hits[2].label)
    assert row == query.hits[2].index
    assert app_service.row_of_thumbnail("default", thumb, "unicorn") is None


@pytest.fixture
def cb(app_service):
    return Callbacks(app_service)


def test_no_technical_words_in_the_page_labels(app_service):
    demo = app.build_demo(app_service)
    shown = []
    for block in demo.blocks.values():
        for attr in ("label", "value", "placeholder", "info"):
            v = getattr(block, attr, None)
            if isinstance(v, str):
                shown.append(v)
    text = "\n".join(_shown(s) for s in shown)
    assert "How does it work?" in text
    assert not BANNED.search(text), BANNED.findall(text)
