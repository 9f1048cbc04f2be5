"""The page: layout, event wiring and launch settings (CSS and the canvas script live in
`static/`, loaded here)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import gradio as gr

from sbir_app.callbacks import CANVAS, NO_EXPLANATION, Callbacks
from sbir_app.served import ServedImages, served_folder
from sbir_core.data.examples import list_examples
from sbir_core.data.images import MAX_UPLOAD_BYTES
from sbir_core.service import DEFAULT_K, MAX_K, RetrievalService

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
CONCURRENCY = 2  # 2 CPU cores: two searches at a time, the rest wait in the queue

TITLE = "Sketch Search"
INSTRUCTIONS = ("**Draw an object** on the white canvas: matching pictures appear after every stroke. "
                "Click a result to see *why* it matched — even for things the model never saw in training.")

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


def page_css() -> str:
    return (STATIC / "page.css").read_text(encoding="utf-8")


def page_head() -> str:
    """The canvas script, for the page's <head> (scripts inside gr.HTML do not run)."""
    return "<script>\n" + (STATIC / "canvas.js").read_text(encoding="utf-8") + "</script>\n"


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
        owner_state = gr.State(None)  # this visitor's secret token: names their uploaded galleries
        mine_state = gr.State([])  # this visitor's uploaded galleries, [(label, id)]
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
        css=page_css(),
        head=page_head(),
        footer_links=[],
    )

