"""Keeping the map from crowding out searches when a whole class draws at once."""
from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable


class DutyCycle:
    """Runs a function so that, back to back, it takes at most `share` of the time.

    The map after each search costs more than the search itself (docs/BENCHMARKS.md section
    10); with 30 pupils drawing, maps alone would fill a core and every search would wait
    behind them. After a run of t seconds the next run starts no sooner than
    t * (1 / share - 1) after it ended, so searches keep the rest. One visitor is never
    slowed (a stroke a second leaves far longer gaps); in a class each pupil's map follows
    their drawing a few seconds behind, still the latest drawing (the page asks for maps
    `always_last`). A slower machine makes t longer, and the pause with it."""

    def __init__(self, share: float = 0.4) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.share = share
        self._lock = threading.Lock()
        self._next = 0.0  # monotonic time before which no run starts

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def paced(*args: Any, **kwargs: Any) -> Any:
            with self._lock:  # one run at a time; the pause counts from the previous run's end
                time.sleep(max(0.0, self._next - time.monotonic()))
                t0 = time.monotonic()
                try:
                    return fn(*args, **kwargs)
                finally:
                    end = time.monotonic()
                    self._next = end + (end - t0) * (1 / self.share - 1)
        return paced
