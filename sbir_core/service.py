"""`RetrievalService`: everything the browser app does, as plain Python orchestration.

The app (`app.py`) is a thin Gradio layer over this class (it formats the plain-text
messages), and `python -m sbir_core` reaches the same library. The service holds one
encoder, a `GalleryStore` of named galleries (each call names its gallery: a visitor's
choice lives in the visitor's session, never here), bounded caches of query encodings
and explanations, and turns every failure a user can cause into a plain message:

    canvas / photo / text -> data.drawing -> gallery.query (encoder) -> gallery.index
        -> results (SearchResult) -> explain.correspondence / explain.embedding_map
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from cachetools import LRUCache
from PIL import Image

from sbir_core.data.drawing import canvas_image, compact_sketch, input_fingerprint
from sbir_core.data.images import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS
from sbir_core.data.preprocess import BlankSketchError, preprocess_photo
from sbir_core.errors import InputError, SBIRError
from sbir_core.explain.correspondence import explain_pair
from sbir_core.explain.embedding_map import gallery_map
from sbir_core.gallery import confidence
from sbir_core.gallery.batching import SketchBatcher
from sbir_core.gallery.identity import checkpoint_spec
from sbir_core.gallery.index import PLAIN_HEAD
from sbir_core.gallery.query import encode_query, encode_sketch_query, search_reranked
from sbir_core.gallery.results import SearchResult
from sbir_core.gallery.sharing import code_of, gallery_id, parse_code
from sbir_core.gallery.store import BuildOutcome, GalleryStore, LoadedGallery
from sbir_core.models.encoders import create_encoder
from sbir_core.models.relation import relation_for
from sbir_core.paths import PathLike, SHIPPED_GALLERIES

log = logging.getLogger(__name__)

DEFAULT_K = 12
MAX_K = 48  # k is clamped to [1, MAX_K]
QUERY_CACHE_ENTRIES = 256
EXPLANATION_CACHE_ENTRIES = 32

EMPTY_SKETCH_MESSAGE = "Draw something first: the canvas is empty."
SORRY = {"sketch": "Sorry, that drawing could not be searched. Try drawing it again.",
         "text": "Sorry, that text could not be searched. Try another word.",
         "photo": "Sorry, that photo could not be searched. Try another picture."}
ProgressFn = Callable[[float, str], None]


class _Cache:
    """A bounded LRU cache shared by the server's threads."""

    def __init__(self, size: int) -> None:
        self._c: LRUCache = LRUCache(size)
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            return self._c.get(key)

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._c[key] = value


# ----------------------------------------------------------------------------- results
@dataclass
class Query:
    """What was searched for; kept (e.g. in the page's state) to explain results later."""

    kind: str  # "sketch", "photo" or "text"
    embedding: np.ndarray  # (D,) float32, L2-normalised
    gallery: str  # gallery name the hits come from
    hits: list[SearchResult] = field(default_factory=list)
    image: Any = None  # the drawing as given / the photo as the encoder saw it (for explanations)
    text: Optional[str] = None
    key: str = ""  # cache key of the input
    model_input: Any = None  # the preprocessed image the encoder was given (cropped, padded, line width)

    @property
    def highlight(self) -> list[int]:
        return [h.index for h in self.hits]


@dataclass
class SearchOutcome:
    ok: bool
    message: str
    hits: list[SearchResult] = field(default_factory=list)
    query: Optional[Query] = None
    seconds: float = 0.0
    # How sure the search is, for the page to word (filled by the confidence rule):
    # "sure" (the first result is right at least 4 times in 5), "closest" (no claim of a
    # match), "absent" (the gallery probably lacks the object), "unreadable" (a scribble or
    # a dot); "" when not assessed.
    level: str = ""
    guess: Optional[str] = None  # a class the model can stand behind when the gallery lacks it
    # Why it failed (ok False), for the page to word: "blank" (nothing readable drawn),
    # "input" (the caller's input; `message` says what to change), "error" (a bug, logged).
    problem: str = ""

    @property
    def unsure(self) -> bool:
        """No claim of a match (any level but "sure"; False when not assessed)."""
        return self.level not in ("", "sure")

    def gallery_items(self) -> list[tuple[str, str]]:
        """(image, caption) pairs, the form `gr.Gallery` takes."""
        return [(h.thumb, h.caption) for h in self.hits]


@dataclass
class ExplanationImages:
    ok: bool
    message: str
    correspondences: Optional[Image.Image] = None
    synthesis: Optional[Image.Image] = None
    heatmap: Optional[Image.Image] = None
    hit: Optional[SearchResult] = None


@dataclass
class MapImage:
    ok: bool
    message: str
    image: Optional[Image.Image] = None
    plot_data: Optional[dict] = None
    marks: Any = None  # where the picture's star, caption, results and class names are (`MapMarks`)


def clamp_k(k: Any) -> int:
    """Number of results: any value is clamped to [1, MAX_K]; what is not a number gives DEFAULT_K."""
    try:
        k = int(float(k))
    except (TypeError, ValueError, OverflowError):
        return DEFAULT_K
    return max(1, min(k, MAX_K))


# ----------------------------------------------------------------------------- loaded gallery


# ----------------------------------------------------------------------------- the service
class RetrievalService:
    """Load the model and galleries once; answer searches, explanations, maps and builds."""

    def __init__(
        self,
        galleries_root: PathLike = SHIPPED_GALLERIES,
        gallery: Optional[str] = "default",
        checkpoint: Union[str, PathLike, None] = "default",
        *,
        encoder: Any = None,
        relation: Union[str, PathLike, None, Any] = "auto",
        cache_dir: Optional[PathLike] = None,
        uploads_dir: Optional[PathLike] = None,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        max_upload_pixels: int = MAX_UPLOAD_PIXELS,
        auto_rebuild: bool = True,
        progress: Optional[ProgressFn] = None,
    ) -> None:
        self.notices: list[str] = []  # page-level warnings (missing checkpoint, ...)
        self.encoder, self.checkpoint = self._load_encoder(encoder, checkpoint)
        self.relation = self._load_relation(relation)
        self.confidence_rule = confidence.rule_for(self.encoder)  # None: levels are not assessed
        self.store = GalleryStore(self.encoder, self.checkpoint, galleries_root, cache=cache_dir, uploads=uploads_dir,
                                  max_upload_bytes=max_upload_bytes, max_upload_pixels=max_upload_pixels,
                                  auto_rebuild=auto_rebuild)
        self._map_lock = threading.Lock()
        self._queries = _Cache(QUERY_CACHE_ENTRIES)
        self._explanations = _Cache(EXPLANATION_CACHE_ENTRIES)
        self._batcher = SketchBatcher(self.encoder)  # drawings searched at the same time share a forward pass
        # The gallery a call without one uses, fixed at start: visitors name their gallery
        # with each call (the page keeps it in the visitor's session).
        self.default_gallery: Optional[str] = None
        candidates = ([gallery] if gallery else []) + [n for n in self.store.list_galleries() if n != gallery]
        for name in candidates:
            try:
                self.store.get(name, progress=progress)
            except InputError as exc:
                self.notices.append(str(exc))
                continue
            self.default_gallery = name
            break

    @property
    def thumbs_dir(self) -> Path:
        return self.store.thumbs_dir

    @property
    def max_upload_bytes(self) -> int:
        return self.store.max_upload_bytes

    @property
    def max_upload_pixels(self) -> int:
        return self.store.max_upload_pixels

    def gallery(self, name: Optional[str] = None, progress: Optional[ProgressFn] = None) -> LoadedGallery:
        """The named gallery (the default one when None), loaded once."""
        return self.store.get(name or self.default_gallery, progress=progress)

    def list_galleries(self) -> list[str]:
        return self.store.list_galleries()

    def describe_gallery(self, name: str, progress: Optional[ProgressFn] = None) -> str:
        return self.store.describe(name, progress=progress)

    def gallery_info(self, name: Optional[str] = None) -> dict[str, Any]:
        return self.store.info(name or self.default_gallery)

    def thumbnail(self, lg: LoadedGallery, row: int) -> str:
        return self.store.thumbnail(lg, row)

    def build_gallery_from_uploads(self, files: Any, name: str, owner: str, progress: Optional[ProgressFn] = None,
                                   modality: str = "photo") -> BuildOutcome:
        """Uploaded files -> a class gallery: opened with its code, changed only with `owner`
        (see GalleryStore.build_from_uploads and gallery.sharing)."""
        return self.store.build_from_uploads(files, name, owner, progress=progress, modality=modality)

    def build_gallery_from_folder(self, folder: PathLike, name: Optional[str] = None,
                                  progress: Optional[ProgressFn] = None, modality: str = "photo",
                                  make_default: bool = True) -> BuildOutcome:
        """The operator's `--gallery PATH`: a public gallery under the galleries root."""
        out = self.store.build_from_folder(folder, name, progress=progress, modality=modality)
        if out.ok and make_default:
            self.default_gallery = out.name
        return out

    def open_class_gallery(self, code: Any, progress: Optional[ProgressFn] = None) -> tuple[str, str]:
        """A class code as typed (or a pasted link) -> (gallery id, status line); InputError
        with one plain sentence for a malformed or unknown code."""
        gid = gallery_id(parse_code(code))
        return gid, self.store.describe(gid, progress=progress)

    def owned_galleries(self, owner: Any) -> list[tuple[str, str]]:
        """The class galleries `owner` built, as (page label, gallery id)."""
        return self.store.owned(owner)

    def delete_gallery(self, gallery: Any, owner: Any) -> str:
        """Delete a class gallery (its owner only) -> a status line; InputError otherwise."""
        name = self.store.delete_shared(gallery, owner)
        return f"Gallery “{name}” is deleted. Its class code no longer opens anything."

    def rename_gallery(self, gallery: Any, name: Any, owner: Any) -> str:
        """Rename a class gallery (its owner only; its code stays) -> its new page label."""
        return self.store.rename_shared(gallery, name if isinstance(name, str) else "", owner)

    def display_name(self, gallery: str) -> str:
        return self.store.display_name(gallery)

    def class_gallery_name(self, gallery: str) -> Optional[str]:
        """The name a class gallery's builder gave it (without its code); None for other galleries."""
        code = code_of(gallery)
        info = self.store.shared.read(code) if code else None
        return info.name.replace("_", " ") if info else None

    # ------------------------------------------------------------------ model
    def _load_encoder(self, encoder: Any, checkpoint: Any) -> tuple[Any, str]:
        if encoder is not None:
            spec = checkpoint_spec(encoder)  # "none", "default", a path, or "<checkpoint id>" if unknown
            return encoder, (None if spec.startswith("<") else spec)
        spec = "none" if checkpoint is None else str(checkpoint)
        try:
            enc = create_encoder(checkpoint=spec)
            enc.backbone.fuse_for_inference()  # the service only searches: a cheaper forward pass
            return enc, spec
        except (FileNotFoundError, ValueError, SBIRError) as exc:
            if spec.lower() == "none":
                raise
            what = ("the trained model (checkpoints/default.safetensors) is missing" if isinstance(exc, FileNotFoundError)
                    else f"the trained model could not be loaded ({exc})")
            msg = (f"Heads up: {what}, so the app runs on the raw backbone. Drawing and photo search "
                   "still work, but matches are weaker and text search is off.")
            log.warning("%s (%s)", msg, exc)
            self.notices.append(msg)
            return create_encoder(checkpoint="none"), "none"

    def _load_relation(self, relation: Any) -> Any:
        if relation is None or relation == "none":
            return None
        if not isinstance(relation, (str, os.PathLike)):
            return relation  # an already-loaded RelationModel
        try:
            return relation_for(self.encoder, None if relation == "auto" else relation)
        except Exception as exc:  # explanations fall back to backbone tokens
            log.warning("relation model not loaded: %s", exc)
            return None

    @property
    def encoder_id(self) -> str:
        return str(self.encoder.encoder_id)

    @property
    def has_text(self) -> bool:
        head = getattr(self.encoder, "head", None)
        return head is not None and hasattr(head, "embed_text")

    @property
    def can_rerank(self) -> bool:
        return self.relation is not None

    def warm_up(self, name: Optional[str] = None, explain: bool = True) -> None:
        """Do the one-time work before the first user does: every thumbnail, the
        t-SNE map, the text encoder and the explanation code path."""
        lg = self.gallery(name)
        for i in range(len(lg)):
            self.thumbnail(lg, i)
        self._map(lg)
        if self.has_text:
            try:
                encode_query(self.encoder, text="cat")
            except Exception as exc:
                log.warning("text encoder warm-up failed: %s", exc)
        if explain and len(lg):
            from sbir_core.data.examples import list_examples  # only here: reads the example files

            ex = list_examples()
            if ex:
                out = self.search_sketch(ex[0].render(), 1, gallery=lg.name)
                if out.ok:
                    self.explain(out.query, 0)

    # ------------------------------------------------------------------ searching
    def _hits(self, lg: LoadedGallery, results: Sequence[SearchResult]) -> list[SearchResult]:
        """Gallery search results with their thumbnails (what the page shows)."""
        return [dataclasses.replace(h, path=lg.paths[h.index], thumb=self.thumbnail(lg, h.index)) for h in results]

    def search_sketch(self, canvas_value: Any, k: int = DEFAULT_K, gallery: Optional[str] = None,
                      rerank: bool = False, brush: Optional[float] = None) -> SearchOutcome:
        """A drawing (canvas dict, image, array, path or stroke list) -> results.

        Searches photos, or sketches when the gallery holds sketches (sketch -> sketch).
        """
        t0 = time.perf_counter()
        try:
            lg = self.gallery(gallery)
            img = canvas_image(canvas_value)
            key = "sketch:" + input_fingerprint(img) + (f":{brush:.1f}" if brush else "")
            cached = self._queries.get(key)
            if cached is None:
                cached = encode_sketch_query(self.encoder, img, brush=brush,  # BlankSketchError when empty
                                             batcher=self._batcher)
                self._queries.put(key, cached)
            emb, sk = cached.embedding, cached.model_input
            use_rerank = rerank and self.relation is not None and lg.gallery.tokens is not None \
                and lg.modality == "photo"
            if use_rerank:
                hits = self._hits(lg, search_reranked(lg.gallery, self.relation, cached, clamp_k(k)))
            else:
                hits = self._hits(lg, lg.gallery.search(emb, clamp_k(k)))
        except Exception as exc:  # never let one bad drawing take the page down
            return self._failure(exc, "sketch", t0)
        mode = "sketch → sketch" if lg.modality == "sketch" else "sketch → photo"
        q = Query(kind="sketch", embedding=emb, gallery=lg.name, hits=hits, image=compact_sketch(img), key=key,
                  model_input=sk)
        dt = time.perf_counter() - t0
        level, guess = self._confidence(lg, emb, hits, kind="sketch", drawing=img, brush=brush, model_input=sk)
        msg = self._summary(hits, mode, dt, rerank=use_rerank)
        return SearchOutcome(True, msg, hits, q, dt, level=level, guess=guess)

    @staticmethod
    def _failure(exc: Exception, kind: str, t0: float) -> SearchOutcome:
        """A failed search as the page words it: the caller's mistake in its own sentence, a
        bug as a plain "sorry" (logged with its traceback)."""
        seconds = time.perf_counter() - t0
        if isinstance(exc, BlankSketchError):
            return SearchOutcome(False, EMPTY_SKETCH_MESSAGE, seconds=seconds, problem="blank")
        if isinstance(exc, InputError):
            return SearchOutcome(False, str(exc), seconds=seconds, problem="input")
        log.error("%s search failed", kind, exc_info=exc)
        return SearchOutcome(False, SORRY[kind], seconds=seconds, problem="error")

    def _confidence(self, lg: LoadedGallery, emb: np.ndarray, hits: Sequence[SearchResult], **query: Any
                    ) -> tuple[str, Optional[str]]:
        """(level, guess) by the checkpoint's calibrated rule (`gallery.confidence`); ("", None)
        when it has none. It reads the first row, so a search for fewer results looks further."""
        if self.confidence_rule is None or not hits:
            return "", None
        try:
            labels = [h.label for h in hits]
            if len(labels) < confidence.TOP:
                labels = [r.label for r in lg.gallery.search(emb, confidence.TOP)]
            return confidence.assess(self.confidence_rule, self.encoder, lg.gallery, emb, labels, **query)
        except Exception:  # the results still show
            log.exception("confidence rule failed")
            return "", None

    def search_text(self, text: str, k: int = DEFAULT_K, gallery: Optional[str] = None) -> SearchOutcome:
        """A class name or phrase -> results (needs the trained checkpoint's text head)."""
        t0 = time.perf_counter()
        text = (text or "").strip()
        if not text:
            return SearchOutcome(False, "Type a word first, e.g. “cat” or “bicycle”.", problem="input")
        if len(text) > 200:
            return SearchOutcome(False, "That text is too long: a few words are enough.", problem="input")
        if not self.has_text:
            return SearchOutcome(False, "Text search needs the trained model (checkpoints/default.safetensors), "
                                        "which is not loaded; drawing and photo search still work.", problem="input")
        try:
            lg = self.gallery(gallery)
            key = "text:" + text.lower()
            emb = self._queries.get(key)
            if emb is None:
                emb = encode_query(self.encoder, text=text)
                self._queries.put(key, emb)
            hits = self._hits(lg, lg.gallery.search(emb, clamp_k(k)))
        except Exception as exc:
            return self._failure(exc, "text", t0)
        dt = time.perf_counter() - t0
        q = Query(kind="text", embedding=emb, gallery=lg.name, hits=hits, text=text, key=key)
        level, guess = self._confidence(lg, emb, hits, kind="text", text=text)
        return SearchOutcome(True, self._summary(hits, f"text “{text}” → {lg.modality}", dt), hits, q, dt,
                             level=level, guess=guess)

    def search_photo(self, image: Any, k: int = DEFAULT_K, gallery: Optional[str] = None) -> SearchOutcome:
        """A photo (PIL image or array; decode uploads with `open_upload`) as the query."""
        t0 = time.perf_counter()
        if image is None or (isinstance(image, str) and not image):
            return SearchOutcome(False, "Upload a photo first.", problem="input")
        try:
            if isinstance(image, (str, os.PathLike, dict, bytes)):
                raise InputError("A photo must be sent as an upload or as image data, not as a file name.")
            if isinstance(image, np.ndarray):
                if image.ndim not in (2, 3) or image.size == 0:
                    raise InputError("That upload is not an image.")
                if image.shape[0] * image.shape[1] > self.max_upload_pixels:
                    raise InputError(f"That photo is too large ({image.shape[1]}×{image.shape[0]}); "
                                       f"the limit is {self.max_upload_pixels / 1e6:.0f} megapixels.")
                image = Image.fromarray(image.astype(np.uint8) if image.dtype != np.uint8 else image)
            if not isinstance(image, Image.Image):
                raise InputError("That upload is not an image.")
            if image.width * image.height > self.max_upload_pixels:
                raise InputError(f"That photo is too large ({image.width}×{image.height}); "
                                   f"the limit is {self.max_upload_pixels / 1e6:.0f} megapixels.")
            lg = self.gallery(gallery)
            key = "photo:" + input_fingerprint(image)
            cached = self._queries.get(key)
            if cached is None:
                cached = (encode_query(self.encoder, photo=image), preprocess_photo(image, self.encoder.image_size))
                self._queries.put(key, cached)
            emb, shown = cached
            hits = self._hits(lg, lg.gallery.search(emb, clamp_k(k)))
        except Exception as exc:
            return self._failure(exc, "photo", t0)
        dt = time.perf_counter() - t0
        q = Query(kind="photo", embedding=emb, gallery=lg.name, hits=hits, image=shown, key=key, model_input=shown)
        level, guess = self._confidence(lg, emb, hits, kind="photo")
        return SearchOutcome(True, self._summary(hits, f"photo → {lg.modality}", dt), hits, q, dt,
                             level=level, guess=guess)

    @staticmethod
    def _summary(hits: Sequence[SearchResult], mode: str, seconds: float, rerank: bool = False) -> str:
        if not hits:
            return f"No results ({mode})."
        top = hits[0].label.replace("_", " ") if hits[0].label else "?"
        extra = ", re-ranked" if rerank else ""
        return (f"First result: {top} (similarity {hits[0].score:.2f}) · {len(hits)} results · {mode}{extra} · "
                f"{seconds * 1000:.0f} ms")

    # ------------------------------------------------------------------ explanations
    def explain(self, query: Optional[Query], result_index: int, gallery_row: Optional[int] = None
                ) -> ExplanationImages:
        """Why did result `result_index` (its rank in `query.hits`) match? Token
        correspondences, patch-replacement synthesis and a heatmap.

        `gallery_row` (the clicked image's row in the gallery) wins over the rank when
        given, so a click explains the image that was clicked even if the results
        moved on in between."""
        if query is None or not query.hits:
            return ExplanationImages(False, "Search first, then click a result to see why it matched.")
        if query.image is None:
            return ExplanationImages(False, "Explanations compare a drawing (or photo) with a result; "
                                            "a text query has no picture to compare. Draw it instead!")
        hit = None
        if gallery_row is not None:
            hit = self._hit_for_row(query, int(gallery_row))
        if hit is None:
            try:
                i = int(result_index)
            except (TypeError, ValueError):
                return ExplanationImages(False, "Click one of the results.")
            if not 0 <= i < len(query.hits):
                return ExplanationImages(False, f"There is no result number {i + 1}.")
            hit = query.hits[i]
        # The message's order note depends on the results after this one, so on k too.
        key = (query.key, query.gallery, hit.index, self.relation is not None, len(query.hits))
        cached = self._explanations.get(key)
        if cached is not None:
            return cached
        try:
            ex = explain_pair(self.encoder, query.image, hit.path, relation=self.relation, query_kind=query.kind)
            label = hit.label.replace("_", " ") or "this image"
            score = f", relation score {ex.relation_score:.2f}" if ex.relation_score is not None else ""
            msg = (f"{hit.heading}: {label} (similarity {hit.score:.2f}{score}). "
                   + self._order_note(query, hit)
                   + f"Lines join the parts of your {'drawing' if query.kind == 'sketch' else 'photo outline'} "
                   f"to the parts of the image that look most alike.")
            out = ExplanationImages(True, msg, ex.render_correspondences(), ex.render_synthesis(),
                                    ex.render_heatmap(), hit)
        except BlankSketchError:
            out = ExplanationImages(False, "The query has no lines to compare.")
        except Exception:
            log.exception("explanation failed")
            out = ExplanationImages(False, "Sorry, this match could not be explained.", hit=hit)
        self._explanations.put(key, out)
        return out

    def _order_note(self, query: Query, hit: SearchResult) -> str:
        """Why a result sits above one with a higher similarity, when it does: seen-class
        calibration orders every result, gallery diffusion those after the first row."""
        if not any(h.score > hit.score for h in query.hits if h.rank > hit.rank):
            return ""
        try:
            g = self.gallery(query.gallery).gallery
        except InputError:
            return ""
        notes = []
        if g.calibration is not None:
            notes.append("pictures of things the model was trained on move down a little when your drawing "
                         "looks like none of them, so that new kinds of things can reach the first row")
        if g.diffusion_k and hit.rank >= PLAIN_HEAD:
            notes.append(f"after the first {PLAIN_HEAD}, results are also ordered by how much they resemble "
                         f"your best matches")
        if not notes:
            return ""
        return "A result with a higher similarity comes later: " + "; ".join(notes) + ". "

    def _hit_for_row(self, query: Query, row: int) -> Optional[SearchResult]:
        for h in query.hits:
            if h.index == row:
                return h
        try:
            lg = self.gallery(query.gallery)
        except InputError:
            return None
        if not 0 <= row < len(lg):
            return None
        score = float(lg.gallery.raw_embeddings[row] @ query.embedding)
        rank = lg.gallery.rank_of(query.embedding, row)
        past = rank is None  # a big gallery ranks its shortlist only
        return SearchResult(rank=lg.gallery.shortlist if past else rank, index=row, path=lg.paths[row], score=score,
                            label=lg.labels[row], thumb=self.thumbnail(lg, row), past_shortlist=past)

    def row_of_thumbnail(self, gallery: Optional[str], path: str, label: Optional[str] = None) -> Optional[int]:
        """The gallery row a results-grid image shows (thumbnails are named <row>.jpg);
        None when it cannot be told. When `label` is given (the class the page showed with
        the image), it must be that row's class."""
        stem = Path(str(path)).stem
        if not stem.isdigit():
            return None
        try:
            lg = self.gallery(gallery)
        except InputError:
            return None
        row = int(stem)
        if not 0 <= row < len(lg):
            return None
        if label is not None and lg.labels[row] != label:
            return None
        return row

    # ------------------------------------------------------------------ t-SNE map
    def _map_cache_dir(self, lg: LoadedGallery) -> Path:
        return lg.thumbs_dir.parent.parent / "maps" / lg.thumbs_dir.name

    def _map(self, lg: LoadedGallery) -> Any:
        if lg.emap is None:
            with self._map_lock:  # fitted once, even when two visitors ask at once
                if lg.emap is None:
                    lg.emap = gallery_map(lg.gallery, cache=self._map_cache_dir(lg), search=(lg.directory,))
        return lg.emap

    def map_image(self, query_embedding: Optional[np.ndarray] = None, highlight: Optional[Sequence[int]] = None,
                  gallery: Optional[str] = None, size: tuple[int, int] = (640, 560),
                  query_label: str = "your drawing") -> MapImage:
        """The gallery's t-SNE map (thumbnails, class names) with the query placed in it
        (a star) and `highlight` (the top-k rows, best first) framed. With results, the
        star goes where most of its best results sit together (`place_by_results`), so it
        lands with what the page shows; without, by its embedding."""
        try:
            lg = self.gallery(gallery)
            m = self._map(lg)
            xy = None
            hl = [int(i) for i in highlight] if highlight is not None else None
            if query_embedding is not None:
                xy = m.place_by_results(hl) if hl else m.place(
                    np.asarray(query_embedding, dtype=np.float32).reshape(1, -1))[0]
            what = 'drawings' if lg.modality == 'sketch' else 'pictures'
            # A big gallery's map shows a sample of it, and says so.
            title = (f"{lg.name}: {len(m):,} of its {len(lg):,} {what}" if m.sampled else
                     f"{lg.name}: {len(lg)} {what}") + (
                (" · ★ sits with its best matches (pink frames)" if hl else " · ★ = you") if xy is not None else "")
            # Thumbnails are decoded once per map (it caches them and the base layer).
            marks = m.marks(query_xy=xy, highlight=hl, size=size, title=title, query_label=query_label,
                            thumbnails=lambda row: self.thumbnail(lg, row))
            return MapImage(True, "", m.draw(marks), m.to_plot_data(query_xy=xy, highlight=hl), marks)
        except InputError as exc:
            return MapImage(False, str(exc))
        except Exception:
            log.exception("t-SNE map failed")
            return MapImage(False, "The map could not be drawn.")

    def map_image_for(self, query: Optional[Query], size: tuple[int, int] = (640, 560)) -> MapImage:
        if query is None:
            return self.map_image(None, None, size=size)
        label = {"sketch": "your drawing", "photo": "your photo", "text": f"“{(query.text or '')[:24]}”"}.get(
            query.kind, "your query")
        return self.map_image(query.embedding, query.highlight, gallery=query.gallery, size=size, query_label=label)

    # ------------------------------------------------------------------ building galleries



