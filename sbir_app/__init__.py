"""The browser app: a thin Gradio layer over `sbir_core.service.RetrievalService`.

`page` lays the page out and launches it, `callbacks` turns page events into service calls
and words the answers, `served` hands pictures to Gradio safely; `static/` holds the CSS
and the drawing canvas' script. `app.py` at the repository root is the entry point.
"""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls
# Gradio's queue rebuilds a pandas table of its last 10,000 events after every event (process
# time percentiles for its API page): a class's searches paid 6.5% of the server's time for it,
# growing with the lesson. Every 500 events over the last 1,000 is plenty.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "500")
os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")

from sbir_app.callbacks import (  # noqa: E402
    CANVAS,
    NO_EXPLANATION,
    Callbacks,
    example_canvas,
    example_strokes,
    explanation_markdown,
    status_markdown,
)
from sbir_app.page import build_demo, launch  # noqa: E402
from sbir_app.served import ServedImages, served_folder  # noqa: E402
from sbir_core.data.examples import list_examples  # noqa: E402

__all__ = ["CANVAS", "NO_EXPLANATION", "Callbacks", "ServedImages", "build_demo", "example_canvas",
           "example_strokes", "explanation_markdown", "launch", "list_examples", "served_folder",
           "status_markdown"]
