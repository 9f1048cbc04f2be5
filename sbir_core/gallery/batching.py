"""Micro-batching: sketch queries that arrive together share one forward pass.

A class drawing at once sends a search per stroke, about 30 a second. On a CPU one pass over
a batch of B drawings costs far less than B passes of one (measured in docs/BENCHMARKS.md
section 10), so each caller prepares its drawing in its own thread and hands the model input
to one worker thread, which encodes everything that queued while its previous pass ran.
Nothing waits for a batch to fill: a lone query starts at once (`window_s` = 0), so one
visitor is served as fast as without batching. Each row's result equals encoding it alone
(eval mode: no batch statistics; tests/test_batching.py compares them).
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Optional

import numpy as np
import torch

DEFAULT_MAX_BATCH = 8  # drawings per pass (16 images with their mirror images); 16 costs more per drawing
RESULT_TIMEOUT_S = 60.0  # a caller never waits forever on a stuck worker


class SketchBatcher:
    """Encodes (3, H, W) sketch tensors in batches, for any number of calling threads."""

    def __init__(self, encoder: Any, max_batch: int = DEFAULT_MAX_BATCH, window_s: float = 0.0) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.encoder, self.max_batch, self.window_s = encoder, int(max_batch), float(window_s)
        self._queue: "queue.Queue[tuple[torch.Tensor, Future]]" = queue.Queue()
        self._lock = threading.Lock()
        self._worker: Optional[threading.Thread] = None
        self.batches = 0  # passes run and rows encoded (for tests and benchmarks)
        self.rows = 0

    def encode(self, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """One preprocessed sketch (3, H, W) in [0, 1] -> (L2-normalised (D,) float32
        embedding, its (T, C) token grid), as `encoder.encode(x[None], "sketch")` gives it."""
        fut: Future = Future()
        self._queue.put((x, fut))
        self._start()
        return fut.result(timeout=RESULT_TIMEOUT_S)

    def _start(self) -> None:
        if self._worker is None:
            with self._lock:
                if self._worker is None:  # one worker per batcher, started on first use
                    self._worker = threading.Thread(target=self._run, name="sketch-batcher", daemon=True)
                    self._worker.start()

    def _take(self) -> list[tuple[torch.Tensor, Future]]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:  # what queued while the last pass ran, and what arrives within the window
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                             if self.window_s > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                out = self.encoder.encode(torch.stack([x for x, _ in batch]), "sketch")
                emb = out.normalized()
                # counted before any caller is answered: a caller may read them the moment it returns
                self.batches, self.rows = self.batches + 1, self.rows + len(batch)
                for i, (_, fut) in enumerate(batch):
                    # clone: a cached query keeps its own row, not the whole batch's tokens
                    fut.set_result((np.ascontiguousarray(emb[i]), out.tokens[i].clone()))
            except BaseException as exc:  # every caller of this pass gets the error, the worker goes on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
