"""`RetrievalService`: everything the browser app does, as plain Python.

The app (`app.py`) is a thin Gradio layer over this class, and the tests drive it
directly. It loads the encoder and the galleries once, caches what can be cached
(gallery arrays, thumbnails, the t-SNE map, query embeddings, explanations) and
turns every failure a user can cause into a friendly message instead of a
traceback. All retrieval work goes through the library the command line uses:

- `encoders.create_encoder`                 (the model; raw backbone if the checkpoint is missing)
- `index.Gallery.load / build_gallery / check_encoder / encode_query / Gallery.search`
- `preprocess.preprocess_sketch` (via the encoder) and `BlankSketchError`
- `explain.explain_pair` (+ `relation.load_relation` / `rerank` when a relation model exists)
- `embedding_map.EmbeddingMap / fit_map`   (the t-SNE panel)

Data flows one way: canvas -> preprocessing -> encoder -> index -> results ->
explanations / map.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from sbir_core.paths import cache_dir, home
from sbir_core.data.preprocess import BlankSketchError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GALLERIES = ROOT / "galleries"
DEFAULT_CACHE = cache_dir() / "app"
# Galleries visitors upload live outside the repository, in the user's data folder.
DEFAULT_UPLOADS = home() / "uploaded-galleries"
DEFAULT_K = 12
MAX_K = 48  # k is clamped to [1, MAX_K]
MAX_UPLOADED_GALLERIES = 32  # on disk; the oldest is deleted when a new one would exceed this
MAX_LOADED_GALLERIES = 8  # uploaded galleries kept in memory at once (shipped ones always stay)
UPLOAD_PREFIX = "upload:"  # gallery ids of uploaded galleries: upload:<session token>/<name>

# Uploads (query photos and gallery images): refuse anything bigger before decoding it.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000
MAX_UPLOAD_FILES = 2000
# Drawings sent as images (API clients; the page sends strokes): a canvas is at most a few
# megapixels, so anything bigger is refused from its header, before decoding.
MAX_CANVAS_PIXELS = 4_000_000
THUMB_SIZE = 256
GALLERY_NAME_RE = re.compile(r"[^a-z0-9_-]+")

EMPTY_SKETCH_MESSAGE = "✏️ Draw something first: the canvas is empty."
ProgressFn = Callable[[float, str], None]
PathLike = Union[str, "os.PathLike[str]"]


class ServiceError(Exception):
    """A problem the user can fix; its message is shown in the page as is."""


# ----------------------------------------------------------------------------- results
@dataclass
class Hit:
    """One search result."""

    rank: int  # 0-based position in the result list
    index: int  # row in the gallery
    path: str  # the gallery image
    thumb: str  # a small copy for the results grid (may be `path` itself)
    score: float  # cosine similarity (or re-ranked score)
    label: str

    @property
    def caption(self) -> str:
        name = self.label.replace("_", " ") if self.label else "(no class)"
        return f"{name} · {self.score:.2f}"


@dataclass
class Query:
    """What was searched for; kept (e.g. in the page's state) to explain results later."""

    kind: str  # "sketch", "photo" or "text"
    embedding: np.ndarray  # (D,) float32, L2-normalised
    gallery: str  # gallery name the hits come from
    hits: list[Hit] = field(default_factory=list)
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
    hits: list[Hit] = field(default_factory=list)
    query: Optional[Query] = None
    seconds: float = 0.0
    unsure: bool = False  # the best match is weak: the gallery may not contain the object

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
    hit: Optional[Hit] = None


@dataclass
class MapImage:
    ok: bool
    message: str
    image: Optional[Image.Image] = None
    plot_data: Optional[dict] = None


@dataclass
class BuildOutcome:
    ok: bool
    message: str
    name: Optional[str] = None
    report: Any = None  # index.BuildReport
    skipped: list[tuple[str, str]] = field(default_factory=list)
    gallery: Any = None  # the built index.Gallery, internal hand-over only


# ----------------------------------------------------------------------------- small helpers
class _LRU:
    """A tiny thread-safe LRU cache."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def pop(self, key: Any) -> Any:
        with self._lock:
            return self._d.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


def _thumb_prefix(gallery_id: str) -> str:
    return sanitize_gallery_name(gallery_id.replace(UPLOAD_PREFIX, "upload-").replace("/", "_"))


def sanitize_gallery_name(name: str) -> str:
    """User text -> a safe folder name (lowercase letters, digits, '_' and '-')."""
    s = GALLERY_NAME_RE.sub("_", str(name or "").strip().lower()).strip("_-")
    return s[:40]


def clamp_k(k: Any) -> int:
    """Number of results: any value is clamped to [1, MAX_K]; what is not a number gives DEFAULT_K."""
    try:
        k = int(float(k))
    except (TypeError, ValueError, OverflowError):
        return DEFAULT_K
    return max(1, min(k, MAX_K))


def display_name(gallery_id: str) -> str:
    """How a gallery is named in the page: uploaded ones by the name their builder chose."""
    if gallery_id and gallery_id.startswith(UPLOAD_PREFIX):
        return gallery_id.rsplit("/", 1)[-1] + " (yours)"
    return gallery_id


def label_from_filename(filename: str) -> str:
    """'red_car_03.jpg' -> 'red_car', 'Cat (2).png' -> 'cat': the class of an uploaded image."""
    stem = Path(filename).stem.lower()
    stem = re.sub(r"\(\d+\)$", "", stem).strip()
    stem = re.sub(r"[\s_\-.]*\d+$", "", stem)
    stem = GALLERY_NAME_RE.sub("_", stem).strip("_-")
    return stem or "uploaded"


def open_upload(path: PathLike, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS,
                what: str = "") -> Image.Image:
    """An uploaded file (a path the web framework wrote, never one a client named) ->
    the decoded image; ServiceError with one plain sentence otherwise.

    Only the header is read before the pixel check, so a decompression bomb is
    refused before it is decoded.
    """
    p = Path(path)
    name = what or p.name
    if not p.is_file():
        raise ServiceError(f"“{name}” was not received; please upload it again.")
    size = p.stat().st_size
    if size == 0:
        raise ServiceError(f"“{name}” is empty.")
    if size > max_bytes:
        raise ServiceError(f"“{name}” is too large ({size / 2**20:.1f} MB); the limit is {max_bytes / 2**20:.0f} MB.")
    try:
        with Image.open(p) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ServiceError(f"“{name}” is too large ({w}×{h} = {w * h / 1e6:.0f} megapixels); "
                                   f"the limit is {max_pixels / 1e6:.0f} megapixels.")
            im.load()
            return im.copy()
    except ServiceError:
        raise
    except Exception as exc:  # PIL raises many kinds for files that are not images
        raise ServiceError(f"“{name}” is not an image that can be read (PNG, JPEG, WebP, GIF or BMP).") from exc


def check_upload(path: PathLike, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS) -> None:
    """Raise ServiceError unless `path` is a readable image within the size limits."""
    open_upload(path, max_bytes, max_pixels)


def _canvas_image(value: Any) -> Any:
    """A drawing as data -> something `preprocess_sketch` takes.

    Accepted: a stroke list, a PIL image, an array, or an editor dict
    {"background", "layers", "composite"} of those (the composite is what the user
    sees). File names are refused: the service never opens a path a client names.
    """
    if value is None:
        raise BlankSketchError()
    if isinstance(value, dict):
        if "path" in value or "url" in value:
            _as_image(value)  # a file reference: refused
        comp = value.get("composite")
        if comp is not None:
            return _as_image(comp)
        parts = [value.get("background"), *(value.get("layers") or [])]
        parts = [_to_pil(_as_image(p)).convert("RGBA") for p in parts if p is not None]
        if not parts:
            raise BlankSketchError()
        base = Image.new("RGBA", parts[0].size, (255, 255, 255, 0))
        for p in parts:
            if p.size != base.size:
                p = p.resize(base.size)
            base.alpha_composite(p)
        return base
    return _as_image(value)


def _as_image(x: Any) -> Any:
    """Images, arrays and stroke lists pass; anything else (a path, a file dict) is refused."""
    if isinstance(x, (str, os.PathLike, dict, bytes)):
        raise ServiceError("A drawing must be sent as strokes or as image data, not as a file name.")
    if isinstance(x, np.ndarray):
        if x.ndim not in (2, 3) or x.size == 0:
            raise ServiceError("That drawing is not an image.")
        if x.shape[0] * x.shape[1] > MAX_CANVAS_PIXELS:
            raise ServiceError(f"That drawing is too large ({x.shape[1]}×{x.shape[0]}); the limit is "
                               f"{MAX_CANVAS_PIXELS / 1e6:.0f} megapixels.")
    if isinstance(x, Image.Image) and x.width * x.height > MAX_CANVAS_PIXELS:
        raise ServiceError(f"That drawing is too large ({x.width}×{x.height}); the limit is "
                           f"{MAX_CANVAS_PIXELS / 1e6:.0f} megapixels.")
    return x


def _to_pil(x: Any) -> Image.Image:
    if isinstance(x, Image.Image):
        return x
    a = np.asarray(x)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _compact_sketch(x: Any) -> Any:
    """A drawing as a small grey image to keep with the query (page state holds one
    per visitor): transparent canvases are flattened onto white first."""
    if not isinstance(x, (Image.Image, np.ndarray)):
        return x  # strokes are small already
    im = _to_pil(x)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        if np.asarray(rgba)[..., 3].min() < 250:
            return im  # real transparency: the alpha is the ink, keep it
        im = rgba
    return im.convert("L")


def _fingerprint(x: Any) -> str:
    """A cache key for a query input (exact: any changed pixel or point changes it)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(x, Image.Image):
        h.update(f"{x.mode}{x.size}".encode())
        h.update(x.tobytes())
    elif isinstance(x, np.ndarray):
        h.update(f"{x.dtype}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    else:
        h.update(repr(x).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- loaded gallery
@dataclass
class LoadedGallery:
    name: str
    directory: Path
    gallery: Any  # index.Gallery
    paths: list[str]  # image paths that exist on this machine
    thumbs_dir: Path
    notice: str = ""  # shown in the page (e.g. "rebuilt with the current model")
    emap: Any = None  # EmbeddingMap, fitted lazily
    _thumbs: dict = field(default_factory=dict)

    @property
    def modality(self) -> str:
        return self.gallery.modality

    @property
    def labels(self) -> list[str]:
        return self.gallery.labels

    def __len__(self) -> int:
        return len(self.gallery)


# ----------------------------------------------------------------------------- the service
class RetrievalService:
    """Load the model and galleries once; answer searches, explanations, maps and builds."""

    def __init__(
        self,
        galleries_root: PathLike = DEFAULT_GALLERIES,
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
        self.root = Path(galleries_root).resolve()
        self.cache_dir = Path(cache_dir).resolve() if cache_dir else DEFAULT_CACHE.resolve()
        self.uploads_dir = Path(uploads_dir).resolve() if uploads_dir else DEFAULT_UPLOADS.resolve()
        self.thumbs_dir = self.cache_dir / "thumbs"  # the only files the app serves from disk
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_upload_pixels = int(max_upload_pixels)
        self.auto_rebuild = auto_rebuild
        self.notices: list[str] = []  # page-level warnings (missing checkpoint, ...)
        self._lock = threading.RLock()
        self._build_lock = threading.Lock()
        self._galleries: dict[str, LoadedGallery] = {}  # shipped galleries, loaded once
        self._uploaded = _LRU(MAX_LOADED_GALLERIES)  # visitors' galleries, bounded
        self._queries = _LRU(256)
        self._explanations = _LRU(32)
        # The gallery a search without one uses. Fixed at start: visitors choose their
        # gallery per call (the page keeps it in the visitor's session), never for others.
        self.default_gallery: Optional[str] = None
        self.encoder, self.checkpoint = self._load_encoder(encoder, checkpoint)
        self.relation = self._load_relation(relation)
        candidates = ([gallery] if gallery else []) + [n for n in self.list_galleries() if n != gallery]
        for name in candidates:
            try:
                self._get_gallery(name, progress=progress)
            except ServiceError as exc:
                self.notices.append(str(exc))
                continue
            self.default_gallery = name
            break

    # ------------------------------------------------------------------ model
    def _load_encoder(self, encoder: Any, checkpoint: Any) -> tuple[Any, str]:
        from sbir_core.models.encoders import create_encoder

        if encoder is not None:
            from sbir_core.gallery.index import checkpoint_spec

            spec = checkpoint_spec(encoder)  # "none", "default", a path, or "<checkpoint id>" if unknown
            return encoder, (None if spec.startswith("<") else spec)
        spec = "none" if checkpoint is None else str(checkpoint)
        try:
            return create_encoder(checkpoint=spec), spec
        except (FileNotFoundError, ValueError) as exc:
            if spec.lower() == "none":
                raise
            what = ("the trained model (checkpoints/default.safetensors) is missing" if isinstance(exc, FileNotFoundError)
                    else f"the trained model could not be loaded ({exc})")
            msg = (f"⚠️ Heads up: {what}, so the app runs on the raw backbone. Drawing and photo search "
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
            from sbir_core.models.relation import DEFAULT_RELATION, load_relation
        except ImportError:
            return None
        path = DEFAULT_RELATION if relation == "auto" else Path(relation)
        if relation == "auto" and not Path(path).is_file():
            return None
        try:
            model = load_relation(path)
        except Exception as exc:  # explanations fall back to backbone tokens
            log.warning("relation model not loaded: %s", exc)
            return None
        grid = getattr(model, "grid", None)
        try:
            enc_grid = self._token_grid()
        except Exception:
            enc_grid = None
        if grid is not None and enc_grid is not None and tuple(grid) != tuple(enc_grid):
            log.warning("relation model grid %s does not fit the encoder's %s; not used", grid, enc_grid)
            return None
        return model

    def _token_grid(self) -> tuple[int, int]:
        import torch

        with torch.inference_mode():
            x = torch.zeros(1, 3, self.encoder.image_size, self.encoder.image_size)
            return tuple(self.encoder.backbone_features(x).grid)

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

    # ------------------------------------------------------------------ galleries
    def list_galleries(self) -> list[str]:
        """Names of the built galleries under the galleries root (folders holding a
        gallery.json, at most two levels deep), 'default' first."""
        from sbir_core.gallery.index import GALLERY_FILE

        names = set()
        if self.root.is_dir():
            nested: dict[str, list[str]] = {}
            for meta in list(self.root.glob(f"*/{GALLERY_FILE}")) + list(self.root.glob(f"*/*/{GALLERY_FILE}")):
                rel = meta.parent.relative_to(self.root)
                if any(part.startswith(".") for part in rel.parts) or "images" in rel.parts:
                    continue
                if len(rel.parts) == 2 and not (self.root / rel.parts[0] / GALLERY_FILE).is_file():
                    nested.setdefault(rel.parts[0], []).append(rel.as_posix())
                else:
                    names.add(rel.as_posix())
            for parent, inner in nested.items():
                # one index inside a folder (galleries/x/index/) is listed as the folder, x
                names |= {parent} if len(inner) == 1 else set(inner)
        names |= {n for n in self._galleries}
        return sorted(names, key=lambda n: (n != "default", n))

    def gallery_dir(self, name: str) -> Path:
        d = (self.root / name).resolve()
        if self.root not in d.parents and d != self.root:
            raise ServiceError(f"“{name}” is not a gallery name.")
        return d

    def _rebuilt_dir(self, name: str) -> Path:
        return self.cache_dir / "rebuilt" / sanitize_gallery_name(name.replace("/", "_"))

    def select_gallery(self, name: str, progress: Optional[ProgressFn] = None) -> str:
        """Load `name` (once) and describe it in one status line. Changes nothing for
        anyone else: the caller passes the gallery with each search.

        A gallery built with another encoder is rebuilt from its source images when
        they are available; otherwise a ServiceError says how to rebuild it.
        """
        lg = self._get_gallery(name, progress=progress)
        kind = "sketches" if lg.modality == "sketch" else "images"
        n_cls = len(set(lg.labels))
        msg = f"Gallery {display_name(lg.name)}: {len(lg)} {kind}, {n_cls} {'class' if n_cls == 1 else 'classes'}."
        return msg + (f" {lg.notice}" if lg.notice else "")

    def _get_gallery(self, name: Optional[str], progress: Optional[ProgressFn] = None) -> LoadedGallery:
        name = name or self.default_gallery
        if not name:
            raise ServiceError("No gallery yet: upload some images below to build one, or run "
                               "`python app.py --gallery PATH/TO/IMAGES`.")
        if name.startswith(UPLOAD_PREFIX):
            return self._get_uploaded(name, progress)
        lg = self._galleries.get(name)
        if lg is not None:
            return lg
        with self._lock:
            lg = self._galleries.get(name)
            if lg is None:
                lg = self._load_gallery(name, progress)
                self._galleries[name] = lg
            return lg

    def _get_uploaded(self, gid: str, progress: Optional[ProgressFn]) -> LoadedGallery:
        lg = self._uploaded.get(gid)
        if lg is not None:
            return lg
        from sbir_core.gallery.index import Gallery, GalleryError, check_encoder

        d = self._upload_dir(gid)
        try:
            g = Gallery.load(d / "index")
            check_encoder(g, self.encoder)
        except GalleryError as exc:
            raise ServiceError(f"No gallery named “{display_name(gid)}”: build it again by uploading its images.") \
                from exc
        lg = self._wrap(gid, d / "index", g)
        self._uploaded.put(gid, lg)
        return lg

    def _upload_dir(self, gid: str) -> Path:
        """upload:<32 hex token>/<clean name> -> its folder under the uploads root."""
        m = re.fullmatch(re.escape(UPLOAD_PREFIX) + r"([0-9a-f]{32})/([a-z0-9_-]{1,40})", gid or "")
        if not m:
            raise ServiceError(f"“{display_name(gid)}” is not a gallery name.")
        return self.uploads_dir / m.group(1) / m.group(2)

    def _load_gallery(self, name: str, progress: Optional[ProgressFn]) -> LoadedGallery:
        from sbir_core.gallery.index import GALLERY_FILE, Gallery, GalleryError, StaleGalleryError, check_encoder

        d = self.gallery_dir(name)
        # A gallery whose sources live inside its own folder is rebuilt into the cache
        # (a rebuild swaps the whole gallery folder, which must never take the images along).
        cached = self._rebuilt_dir(name)

        def cached_copy() -> Optional[LoadedGallery]:
            """An earlier re-index in the cache, if it fits the current model."""
            if (cached / GALLERY_FILE).is_file():
                try:
                    g = Gallery.load(cached)
                    check_encoder(g, self.encoder)
                    return self._wrap(name, cached, g, notice="(re-indexed for the current model)")
                except GalleryError:
                    pass
            return None

        if not (d / GALLERY_FILE).is_file():
            nested = sorted(p.parent for p in d.glob(f"*/{GALLERY_FILE}") if not p.parent.name.startswith("."))
            if len(nested) == 1:  # e.g. galleries/default/index/ next to galleries/default/images/
                d = nested[0]
        if not (d / GALLERY_FILE).is_file():
            images = d / "images"
            if (lg := cached_copy()) is not None:
                return lg
            if images.is_dir() and self.auto_rebuild:
                # Images shipped without an index: index them once into the cache.
                return self._rebuild(name, images, cached, "photo", progress,
                                     why="it has images but no index yet")
            raise ServiceError(f"No gallery named “{name}” (no {GALLERY_FILE} in {d}). "
                               "Build one by uploading images, or with "
                               f"`python -m sbir_core index PHOTO_DIR --out {d}`.")
        try:
            g = Gallery.load(d)
        except GalleryError as exc:
            raise ServiceError(f"Gallery “{name}” cannot be loaded: {exc}") from exc
        try:
            check_encoder(g, self.encoder)
        except StaleGalleryError as exc:
            if (lg := cached_copy()) is not None:
                return lg
            src = self._source_dir(d, g)
            if src is None or not self.auto_rebuild:
                raise ServiceError(
                    f"Gallery “{name}” was built with another model ({g.encoder_id}) and its source images "
                    f"are not available to re-index it. {exc}") from exc
            inside = d == src or d in src.parents
            out = cached if inside else d
            return self._rebuild(name, src, out, g.modality, progress,
                                 why=f"it was built with {g.encoder_id}, the app runs {self.encoder_id}")
        return self._wrap(name, d, g)

    @staticmethod
    def _source_dir(d: Path, g: Any) -> Optional[Path]:
        src = Path(g.source_dir) if g.source_dir else None
        if src is not None and src.is_dir():
            return src.resolve()
        if (d / "images").is_dir():
            return (d / "images").resolve()
        return None

    def _rebuild(self, name: str, src: Path, out: Path, modality: str, progress: Optional[ProgressFn],
                 why: str) -> LoadedGallery:
        from sbir_core.gallery.index import GalleryError, build_gallery

        log.warning("indexing gallery %s from %s into %s (%s)", name, src, out, why)
        if progress:
            progress(0.0, f"Indexing gallery {name} ({why})…")
        t0 = time.perf_counter()
        try:
            with self._build_lock:
                g, report = build_gallery(src, out, self.encoder, modality=modality, checkpoint=self.checkpoint,
                                          progress=True)
        except (GalleryError, FileNotFoundError, ValueError) as exc:
            raise ServiceError(f"Gallery “{name}” could not be re-indexed: {exc}") from exc
        self._save_map(g, out)
        notice = (f"(indexed for the current model in {time.perf_counter() - t0:.0f} s because {why}"
                  + (f"; {len(report.skipped)} unreadable files skipped" if report.skipped else "") + ")")
        return self._wrap(name, out, g, notice=notice)

    def _wrap(self, name: str, d: Path, g: Any, notice: str = "") -> LoadedGallery:
        # Item paths are stored relative to the source folder; if the gallery was built
        # elsewhere (another checkout), fall back to the images next to it.
        paths = list(g.paths)
        if paths and not Path(paths[0]).is_file() and (d / "images").is_dir():
            alt = [str(d / "images" / it["path"]) for it in g.items]
            if Path(alt[0]).is_file():
                paths = alt
        sig = hashlib.sha1(f"{d}|{g.encoder_id}|{g.meta.get('updated')}|{len(g)}".encode()).hexdigest()[:10]
        thumbs = self.thumbs_dir / f"{_thumb_prefix(name)}-{sig}"
        return LoadedGallery(name=name, directory=d, gallery=g, paths=paths, thumbs_dir=thumbs, notice=notice)

    def gallery_info(self, name: Optional[str] = None) -> dict[str, Any]:
        lg = self._get_gallery(name)
        return {"name": lg.name, "count": len(lg), "modality": lg.modality, "classes": sorted(set(lg.labels)),
                "encoder": lg.gallery.encoder_id, "directory": str(lg.directory)}

    # ------------------------------------------------------------------ thumbnails
    def thumbnail(self, lg: LoadedGallery, row: int) -> str:
        """A small JPEG of gallery row `row` (made once, then reused)."""
        t = lg._thumbs.get(row)
        if t is not None:
            return t
        src = lg.paths[row]
        out = lg.thumbs_dir / f"{row}.jpg"
        if not out.is_file():
            try:
                from sbir_core.gallery.index import load_image

                im = load_image(src)
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                white.alpha_composite(rgba)
                im = white.convert("RGB")
                im.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
                lg.thumbs_dir.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                im.save(tmp, "JPEG", quality=88)
                os.replace(tmp, out)
            except Exception as exc:  # missing/corrupt source: a grey tile, never the source path
                log.warning("no thumbnail for %s: %s", src, exc)
                lg.thumbs_dir.mkdir(parents=True, exist_ok=True)
                missing = lg.thumbs_dir / "missing.png"
                if not missing.is_file():
                    Image.new("RGB", (64, 64), (225, 225, 225)).save(missing)
                return str(missing)
        lg._thumbs[row] = str(out)
        return str(out)

    def warm_up(self, name: Optional[str] = None, explain: bool = True) -> None:
        """Do the one-time work before the first user does: every thumbnail, the
        t-SNE map, the text encoder and the explanation code path."""
        lg = self._get_gallery(name)
        for i in range(len(lg)):
            self.thumbnail(lg, i)
        self._map(lg)
        if self.has_text:
            try:
                from sbir_core.gallery.index import encode_query

                encode_query(self.encoder, text="cat")
            except Exception as exc:
                log.warning("text encoder warm-up failed: %s", exc)
        if explain and len(lg):
            from sbir_core.data.examples import list_examples

            ex = list_examples()
            if ex:
                out = self.search_sketch(ex[0].render(), 1, gallery=lg.name)
                if out.ok:
                    self.explain(out.query, 0)

    # ------------------------------------------------------------------ searching
    def _hits(self, lg: LoadedGallery, q: np.ndarray, k: int) -> list[Hit]:
        k = clamp_k(k)
        res = lg.gallery.search(q, k)
        return [Hit(rank=r, index=h.index, path=lg.paths[h.index], thumb=self.thumbnail(lg, h.index),
                    score=h.score, label=h.label) for r, h in enumerate(res)]

    def _rerank_hits(self, lg: LoadedGallery, q: np.ndarray, query_tokens: Any, ink: Any, k: int) -> list[Hit]:
        from sbir_core.models.relation import DEFAULT_TOPK, rerank

        g = lg.gallery
        cands = g.search(q, max(DEFAULT_TOPK, k))
        idx = np.array([c.index for c in cands])
        order = np.argsort(idx)
        toks = np.asarray(g.tokens[idx[order]], dtype=np.float32)[np.argsort(order)]
        scores = rerank(self.relation, query_tokens, ink, toks, np.array([c.score for c in cands]))
        best = np.argsort(-scores, kind="stable")[:k]
        return [Hit(rank=r, index=int(idx[j]), path=lg.paths[int(idx[j])], thumb=self.thumbnail(lg, int(idx[j])),
                    score=float(scores[j]), label=cands[j].label) for r, j in enumerate(best)]

    def search_sketch(self, canvas_value: Any, k: int = DEFAULT_K, gallery: Optional[str] = None,
                      rerank: bool = False, brush: Optional[float] = None) -> SearchOutcome:
        """A drawing (canvas dict, image, array, path or stroke list) -> results.

        Searches photos, or sketches when the gallery holds sketches (sketch -> sketch).
        """
        t0 = time.perf_counter()
        try:
            lg = self._get_gallery(gallery)
            img = _canvas_image(canvas_value)
            key = "sketch:" + _fingerprint(img) + (f":{brush:.1f}" if brush else "")
            cached = self._queries.get(key)
            if cached is None:
                from sbir_core.data.preprocess import preprocess_sketch

                # Exactly SBIREncoder.encode_sketches([img]) (what index.encode_query runs),
                # keeping the preprocessed view for re-ranking.
                sk = preprocess_sketch(img, self.encoder.image_size, brush=brush)  # BlankSketchError when empty
                out = self.encoder.encode(self.encoder.to_tensor(sk)[None], "sketch")
                emb = np.ascontiguousarray(out.normalized()[0], dtype=np.float32)
                cached = (emb, sk, out.tokens[0])
                self._queries.put(key, cached)
            emb, sk, tokens = cached
            use_rerank = rerank and self.relation is not None and lg.gallery.tokens is not None \
                and lg.modality == "photo"
            if use_rerank:
                from sbir_core.models.relation import ink_cells

                hits = self._rerank_hits(lg, emb, tokens, ink_cells(sk, lg.gallery.grid).reshape(-1), k)
            else:
                hits = self._hits(lg, emb, k)
        except BlankSketchError:
            return SearchOutcome(False, EMPTY_SKETCH_MESSAGE, seconds=time.perf_counter() - t0)
        except ServiceError as exc:
            return SearchOutcome(False, str(exc), seconds=time.perf_counter() - t0)
        except Exception:  # never let one bad drawing take the page down
            log.exception("sketch search failed")
            return SearchOutcome(False, "Sorry, that drawing could not be searched. Try drawing it again.",
                                 seconds=time.perf_counter() - t0)
        mode = "sketch → sketch" if lg.modality == "sketch" else "sketch → photo"
        q = Query(kind="sketch", embedding=emb, gallery=lg.name, hits=hits, image=_compact_sketch(img), key=key,
                  model_input=sk)
        dt = time.perf_counter() - t0
        unsure = lg.modality == "photo" and not use_rerank and self._unsure(hits)
        msg = self._summary(hits, mode, dt, rerank=use_rerank)
        if unsure:
            msg = "🤔 **Not sure:** this gallery may not contain what you drew. " + msg.replace("Best match", "Closest")
        return SearchOutcome(True, msg, hits, q, dt, unsure=unsure)

    @property
    def confidence_threshold(self) -> Optional[float]:
        """Top-1 similarity below which a sketch search is reported as unsure; calibrated
        on held-out training classes with the checkpoint (None: no calibration)."""
        conf = (getattr(self.encoder, "meta", None) or {}).get("retrieval", {}).get("confidence") or {}
        return conf.get("threshold")

    def _unsure(self, hits: Sequence[Hit]) -> bool:
        t = self.confidence_threshold
        return bool(hits) and t is not None and hits[0].score < t

    def search_text(self, text: str, k: int = DEFAULT_K, gallery: Optional[str] = None) -> SearchOutcome:
        """A class name or phrase -> results (needs the trained checkpoint's text head)."""
        t0 = time.perf_counter()
        text = (text or "").strip()
        if not text:
            return SearchOutcome(False, "Type a word first, e.g. “cat” or “bicycle”.")
        if len(text) > 200:
            return SearchOutcome(False, "That text is too long: a few words are enough.")
        if not self.has_text:
            return SearchOutcome(False, "Text search needs the trained model (checkpoints/default.safetensors), "
                                        "which is not loaded; drawing and photo search still work.")
        try:
            from sbir_core.gallery.index import encode_query

            lg = self._get_gallery(gallery)
            key = "text:" + text.lower()
            emb = self._queries.get(key)
            if emb is None:
                emb = encode_query(self.encoder, text=text)
                self._queries.put(key, emb)
            hits = self._hits(lg, emb, k)
        except ServiceError as exc:
            return SearchOutcome(False, str(exc))
        except Exception:
            log.exception("text search failed")
            return SearchOutcome(False, "Sorry, that text could not be searched. Try another word.")
        dt = time.perf_counter() - t0
        q = Query(kind="text", embedding=emb, gallery=lg.name, hits=hits, text=text, key=key)
        return SearchOutcome(True, self._summary(hits, f"text “{text}” → {lg.modality}", dt), hits, q, dt)

    def search_photo(self, image: Any, k: int = DEFAULT_K, gallery: Optional[str] = None) -> SearchOutcome:
        """A photo (PIL image or array; decode uploads with `open_upload`) as the query."""
        t0 = time.perf_counter()
        if image is None or (isinstance(image, str) and not image):
            return SearchOutcome(False, "Upload a photo first.")
        try:
            from sbir_core.gallery.index import encode_query
            from sbir_core.data.preprocess import preprocess_photo

            if isinstance(image, (str, os.PathLike, dict, bytes)):
                raise ServiceError("A photo must be sent as an upload or as image data, not as a file name.")
            if isinstance(image, np.ndarray):
                if image.ndim not in (2, 3) or image.size == 0:
                    raise ServiceError("That upload is not an image.")
                if image.shape[0] * image.shape[1] > self.max_upload_pixels:
                    raise ServiceError(f"That photo is too large ({image.shape[1]}×{image.shape[0]}); "
                                       f"the limit is {self.max_upload_pixels / 1e6:.0f} megapixels.")
                image = Image.fromarray(image.astype(np.uint8) if image.dtype != np.uint8 else image)
            if not isinstance(image, Image.Image):
                raise ServiceError("That upload is not an image.")
            if image.width * image.height > self.max_upload_pixels:
                raise ServiceError(f"That photo is too large ({image.width}×{image.height}); "
                                   f"the limit is {self.max_upload_pixels / 1e6:.0f} megapixels.")
            lg = self._get_gallery(gallery)
            key = "photo:" + _fingerprint(image)
            cached = self._queries.get(key)
            if cached is None:
                cached = (encode_query(self.encoder, photo=image), preprocess_photo(image, self.encoder.image_size))
                self._queries.put(key, cached)
            emb, shown = cached
            hits = self._hits(lg, emb, k)
        except ServiceError as exc:
            return SearchOutcome(False, str(exc))
        except Exception:
            log.exception("photo search failed")
            return SearchOutcome(False, "Sorry, that photo could not be searched. Try another picture.")
        dt = time.perf_counter() - t0
        q = Query(kind="photo", embedding=emb, gallery=lg.name, hits=hits, image=shown, key=key, model_input=shown)
        return SearchOutcome(True, self._summary(hits, f"photo → {lg.modality}", dt), hits, q, dt)

    @staticmethod
    def _summary(hits: Sequence[Hit], mode: str, seconds: float, rerank: bool = False) -> str:
        if not hits:
            return f"No results ({mode})."
        top = hits[0].label.replace("_", " ") if hits[0].label else "?"
        extra = ", re-ranked" if rerank else ""
        return (f"Best match: **{top}** ({hits[0].score:.2f}) · {len(hits)} results · {mode}{extra} · "
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
        i = hit.rank
        key = (query.key, query.gallery, hit.index, self.relation is not None)
        cached = self._explanations.get(key)
        if cached is not None:
            return cached
        try:
            from sbir_core.explain.correspondence import explain_pair

            sketch = query.image
            if query.kind == "photo":
                from sbir_core.data.preprocess import photo_to_edges

                sketch = photo_to_edges(query.image, self.encoder.image_size)  # the photo's outline
            ex = explain_pair(self.encoder, sketch, hit.path, relation=self.relation)
            label = hit.label.replace("_", " ") or "this image"
            score = f", relation score {ex.relation_score:.2f}" if ex.relation_score is not None else ""
            msg = (f"Result {i + 1}: **{label}** (similarity {hit.score:.2f}{score}). "
                   f"Lines join the parts of your {'drawing' if query.kind == 'sketch' else 'photo outline'} "
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

    def _hit_for_row(self, query: Query, row: int) -> Optional[Hit]:
        for h in query.hits:
            if h.index == row:
                return h
        try:
            lg = self._get_gallery(query.gallery)
        except ServiceError:
            return None
        if not 0 <= row < len(lg):
            return None
        score = float(lg.gallery.embeddings[row] @ query.embedding)
        rank = int((lg.gallery.embeddings @ query.embedding > score).sum())
        return Hit(rank=rank, index=row, path=lg.paths[row], thumb=self.thumbnail(lg, row), score=score,
                   label=lg.labels[row])

    def row_of_thumbnail(self, gallery: Optional[str], path: str, caption: Optional[str] = None) -> Optional[int]:
        """The gallery row a results-grid image shows (thumbnails are named <row>.jpg);
        None when it cannot be told. The caption's label must agree."""
        stem = Path(str(path)).stem
        if not stem.isdigit():
            return None
        try:
            lg = self._get_gallery(gallery)
        except ServiceError:
            return None
        row = int(stem)
        if not 0 <= row < len(lg):
            return None
        if caption:
            label = caption.rsplit(" · ", 1)[0]
            if label != (lg.labels[row].replace("_", " ") if lg.labels[row] else "(no class)"):
                return None
        return row

    # ------------------------------------------------------------------ t-SNE map
    def _map_cache_dir(self, lg: LoadedGallery) -> Path:
        return lg.thumbs_dir.parent.parent / "maps" / lg.thumbs_dir.name

    def _map(self, lg: LoadedGallery) -> Any:
        if lg.emap is not None:
            return lg.emap
        from sbir_core.explain.embedding_map import EmbeddingMap, fit_map

        with self._lock:
            if lg.emap is not None:
                return lg.emap
            m = None
            for d in (lg.gallery.root or lg.directory, lg.directory, self._map_cache_dir(lg)):
                if EmbeddingMap.exists(d):
                    try:
                        cand = EmbeddingMap.load(d)
                        if len(cand) == len(lg) and cand.dim == lg.gallery.embeddings.shape[1] and np.allclose(
                                cand.reference[: min(5, len(cand))], lg.gallery.raw_embeddings[: min(5, len(cand))],
                                atol=1e-4):
                            m = cand
                            break
                    except (ValueError, OSError) as exc:
                        log.warning("ignoring the map in %s: %s", d, exc)
            if m is None:
                log.info("fitting the t-SNE map of gallery %s (%d points)", lg.name, len(lg))
                m = fit_map(lg.gallery.raw_embeddings, lg.labels if any(lg.labels) else None)
                try:
                    m.save(self._map_cache_dir(lg))
                except OSError as exc:
                    log.warning("could not cache the map: %s", exc)
            lg.emap = m
            return m

    @staticmethod
    def _save_map(g: Any, d: Path) -> None:
        try:
            from sbir_core.explain.embedding_map import fit_map

            fit_map(g.raw_embeddings, g.labels if any(g.labels) else None).save(d)
        except Exception as exc:  # the map is optional: the app fits one lazily
            log.warning("no t-SNE map saved for %s: %s", d, exc)

    def tsne(self, query_embedding: Optional[np.ndarray] = None, highlight: Optional[Sequence[int]] = None,
             gallery: Optional[str] = None, size: tuple[int, int] = (640, 560),
             query_label: str = "your drawing") -> MapImage:
        """The gallery's t-SNE map (thumbnails, class names) with the query placed in it
        (a star) and `highlight` (the top-k rows) framed."""
        try:
            lg = self._get_gallery(gallery)
            m = self._map(lg)
            xy = None
            if query_embedding is not None:
                xy = m.place(np.asarray(query_embedding, dtype=np.float32).reshape(1, -1))[0]
            hl = [int(i) for i in highlight] if highlight is not None else None
            title = f"{lg.name}: {len(lg)} {'sketches' if lg.modality == 'sketch' else 'images'}" + (
                " · ★ your query, framed: its results" if xy is not None else "")
            # Thumbnails are decoded once per map (it caches them and the base layer).
            img = m.render(query_xy=xy, highlight=hl, size=size, title=title, query_label=query_label,
                           thumbnails=lambda row: self.thumbnail(lg, row))
            return MapImage(True, "", img, m.to_plot_data(query_xy=xy, highlight=hl))
        except ServiceError as exc:
            return MapImage(False, str(exc))
        except Exception:
            log.exception("t-SNE map failed")
            return MapImage(False, "The map could not be drawn.")

    def tsne_for(self, query: Optional[Query], size: tuple[int, int] = (640, 560)) -> MapImage:
        if query is None:
            return self.tsne(None, None, size=size)
        label = {"sketch": "your drawing", "photo": "your photo", "text": f"“{(query.text or '')[:24]}”"}.get(
            query.kind, "your query")
        return self.tsne(query.embedding, query.highlight, gallery=query.gallery, size=size, query_label=label)

    # ------------------------------------------------------------------ building galleries
    def build_gallery_from_uploads(self, files: Optional[Iterable[Any]], name: str, owner: str,
                                   progress: Optional[ProgressFn] = None, modality: str = "photo") -> BuildOutcome:
        """Uploaded image files -> a gallery only its builder can name (`upload:<owner>/<name>`,
        `owner` being a 32-hex-digit session token). The class of an image is its file
        name without the number (cat_01.jpg -> cat). Every usable file is kept: identical
        files are stored once, different files with the same name are renamed; the
        outcome reports both, and every file that was skipped and why."""
        files = [f for f in (files or []) if f is not None]
        clean = sanitize_gallery_name(name)
        if not clean:
            return BuildOutcome(False, "Give the new gallery a name (letters, digits, _ or -).")
        if not re.fullmatch(r"[0-9a-f]{32}", owner or ""):
            return BuildOutcome(False, "This page session has expired; reload the page and upload again.")
        if not files:
            return BuildOutcome(False, "Choose some images to upload first.")
        if len(files) > MAX_UPLOAD_FILES:
            return BuildOutcome(False, f"Too many files ({len(files)}); the limit is {MAX_UPLOAD_FILES}.")
        gid = f"{UPLOAD_PREFIX}{owner}/{clean}"
        home = self._upload_dir(gid)
        src = home / "images"
        shutil.rmtree(src, ignore_errors=True)  # a rebuild under the same name starts afresh
        skipped: list[tuple[str, str]] = []
        notes: list[str] = []
        seen: dict[str, str] = {}  # content hash -> stored relative path
        copied = 0
        for n, f in enumerate(files):
            path = Path(f["path"] if isinstance(f, dict) else getattr(f, "name", f))
            orig = Path(f.get("orig_name") or path.name) if isinstance(f, dict) else path
            if progress:
                progress(0.1 * n / len(files), f"Checking {orig.name}")
            try:
                check_upload(path, self.max_upload_bytes, self.max_upload_pixels)
            except ServiceError as exc:
                skipped.append((orig.name, str(exc)))
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:
                notes.append(f"{orig.name} is identical to {seen[digest]} (kept once)")
                continue
            label = label_from_filename(orig.name)
            stem = GALLERY_NAME_RE.sub("_", orig.stem.lower()).strip("_") or "image"
            suffix = path.suffix.lower() if path.suffix else ".png"
            dest = src / label / f"{stem}{suffix}"
            k = 2
            while dest.exists():
                dest = src / label / f"{stem}-{k}{suffix}"
                k += 1
            if k > 2:
                notes.append(f"{orig.name} was renamed {dest.name} (another file had its name)")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            seen[digest] = f"{label}/{dest.name}"
            copied += 1
        if not copied:
            return BuildOutcome(False, "None of the uploaded files could be used: "
                                + "; ".join(f"{n}: {why}" for n, why in skipped[:5]), skipped=skipped)
        outcome = self._index_folder(src, home / "index", gid, progress, modality)
        outcome.skipped = skipped + outcome.skipped
        if outcome.ok:
            with self._lock:
                self._uploaded.put(gid, self._wrap(gid, home / "index", outcome.gallery))
            outcome.gallery = None
            self._evict_uploads(keep=home)
            if notes:
                outcome.message += f"\n\nKept all {copied} distinct file(s): " + "; ".join(notes[:10]) + (
                    " …" if len(notes) > 10 else "")
            if skipped:
                outcome.message += f"\n\nSkipped {len(skipped)} upload(s): " + "; ".join(
                    f"{n} ({why})" for n, why in skipped[:10]) + (" …" if len(skipped) > 10 else "")
        return outcome

    def _evict_uploads(self, keep: Path) -> None:
        """Keep at most MAX_UPLOADED_GALLERIES uploaded galleries on disk (oldest go first)."""
        homes = sorted((p for p in self.uploads_dir.glob("*/*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for old in homes[: max(0, len(homes) - MAX_UPLOADED_GALLERIES)]:
            if old != keep:
                gid = f"{UPLOAD_PREFIX}{old.parent.name}/{old.name}"
                self._uploaded.pop(gid)
                shutil.rmtree(old, ignore_errors=True)
                for t in self.thumbs_dir.glob(f"{_thumb_prefix(gid)}-*"):
                    shutil.rmtree(t, ignore_errors=True)

    def _index_folder(self, src: Path, out: Path, name: str, progress: Optional[ProgressFn],
                      modality: str) -> BuildOutcome:
        from sbir_core.gallery.index import GalleryError, build_gallery

        if modality not in ("photo", "sketch"):
            return BuildOutcome(False, f"A gallery holds photos or sketches, not {modality!r}.")
        if progress:
            progress(0.1, f"Indexing {display_name(name)}…")
        try:
            with self._build_lock:
                g, report = build_gallery(src, out, self.encoder, modality=modality, checkpoint=self.checkpoint,
                                          progress=True)
        except (GalleryError, FileNotFoundError, ValueError, OSError) as exc:
            return BuildOutcome(False, f"The gallery could not be built: {exc}")
        skipped = [(Path(p).name, why) for p, why in report.skipped]
        n_cls = len(set(g.labels))
        msg = (f"✅ Gallery {display_name(name)} is ready: {report.total} "
               f"{'sketches' if modality == 'sketch' else 'images'} in {n_cls} {'class' if n_cls == 1 else 'classes'}"
               f" ({report.seconds:.0f} s).")
        if skipped:
            msg += f" Skipped {len(skipped)} file(s): " + "; ".join(f"{n} ({why})" for n, why in skipped[:10])
        out_ = BuildOutcome(True, msg, name, report, skipped)
        out_.gallery = g
        return out_

    def build_gallery_from_folder(self, folder: PathLike, name: Optional[str] = None,
                                  progress: Optional[ProgressFn] = None, modality: str = "photo",
                                  make_default: bool = True) -> BuildOutcome:
        """The operator's `--gallery PATH`: index a folder (class = first-level subfolder)
        into galleries/<name>, public to every visitor."""
        src = Path(folder).expanduser().resolve()
        if not src.is_dir():
            return BuildOutcome(False, f"Not a folder: {src}")
        clean = sanitize_gallery_name(name or src.name)
        if not clean:
            return BuildOutcome(False, "Give the gallery a name (letters, digits, _ or -).")
        out = self.gallery_dir(clean)
        if out == src or out in src.parents:
            return BuildOutcome(False, f"The images ({src}) cannot live inside the gallery folder ({out}); "
                                       "choose another name.")
        outcome = self._index_folder(src, out, clean, progress, modality)
        if outcome.ok:
            with self._lock:
                self._galleries[clean] = self._wrap(clean, out, outcome.gallery)
                if make_default:
                    self.default_gallery = clean
            outcome.gallery = None
        return outcome
