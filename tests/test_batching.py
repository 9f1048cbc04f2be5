"""Micro-batched query encoding (gallery.batching): drawings searched at the same time share
one forward pass, and each gets exactly what encoding it alone gives."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import at_once
from sbir_core.data.examples import list_examples
from sbir_core.gallery.batching import SketchBatcher
from sbir_core.gallery.query import encode_sketch_query


@pytest.fixture(scope="module")
def shipped_encoder(shipped_service):
    """The shipped checkpoint as the app loads it (flip averaging on: each drawing is two rows
    of the batch); conftest's session service holds it."""
    return shipped_service.encoder


def test_concurrent_drawings_share_passes_and_equal_unbatched(shipped_encoder):
    drawings = [e.render(size=200, line_width=3) for e in list_examples()[:6]]
    alone = [encode_sketch_query(shipped_encoder, d) for d in drawings]
    # A window long enough that the six threads' drawings meet in the worker's queue.
    batcher = SketchBatcher(shipped_encoder, max_batch=6, window_s=0.5)
    together = at_once(lambda d: encode_sketch_query(shipped_encoder, d, batcher=batcher), drawings)
    assert batcher.rows == 6 and batcher.batches < 6, "no two drawings shared a pass"
    for a, b in zip(alone, together):
        assert not isinstance(b, BaseException), b
        np.testing.assert_allclose(b.embedding, a.embedding, atol=1e-5)  # each its own row, in order
        assert b.embedding.dtype == np.float32 and abs(float(np.linalg.norm(b.embedding)) - 1) < 1e-5
        assert torch.allclose(b.tokens, a.tokens, atol=1e-4)
        assert b.model_input.tobytes() == a.model_input.tobytes()
    # The drawings differ, so a row handed to the wrong caller would not pass the loop above.
    assert float(together[0].embedding @ together[1].embedding) < 0.999


def test_a_lone_query_does_not_wait_for_a_batch(shipped_encoder):
    batcher = SketchBatcher(shipped_encoder)  # window 0: whatever queued, nothing more
    d = list_examples()[0].render(size=200, line_width=3)
    q = encode_sketch_query(shipped_encoder, d, batcher=batcher)
    np.testing.assert_allclose(q.embedding, encode_sketch_query(shipped_encoder, d).embedding, atol=1e-5)
    assert (batcher.batches, batcher.rows) == (1, 1)


def test_a_caller_with_its_answer_sees_its_pass_counted(shipped_encoder, monkeypatch):
    """The counters (read by tests and benchmarks as soon as the callers return) include a
    pass before any of its callers is answered, however late the worker thread runs on."""
    import concurrent.futures
    import time

    from sbir_core.gallery import batching

    class SlowToReturn(concurrent.futures.Future):  # the worker is descheduled after each answer
        def set_result(self, result):
            super().set_result(result)
            time.sleep(0.2)

    monkeypatch.setattr(batching, "Future", SlowToReturn)
    batcher = SketchBatcher(shipped_encoder)
    x = torch.ones(3, 64, 64)
    batcher.encode(x)
    assert (batcher.batches, batcher.rows) == (1, 1)
    batcher.encode(x)
    assert (batcher.batches, batcher.rows) == (2, 2)


def test_a_failed_pass_fails_its_callers_and_the_worker_goes_on(shipped_encoder):
    batcher = SketchBatcher(shipped_encoder)
    with pytest.raises(RuntimeError):
        batcher.encode(torch.zeros(5, 7))  # not an image: the forward pass raises
    d = list_examples()[1].render(size=200, line_width=3)
    q = encode_sketch_query(shipped_encoder, d, batcher=batcher)  # the next caller is served
    np.testing.assert_allclose(q.embedding, encode_sketch_query(shipped_encoder, d).embedding, atol=1e-5)


def test_the_service_answers_concurrent_searches_as_sequential_ones(shipped_encoder, tmp_path):
    """The page's path: many visitors' strokes at once through RetrievalService give each
    visitor the first row they would get alone (the shipped gallery)."""
    from sbir_core.service import RetrievalService

    svc = RetrievalService(encoder=shipped_encoder, relation=None, cache_dir=tmp_path / "cache",
                           uploads_dir=tmp_path / "uploads")
    strokes = [[list(map(list, s)) for s in e.strokes] for e in list_examples()[:8]]
    alone = [svc.search_sketch(s, 5).hits for s in strokes]
    svc._queries = type(svc._queries)(1)  # no answers from the cache: every search encodes
    together = at_once(lambda s: svc.search_sketch(s, 5).hits, strokes)
    for a, b in zip(alone, together):
        assert [h.index for h in b] == [h.index for h in a]
        np.testing.assert_allclose([h.score for h in b], [h.score for h in a], atol=1e-5)
    assert svc._batcher.rows == 2 * len(strokes)
