#!/usr/bin/env python3
"""Sketch search in the browser: draw an object, find matching pictures, see why they match.

    python app.py                         # http://127.0.0.1:7860, gallery galleries/default
    python app.py --host 0.0.0.0 --port 8080
    python app.py --gallery ~/Pictures/animals [--name animals] [--sketch-gallery]

GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are respected (flags win). The page is a thin
Gradio layer over `sbir_core.service.RetrievalService`; every callback below only
converts between Gradio values and the service's plain Python objects.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import logging
import os
import secrets
import sys
import threading
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from sbir_core.data.drawing import MAX_CANVAS_PIXELS, read_stroke_json, stroke_brush  # noqa: E402
from sbir_core.data.examples import list_examples  # noqa: E402
from sbir_core.data.images import MAX_UPLOAD_BYTES, open_upload  # noqa: E402
from sbir_core.errors import InputError  # noqa: E402
from sbir_core.gallery.store import display_name  # noqa: E402
from sbir_core.paths import SHIPPED_GALLERIES  # noqa: E402
from sbir_core.service import (  # noqa: E402
    DEFAULT_K,
    EMPTY_SKETCH_MESSAGE,
    MAX_K,
    Query,
    RetrievalService,
    SearchOutcome,
    clamp_k,
)

log = logging.getLogger("sbir_app")

CANVAS = (384, 384)  # size of example renders and API canvases (the page sends strokes, not pixels)
BRUSH_RADIUS = 3  # ~6 px lines on the 384 px canvas
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
CONCURRENCY = 2  # 2 CPU cores: two searches at a time, the rest wait in the queue
NO_EXPLANATION = "Click a result to see why it matched."

TITLE = "Sketch Search"
INSTRUCTIONS = ("**Draw an object** on the white canvas: matching pictures appear after every stroke. "
                "Click a result to see *why* it matched — even for things the model never saw in training.")

CSS = """
#title h1 { margin-bottom: 0; }
#title p { margin-top: 4px; font-size: 1.05rem; }
#notice { border-left: 4px solid #f59e0b; background: #fffbeb; padding: 6px 12px; border-radius: 6px; }
#notice:empty, #notice .prose:empty { display: none; }
#sketch { position: relative; height: 470px; border: 1px solid var(--border-color-primary);
  border-radius: var(--radius-lg); overflow: hidden; background: #fff; padding: 0 !important; }
#sketch canvas { position: absolute; inset: 0; width: 100%; height: 100%; display: block; background: #fff;
  cursor: crosshair; touch-action: none; user-select: none; -webkit-user-select: none; }
#sketch .sbir-tools { position: absolute; top: 6px; right: 6px; z-index: 2; display: flex; gap: 6px;
  align-items: center; background: rgba(255,255,255,.92); border: 1px solid var(--border-color-primary);
  border-radius: 8px; padding: 3px 8px; font-size: 0.8rem; color: #374151; }
#sketch .sbir-tools button { border: 1px solid var(--border-color-primary); border-radius: 6px; background: #fff;
  padding: 2px 8px; cursor: pointer; }
#sketch .sbir-tools button:hover { background: #eef2ff; }
#sketch .sbir-tools input[type=range] { width: 80px; }
#sketch .sbir-label { position: absolute; top: 6px; left: 8px; z-index: 2; font-size: 0.8rem; color: #6b7280;
  pointer-events: none; }
#status { min-height: 2.2em; }
#classes summary { cursor: pointer; font-size: 0.9rem; color: #374151; }
#classes .chips { display: flex; flex-wrap: wrap; gap: 4px; max-height: 5.6em; overflow-y: auto; margin-top: 4px; }
#classes .chip { background: #eef2ff; border: 1px solid #c7d2fe; border-radius: 999px; padding: 0 8px;
  font-size: 0.8rem; line-height: 1.5; white-space: nowrap; }
#results img, #examples img { object-fit: contain !important; background: #fff; }
/* Captions under their thumbnails (Gradio draws them over the bottom of the picture). */
#results .thumbnail-item, #examples .thumbnail-item { aspect-ratio: auto !important; display: flex !important;
  flex-direction: column; overflow: hidden; }
#results .thumbnail-item > img, #examples .thumbnail-item > img { width: 100% !important; height: auto !important;
  aspect-ratio: 1 / 1; flex: none; }
#results .caption-label, #examples .caption-label { position: static !important; max-width: 100% !important;
  border: 0 !important; border-top: 1px solid var(--border-color-primary) !important; border-radius: 0 !important;
  background: var(--background-fill-secondary); padding: 2px 4px !important; text-align: center;
  white-space: normal; line-height: 1.15; font-size: 0.8rem; font-weight: 600; }
#examples .caption-label { font-size: 0.75rem; }
#results .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr)) !important; }
#examples .grid-container { grid-template-columns: repeat(6, minmax(0, 1fr)) !important; gap: 8px; }
/* Results take the height they need, scrolling past a limit; no tall box while empty. */
#results { height: auto !important; }
#results .grid-wrap { height: auto !important; min-height: 0 !important; max-height: 640px; }
#results > .empty { min-height: 0 !important; height: 90px !important; }
/* Its download button in the label's row, not over the first row's last picture. */
#results .gallery-container, #results .grid-wrap { position: static !important; }
#results .icon-button-wrapper.top-panel { top: 4px !important; right: 6px !important; }
/* The examples take the room their pictures need (no tall empty box under them). */
#examples, #examples .gallery-container, #examples .grid-wrap { height: auto !important; min-height: 0 !important;
  max-height: none !important; overflow: visible !important; }
/* Explanation pictures stay collapsed until a result is clicked (#explanation-text says so). */
#explanation:has(> .empty), #synthesis:has(> .empty), #heatmap:has(> .empty) { display: none !important; }
/* Pictures fit under their labels instead of being cut off at the bottom. */
#explanation, #synthesis, #heatmap, #tsne { display: flex !important; flex-direction: column; }
#explanation > .image-container, #synthesis > .image-container, #heatmap > .image-container,
#tsne > .image-container { flex: 1 1 0; min-height: 0; height: auto !important; }
#model-view, #model-view .image-container, #model-view button, #model-view .image-frame { height: auto !important; }
#model-view img { max-height: 190px; width: 100%; object-fit: contain; }
#explanation img, #synthesis img, #heatmap img, #tsne img { object-fit: contain !important; }
footer { display: none !important; }
/* Panel labels above their pictures, not over the top-left corner of them. */
#results [data-testid="block-label"], #explanation [data-testid="block-label"],
#synthesis [data-testid="block-label"], #heatmap [data-testid="block-label"], #tsne [data-testid="block-label"],
#model-view [data-testid="block-label"] { position: static !important; margin-bottom: 4px; }
/* From a 768 px tablet up: drawing and results side by side (Gradio wraps the columns). */
@media (min-width: 700px) {
  #top-row { flex-wrap: nowrap !important; }
  #top-row > #query-col, #top-row > #results-col { min-width: 0 !important; }
}
/* Tablets: a smaller canvas with a compact toolbar, 3 result columns, explanation above the map. */
@media (max-width: 1099px) {
  #sketch { height: 360px; }
  #sketch .sbir-label { top: auto; bottom: 6px; }
  #sketch .sbir-tools { gap: 4px; padding: 2px 4px; white-space: nowrap; }
  #sketch .sbir-tools input[type=range] { width: 56px; }
  #sketch .sbir-tools button { padding: 1px 6px; font-size: 0.8rem; font-weight: 400; }
  #k input[type=range] { min-width: 0; width: auto; flex: 1 1 auto; }
  #results .grid-container { grid-template-columns: repeat(3, minmax(0, 1fr)) !important; }
  #results .caption-label { font-size: 0.75rem; }
  #examples .grid-container { grid-template-columns: repeat(4, minmax(0, 1fr)) !important; }
  #under-canvas { flex-wrap: wrap !important; }
  #under-canvas > * { min-width: 100% !important; }
  #model-view img { max-height: 140px; }
  #why-row { flex-direction: column; }
  #why-row > #why-col, #why-row > #map-col { flex: none !important; width: 100%; }
  #tsne { height: 640px !important; }
}
@media (min-width: 1100px) and (max-width: 1599px) {
  #examples .grid-container { grid-template-columns: repeat(4, minmax(0, 1fr)) !important; }
}
/* Projectors: a bigger canvas, all 12 results in two rows, larger text and map. */
@media (min-width: 1600px) {
  #sketch { height: 520px; }
  #results .grid-container { grid-template-columns: repeat(6, minmax(0, 1fr)) !important; }
  #results .grid-wrap { max-height: 760px; }
  #results .caption-label { font-size: 0.95rem; }
  #status, #status .prose, #status p { font-size: 1.1rem !important; }
  #classes .chips { max-height: none; }
  #tsne { height: 700px !important; }
  #explanation { height: 440px !important; }
}
"""


# The drawing canvas: plain HTML (gr.HTML) plus this script (loaded in the page's <head>;
# scripts inside gr.HTML do not run). It keeps the strokes as point lists and, on every
# pointer release, writes them as JSON into the hidden #strokes textbox and fires its
# `input` event (an `input` DOM event for the value, then a keypress, which is what Gradio 6's
# textbox turns into its `input` event): one tiny request per stroke, no image export or upload.
SKETCH_HTML = """
<canvas aria-label="Drawing canvas" role="img"></canvas>
<div class="sbir-label">Your drawing</div>
<div class="sbir-tools">
  <label title="Brush size">Brush <input type="range" min="1" max="24" step="1" value="6"
         aria-label="Brush size" data-sbir="size"></label>
  <button type="button" data-sbir="undo" aria-label="Undo" title="Undo the last stroke">&#8630; Undo</button>
  <button type="button" data-sbir="clear" aria-label="Clear canvas" title="Clear canvas">&#10005; Clear</button>
</div>
"""

SKETCH_JS = r"""
<script>
(() => {
  if (window.sbirSketch) return;
  const S = {strokes: [], cur: null, size: 6, w: 0, h: 0, canvas: null, pid: null};
  window.sbirSketch = S;
  const find = () => document.querySelector('#sketch canvas');
  function sync() {
    const c = find();
    if (!c) return null;
    const dpr = window.devicePixelRatio || 1, w = c.clientWidth, h = c.clientHeight;
    if (c !== S.canvas || S.w !== w || S.h !== h || c.width !== Math.round(w * dpr)) {
      S.canvas = c; S.w = w; S.h = h;
      c.width = Math.max(1, Math.round(w * dpr)); c.height = Math.max(1, Math.round(h * dpr));
      redraw();
    }
    return c;
  }
  function ctx() {
    const c = S.canvas, g = c.getContext('2d'), k = c.width / Math.max(1, S.w);
    g.setTransform(k, 0, 0, k, 0, 0);
    g.lineCap = 'round'; g.lineJoin = 'round';
    return g;
  }
  function dot(g, p, size) { g.beginPath(); g.arc(p[0], p[1], size / 2, 0, 2 * Math.PI); g.fill(); }
  function drawStroke(g, st) {
    const p = st.points;
    g.strokeStyle = '#000'; g.fillStyle = '#000'; g.lineWidth = st.size;
    if (p.length === 1) return dot(g, p[0], st.size);
    g.beginPath(); g.moveTo(p[0][0], p[0][1]);
    for (let i = 1; i < p.length; i++) g.lineTo(p[i][0], p[i][1]);
    g.stroke();
  }
  function redraw() {
    if (!S.canvas) return;
    const g = ctx();
    g.fillStyle = '#fff'; g.fillRect(0, 0, S.w, S.h);
    for (const st of S.strokes) drawStroke(g, st);
    if (S.cur) drawStroke(g, S.cur);
  }
  function box() { return document.querySelector('#strokes textarea, #strokes input'); }
  // Stroke JSON -> #strokes, then its input event: a search. Every search from the canvas
  // (a stroke, Undo, Clear, an example) goes this one way, so their answers arrive in order.
  S.search = (value) => {
    const t = box();
    if (!t) return;
    t.value = value;
    t.dispatchEvent(new Event('input', {bubbles: true}));  // updates the textbox' value
    // Gradio 6's textbox fires its `input` event from keypress (after the value settles)
    t.dispatchEvent(new KeyboardEvent('keypress', {bubbles: true, key: 'Unidentified'}));
  };
  function send() {  // the full stroke list
    // The brush the person chose travels with the strokes: the server draws the lines
    // that wide (scaled like the drawing, within the widths the model was trained on).
    const brush = S.strokes.length ? S.strokes.reduce((a, s) => a + s.size, 0) / S.strokes.length : S.size;
    S.search(JSON.stringify({strokes: S.strokes.map(s => s.points), brush: Math.round(brush * 10) / 10}));
  }
  function pt(e) {
    const r = S.canvas.getBoundingClientRect();
    const x = Math.min(Math.max(e.clientX - r.left, 0), r.width), y = Math.min(Math.max(e.clientY - r.top, 0), r.height);
    return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
  }
  document.addEventListener('pointerdown', e => {
    if (e.button !== 0 || !(e.target instanceof HTMLCanvasElement) || !e.target.closest('#sketch')) return;
    sync();
    e.preventDefault();
    try { e.target.setPointerCapture(e.pointerId); } catch (_) {}
    S.pid = e.pointerId;
    S.cur = {points: [pt(e)], size: S.size};
    const g = ctx(); g.fillStyle = '#000'; dot(g, S.cur.points[0], S.size);
  });
  document.addEventListener('pointermove', e => {
    if (!S.cur || e.pointerId !== S.pid) return;
    const evs = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    const g = ctx(); g.strokeStyle = '#000'; g.lineWidth = S.cur.size;
    for (const ev of (evs.length ? evs : [e])) {
      const p = pt(ev), q = S.cur.points[S.cur.points.length - 1];
      if (Math.abs(p[0] - q[0]) + Math.abs(p[1] - q[1]) < 1) continue;
      S.cur.points.push(p);
      g.beginPath(); g.moveTo(q[0], q[1]); g.lineTo(p[0], p[1]); g.stroke();
    }
  });
  function end(e) {
    if (!S.cur || e.pointerId !== S.pid) return;
    S.strokes.push(S.cur); S.cur = null; S.pid = null;
    send();
  }
  document.addEventListener('pointerup', end);
  document.addEventListener('pointercancel', end);
  S.clear = () => {
    S.strokes = []; S.cur = null; sync(); redraw();
    // The empty drawing goes the way every stroke goes, so its answer (no results, the
    // plain map) cannot be overtaken by a search still running for an earlier stroke.
    send();
    const b = document.querySelector('#clear-trigger');  // and the explanation panels empty
    if (b) b.click();
  };
  S.undo = () => { S.strokes.pop(); sync(); redraw(); if (S.strokes.length) send(); else S.clear(); };
  // An example (or any stroke JSON from the server): fit it into the canvas and draw it.
  S.load = (value) => {
    let d = value;
    try { if (typeof d === 'string') d = d.trim() ? JSON.parse(d) : []; } catch (_) { return; }
    let strokes = Array.isArray(d) ? d : ((d && d.strokes) || []);
    strokes = strokes.filter(s => Array.isArray(s) && s.length).map(s =>
      (s.length === 2 && Array.isArray(s[0]) && s[0].length !== 2) ? s[0].map((x, i) => [x, s[1][i]]) : s);
    sync();
    const all = strokes.flat();
    S.strokes = [];
    if (all.length && S.w > 0) {
      const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
      const x0 = Math.min(...xs), y0 = Math.min(...ys), x1 = Math.max(...xs), y1 = Math.max(...ys);
      const m = 0.12, k = Math.min(S.w * (1 - 2 * m) / Math.max(1, x1 - x0), S.h * (1 - 2 * m) / Math.max(1, y1 - y0));
      const ox = (S.w - (x1 - x0) * k) / 2 - x0 * k, oy = (S.h - (y1 - y0) * k) / 2 - y0 * k;
      S.strokes = strokes.map(s => ({size: S.size, points: s.map(p =>
        [Math.round((p[0] * k + ox) * 10) / 10, Math.round((p[1] * k + oy) * 10) / 10])}));
    }
    redraw();
  };
  document.addEventListener('click', e => {
    const b = e.target.closest && e.target.closest('#sketch button[data-sbir]');
    if (!b) return;
    if (b.dataset.sbir === 'undo') S.undo(); else if (b.dataset.sbir === 'clear') S.clear();
  });
  document.addEventListener('input', e => {
    if (e.target.matches && e.target.matches('#sketch input[data-sbir=size]')) S.size = +e.target.value;
  });
  // Ctrl+Z / Cmd+Z undoes the last stroke (not while typing in a text field).
  document.addEventListener('keydown', e => {
    if ((e.ctrlKey || e.metaKey) && !e.shiftKey && (e.key === 'z' || e.key === 'Z')) {
      const t = e.target;
      if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
      if (!S.strokes.length) return;
      e.preventDefault(); S.undo();
    }
  });
  setInterval(sync, 300);  // the canvas appears after the app mounts, and follows layout changes
  window.addEventListener('resize', sync);
})();
</script>
"""


def _theme() -> gr.themes.Base:
    # System fonts only: the page renders the same offline (no web-font requests).
    return gr.themes.Soft(
        primary_hue="indigo",
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "Consolas", "monospace"],
    )


def blank_canvas() -> dict:
    white = Image.new("RGB", CANVAS, "white")
    return {"background": white, "layers": [], "composite": white}


def example_canvas(name_or_index: Any) -> tuple[dict, Image.Image]:
    ex = list_examples()
    e = ex[name_or_index] if isinstance(name_or_index, int) else next(x for x in ex if x.name == name_or_index)
    img = e.render(size=CANVAS[0], line_width=2 * BRUSH_RADIUS, margin=0.12)
    return {"background": img, "layers": [], "composite": img}, img


def example_strokes(name_or_index: Any) -> str:
    """An example drawing as stroke JSON for the page's canvas: {"canvas": [w, h], "strokes":
    [[[x, y], ...], ...]} (the canvas script fits it into the drawing area)."""
    ex = list_examples()
    e = ex[name_or_index] if isinstance(name_or_index, int) else next(x for x in ex if x.name == name_or_index)
    return json.dumps({"canvas": list(e.canvas), "strokes": [[[x, y] for x, y in s] for s in e.strokes]},
                      separators=(",", ":"))


def _upload_path(value: Any) -> Optional[str]:
    """The server path of an upload as Gradio hands it over (a FileData dict), or None."""
    if isinstance(value, dict):
        value = value.get("path")
    return value if isinstance(value, str) and value else None


def editor_input(value: Any) -> Any:
    """An image-editor value from an API client ({"background", "layers", "composite"} of
    uploads) -> a PIL image, decoded here with the canvas size limit."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InputError("Send the drawing as an image upload or as strokes.")
    comp = _upload_path(value.get("composite"))
    paths = [comp] if comp else [p for p in [_upload_path(value.get("background")),
                                             *(_upload_path(v) for v in (value.get("layers") or []))] if p]
    if not paths:
        return None
    imgs = [open_upload(p, MAX_UPLOAD_BYTES, MAX_CANVAS_PIXELS, what="The drawing").convert("RGBA") for p in paths]
    base = Image.new("RGBA", imgs[0].size, (255, 255, 255, 0))
    for im in imgs:
        base.alpha_composite(im if im.size == base.size else im.resize(base.size))
    return base


def status_markdown(out: SearchOutcome) -> str:
    """The service's plain status line, formatted for the page: the best match in bold,
    a thinking face on the "not sure" notice, a pencil on the empty-canvas hint."""
    msg = out.message.replace("*", "\\*").replace("_", "\\_")
    if not out.ok:
        return ("✏️ " + msg) if out.message == EMPTY_SKETCH_MESSAGE else msg
    if out.hits:
        top = out.hits[0].label.replace("_", " ") if out.hits[0].label else "?"
        top_md = top.replace("*", "\\*").replace("_", "\\_")
        msg = msg.replace(f": {top_md} (", f": **{top_md}** (", 1)
    if out.unsure:
        msg = "🤔 " + msg.replace("Not sure:", "**Not sure:**", 1)
    return msg


def explanation_markdown(ex: Any) -> str:
    """The explanation's plain message with the result's class in bold."""
    msg = ex.message.replace("*", "\\*").replace("_", "\\_")
    if ex.ok and ex.hit is not None and ex.hit.label:
        label = ex.hit.label.replace("_", " ").replace("*", "\\*")
        msg = msg.replace(f": {label} (", f": **{label}** (", 1)
    return msg


# ----------------------------------------------------------------------------- callbacks
class Callbacks:
    """The page's event handlers as plain methods (the tests call them directly)."""

    def __init__(self, service: RetrievalService) -> None:
        self.service = service

    # ---- searching
    def _sketch(self, value: Any, k: Any, gallery: Optional[str], brush: Optional[float] = None):
        out = self.service.search_sketch(value, clamp_k(k), gallery=_gallery(gallery), brush=brush)
        return out.gallery_items(), status_markdown(out), out.query

    def search_sketch(self, canvas: Any, k: Any = DEFAULT_K, gallery: Optional[str] = None):
        """/search_sketch: a drawn image from an API client (an image-editor value of uploads)."""
        try:
            value = editor_input(canvas)
        except InputError as exc:
            return [], str(exc), None
        return self._sketch(value, k, gallery)

    def search_strokes(self, strokes: Any, k: Any = DEFAULT_K, gallery: Optional[str] = None):
        """/search_strokes, the page's per-stroke search: stroke JSON from the canvas."""
        try:
            value = read_stroke_json(strokes)
        except (InputError, ValueError, TypeError) as exc:  # StrokeError, bad JSON
            return [], f"The drawing could not be read: {exc}.", None
        return self._sketch(value, k, gallery, brush=stroke_brush(strokes))

    def search_text(self, text: Any, k: Any = DEFAULT_K, gallery: Optional[str] = None):
        out = self.service.search_text(text if isinstance(text, str) else "", clamp_k(k), gallery=_gallery(gallery))
        return out.gallery_items(), status_markdown(out), out.query

    def search_photo(self, photo: Any, k: Any = DEFAULT_K, gallery: Optional[str] = None):
        """/search_photo: an uploaded photo (Gradio's FileData, decoded here with limits)."""
        path = _upload_path(photo)
        if path is None:
            return [], "Upload a photo first.", None
        try:
            image = open_upload(path, self.service.max_upload_bytes, self.service.max_upload_pixels, what="That file")
        except InputError as exc:
            return [], str(exc), None
        out = self.service.search_photo(image, clamp_k(k), gallery=_gallery(gallery))
        return out.gallery_items(), status_markdown(out), out.query

    def rerun(self, query: Optional[Query], strokes: Any, text: str, photo: Any, k: float, gallery: Optional[str]):
        """k or gallery changed: repeat the last kind of search."""
        kind = query.kind if query is not None else "sketch"
        if kind == "text":
            return self.search_text(text, k, gallery)
        if kind == "photo":
            return self.search_photo(photo, k, gallery)
        return self.search_strokes(strokes, k, gallery)

    def load_example(self, evt: gr.SelectData) -> str:
        """A click on an example: its stroke JSON. The page draws it on the canvas and
        searches with it the way strokes are searched (`search_strokes`). Any client can send
        any index: one that names no example gives no drawing."""
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) and evt.index else evt.index
        if not isinstance(index, int) or not 0 <= index < len(list_examples()):
            return ""
        return example_strokes(index)

    def search_example(self, name: str, k: float = DEFAULT_K, gallery: Optional[str] = None):
        """API: search with one of the built-in example drawings by name."""
        names = [e.name for e in list_examples()]
        if name not in names:
            return [], f"No example named “{str(name)[:40]}”; examples: {', '.join(names)}.", None
        return self.search_strokes(example_strokes(name), k, gallery)

    # ---- explanations and the map
    def explain(self, query: Optional[Query], rank: Any = 0):
        try:
            rank = int(float(rank or 0))
        except (TypeError, ValueError, OverflowError):
            rank = -1
        ex = self.service.explain(query, rank)
        return ex.correspondences, ex.synthesis, ex.heatmap, explanation_markdown(ex)

    def on_select(self, query: Optional[Query], evt: gr.SelectData):
        """A click on a result: explain the image that was clicked (by its gallery row,
        read off the thumbnail), falling back to its position."""
        rank = evt.index if isinstance(evt.index, int) else evt.index[0]
        row = None
        value = evt.value if isinstance(evt.value, dict) else {}
        image = value.get("image")
        path = image.get("path") or image.get("url") if isinstance(image, dict) else image
        if query is not None and path:
            row = self.service.row_of_thumbnail(query.gallery, str(path), value.get("caption"))
        ex = self.service.explain(query, int(rank or 0), gallery_row=row)
        return ex.correspondences, ex.synthesis, ex.heatmap, explanation_markdown(ex)

    def tsne(self, query: Optional[Query], gallery: Optional[str] = None):
        m = self.service.tsne_for(query) if query is not None else self.service.tsne(gallery=gallery or None)
        return m.image if m.ok else None

    def map_panel(self, query: Optional[Query]):
        """The map, a heading that names what is placed in it, and the query as the model saw it."""
        kind = query.kind if query is not None else "sketch"
        what = {"sketch": "your drawing", "photo": "your photo", "text": "your word"}.get(kind, "your query")
        seen = query.model_input if query is not None else None
        return self.tsne(query), f"### Where does {what} land?", gr.update(value=seen, visible=seen is not None)

    def clear_explanation(self):
        return None, None, None, NO_EXPLANATION

    # ---- galleries (each visitor's choice lives in their page session, never in the process)
    def choose_gallery(self, name: Optional[str], progress: gr.Progress = gr.Progress(track_tqdm=True)):
        try:
            msg = self.service.describe_gallery(_gallery(name) or self.service.default_gallery,
                                                progress=lambda f, d: progress(f, desc=d))
        except InputError as exc:
            return f"⚠️ {exc}", [], None, None
        except Exception:  # anything unexpected: a message, not a crash
            log.exception("selecting gallery %s failed", name)
            return "⚠️ That gallery could not be opened.", [], None, None
        return msg, [], None, self.tsne(None, name)

    def build_gallery(self, files: Any, name: Any, sketches: bool, owner: Optional[str],
                      mine: Optional[list], progress: gr.Progress = gr.Progress(track_tqdm=True)):
        """Build a gallery from this visitor's uploads. Only this visitor's page lists it;
        the upload box is emptied so the next build starts from new files."""
        owner = owner or secrets.token_hex(16)
        mine = list(mine or [])
        out = self.service.build_gallery_from_uploads(
            files, name if isinstance(name, str) else "", owner, progress=lambda f, d: progress(f, desc=d),
            modality="sketch" if sketches else "photo")
        if out.ok and out.name not in [v for _, v in mine]:
            mine.append((display_name(out.name), out.name))
        choices = self.gallery_choices(mine)
        dd = gr.update(choices=choices, value=out.name) if out.ok else gr.update(choices=choices)
        msg = out.message if out.ok else f"⚠️ {out.message}"
        return msg, dd, None, owner, mine

    def gallery_classes(self, name: Optional[str]) -> str:
        """What the gallery contains, as compact chips (so a class can be found with the
        browser's search, and nobody draws an object the gallery lacks without knowing)."""
        import html

        try:
            info = self.service.gallery_info(_gallery(name))
        except InputError:
            return ""
        labels = [c.replace("_", " ") for c in info["classes"] if c]
        if not labels:
            return ""
        chips = "".join(f'<span class="chip">{html.escape(c)}</span>' for c in labels)
        n = len(labels)
        return (f'<details class="classes" open><summary>This gallery has {n} {"class" if n == 1 else "classes"} '
                f'({info["count"]} pictures)</summary><div class="chips">{chips}</div></details>')

    def gallery_choices(self, mine: Optional[list] = None) -> list:
        return [(display_name(n), n) for n in self.service.list_galleries()] + [tuple(m) for m in (mine or [])]

    def refresh_galleries(self, current: Optional[str], mine: Optional[list]):
        choices = self.gallery_choices(mine)
        values = [v for _, v in choices]
        value = current if current in values else (self.service.default_gallery if self.service.default_gallery
                                                   in values else (values[0] if values else None))
        return gr.update(choices=choices, value=value)


def _gallery(name: Any) -> Optional[str]:
    return name if isinstance(name, str) and name else None


# ----------------------------------------------------------------------------- the page
class ServedImages:
    """Pictures a callback returns, handed to Gradio as files written whole.

    Gradio stores a returned PIL image by rewriting a file named after its content each time
    (`save_pil_to_cache`), so two visitors getting the same picture at once (a class
    clicking the same example) can be sent a half-written file. A file path is copied into
    Gradio's cache atomically instead. Files are named by content, written under a temporary
    name and renamed; at most `limit` are kept (the oldest go first). WebP, as Gradio would
    have sent them (a third of PNG's size for the map)."""

    def __init__(self, folder: Path, limit: int = 256) -> None:
        self.folder, self.limit = Path(folder), limit
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, img: Image.Image) -> str:
        buf = io.BytesIO()
        img.save(buf, "WEBP")
        data = buf.getvalue()
        out = self.folder / f"{hashlib.sha256(data).hexdigest()[:32]}.webp"
        with self._lock:
            if not out.exists():
                tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, out)
                self._prune()
            else:
                out.touch()  # recently used: pruned last
        return str(out)

    def _prune(self) -> None:
        files = sorted(self.folder.glob("*.webp"), key=lambda f: f.stat().st_mtime)
        for f in files[: max(0, len(files) - self.limit)]:
            f.unlink(missing_ok=True)

    def convert(self, value: Any) -> Any:
        if isinstance(value, Image.Image):
            return self.path(value)
        if isinstance(value, dict) and isinstance(value.get("value"), Image.Image):  # gr.update(value=...)
            return {**value, "value": self.path(value["value"])}
        return value

    def __call__(self, fn: Any) -> Any:
        """`fn` with every picture it returns converted (its signature kept for Gradio)."""
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            return tuple(self.convert(v) for v in out) if isinstance(out, tuple) else self.convert(out)
        return wrapped


def served_folder(service: RetrievalService) -> Path:
    """Where `ServedImages` writes: next to the thumbnails, and like them allowed to Gradio."""
    return service.thumbs_dir.parent / "served"


def build_demo(service: RetrievalService) -> gr.Blocks:
    cb = Callbacks(service)
    served = ServedImages(served_folder(service))
    galleries = cb.gallery_choices()
    notices = "\n\n".join(service.notices)
    examples = list_examples()

    with gr.Blocks(title="Sketch Search", analytics_enabled=False) as demo:
        query_state = gr.State(None)  # this visitor's last query (and its results)
        owner_state = gr.State(None)  # this visitor's secret token: names their uploaded galleries
        mine_state = gr.State([])  # this visitor's uploaded galleries, [(label, id)]
        gr.Markdown(f"# {TITLE}\n{INSTRUCTIONS}", elem_id="title")
        gr.Markdown(notices, elem_id="notice", visible=bool(notices))

        with gr.Row(equal_height=False, elem_id="top-row"):
            # ---- left: the query
            with gr.Column(scale=5, min_width=340, elem_id="query-col"):
                with gr.Tabs():
                    with gr.Tab("Draw", id="draw"):
                        # A plain canvas (SKETCH_HTML + SKETCH_JS): each stroke sends its points,
                        # not an image, through the hidden #strokes textbox.
                        gr.HTML(SKETCH_HTML, elem_id="sketch", js_on_load=None, padding=False,
                                container=False)
                        strokes = gr.Textbox(value="", visible="hidden", elem_id="strokes", show_label=False,
                                             container=False)
                        clear_trigger = gr.Button("Clear", visible="hidden", elem_id="clear-trigger")
                        with gr.Row(equal_height=False, elem_id="under-canvas"):
                            # Search button and examples beside the model's view (no empty
                            # box next to the button on wide screens; they wrap on narrow ones).
                            with gr.Column(scale=3, min_width=200):
                                search_btn = gr.Button("Search", variant="primary", elem_id="search-button")
                                gr.Markdown("**Or start from an example** (click one):", elem_id="examples-heading")
                                example_gallery = gr.Gallery(
                                    value=[(e.render(size=112, line_width=3), e.label) for e in examples],
                                    columns=6, height="auto", allow_preview=False, show_label=False,
                                    elem_id="examples", object_fit="contain", interactive=False, buttons=[],
                                )
                            # What the encoder is given: cropped, padded, at the line width it gets.
                            model_view = gr.Image(label="What the model sees", elem_id="model-view", type="pil",
                                                  interactive=False, height=230, visible=False,
                                                  show_label=True, buttons=[], scale=1, min_width=150)
                    with gr.Tab("Type a word", id="text"):
                        text = gr.Textbox(label="Class name", placeholder="e.g. cat, bicycle, guitar…",
                                          elem_id="text-query", max_length=200)
                        text_btn = gr.Button("Search by word", variant="primary", elem_id="text-button")
                        gr.Markdown("Works for classes the model never trained on too. "
                                    + ("" if service.has_text else "*(Needs the trained model, not loaded now.)*"))
                    with gr.Tab("Use a photo", id="photo"):
                        photo = gr.Image(type="filepath", label="Query photo", sources=["upload", "clipboard"],
                                         elem_id="photo-query", height=360)
                        photo_btn = gr.Button("Search with this photo", variant="primary", elem_id="photo-button")

            # ---- right: the results
            with gr.Column(scale=6, min_width=360, elem_id="results-col"):
                with gr.Row():
                    gallery_dd = gr.Dropdown(choices=galleries, value=service.default_gallery, label="Gallery",
                                             elem_id="gallery-select", scale=3)
                    k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="Results (k)", elem_id="k", scale=2)
                classes = gr.HTML(cb.gallery_classes(service.default_gallery), elem_id="classes")
                status = gr.Markdown("Draw something on the canvas to start.", elem_id="status")
                results = gr.Gallery(label="Matches (click one to see why)", columns=4, height=560,
                                     allow_preview=False, object_fit="contain", elem_id="results",
                                     show_label=True, interactive=False)

        with gr.Row(equal_height=False, elem_id="why-row"):
            with gr.Column(scale=7, elem_id="why-col"):
                gr.Markdown("### Why did it match?")
                expl_msg = gr.Markdown(NO_EXPLANATION, elem_id="explanation-text")
                expl = gr.Image(label="Token correspondences: your drawing ↔ the match", elem_id="explanation",
                                type="pil", interactive=False, height=360, buttons=["download", "fullscreen"])
                with gr.Row():
                    synth = gr.Image(label="Drawing rebuilt from its patches", elem_id="synthesis",
                                     type="pil", interactive=False, height=330, buttons=["download", "fullscreen"])
                    heat = gr.Image(label="Where it agrees (heatmap)", elem_id="heatmap",
                                    type="pil", interactive=False, height=330, buttons=["download", "fullscreen"])
            with gr.Column(scale=5, elem_id="map-col"):
                map_heading = gr.Markdown("### Where does your drawing land?", elem_id="map-heading")
                tsne = gr.Image(value=cb.tsne(None), label="t-SNE map of the gallery (★ = your query)",
                                elem_id="tsne", type="pil", interactive=False, height=520)

        with gr.Accordion("Build your own gallery from images", open=False, elem_id="build"):
            gr.Markdown("Upload images (one class per file name: `cat_1.jpg`, `cat_2.jpg`, `dog_1.png` …). "
                        f"Files that are not images or larger than {MAX_UPLOAD_BYTES // 2**20} MB are skipped.")
            with gr.Row():
                files = gr.File(file_count="multiple", file_types=["image"], label="Images",
                                elem_id="upload-files", scale=3)
                with gr.Column(scale=2):
                    new_name = gr.Textbox(label="Gallery name", placeholder="my_gallery", elem_id="gallery-name")
                    is_sketch = gr.Checkbox(label="These are sketches (sketch → sketch search)", value=False)
                    build_btn = gr.Button("Build gallery", variant="secondary", elem_id="build-button")
            build_msg = gr.Markdown(elem_id="build-report")

        # hidden API helpers (the page uses .select; API clients pass a rank)
        rank = gr.Number(value=0, precision=0, visible=False)
        explain_btn = gr.Button(visible=False)
        example_name = gr.Textbox(visible=False)
        example_btn = gr.Button(visible=False)
        # API clients may still send a drawn image (an ImageEditor value) to /search_sketch
        sketch_api = gr.Sketchpad(visible=False, type="numpy", image_mode="RGB", canvas_size=CANVAS)
        sketch_api_btn = gr.Button(visible=False)

        search_outputs = [results, status, query_state]
        expl_outputs = [expl, synth, heat, expl_msg]
        fast = dict(show_progress="minimal", concurrency_id="search", concurrency_limit=CONCURRENCY)

        def then_map(ev):
            # always_last: a map asked for while the previous one is still drawing runs after
            # it (the default, "once", would drop it and leave the map of an older query).
            ev.then(served(cb.map_panel), [query_state], [tsne, map_heading, model_view], show_progress="hidden",
                    trigger_mode="always_last", concurrency_id="map", concurrency_limit=1,
                    api_visibility="private")

        # Every finished stroke (the canvas script fires #strokes' input event), only the
        # latest when strokes pile up.
        then_map(strokes.input(cb.search_strokes, [strokes, k, gallery_dd], search_outputs,
                               trigger_mode="always_last", api_name="search_strokes",
                               **dict(fast, show_progress="hidden")))
        # Uploaded images are decoded by the callbacks (with size limits and plain messages),
        # not by Gradio's preprocessing: preprocess=False hands over the upload's FileData.
        then_map(sketch_api_btn.click(cb.search_sketch, [sketch_api, k, gallery_dd], search_outputs,
                                      api_name="search_sketch", preprocess=False, **fast))
        then_map(search_btn.click(cb.search_strokes, [strokes, k, gallery_dd], search_outputs,
                                  api_visibility="private", **fast))
        example_gallery.select(cb.load_example, None, [strokes], api_visibility="private",
                               show_progress="hidden").then(
            None, [strokes], None, api_visibility="private", show_progress="hidden",
            js="(s) => { if (window.sbirSketch) { window.sbirSketch.load(s); window.sbirSketch.search(s); } }")
        then_map(example_btn.click(cb.search_example, [example_name, k, gallery_dd], search_outputs,
                                   api_name="search_example", **fast))
        then_map(text.submit(cb.search_text, [text, k, gallery_dd], search_outputs, api_name="search_text", **fast))
        then_map(text_btn.click(cb.search_text, [text, k, gallery_dd], search_outputs,
                                api_visibility="private", **fast))
        then_map(photo_btn.click(cb.search_photo, [photo, k, gallery_dd], search_outputs, api_name="search_photo",
                                 preprocess=False, **fast))
        then_map(photo.upload(cb.search_photo, [photo, k, gallery_dd], search_outputs, api_visibility="private",
                              preprocess=False, **fast))
        then_map(k.release(cb.rerun, [query_state, strokes, text, photo, k, gallery_dd], search_outputs,
                           api_visibility="private", **fast))

        results.select(served(cb.on_select), [query_state], expl_outputs, api_visibility="private",
                       show_progress="minimal", concurrency_id="explain", concurrency_limit=CONCURRENCY)
        explain_btn.click(served(cb.explain), [query_state, rank], expl_outputs, api_name="explain",
                          concurrency_id="explain", concurrency_limit=CONCURRENCY)
        # The canvas' Clear (and Undo of the only stroke) searches with no strokes through
        # #strokes, above; this only empties the explanation panels, in the browser.
        clear_trigger.click(None, None, expl_outputs, js=f"() => [null, null, null, {json.dumps(NO_EXPLANATION)}]",
                            api_visibility="private", show_progress="hidden")

        gallery_dd.input(served(cb.choose_gallery), [gallery_dd], [status, results, query_state, tsne],
                         api_name="select_gallery", concurrency_id="build", concurrency_limit=1).then(
            cb.clear_explanation, None, expl_outputs, api_visibility="private")
        gallery_dd.change(cb.gallery_classes, [gallery_dd], [classes], api_visibility="private",
                          show_progress="hidden")
        build_btn.click(cb.build_gallery, [files, new_name, is_sketch, owner_state, mine_state],
                        [build_msg, gallery_dd, files, owner_state, mine_state],
                        api_name="build_gallery", concurrency_id="build", concurrency_limit=1).then(
            served(cb.choose_gallery), [gallery_dd], [status, results, query_state, tsne], api_visibility="private")
        demo.load(cb.refresh_galleries, [gallery_dd, mine_state], [gallery_dd], api_visibility="private")

    demo.callbacks = cb  # for tests and scripts
    return demo


def launch(demo: gr.Blocks, service: RetrievalService, host: Optional[str] = None, port: Optional[int] = None,
           prevent_thread_lock: bool = False, concurrency: int = CONCURRENCY, quiet: bool = False):
    """Queue + launch with the app's settings (theme, CSS, file access, upload limit)."""
    host = host or os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    port = int(port or os.environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT)
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    return demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=prevent_thread_lock,
        # Only thumbnails and the pictures the page makes (explanations, maps; named by
        # content) are served from disk; gallery images, gallery.json and the repository are
        # not. Without the second, a cache outside the temp and working folders (the
        # default, ~/.cache/sbir) would make Gradio refuse every explanation.
        allowed_paths=[str(service.thumbs_dir), str(served_folder(service))],
        max_file_size=MAX_UPLOAD_BYTES,
        show_error=False,  # the callbacks turn every failure into a plain sentence
        quiet=quiet,
        theme=_theme(),
        css=CSS,
        head=SKETCH_JS,
        footer_links=[],
    )


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Zero-shot sketch-based image retrieval in the browser.")
    p.add_argument("--host", default=None, help=f"address to serve on (default $GRADIO_SERVER_NAME or {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None,
                   help=f"port (default $GRADIO_SERVER_PORT or {DEFAULT_PORT})")
    p.add_argument("--gallery", default=None, metavar="PATH",
                   help="index this folder of images (class = subfolder) into galleries/<name> and show it")
    p.add_argument("--name", default=None, help="gallery name for --gallery (default: the folder's name)")
    p.add_argument("--sketch-gallery", action="store_true", help="--gallery holds sketches (sketch -> sketch)")
    p.add_argument("--galleries", default=None, metavar="DIR", help="galleries root (default: galleries/)")
    p.add_argument("--default-gallery", default="default", help="gallery shown first (default: default)")
    p.add_argument("--uploads-dir", default=None, metavar="DIR",
                   help="where visitors' uploaded galleries are kept (default $SBIR_HOME/uploaded-galleries; "
                        "$SBIR_HOME is ~/.cache/sbir unless set)")
    p.add_argument("--checkpoint", default="default", metavar="default|none|PATH",
                   help="model checkpoint (falls back to the raw backbone, with a warning, if missing)")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY, help="searches run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per search (default 1: best on 2 cores)")
    p.add_argument("--no-warmup", action="store_true", help="skip making thumbnails and the map before serving")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import torch

    torch.set_num_threads(max(1, args.threads))
    root = Path(args.galleries) if args.galleries else SHIPPED_GALLERIES
    service = RetrievalService(root, gallery=None if args.gallery else args.default_gallery,
                               checkpoint=args.checkpoint, uploads_dir=args.uploads_dir,
                               progress=lambda f, d: print(d, file=sys.stderr))
    if args.gallery:
        print(f"Indexing {args.gallery} …", file=sys.stderr)
        out = service.build_gallery_from_folder(args.gallery, args.name,
                                                modality="sketch" if args.sketch_gallery else "photo",
                                                progress=lambda f, d: print(d, file=sys.stderr))
        print(out.message, file=sys.stderr)
        if not out.ok:
            return 2
    if service.default_gallery and not args.no_warmup:
        try:
            service.warm_up()
        except Exception as exc:  # warm-up is an optimisation only
            log.warning("warm-up failed: %s", exc)
    for n in service.notices:
        log.warning(n)
    demo = build_demo(service)
    launch(demo, service, args.host, args.port, concurrency=args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
