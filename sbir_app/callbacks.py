"""The page's event handlers: each converts between Gradio values and the plain Python
objects of `sbir_core.service.RetrievalService`, and words the service's results for the page."""
from __future__ import annotations

import html
import json
import logging
from typing import Any, Optional

import gradio as gr
from PIL import Image

from sbir_core.data.drawing import MAX_CANVAS_PIXELS, read_stroke_json, stroke_brush
from sbir_core.data.examples import list_examples
from sbir_core.data.images import MAX_UPLOAD_BYTES, open_upload
from sbir_core.errors import InputError
from sbir_app.sharing import share_panel
from sbir_core.gallery.sharing import code_of, new_owner_token, valid_owner
from sbir_core.service import (
    DEFAULT_K,
    Query,
    RetrievalService,
    SearchOutcome,
    clamp_k,
)

log = logging.getLogger("sbir_app")

CANVAS = (384, 384)  # size of example renders and API canvases (the page sends strokes, not pixels)
BRUSH_RADIUS = 3  # ~6 px lines on the 384 px canvas
NO_EXPLANATION = "Click a result to see why it matched."


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


UNREADABLE = "I can't read this drawing yet - try a few bigger lines."


def _md(text: str) -> str:
    """Plain text safe inside Markdown (no accidental bold or italics)."""
    return html.escape(text, quote=False).replace("*", "\\*").replace("_", "\\_")


def _details(text: str) -> str:
    """The service's technical sentence, one click away (for older students and teachers)."""
    return f'\n\n<details class="tech"><summary>Details</summary>\n\n{_md(text)}\n\n</details>'


def _a(name: str) -> str:
    return ("an " if name[:1].lower() in "aeiou" else "a ") + f"**{_md(name)}**"


def status_markdown(out: SearchOutcome, drew: bool = False) -> str:
    """The status line, worded from the outcome's fields (`level`, `guess`, `hits`), never
    from the service's sentence, which goes under "Details". `drew`: the canvas holds lines,
    so an empty-drawing answer means the lines were too small or too few to read."""
    if not out.ok:
        if out.problem == "blank":
            return "✏️ " + (UNREADABLE if drew else _md(out.message))
        return _md(out.message)
    if not out.hits:
        return "No pictures found in this gallery." + _details(out.message)
    level = out.level
    top = out.hits[0].name
    if level == "sure":
        text = f"This looks like {_a(top)}."
    elif level == "closest":
        text = "🤔 **Not sure it's here.** These are the closest pictures."
    elif level == "absent":
        text = "🤔 **Not in this gallery?** These are only the closest pictures."
        if out.guess:
            text += f" This looks like {_a(out.guess.replace('_', ' '))}; this gallery has none."
    elif level == "unreadable":
        text = "✏️ " + UNREADABLE
    else:  # not assessed: no claim that the first picture is right
        text = f"Closest pictures: {_a(top)} comes first."
    return text + _details(out.message)


def explanation_markdown(ex: Any, kind: str = "sketch") -> str:
    """Why a result matched, in plain words, with the service's technical message under
    "Details"."""
    if not ex.ok or ex.hit is None:
        return _md(ex.message)
    what = "your photo" if kind == "photo" else "your drawing"
    return (f"{ex.hit.heading}: **{_md(ex.hit.name)}**. Each line joins a part of {what} to a part of "
            f"this picture that looks the same. Below: {what} built from pieces of this picture, and the "
            f"places in it that agree with {what}." + _details(ex.message))


# ----------------------------------------------------------------------------- callbacks
class Callbacks:
    """The page's event handlers as plain methods (the tests call them directly)."""

    def __init__(self, service: RetrievalService) -> None:
        self.service = service

    # ---- searching
    def _sketch(self, value: Any, k: Any, gallery: Optional[str], brush: Optional[float] = None,
                drew: bool = False):
        out = self.service.search_sketch(value, clamp_k(k), gallery=_gallery(gallery), brush=brush)
        return out.gallery_items(), status_markdown(out, drew=drew), out.query

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
        return self._sketch(value, k, gallery, brush=stroke_brush(strokes), drew=bool(value))

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
        return ex.correspondences, ex.synthesis, ex.heatmap, explanation_markdown(ex, _kind(query))

    def on_select(self, query: Optional[Query], evt: gr.SelectData):
        """A click on a result: explain the image that was clicked (by its gallery row,
        read off the thumbnail), falling back to its position."""
        rank = evt.index if isinstance(evt.index, int) else evt.index[0]
        row = None
        value = evt.value if isinstance(evt.value, dict) else {}
        image = value.get("image")
        path = image.get("path") or image.get("url") if isinstance(image, dict) else image
        caption = value.get("caption")
        # the result the grid showed with that caption (captions come from the query's hits)
        shown = next((h for h in query.hits if h.caption == caption), None) if query is not None and caption else None
        if query is not None and path and (shown is not None or not caption):
            row = self.service.row_of_thumbnail(query.gallery, str(path), shown.label if shown else None)
        ex = self.service.explain(query, int(rank or 0), gallery_row=row)
        return ex.correspondences, ex.synthesis, ex.heatmap, explanation_markdown(ex, _kind(query))

    def map_image(self, query: Optional[Query], gallery: Optional[str] = None):
        m = self.service.map_image_for(query) if query is not None else self.service.map_image(gallery=gallery or None)
        return m.image if m.ok else None

    def map_panel(self, query: Optional[Query]):
        """The map, a heading that names what is placed in it, and the query as the model saw it."""
        kind = query.kind if query is not None else "sketch"
        what = {"sketch": "your drawing", "photo": "your photo", "text": "your word"}.get(kind, "your query")
        seen = query.model_input if query is not None else None
        return self.map_image(query), f"### Where does {what} land?", gr.update(value=seen, visible=seen is not None)

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
        return msg, [], None, self.map_image(None, name)

    def build_gallery(self, files: Any, name: Any, sketches: bool, owner: Any, mine: Optional[list],
                      progress: gr.Progress = gr.Progress(track_tqdm=True)):
        """Build a class gallery from this visitor's uploads. `owner` is this browser's owner
        token (kept in its localStorage; a new one is made on the first build): the same
        owner and name rebuild that gallery, keeping its code. The upload box is emptied so
        the next build starts from new files."""
        owner = owner if valid_owner(owner) else new_owner_token()
        out = self.service.build_gallery_from_uploads(
            files, name if isinstance(name, str) else "", owner, progress=lambda f, d: progress(f, desc=d),
            modality="sketch" if sketches else "photo")
        mine = _add(mine, out.name) if out.ok else list(mine or [])
        choices = self.gallery_choices(mine, owner)
        dd = gr.update(choices=choices, value=out.name) if out.ok else gr.update(choices=choices)
        msg = _md(out.message) if out.ok else f"⚠️ {_md(out.message)}"
        return msg, dd, None, owner, mine

    def open_class(self, code: Any, mine: Optional[list], owner: Any = None):
        """/open_class: a class code (or a pasted link) -> the gallery chosen in this page."""
        try:
            gid, msg = self.service.open_class_gallery(code)
        except InputError as exc:
            return f"⚠️ {_md(str(exc))}", gr.update(), list(mine or [])
        mine = _add(mine, gid)
        return _md(msg), gr.update(choices=self.gallery_choices(mine, owner), value=gid), mine

    def delete_gallery(self, gallery: Any, owner: Any, mine: Optional[list]):
        """/delete_gallery: the chosen class gallery, if this browser built it."""
        try:
            msg = self.service.delete_gallery(gallery, owner)
        except InputError as exc:
            return f"⚠️ {_md(str(exc))}", gr.update(), list(mine or [])
        mine = [g for g in (mine or []) if g != gallery]
        return _md(msg), gr.update(choices=self.gallery_choices(mine, owner), value=self.service.default_gallery), mine

    def rename_gallery(self, gallery: Any, name: Any, owner: Any, mine: Optional[list]):
        """/rename_gallery: a new name for the chosen class gallery, if this browser built it."""
        try:
            label = self.service.rename_gallery(gallery, name, owner)
        except InputError as exc:
            return f"⚠️ {_md(str(exc))}", gr.update()
        return f"Renamed: {_md(label)}.", gr.update(choices=self.gallery_choices(mine, owner), value=gallery)

    def share_panel(self, gallery: Any, owner: Any, request: Optional[gr.Request] = None) -> str:
        """The chosen class gallery's code, link and QR code (nothing for other galleries)."""
        if code_of(gallery) is None:
            return ""
        owned = any(g == gallery for _, g in self.service.owned_galleries(owner))
        return share_panel(gallery, self.service.class_gallery_name(gallery) or str(gallery), owned, request)

    def load_page(self, current: Any, owner: Any, mine: Optional[list], request: Optional[gr.Request] = None):
        """Page load: this browser's own class galleries in the list, and the gallery of a
        link's ?class=CODE chosen. -> dropdown, session galleries, message, status, map."""
        code = (request.query_params.get("class") if request is not None else None) or ""
        mine = [g for g in (mine or []) if isinstance(g, str)]
        status, map_image, msg = gr.update(), gr.update(), ""
        if code:
            try:
                current, status = self.service.open_class_gallery(code)
                mine = _add(mine, current)
                map_image = self.map_image(None, current)
            except InputError as exc:
                msg = status = f"⚠️ {_md(str(exc))}"
        choices = self.gallery_choices(mine, owner)
        values = [v for _, v in choices]
        value = current if current in values else (self.service.default_gallery if self.service.default_gallery
                                                   in values else (values[0] if values else None))
        return gr.update(choices=choices, value=value), mine, msg, status, map_image

    def gallery_classes(self, name: Optional[str]) -> str:
        """What the gallery contains, as compact chips (so a class can be found with the
        browser's search, and nobody draws an object the gallery lacks without knowing)."""
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

    def gallery_choices(self, mine: Optional[list] = None, owner: Any = None) -> list:
        """The galleries this page may choose: the server's, this browser's own class
        galleries, and those opened with a code in this session (while they exist)."""
        public = [(n, n) for n in self.service.list_galleries()]
        own = self.service.owned_galleries(owner)
        ids = {g for _, g in own}
        opened = [(self.service.display_name(g), g) for g in (mine or []) if isinstance(g, str) and g not in ids]
        return public + own + [(label, g) for label, g in opened if label != g]


def _add(mine: Optional[list], gallery: str) -> list:
    """The session's opened class galleries with `gallery` added once."""
    mine = [g for g in (mine or []) if isinstance(g, str)]
    return mine if gallery in mine else mine + [gallery]


def _kind(query: Optional[Query]) -> str:
    return query.kind if query is not None else "sketch"


def _gallery(name: Any) -> Optional[str]:
    return name if isinstance(name, str) and name else None

