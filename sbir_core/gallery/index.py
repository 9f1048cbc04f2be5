"""The gallery index: embed a folder of images once, search it many times.

A gallery is a folder holding
- `gallery.json`: format version, encoder id (backbone@checkpoint), modality, index
  type and parameters, source folder, and one record per item (path relative to the
  source folder, label, size, mtime_ns) in row order;
- `embeddings.npy`: (N, D) float32, L2-normalised (cosine = inner product);
- `tokens.npy`: (N, T, C) float16 token grids for the explanations (optional);
- `index.faiss`: the approximate index, for the `hnsw` and `ivf` types only.

Builds are incremental (files are identified by relative path + size + mtime, so
unchanged files are never re-encoded, even after the folder is moved) and atomic
(everything is written to a hidden sibling folder that is then swapped in with
renames), so an interrupted build leaves the previous gallery as it was.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from sbir_core.gallery.diffusion import diffuse_gallery, expand_queries
from sbir_core.data.datasets import image_folder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GALLERY_FILE = "gallery.json"
EMBEDDINGS_FILE = "embeddings.npy"
MIN_MAP_ITEMS = 5  # t-SNE needs a few points to mean anything
TOKENS_FILE = "tokens.npy"
INDEX_FILE = "index.faiss"
INDEX_TYPES = ("flat", "hnsw", "ivf")
GALLERY_MODALITIES = ("photo", "sketch")

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 64
DEFAULT_NPROBE = 32
# faiss's k-means warns below 39 training points per centroid; fewer gives poor lists.
IVF_MIN_POINTS_PER_LIST = 39
IVF_MIN_LISTS = 8
# faiss would subsample k-means input to 256 points per list anyway; doing it here
# with a fixed seed keeps builds reproducible.
IVF_MAX_POINTS_PER_LIST = 256
FLOAT16_MAX = float(np.finfo(np.float16).max)

PathLike = Union[str, "os.PathLike[str]"]


class GalleryError(ValueError):
    """A gallery folder is missing, incomplete or inconsistent.

    A ValueError so the command line reports it as one line (see cli.main).
    """


class StaleGalleryError(GalleryError):
    """The gallery was built with another encoder than the one used to query it."""


@dataclass(frozen=True)
class SearchResult:
    index: int  # row in the gallery
    path: str  # absolute path of the image
    score: float  # cosine similarity (inner product of normalised vectors)
    label: str


@dataclass
class BuildReport:
    out_dir: str
    total: int = 0  # items in the gallery after the build
    added: int = 0  # new files, encoded
    updated: int = 0  # files whose size or mtime changed, re-encoded
    reused: int = 0  # unchanged files, embeddings copied from the previous gallery
    removed: int = 0  # items of the previous gallery that are gone (deleted or now unreadable)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    rebuilt_reason: Optional[str] = None  # why nothing could be reused, if so
    index_type: str = "flat"  # the index actually built (ivf falls back to flat when tiny)
    written: bool = True  # False when nothing changed and the gallery was left untouched
    seconds: float = 0.0


@dataclass
class _Candidate:
    rel: str  # POSIX path relative to the source folder
    path: Path
    label: str
    size: int
    mtime_ns: int

    def record(self) -> dict[str, Any]:
        return {"path": self.rel, "label": self.label, "size": self.size, "mtime_ns": self.mtime_ns}


# ----------------------------------------------------------------------------- images
# The same limit as uploads in the app: a 100-megapixel file decodes to gigabytes.
MAX_IMAGE_PIXELS = 40_000_000


class ImageTooLargeError(ValueError):
    """An image whose header announces more pixels than MAX_IMAGE_PIXELS (never decoded)."""


def load_image(path: PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully (so corrupt files fail here, not later), EXIF-rotated.

    Rotation is applied because browsers show photos rotated; the index and the
    queries must see the same pixels the user sees. The size is checked from the
    header first, so an oversized file is refused before it is decoded.
    """
    with Image.open(path) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageTooLargeError(f"too large ({w}x{h} = {w * h / 1e6:.0f} megapixels; "
                                     f"the limit is {max_pixels / 1e6:.0f})")
        im.load()
        out = ImageOps.exif_transpose(im)
        if out is im:  # exif_transpose returns the same object when there is nothing to do
            out = im.copy()
    return out


# ----------------------------------------------------------------------------- faiss
def _faiss():
    # Imported lazily: `python -m sbir_core --help` should not pay for it. faiss logs
    # which CPU build it picked at INFO, noise on every CLI call unless asked for.
    loader = logging.getLogger("faiss.loader")
    if loader.level == logging.NOTSET:
        loader.setLevel(logging.WARNING)
    import faiss

    return faiss


def auto_nlist(n: int) -> int:
    """IVF list count: ~4 sqrt(N), but never more than the data can train."""
    return int(min(max(1, round(4 * math.sqrt(n))), n // IVF_MIN_POINTS_PER_LIST))


def build_index(
    embeddings: np.ndarray,
    index_type: str = "flat",
    *,
    m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef_search: int = DEFAULT_EF_SEARCH,
    nlist: Optional[int] = None,
    nprobe: int = DEFAULT_NPROBE,
    seed: int = 0,
) -> tuple[Any, str, dict[str, Any]]:
    """-> (faiss index or None for flat, the type actually built, its parameters).

    Flat needs no index: exact search runs straight on the embeddings (faiss.knn),
    so the vectors are not held twice.
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    if index_type == "flat":
        return None, "flat", {}
    faiss = _faiss()
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        index.add(x)
        index.hnsw.efSearch = int(ef_search)
        return index, "hnsw", {"M": int(m), "ef_construction": int(ef_construction), "ef_search": int(ef_search)}
    # ivf
    lists = int(nlist) if nlist else auto_nlist(n)
    if lists < IVF_MIN_LISTS or n < lists * IVF_MIN_POINTS_PER_LIST:
        log.warning(
            "%d items are too few to train an IVF index (needs >= %d); using exact flat search instead",
            n, max(lists, IVF_MIN_LISTS) * IVF_MIN_POINTS_PER_LIST,
        )
        return None, "flat", {}
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
    train = x
    if n > lists * IVF_MAX_POINTS_PER_LIST:
        rng = np.random.default_rng(seed)
        train = x[np.sort(rng.choice(n, lists * IVF_MAX_POINTS_PER_LIST, replace=False))]
    index.train(train)
    index.add(x)
    index.nprobe = min(int(nprobe), lists)
    return index, "ivf", {"nlist": lists, "nprobe": int(index.nprobe)}


def _apply_search_params(index: Any, index_type: str, ef_search: Optional[int], nprobe: Optional[int]) -> None:
    if index is None:
        return
    if index_type == "hnsw" and ef_search is not None:
        index.hnsw.efSearch = int(ef_search)
    if index_type == "ivf" and nprobe is not None:
        index.nprobe = min(int(nprobe), index.nlist)


# ----------------------------------------------------------------------------- the gallery
class Gallery:
    """Embeddings (+ tokens) of a set of images, searchable by cosine similarity."""

    def __init__(
        self,
        embeddings: np.ndarray,
        meta: dict[str, Any],
        *,
        tokens: Optional[np.ndarray] = None,
        index: Any = None,
        root: Optional[PathLike] = None,
    ) -> None:
        self.meta = meta
        self.tokens = tokens
        self.root = Path(root) if root is not None else None  # the folder it was loaded from
        # What the encoder stored (embeddings.npy); `embeddings` is what searches see.
        self.raw_embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.embeddings = self.raw_embeddings
        self.index = index
        self.diffusion_k = int(meta.get("diffusion_k") or 0)
        if self.diffusion_k and len(self.raw_embeddings) > 1:
            self._diffuse()
        items = meta["items"]
        src = meta.get("source_dir") or ""
        rel = meta.get("source_dir_rel")
        if self.root is not None and rel and (self.root / rel).is_dir():
            # A gallery shipped in a repository or moved with its images: the relative
            # location survives a clone to another path, the absolute one does not.
            src = str((self.root / rel).resolve())
        self._source_dir = src
        # os.path.join keeps absolute item paths as they are (in-memory galleries).
        self.paths: list[str] = [os.path.join(src, *it["path"].split("/")) if src else it["path"] for it in items]
        self.labels: list[str] = [it.get("label", "") for it in items]
        g = meta.get("grid")
        self.grid: Optional[tuple[int, int]] = (int(g[0]), int(g[1])) if g else None

    # ---- construction
    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray,
        *,
        paths: Optional[Sequence[str]] = None,
        labels: Optional[Sequence[str]] = None,
        index_type: str = "flat",
        encoder_id: str = "synthetic",
        modality: str = "photo",
        diffusion_k: int = 0,
        **index_params: Any,
    ) -> "Gallery":
        """An in-memory gallery from vectors (normalised here), e.g. for benchmarks and tests."""
        x = _normalize_rows(np.asarray(embeddings, dtype=np.float32))
        n = len(x)
        paths = list(paths) if paths is not None else [str(i) for i in range(n)]
        labels = list(labels) if labels is not None else [""] * n
        if len(paths) != n or len(labels) != n:
            raise ValueError(f"{n} embeddings but {len(paths)} paths and {len(labels)} labels")
        index, kind, params = build_index(x, index_type, **index_params)
        meta = {
            "format_version": FORMAT_VERSION, "encoder_id": encoder_id, "modality": modality,
            "index_type": kind, "requested_index_type": index_type, "index_params": params,
            "source_dir": "", "count": n, "dims": {"embedding": int(x.shape[1]), "token": None},
            "grid": None, "has_tokens": False, "diffusion_k": int(diffusion_k),
            "items": [{"path": p, "label": lab} for p, lab in zip(paths, labels)],
        }
        return cls(x, meta, index=index)

    @classmethod
    def load(
        cls,
        directory: PathLike,
        *,
        ef_search: Optional[int] = None,
        nprobe: Optional[int] = None,
        mmap_tokens: bool = True,
    ) -> "Gallery":
        """Load a gallery folder; raises GalleryError when anything is missing or inconsistent.

        Tokens are memory-mapped by default: they can be far larger than the
        embeddings and the explanations read only a few rows.
        """
        root = Path(directory)
        _recover(root)
        hint = f"build it with: python -m sbir_core index PHOTO_DIR --out {shlex.quote(str(root))}"
        if not root.is_dir():
            raise GalleryError(f"no gallery at {root}: {hint}")
        meta_path = root / GALLERY_FILE
        if not meta_path.is_file():
            raise GalleryError(f"{root} is not a gallery (no {GALLERY_FILE}): {hint}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GalleryError(f"cannot read {meta_path}: {exc}; rebuild the gallery") from exc
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise GalleryError(
                f"{meta_path} has format version {version!r}, this version of sbir_core reads "
                f"{FORMAT_VERSION}; rebuild the gallery"
            )
        missing = [k for k in ("encoder_id", "modality", "index_type", "items", "dims", "has_tokens") if k not in meta]
        if missing:
            raise GalleryError(f"{meta_path} lacks {', '.join(missing)}; rebuild the gallery")
        try:
            n = len(meta["items"])
            d = meta["dims"]["embedding"]
            bad = [i for i, it in enumerate(meta["items"]) if not isinstance(it.get("path"), str)]
        except (KeyError, TypeError, AttributeError) as exc:
            raise GalleryError(f"{meta_path} is malformed ({exc!r}); rebuild the gallery") from exc
        if bad:
            raise GalleryError(f"{meta_path}: item {bad[0]} has no path; rebuild the gallery")
        # Item paths are relative to the source folder and must stay inside it: a gallery
        # file is data, and data must not make us open /etc/... or ../../secrets.
        escaping = [it["path"] for it in meta["items"] if not _confined(it["path"])]
        if escaping:
            raise GalleryError(f"{meta_path}: item path {escaping[0]!r} leaves the gallery's source folder; "
                               "rebuild the gallery")

        emb = _load_array(root / EMBEDDINGS_FILE)
        if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[0] != n or emb.shape[1] != d:
            raise GalleryError(
                f"{root / EMBEDDINGS_FILE} is {emb.dtype} {emb.shape}, {GALLERY_FILE} lists {n} items of "
                f"dimension {d}: the gallery is inconsistent; rebuild it"
            )
        if not np.isfinite(emb).all():
            raise GalleryError(f"{root / EMBEDDINGS_FILE} contains NaN or infinite values: it is corrupt; rebuild it")
        norms = np.linalg.norm(emb, axis=1)
        if n and not (np.abs(norms - 1.0) < 1e-2).all():
            raise GalleryError(f"{root / EMBEDDINGS_FILE} has {(np.abs(norms - 1.0) >= 1e-2).sum()} rows that are "
                               "not unit vectors (zeros or garbage): it is corrupt; rebuild it")
        tokens = None
        if meta["has_tokens"]:
            tokens = _load_array(root / TOKENS_FILE, mmap=mmap_tokens)
            g = meta.get("grid") or (0, 0)
            want = (n, int(g[0]) * int(g[1]), meta["dims"].get("token"))
            if tokens.dtype != np.float16 or tokens.shape != want:
                raise GalleryError(
                    f"{root / TOKENS_FILE} is {tokens.dtype} {tokens.shape}, expected float16 {want}: "
                    f"the gallery is inconsistent; rebuild it"
                )
        index = None
        kind = meta["index_type"]
        if kind not in INDEX_TYPES:
            raise GalleryError(f"{meta_path} names an unknown index type {kind!r}")
        if kind != "flat":
            ipath = root / INDEX_FILE
            if not ipath.is_file():
                raise GalleryError(f"{ipath} is missing (the gallery's index type is {kind}); rebuild the gallery")
            try:
                index = _faiss().read_index(str(ipath))
            except RuntimeError as exc:  # faiss reports bad files as RuntimeError
                raise GalleryError(f"cannot read {ipath}: {str(exc).splitlines()[0]}; rebuild the gallery") from exc
            if index.ntotal != n or index.d != d:
                raise GalleryError(
                    f"{ipath} holds {index.ntotal} vectors of dimension {index.d}, {GALLERY_FILE} lists {n} "
                    f"of dimension {d}: the gallery is inconsistent; rebuild it"
                )
            _apply_search_params(index, kind, ef_search, nprobe)
        return cls(emb, meta, tokens=tokens, index=index, root=root)

    # ---- attributes
    def __len__(self) -> int:
        return len(self.embeddings)

    def __repr__(self) -> str:
        return (f"Gallery({len(self)} items, encoder={self.encoder_id!r}, modality={self.modality!r}, "
                f"index={self.index_type!r}, root={str(self.root) if self.root else None!r})")

    @property
    def encoder_id(self) -> str:
        return self.meta["encoder_id"]

    @property
    def modality(self) -> str:
        return self.meta["modality"]

    @property
    def index_type(self) -> str:
        return self.meta["index_type"]

    @property
    def source_dir(self) -> str:
        """Where the images are now (may differ from where they were when indexed)."""
        return self._source_dir

    @property
    def items(self) -> list[dict[str, Any]]:
        return self.meta["items"]

    def set_search_params(self, *, ef_search: Optional[int] = None, nprobe: Optional[int] = None) -> None:
        """Trade speed for recall at query time (hnsw: efSearch, ivf: nprobe)."""
        _apply_search_params(self.index, self.index_type, ef_search, nprobe)

    # ---- diffusion
    def _diffuse(self) -> None:
        """Replace searchable embeddings by their DBA version (see sbir_core.gallery.diffusion);
        non-flat indexes are rebuilt on the diffused vectors."""
        k = min(self.diffusion_k, len(self.raw_embeddings))
        s, i = self._knn(self.raw_embeddings, k)
        self.embeddings = diffuse_gallery(self.raw_embeddings, s, i)
        self._rebuild_index()

    def _rebuild_index(self) -> None:
        if self.index is None:
            return
        params = {("m" if k == "M" else k): v for k, v in (self.meta.get("index_params") or {}).items()}
        self.index, _, _ = build_index(self.embeddings, self.index_type, **params)

    def set_diffusion(self, k: int) -> None:
        """Turn gallery diffusion off (0) or set its neighbour count."""
        self.diffusion_k = int(k)
        self.embeddings = self.raw_embeddings
        self._rebuild_index()
        if self.diffusion_k and len(self.raw_embeddings) > 1:
            self._diffuse()

    # ---- search
    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (scores, indices), both (Q, min(k, N)), best first, ties by ascending index.

        With diffusion on, queries are first expanded with their top results (aQE)."""
        q = self._check_queries(queries, k)
        if self.diffusion_k:
            s, i = self._knn(q, min(self.diffusion_k, len(self)))
            q = expand_queries(q, self.embeddings, s, i)
        return self._knn(q, k)

    def score_all(self, queries: np.ndarray) -> np.ndarray:
        """(Q, N) cosine scores against every item, as `knn` ranks them (for evaluation)."""
        q = self._check_queries(queries, 1)
        if self.diffusion_k:
            s, i = self._knn(q, min(self.diffusion_k, len(self)))
            q = expand_queries(q, self.embeddings, s, i)
        return q @ self.embeddings.T

    def _check_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"query vectors have shape {tuple(np.shape(queries))}, the gallery's dimension is "
                f"{self.embeddings.shape[1]}: were they embedded with the gallery's encoder?"
            )
        if not np.isfinite(q).all():
            raise ValueError("query vectors contain NaN or infinity")
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        return _normalize_rows(q)  # cosine scores whatever the caller passed

    def _knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        k = min(int(k), n)
        if n == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        faiss = _faiss()
        if self.index is None:
            s, i = faiss.knn(q, self.embeddings, k, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            s, i = self.index.search(q, k)
            # Approximate indexes can come back short (-1): an IVF probe that saw fewer
            # than k vectors. Those rows are answered exactly, so k results always come.
            short = (i < 0).any(axis=1)
            if short.any():
                s[short], i[short] = faiss.knn(q[short], self.embeddings, k, metric=faiss.METRIC_INNER_PRODUCT)
        # Deterministic order: score descending, then index ascending.
        order = np.lexsort((i, -s), axis=-1)
        s = np.take_along_axis(s, order, axis=1)
        i = np.take_along_axis(i, order, axis=1).astype(np.int64)
        return s, i

    def search(self, queries: np.ndarray, k: int = 10) -> Union[list[SearchResult], list[list[SearchResult]]]:
        """The top min(k, N) results, best first: a list for one query (D,), a list per
        query for a batch (Q, D)."""
        s, i = self.knn(queries, k)
        out = [
            [SearchResult(index=int(j), path=self.paths[j], score=float(v), label=self.labels[j])
             for v, j in zip(srow, irow)]
            for srow, irow in zip(s, i)
        ]
        return out[0] if np.ndim(queries) == 1 else out

    @classmethod
    def build(cls, source_dir: PathLike, encoder: Any, out_dir: Optional[PathLike] = None,
              **options: Any) -> "Gallery":
        """Index a folder of images (class = first-level subfolder) and return the gallery.
        `out_dir` defaults to $SBIR_HOME/galleries/<folder name>; rebuilding updates only
        what changed. Options are those of `build_gallery`."""
        from sbir_core.paths import galleries_dir

        src = Path(source_dir)
        out = Path(out_dir) if out_dir is not None else galleries_dir() / (src.resolve().name or "gallery")
        return build_gallery(src, out, encoder, progress=options.pop("progress", False), **options)[0]


def _confined(rel: str) -> bool:
    """A stored item path that stays inside its source folder (relative, no '..')."""
    p = rel.replace("\\", "/")
    parts = p.split("/")
    return bool(p) and not p.startswith("/") and ":" not in parts[0] and ".." not in parts


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"expected a (N, D) array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("zero vector: cannot normalise")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _load_array(path: Path, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise GalleryError(f"{path} is missing: the gallery is incomplete; rebuild it")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise GalleryError(f"cannot read {path}: {exc}; rebuild the gallery") from exc


# ----------------------------------------------------------------------------- encoder identity
def _encoder_name(encoder: Any) -> str:
    return str(encoder.encoder_id).rsplit("@", 1)[0]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def checkpoint_spec(encoder: Any) -> str:
    """The `--checkpoint` value that recreates this encoder: none, default, or a path."""
    ckpt_id = str(encoder.encoder_id).rsplit("@", 1)[-1]
    if ckpt_id == "none":
        return "none"
    explicit = getattr(encoder, "checkpoint_path", None)
    if explicit:
        return str(Path(explicit).resolve())
    from sbir_core.models.encoders import DEFAULT_CHECKPOINT, file_digest

    try:
        st = DEFAULT_CHECKPOINT.stat()
        key = (str(DEFAULT_CHECKPOINT), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:  # hashing is cheap but not free; the file rarely changes
            _DIGESTS[key] = file_digest(DEFAULT_CHECKPOINT)
        if _DIGESTS[key] == ckpt_id:
            return "default"
    except OSError:
        pass
    return f"<checkpoint {ckpt_id}>"  # unknown file: the user has to name it


def _normalize_checkpoint_arg(checkpoint: Optional[PathLike]) -> Optional[str]:
    if checkpoint is None:
        return None
    s = str(checkpoint)
    if s.lower() in ("none", "default"):
        return s.lower()
    return str(Path(s).resolve())  # galleries outlive the shell's working directory


def rebuild_command(gallery: Gallery, encoder_name: str, checkpoint: str) -> str:
    src = gallery.source_dir or "PHOTO_DIR"
    out = str(gallery.root) if gallery.root else "GALLERY_DIR"
    parts = ["python", "-m", "sbir_core", "index", src, "--out", out, "--encoder", encoder_name,
             "--checkpoint", checkpoint]
    kind = gallery.meta.get("requested_index_type", gallery.index_type)
    if kind != "flat":
        parts += ["--index-type", kind]
    if gallery.modality != "photo":
        parts += ["--modality", gallery.modality]
    if not gallery.meta.get("has_tokens", True):
        parts.append("--no-tokens")
    return " ".join(shlex.quote(p) for p in parts)


PROBE_MIN_COSINE = 0.995


def encoder_probe(encoder: Any, modality: str = "photo") -> np.ndarray:
    """The encoder's embedding of a fixed synthetic picture: a fingerprint of the weights
    themselves, so a gallery can tell which model made it whatever its metadata says."""
    cache = encoder.__dict__.setdefault("_sbir_probes", {})
    if modality not in cache:
        from PIL import ImageDraw

        img = Image.new("RGB", (224, 224), "white")
        d = ImageDraw.Draw(img)
        d.ellipse((40, 50, 180, 170), outline="black", width=5, fill=(200, 120, 40))
        d.rectangle((90, 20, 130, 60), outline="black", width=4, fill=(40, 90, 200))
        d.line((20, 200, 200, 190), fill="black", width=5)
        if modality == "photo":
            edges = encoder.edge_transform(img)[None] if encoder.photo_uses_edges else None
            out = encoder.encode(encoder.photo_transform(img)[None], "photo", edges=edges)
        else:
            out = encoder.encode(encoder.sketch_transform(img)[None], "sketch")
        cache[modality] = out.normalized()[0]
    return cache[modality]


def check_encoder(gallery: Gallery, encoder: Any, *, checkpoint: Optional[str] = None) -> None:
    """Raise StaleGalleryError unless `encoder` is the one the gallery was built with.

    Embeddings from two encoders live in different spaces: searching across them
    returns confident nonsense, so this is an error, never a warning. Names are not
    trusted alone: a gallery that stores the probe embedding of its encoder (see
    `encoder_probe`) must match this encoder's probe too.
    """
    if gallery.encoder_id == encoder.encoder_id:
        probe = gallery.meta.get("probe")
        if probe is None:
            return
        mine = encoder_probe(encoder, gallery.modality)
        theirs = np.asarray(probe, dtype=np.float32)
        if theirs.shape == mine.shape and float(theirs @ mine) >= PROBE_MIN_COSINE:
            return
        raise StaleGalleryError(
            f"gallery{' ' + str(gallery.root) if gallery.root else ''} says it was built with {gallery.encoder_id}, "
            "but its stored probe embedding does not match that model's: the gallery and the model disagree; "
            f"rebuild it with: {rebuild_command(gallery, _encoder_name(encoder), checkpoint_spec(encoder))}")
    spec = _normalize_checkpoint_arg(checkpoint) or checkpoint_spec(encoder)
    where = f" {gallery.root}" if gallery.root else ""
    raise StaleGalleryError(
        f"gallery{where} was built with encoder {gallery.encoder_id}, but the encoder is "
        f"{encoder.encoder_id}; rebuild it with: {rebuild_command(gallery, _encoder_name(encoder), spec)}"
    )


# ----------------------------------------------------------------------------- queries
def encode_query(
    encoder: Any,
    *,
    sketch: Any = None,
    photo: Any = None,
    text: Optional[str] = None,
) -> np.ndarray:
    """One query -> normalised float32 (D,). Give exactly one of sketch, photo, text.

    sketch: image path, PIL image, array or stroke list (BlankSketchError if no ink);
    photo: image path, PIL image or array; text: a phrase (needs a text head).
    """
    given = [name for name, v in (("sketch", sketch), ("photo", photo), ("text", text)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of sketch=, photo=, text= (got {', '.join(given) or 'none'})")
    if text is not None:
        if not str(text).strip():
            raise ValueError("the text query is empty")
        emb = np.asarray(encoder.encode_text([str(text).strip()]).float().cpu().numpy(), dtype=np.float32)
        return _normalize_rows(emb.reshape(1, -1))[0]
    if sketch is not None:
        img = _query_image(sketch) if isinstance(sketch, (str, os.PathLike)) else sketch
        out = encoder.encode_sketches([img])
    else:
        img = _query_image(photo) if isinstance(photo, (str, os.PathLike)) else photo
        out = encoder.encode_photos([img])
    return np.ascontiguousarray(out.normalized()[0], dtype=np.float32)


def _query_image(path: PathLike) -> Image.Image:
    if not Path(path).is_file():
        raise FileNotFoundError(f"query image not found: {path}")
    try:
        return load_image(path)
    except Exception as exc:  # PIL raises many types for bad files
        raise ValueError(f"cannot read query image {path}: {exc}") from exc


# ----------------------------------------------------------------------------- building
def _scan(source: Path, out: Path, modality: str) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """Image candidates (sorted by relative path) and skipped non-image files.

    Hidden files and folders (.DS_Store, .git, our own temporary folders) are
    ignored silently, as is the output folder when it lies inside the source.
    """
    def ignored(p: Path) -> bool:
        rel = p.relative_to(source)
        return any(part.startswith(".") for part in rel.parts) or p == out or out in p.parents

    candidates: list[_Candidate] = []
    skipped: list[tuple[str, str]] = []
    images = set()
    # Symbolic links are followed only when they stay inside the folder: a link to
    # /etc/... or to another user's pictures is skipped and counted, as is a dangling one.
    # (Linked folders are never walked into.)
    for p in sorted(source.rglob("*")):
        if p.is_symlink() and not ignored(p):
            target = p.resolve()
            if not target.exists():
                why = "dangling symbolic link"
            elif target != source and source not in target.parents:
                why = "symbolic link to outside the folder (not followed)"
            elif target.is_dir():
                why = "symbolic link to a folder (not followed)"
            else:
                continue
            images.add(p)
            skipped.append((str(p), why))
    for it in image_folder(source, modality=modality):
        p = Path(it.path)
        if p in images or ignored(p):
            continue
        images.add(p)
        try:
            st = p.stat()
        except OSError as exc:  # e.g. a dangling symlink
            skipped.append((str(p), f"cannot read: {exc.strerror or exc}"))
            continue
        candidates.append(_Candidate(p.relative_to(source).as_posix(), p, it.label, st.st_size, st.st_mtime_ns))
    for p in sorted(source.rglob("*")):
        if p not in images and not ignored(p) and p.is_file():
            skipped.append((str(p), "not an image"))
    candidates.sort(key=lambda c: c.rel)
    return candidates, skipped


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _recover(out: Path) -> None:
    """Finish what a build killed mid-swap left: restore the backup, drop dead temp folders."""
    parent = out.parent
    if not parent.is_dir():
        return
    if not out.exists():
        backups = sorted(parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if backups:
            log.warning("restoring gallery %s from %s (a previous build was interrupted)", out, backups[-1])
            os.replace(backups[-1], out)
    for tmp in parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            log.info("removing %s, left by an interrupted build", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Make `tmp` the gallery at `out`. Two renames, rolled back if the second fails;
    a crash between them is repaired by `_recover` on the next load or build."""
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        if backup is not None:
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _previous_gallery(out: Path, encoder_id: str, modality: str, store_tokens: bool) -> tuple[Optional[Gallery], Optional[str]]:
    """The gallery already at `out` if its vectors can be reused, else (None, why not)."""
    if not out.exists():
        return None, None
    if not out.is_dir():
        raise GalleryError(f"{out} exists and is not a folder")
    if not (out / GALLERY_FILE).exists():
        if any(out.iterdir()):
            # The swap replaces the whole folder: never do that to someone's files.
            raise GalleryError(f"{out} is not empty and holds no gallery; refusing to overwrite it (choose another --out)")
        return None, None
    try:
        old = Gallery.load(out)
    except GalleryError as exc:
        return None, f"the existing gallery is unreadable ({exc})"
    if old.encoder_id != encoder_id:
        return None, f"the existing gallery was built with {old.encoder_id}, the encoder is {encoder_id}"
    if old.modality != modality:
        return None, f"the existing gallery holds {old.modality} embeddings, {modality} were asked for"
    if store_tokens and old.tokens is None:
        return None, "the existing gallery has no tokens"
    return old, None


def _encode_batch(encoder: Any, modality: str, images: list) -> Any:
    if modality == "photo":
        return encoder.encode_photos(images, batch_size=len(images))
    return encoder.encode_sketches(images, batch_size=len(images))


def build_gallery(
    source_dir: PathLike,
    out_dir: PathLike,
    encoder: Any,
    *,
    modality: str = "photo",
    index_type: str = "flat",
    store_tokens: bool = True,
    batch_size: int = 16,
    progress: bool = True,
    checkpoint: Optional[PathLike] = None,
    index_params: Optional[Mapping[str, Any]] = None,
) -> tuple[Gallery, BuildReport]:
    """Index the images under `source_dir` into the gallery folder `out_dir`.

    Re-running updates the gallery: only new and changed files are encoded.
    `checkpoint` is what the encoder was created with ("default", "none" or a path);
    it is recorded so `search` can recreate the encoder (inferred when not given).
    """
    t0 = time.perf_counter()
    if modality not in GALLERY_MODALITIES:
        raise ValueError(f"gallery modality must be one of {', '.join(GALLERY_MODALITIES)}, not {modality!r}")
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    source = Path(source_dir).resolve()
    out = Path(out_dir).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"not a folder: {source}")
    encoder_id = str(encoder.encoder_id)
    ckpt = _normalize_checkpoint_arg(checkpoint) or checkpoint_spec(encoder)
    report = BuildReport(out_dir=str(out))

    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
    old, reason = _previous_gallery(out, encoder_id, modality, store_tokens)
    if reason:
        log.warning("re-encoding everything: %s", reason)
        report.rebuilt_reason = reason

    candidates, skipped = _scan(source, out, modality)
    old_rows: dict[str, int] = {}
    if old is not None:
        old_rows = {it["path"]: r for r, it in enumerate(old.items)}
    reuse: dict[str, int] = {}
    to_encode: list[_Candidate] = []
    for c in candidates:
        r = old_rows.get(c.rel)
        it = old.items[r] if r is not None else None
        if it is not None and it.get("size") == c.size and it.get("mtime_ns") == c.mtime_ns:
            reuse[c.rel] = r
        else:
            to_encode.append(c)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        new_rows, new_emb, grid, token_shape = _encode_all(
            encoder, modality, to_encode, tmp, store_tokens, batch_size, progress, skipped)
        kept = sorted([c for c in candidates if c.rel in reuse or c.rel in new_rows], key=lambda c: c.rel)
        report.skipped = skipped
        for path, why in skipped:
            log.warning("skipped %s: %s", path, why)
        report.reused = len(reuse)
        report.added = sum(1 for c in to_encode if c.rel in new_rows and c.rel not in old_rows)
        report.updated = sum(1 for c in to_encode if c.rel in new_rows and c.rel in old_rows)
        kept_rel = {c.rel for c in kept}
        report.removed = sum(1 for rel in old_rows if rel not in kept_rel)
        report.total = len(kept)
        if not kept:
            raise GalleryError(
                f"no readable images in {source} ({len(skipped)} files skipped); nothing to index"
            )
        if old is not None and grid is None:
            grid = old.grid
            if old.tokens is not None:
                token_shape = tuple(old.tokens.shape[1:])

        unchanged = (
            old is not None and not new_rows and report.removed == 0
            and old.meta.get("requested_index_type") == index_type
            and old.meta.get("has_tokens") == store_tokens
            and old.meta.get("source_dir") == str(source)
            and old.meta.get("checkpoint") == ckpt
            and not index_params
        )
        if unchanged:
            # Nothing to do: leave the folder (and its possibly large token file) alone.
            shutil.rmtree(tmp, ignore_errors=True)
            report.written = False
            report.index_type = old.index_type
            report.seconds = time.perf_counter() - t0
            return old, report

        # Assemble rows in the final (sorted) order from the old gallery and the new encodings.
        n = len(kept)
        src_old = np.array([reuse.get(c.rel, -1) for c in kept], dtype=np.int64)
        src_new = np.array([new_rows.get(c.rel, -1) for c in kept], dtype=np.int64)
        is_old = src_old >= 0
        d = old.embeddings.shape[1] if old is not None else new_emb.shape[1]
        emb = np.empty((n, d), dtype=np.float32)
        if is_old.any():
            emb[is_old] = old.embeddings[src_old[is_old]]
        if (~is_old).any():
            emb[~is_old] = new_emb[src_new[~is_old]]
        np.save(tmp / EMBEDDINGS_FILE, emb)
        if store_tokens:
            _assemble_tokens(tmp, n, token_shape, old, src_old, src_new, is_old)

        index, kind, params = build_index(emb, index_type, **dict(index_params or {}))
        if index is not None:
            _faiss().write_index(index, str(tmp / INDEX_FILE))
        if n >= MIN_MAP_ITEMS:  # the t-SNE map is part of the gallery, made once here
            from sbir_core.explain.embedding_map import fit_map

            labels = [c.label for c in kept]
            fit_map(emb, labels if any(labels) else None).save(tmp)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta = {
            "format_version": FORMAT_VERSION,
            "encoder_id": encoder_id,
            "encoder_name": _encoder_name(encoder),
            "checkpoint": ckpt,
            "modality": modality,
            "index_type": kind,
            "requested_index_type": index_type,
            "index_params": params,
            "source_dir": str(source),
            "source_dir_rel": os.path.relpath(source, out),
            "created": old.meta.get("created", now) if old is not None else now,
            "updated": now,
            "count": n,
            "dims": {"embedding": int(d), "token": int(token_shape[1]) if store_tokens and token_shape else None},
            "grid": list(grid) if grid else None,
            "has_tokens": bool(store_tokens),
            # Gallery diffusion as the encoder's checkpoint prescribes (0 = off).
            "diffusion_k": int(getattr(encoder, "diffusion_k", 0)),
            # The encoder's fingerprint by content (see check_encoder).
            "probe": [round(float(v), 6) for v in encoder_probe(encoder, modality)],
            "items": [c.record() for c in kept],
        }
        with open(tmp / GALLERY_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data
        del old  # release the previous gallery's memory maps before its folder moves
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.index_type = kind
    report.seconds = time.perf_counter() - t0
    gallery = Gallery(emb, meta, index=index, root=out,
                      tokens=np.load(out / TOKENS_FILE, mmap_mode="r") if store_tokens else None)
    return gallery, report


def _encode_all(
    encoder: Any,
    modality: str,
    todo: list[_Candidate],
    tmp: Path,
    store_tokens: bool,
    batch_size: int,
    progress: bool,
    skipped: list[tuple[str, str]],
) -> tuple[dict[str, int], Optional[np.ndarray], Optional[tuple[int, int]], Optional[tuple[int, int]]]:
    """Encode `todo` -> (rel -> row in the new arrays, embeddings, grid, (T, C)).

    Tokens are streamed to a scratch file instead of kept in memory: at 196 x 112
    float16 values per image they outgrow RAM long before the embeddings do.
    """
    from tqdm import tqdm

    rows: dict[str, int] = {}
    embs: list[np.ndarray] = []
    grid: Optional[tuple[int, int]] = None
    token_shape: Optional[tuple[int, int]] = None
    scratch = open(tmp / "tokens.partial", "wb") if store_tokens else None

    def emit(batch: list[_Candidate], output: Any) -> None:
        nonlocal grid, token_shape
        embs.append(output.normalized())
        grid = tuple(int(v) for v in output.grid)
        if scratch is not None:
            t = output.tokens.float().cpu().numpy()
            token_shape = (int(t.shape[1]), int(t.shape[2]))
            np.clip(t, -FLOAT16_MAX, FLOAT16_MAX, out=t)  # float16 overflow would store inf
            scratch.write(np.ascontiguousarray(t.astype(np.float16)).tobytes())
        for c in batch:
            rows[c.rel] = len(rows)

    def flush(batch: list[_Candidate], images: list) -> None:
        if not batch:
            return
        try:
            output = _encode_batch(encoder, modality, images)
        except (ValueError, OSError) as exc:  # e.g. a blank sketch: find it, keep the rest
            if len(batch) == 1:
                skipped.append((str(batch[0].path), f"cannot encode: {exc}"))
            else:
                for c, img in zip(batch, images):
                    flush([c], [img])
            return
        emit(batch, output)

    try:
        batch: list[_Candidate] = []
        images: list = []
        for c in tqdm(todo, desc="encoding", unit="img", disable=not progress or not todo, file=sys.stderr):
            try:
                img = load_image(c.path)
            except Exception as exc:  # corrupt, truncated, not really an image, too large...
                skipped.append((str(c.path), f"unreadable image: {exc}"))
                continue
            batch.append(c)
            images.append(img)
            if len(batch) >= batch_size:
                flush(batch, images)
                batch, images = [], []
        flush(batch, images)
    finally:
        if scratch is not None:
            scratch.close()
    emb = np.concatenate(embs) if embs else None
    return rows, emb, grid, token_shape


def _assemble_tokens(
    tmp: Path,
    n: int,
    token_shape: Optional[tuple[int, int]],
    old: Optional[Gallery],
    src_old: np.ndarray,
    src_new: np.ndarray,
    is_old: np.ndarray,
    chunk: int = 1024,
) -> None:
    """Write tokens.npy row by row from the old gallery's file and the scratch file."""
    if token_shape is None:
        raise GalleryError("no token shape known (internal error)")
    scratch_path = tmp / "tokens.partial"
    n_new = int((src_new >= 0).sum())
    new = None
    if n_new:
        new = np.memmap(scratch_path, dtype=np.float16, mode="r", shape=(n_new, *token_shape))
    out = np.lib.format.open_memmap(tmp / TOKENS_FILE, mode="w+", dtype=np.float16, shape=(n, *token_shape))
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        o, so, sn = is_old[sl], src_old[sl], src_new[sl]
        block = np.empty((sl.stop - sl.start, *token_shape), dtype=np.float16)
        if o.any():
            block[o] = old.tokens[so[o]]
        if (~o).any():
            block[~o] = new[sn[~o]]
        out[sl] = block
    out.flush()
    del out, new
    scratch_path.unlink(missing_ok=True)
