"""The page: layout, event wiring and launch settings (CSS and the canvas script live in
`static/`, loaded here)."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

import gradio as gr

from sbir_app.callbacks import CANVAS, NO_EXPLANATION, Callbacks
from sbir_app.pacing import DutyCycle
from sbir_app.served import ServedImages, served_folder
from sbir_core.data.examples import list_examples
from sbir_core.data.images import MAX_UPLOAD_BYTES
from sbir_core.service import DEFAULT_K, MAX_K, RetrievalService

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
CONCURRENCY = 2  # 2 CPU cores: two explanations at a time, the rest wait in the queue
# A class at once (docs/CLASSROOM.md): searches in flight together meet in the encoder's batcher
# (sbir_core.gallery.batching) and share one forward pass, so more may run than there are cores.
SEARCH_CONCURRENCY = 16
QUEUE_SIZE = 256  # events waiting at once: per pupil a search and a map running and one of each waiting
SESSIONS_KEPT = 500  # visitors' page states kept in memory (the oldest go first): a school day of classes
TEMP_FILES_AGE_S = 3600  # Gradio's temporary files (uploads) older than 1 h go, checked every 10 min
MAP_SHARE = 0.15  # maps drawn back to back take at most this share of the time (sbir_app.pacing): a class of 30 gets results in 0.36 s, its maps ~8 s behind (docs/BENCHMARKS.md §10)
_STATIC_PATHS: set[Path] = set()

TITLE = "Sketch Search"
INSTRUCTIONS = ("**Draw an object** on the white canvas: matching pictures appear after every stroke. "
                "Click a result to see *why* it matched — even for things the model never saw in training.")

# The drawing canvas: plain HTML (gr.HTML) plus this script (loaded in the page's <head>;
# scripts inside gr.HTML do not run). It keeps the strokes as point lists and, on every
# pointer release, writes them as JSON into the hidden #strokes textbox and fires its
# `input` event (an `input` DOM event for the value, then a keypress, which is what Gradio 6's
# textbox turns into its `input` event): one tiny request per stroke, no image export or upload.
# Toolbar buttons are at least 44x44 px (fingers); on phones they show their icon only
# (the name stays in aria-label and title).
SKETCH_HTML = """
<canvas aria-label="Drawing canvas" role="img"></canvas>
<div class="sbir-label">Your drawing</div>
<div class="sbir-tools" role="toolbar" aria-label="Drawing tools">
  <button type="button" data-sbir="pen" aria-label="Pen" aria-pressed="true" title="Pen: draw lines">&#9998;<span
    class="t"> Pen</span></button>
  <button type="button" data-sbir="eraser" aria-label="Eraser" aria-pressed="false"
    title="Eraser: touch a line to remove it">&#9003;<span class="t"> Eraser</span></button>
  <label class="brush" title="Line width"><span class="t">Size</span><input type="range" min="1" max="24" step="1"
    value="6" aria-label="Line width" data-sbir="size"></label>
  <button type="button" data-sbir="undo" aria-label="Undo" title="Undo (Ctrl+Z)">&#8630;<span
    class="t"> Undo</span></button>
  <button type="button" data-sbir="redo" aria-label="Redo" title="Redo (Ctrl+Y)">&#8631;<span
    class="t"> Redo</span></button>
  <button type="button" data-sbir="clear" aria-label="Clear canvas" title="Clear the canvas (Undo brings it back)"
    >&#10005;<span class="t"> Clear</span></button>
</div>
"""
# The explanation opens as a panel over the page (static/canvas.js opens and closes it).
CLOSE_HTML = '<button type="button" class="sbir-close" aria-label="Close" title="Close (Esc)">&#10005;</button>'



def how_it_works_html() -> str:
    """Four pictured steps in plain words (inline SVG: no requests, works offline)."""
    return (STATIC / "how_it_works.html").read_text(encoding="utf-8")


def page_css() -> str:
    return (STATIC / "page.css").read_text(encoding="utf-8")


def page_head() -> str:
    """The canvas script, for the page's <head> (scripts inside gr.HTML do not run), and the
    overlay styles, which must reach the page unscoped (static/overlay.css says why)."""
    return ("<script>\n" + (STATIC / "canvas.js").read_text(encoding="utf-8") + "</script>\n"
            "<style>\n" + (STATIC / "overlay.css").read_text(encoding="utf-8") + "</style>\n")


def _theme() -> gr.themes.Base:
    # System fonts only: the page renders the same offline (no web-font requests).
    return gr.themes.Soft(
        primary_hue="indigo",
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "Consolas", "monospace"],
    )



def build_demo(service: RetrievalService) -> gr.Blocks:
    cb = Callbacks(service)
    served = ServedImages(served_folder(service))
    galleries = cb.gallery_choices()
    notices = "\n\n".join(service.notices)
    examples = list_examples()

    with gr.Blocks(title="Sketch Search", analytics_enabled=False) as demo:
        query_state = gr.State(None)  # this visitor's last query (and its results)
        # This browser's owner token (localStorage, so it outlives a reload and a server
        # restart): it changes or deletes the class galleries built here. The fixed key and
        # secret only let the page find it again; the token itself is what protects.
        owner_state = gr.BrowserState(None, storage_key="sbir-owner", secret="sbir-class-galleries")
        mine_state = gr.State([])  # class galleries opened with a code in this session (ids)
        gr.Markdown(f"# {TITLE}\n{INSTRUCTIONS}", elem_id="title")
        gr.Markdown(notices, elem_id="notice", visible=bool(notices))

        with gr.Row(equal_height=False, elem_id="top-row"):
            # ---- left: the query
            with gr.Column(scale=5, min_width=340, elem_id="query-col"):
                with gr.Tabs():
                    with gr.Tab("Draw", id="draw"):
                        # A plain canvas (SKETCH_HTML + static/canvas.js): each stroke sends its points,
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
                with gr.Accordion("How does it work?", open=False, elem_id="how"):
                    gr.HTML(how_it_works_html(), padding=False)

        with gr.Row(equal_height=False, elem_id="why-row"):
            # A panel over the page while open (role dialog; static/canvas.js opens it on a
            # click on a result and closes it with Esc, its close button or a click outside).
            with gr.Column(scale=7, elem_id="why-col", elem_classes=["sbir-why"]):
                gr.HTML(CLOSE_HTML, elem_id="why-close", padding=False, container=False)
                gr.Markdown("### Why did it match?", elem_id="why-heading")
                expl_msg = gr.Markdown(NO_EXPLANATION, elem_id="explanation-text")
                expl = gr.Image(label="Matching parts: your drawing and the picture", elem_id="explanation",
                                type="pil", interactive=False, height=360, buttons=["download", "fullscreen"])
                with gr.Row():
                    synth = gr.Image(label="Your drawing made from pieces of the picture", elem_id="synthesis",
                                     type="pil", interactive=False, height=330, buttons=["download", "fullscreen"])
                    heat = gr.Image(label="Where the picture agrees with your drawing", elem_id="heatmap",
                                    type="pil", interactive=False, height=330, buttons=["download", "fullscreen"])
            with gr.Column(scale=5, elem_id="map-col"):
                map_heading = gr.Markdown("### Where does your drawing land?", elem_id="map-heading")
                # Download and fullscreen only: "share" posts to Hugging Face, which a class cannot use.
                map_image = gr.Image(value=cb.map_image(None),
                                     label="Map of the gallery: alike pictures sit together (★ = you)",
                                     elem_id="map", type="pil", interactive=False, height=520,
                                     buttons=["download", "fullscreen"])

        with gr.Accordion("Class galleries: open one with a code, or build your own", open=False, elem_id="build"):
            with gr.Row(equal_height=True):
                code_box = gr.Textbox(label="Class code", placeholder="ABCDE-23456", max_length=300,
                                      elem_id="class-code", scale=3)
                code_btn = gr.Button("Open", variant="primary", elem_id="class-open", scale=1)
            open_msg = gr.Markdown(elem_id="class-open-msg")
            share_html = gr.HTML(elem_id="share")  # the chosen class gallery's code, link and QR code
            gr.Markdown("**Build a gallery for your class.** Name each picture after what it shows: "
                        "`cat_1.jpg`, `cat_2.jpg`, `dog_1.png` … You get a class code and a link to share. "
                        "Only this browser can change or delete the gallery. "
                        f"Files that are not pictures or larger than {MAX_UPLOAD_BYTES // 2**20} MB are skipped.")
            with gr.Row():
                files = gr.File(file_count="multiple", file_types=["image"], label="Images",
                                elem_id="upload-files", scale=3)
                with gr.Column(scale=2):
                    new_name = gr.Textbox(label="Gallery name", placeholder="my_gallery", elem_id="gallery-name")
                    is_sketch = gr.Checkbox(label="These are sketches (sketch → sketch search)", value=False)
                    build_btn = gr.Button("Build gallery", variant="secondary", elem_id="build-button")
            build_msg = gr.Markdown(elem_id="build-report")
            with gr.Row(equal_height=True):
                rename_box = gr.Textbox(label="New name for the chosen gallery", elem_id="rename-name", scale=3)
                rename_btn = gr.Button("Rename", elem_id="rename-button", scale=1)
                delete_btn = gr.Button("Delete the chosen gallery", variant="stop", elem_id="delete-button", scale=1)
            manage_msg = gr.Markdown(elem_id="manage-msg")

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
        fast = dict(show_progress="minimal", concurrency_id="search", concurrency_limit=SEARCH_CONCURRENCY)

        # A class's maps leave its searches room (paced), and are encoded at WebP's fastest effort.
        paced_map = ServedImages(served_folder(service), lossless=False)(DutyCycle(MAP_SHARE)(cb.map_panel))

        def then_map(ev):
            # always_last: a map asked for while the previous one is still drawing runs after
            # it (the default, "once", would drop it and leave the map of an older query).
            ev.then(paced_map, [query_state], [map_image, map_heading, model_view], show_progress="hidden",
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

        gallery_dd.input(served(cb.choose_gallery), [gallery_dd], [status, results, query_state, map_image],
                         api_name="select_gallery", concurrency_id="build", concurrency_limit=1).then(
            cb.clear_explanation, None, expl_outputs, api_visibility="private")
        gallery_dd.change(cb.gallery_classes, [gallery_dd], [classes], api_visibility="private",
                          show_progress="hidden")
        # preprocess=False: the uploads arrive as FileData (Gradio still checks that they are
        # uploads); gr.File's own preprocessing leaves an empty temporary file per upload, forever.
        build_btn.click(cb.build_gallery, [files, new_name, is_sketch, owner_state, mine_state],
                        [build_msg, gallery_dd, files, owner_state, mine_state], preprocess=False,
                        api_name="build_gallery", concurrency_id="build", concurrency_limit=1).then(
            served(cb.choose_gallery), [gallery_dd], [status, results, query_state, map_image],
            api_visibility="private")
        # Class galleries: a code typed or in the link (?class=CODE), and the owner's changes.
        choose = dict(fn=served(cb.choose_gallery), inputs=[gallery_dd],
                      outputs=[status, results, query_state, map_image], api_visibility="private")
        code_btn.click(cb.open_class, [code_box, mine_state, owner_state], [open_msg, gallery_dd, mine_state],
                       api_name="open_class").then(**choose)
        code_box.submit(cb.open_class, [code_box, mine_state, owner_state], [open_msg, gallery_dd, mine_state],
                        api_visibility="private").then(**choose)
        delete_btn.click(cb.delete_gallery, [gallery_dd, owner_state, mine_state], [manage_msg, gallery_dd, mine_state],
                         api_name="delete_gallery", concurrency_id="build", concurrency_limit=1).then(**choose)
        rename_btn.click(cb.rename_gallery, [gallery_dd, rename_box, owner_state, mine_state], [manage_msg, gallery_dd],
                         api_name="rename_gallery")
        gallery_dd.change(cb.share_panel, [gallery_dd, owner_state], [share_html], api_visibility="private",
                          show_progress="hidden")
        demo.load(served(cb.load_page), [gallery_dd, owner_state, mine_state],
                  [gallery_dd, mine_state, open_msg, status, map_image], api_visibility="private")

    demo.callbacks = cb  # for tests and scripts
    return demo


def _keep_sweeping(demo: gr.Blocks, every: float, age: float) -> None:
    """Gradio's own sweep (delete_cache) stops for good the first time an upload arrives
    while it runs: it iterates the live set of uploads ("Set changed size during iteration",
    Gradio 6.31; tests/test_classroom.py). This one does what it does on a copy of the set,
    every `every` seconds until the app is closed: files the app made (uploads) older than
    `age` seconds are deleted, files a component keeps (its initial value) never."""

    def sweep_once() -> None:
        keep = set().union(*(getattr(b, "keep_in_cache", ()) for b in demo.blocks.values()))
        now = time.time()
        for files in demo.temp_file_sets:
            for f in list(files):  # a copy: uploads keep arriving meanwhile
                if f in keep:
                    continue
                try:
                    if now - os.lstat(f).st_ctime > age:
                        os.remove(f)
                        files.discard(f)
                except FileNotFoundError:
                    files.discard(f)

    def sweep() -> None:
        launched = False
        while True:
            time.sleep(every)
            if not demo.is_running:
                if launched:
                    return
                continue  # not served yet
            launched = True
            try:
                sweep_once()
            except Exception:  # never let one failed turn end the sweeping
                log.exception("sweeping Gradio's temporary files failed")

    threading.Thread(target=sweep, name="temp-files-sweep", daemon=True).start()


def _ours_first() -> None:
    """Gradio tests every file a callback returns against each static folder in turn, twice per
    output, resolving both paths each time (~16 system calls a test): with the thumbnails'
    folder first, a search's 12 thumbnails match at the first test instead of the last
    (measured: docs/BENCHMARKS.md section 10). The order lives in a private list; if a later
    Gradio moves it, files are served as before, only checked more slowly."""
    try:
        from gradio.data_classes import _StaticFiles
    except ImportError:
        return
    paths = getattr(_StaticFiles, "all_paths", None)
    if isinstance(paths, list):
        paths.sort(key=lambda p: p not in _STATIC_PATHS)  # stable: ours first, the rest in order


def launch(demo: gr.Blocks, service: RetrievalService, host: Optional[str] = None, port: Optional[int] = None,
           prevent_thread_lock: bool = False, concurrency: int = CONCURRENCY, quiet: bool = False,
           temp_files_age_s: int = TEMP_FILES_AGE_S):
    """Queue + launch with the app's settings (theme, CSS, file access, upload limit)."""
    host = host or os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    port = int(port or os.environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT)
    demo.queue(default_concurrency_limit=concurrency, max_size=QUEUE_SIZE)
    # A day of lessons must not fill the disk: uploads are deleted once they are this old
    # (and all of them when the server stops).
    demo.delete_cache = demo.delete_cache or (max(1, temp_files_age_s // 6), temp_files_age_s)
    _keep_sweeping(demo, *demo.delete_cache)
    # Thumbnails and the page's pictures are served where they lie: Gradio would otherwise
    # hash and copy each into its temporary folder on every search (12 thumbnails a stroke).
    # Both folders are bounded (thumbnails per gallery, pictures ServedImages.limit).
    static = {Path(p).resolve() for p in (service.thumbs_dir, served_folder(service))} - _STATIC_PATHS
    gr.set_static_paths(sorted(static))  # process-wide, and Gradio appends: each folder once
    _STATIC_PATHS.update(static)
    _ours_first()
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
        css=page_css(),
        head=page_head(),
        footer_links=[],
        state_session_capacity=SESSIONS_KEPT,
    )

