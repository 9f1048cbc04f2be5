"""Named galleries: where they live, loading them once, keeping them fit for the model.

- shipped/operator galleries: folders under a galleries root (`galleries/` of a checkout),
  found by name; a gallery built with another model is re-indexed from its images into
  the cache (the galleries folder itself is never rewritten);
- class galleries (`gallery.sharing`): built from uploads in the page or from a folder with
  `index --share`, under `$SBIR_HOME/class-galleries`, named `class:<CODE>` so that only
  people given the code can open them and only the owner token changes them; at most
  MAX_LOADED_GALLERIES in memory;
- thumbnails: small JPEGs the app may serve (the only files it serves from disk).

Messages are plain text (GalleryStoreError); the app formats them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from cachetools import LRUCache
from PIL import Image

from sbir_core.data.images import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, check_upload, load_image
from sbir_core.errors import InputError
from sbir_core.gallery.identity import check_encoder
from sbir_core.gallery.index import GALLERY_FILE, Gallery, GalleryError, StaleGalleryError, build_gallery
from sbir_core.gallery.sharing import (CLASS_PREFIX, NO_SUCH_CODE, ClassGalleries, ShareError, ShareInfo, code_of,
                                       format_code, gallery_id, valid_owner)
from sbir_core.paths import PathLike, SHIPPED_GALLERIES, cache_dir

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]

MAX_LOADED_GALLERIES = 8  # class galleries kept in memory at once (shipped ones always stay)
MAX_UPLOAD_FILES = 2000
THUMB_SIZE = 256
GALLERY_NAME_RE = re.compile(r"[^a-z0-9_-]+")


def _thumb_prefix(gallery_id: str) -> str:
    return sanitize_gallery_name(gallery_id.replace(":", "-").replace("/", "_"))


def sanitize_gallery_name(name: str) -> str:
    """User text -> a safe folder name (lowercase letters, digits, '_' and '-')."""
    s = GALLERY_NAME_RE.sub("_", str(name or "").strip().lower()).strip("_-")
    return s[:40]


def share_label(info: ShareInfo) -> str:
    """How a class gallery is named in the page: its builder's name and its code."""
    return f"{info.name.replace('_', ' ')} (class {format_code(info.code)})"


def label_from_filename(filename: str) -> str:
    """'red_car_03.jpg' -> 'red_car', 'Cat (2).png' -> 'cat': the class of an uploaded image."""
    stem = Path(filename).stem.lower()
    stem = re.sub(r"\(\d+\)$", "", stem).strip()
    stem = re.sub(r"[\s_\-.]*\d+$", "", stem)
    stem = GALLERY_NAME_RE.sub("_", stem).strip("_-")
    return stem or "uploaded"


@dataclass
class LoadedGallery:
    name: str
    directory: Path
    gallery: Any  # index.Gallery
    paths: Sequence[str]  # image paths that exist on this machine (read on demand in big galleries)
    thumbs_dir: Path
    notice: str = ""  # shown in the page (e.g. "rebuilt with the current model")
    emap: Any = None  # EmbeddingMap, fitted lazily
    _thumbs: dict = field(default_factory=dict)

    @property
    def modality(self) -> str:
        return self.gallery.modality

    @property
    def labels(self) -> Sequence[str]:
        return self.gallery.labels

    @property
    def classes(self) -> list[str]:
        """The distinct labels, sorted (counted in Arrow for a big gallery, not row by row)."""
        return self.gallery.items.distinct("label")

    def __len__(self) -> int:
        return len(self.gallery)


class _ItemPaths(Sequence):
    """Item paths under another folder, made when asked (no million-entry list at open)."""

    def __init__(self, folder: Path, items: Any) -> None:
        self._folder, self._items = folder, items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return str(self._folder / self._items.value(int(i), "path"))


def list_gallery_names(root: PathLike) -> list[str]:
    """Names of the built galleries under `root`: folders holding a gallery.json, at most
    two levels deep (one index inside a folder, galleries/x/index/, is named x); 'default'
    first. Reads the file system only."""
    root = Path(root)
    names: set[str] = set()
    if root.is_dir():
        nested: dict[str, list[str]] = {}
        for meta in list(root.glob(f"*/{GALLERY_FILE}")) + list(root.glob(f"*/*/{GALLERY_FILE}")):
            rel = meta.parent.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or "images" in rel.parts:
                continue
            if len(rel.parts) == 2 and not (root / rel.parts[0] / GALLERY_FILE).is_file():
                nested.setdefault(rel.parts[0], []).append(rel.as_posix())
            else:
                names.add(rel.as_posix())
        for parent, inner in nested.items():
            names |= {parent} if len(inner) == 1 else set(inner)
    return sorted(names, key=lambda n: (n != "default", n))


class GalleryStoreError(InputError):
    """A gallery that cannot be named, found, loaded, re-indexed or built (plain text)."""


@dataclass
class BuildOutcome:
    ok: bool
    message: str
    name: Optional[str] = None
    report: Any = None  # build.BuildReport
    skipped: list[tuple[str, str]] = field(default_factory=list)
    gallery: Any = None  # the built Gallery, internal hand-over only


class GalleryStore:
    """Named galleries for one encoder, loaded once and bounded in memory."""

    def __init__(self, encoder: Any, checkpoint: Optional[str], root: PathLike = SHIPPED_GALLERIES, *,
                 cache: Optional[PathLike] = None, uploads: Optional[PathLike] = None,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, max_upload_pixels: int = MAX_UPLOAD_PIXELS,
                 auto_rebuild: bool = True) -> None:
        self.encoder, self.checkpoint = encoder, checkpoint
        self.root = Path(root).resolve()
        self.cache_dir = Path(cache).resolve() if cache else (cache_dir() / "app").resolve()
        self.shared = ClassGalleries(uploads)  # class galleries: built in the page or by `index --share`
        self.uploads_dir = self.shared.root
        self.thumbs_dir = self.cache_dir / "thumbs"  # the only files the app serves from disk
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_upload_pixels = int(max_upload_pixels)
        self.auto_rebuild = auto_rebuild
        self._lock = threading.RLock()
        self._build_lock = threading.Lock()
        self._galleries: dict[str, LoadedGallery] = {}  # shipped galleries, loaded once
        self._uploaded: LRUCache = LRUCache(MAX_LOADED_GALLERIES)  # class galleries, bounded
        self._uploaded_lock = threading.Lock()

    @property
    def encoder_id(self) -> str:
        return str(self.encoder.encoder_id)

    def list_galleries(self) -> list[str]:
        """Names of the built galleries under the root (see `list_gallery_names`), plus
        those built in this process; 'default' first."""
        names = set(list_gallery_names(self.root)) | set(self._galleries)
        return sorted(names, key=lambda n: (n != "default", n))

    def gallery_dir(self, name: str) -> Path:
        d = (self.root / name).resolve()
        if self.root not in d.parents and d != self.root:
            raise GalleryStoreError(f"“{name}” is not a gallery name.")
        return d

    def _rebuilt_dir(self, name: str) -> Path:
        return self.cache_dir / "rebuilt" / sanitize_gallery_name(name.replace("/", "_"))

    def describe(self, name: str, progress: Optional[ProgressFn] = None) -> str:
        """Load `name` (once) and describe it in one status line. Changes nothing for
        anyone else: the caller passes the gallery with each search.

        A gallery built with another encoder is rebuilt from its source images when
        they are available; otherwise a GalleryStoreError says how to rebuild it.
        """
        lg = self.get(name, progress=progress)
        kind = "sketches" if lg.modality == "sketch" else "images"
        n_cls = len(lg.classes)
        msg = f"Gallery {self.display_name(lg.name)}: {len(lg)} {kind}, {n_cls} {'class' if n_cls == 1 else 'classes'}."
        return msg + (f" {lg.notice}" if lg.notice else "")

    def get(self, name: str, progress: Optional[ProgressFn] = None) -> LoadedGallery:
        """The gallery called `name`, loaded (and re-indexed if needed) once."""
        if not name:
            raise GalleryStoreError("No gallery yet: upload some images to build one, or start the app "
                                    "with --gallery PATH/TO/IMAGES.")
        if code_of(name) is not None:
            return self._get_shared(name)
        lg = self._galleries.get(name)
        if lg is not None:
            return lg
        with self._lock:
            lg = self._galleries.get(name)
            if lg is None:
                lg = self._load_gallery(name, progress)
                self._galleries[name] = lg
            return lg

    def _get_shared(self, gid: str) -> LoadedGallery:
        """A class gallery by its id `class:<CODE>` (checked by code_of before any path is made)."""
        code = code_of(gid)
        d = self.shared.folder(code)
        with self._uploaded_lock:
            lg = self._uploaded.get(gid)
        if lg is not None and not (d / "share.json").is_file():  # deleted (e.g. from the command line)
            self.forget(gid)
            lg = None
        if lg is None:
            try:
                if self.shared.read(code) is None:
                    raise GalleryError("no share record")
                g = Gallery.load(d / "index")
                check_encoder(g, self.encoder)
            except StaleGalleryError as exc:  # e.g. `index --share` with another --checkpoint than the app's
                raise GalleryStoreError("This gallery was built with another model than this app runs; whoever "
                                        "built it needs to build it again.") from exc
            except GalleryError as exc:
                raise GalleryStoreError(NO_SUCH_CODE) from exc
            lg = self._wrap(gid, d / "index", g)
            with self._uploaded_lock:
                self._uploaded[gid] = lg
        self.shared.touch(code)
        return lg

    def display_name(self, gid: str) -> str:
        """How the page names a gallery: class galleries by name and code."""
        code = code_of(gid)
        info = self.shared.read(code) if code else None
        return share_label(info) if info else str(gid)

    def _per_gallery_caches(self) -> tuple[Path, Path]:
        # Thumbnails, and the maps the service keeps beside them (RetrievalService._map_cache_dir).
        return self.thumbs_dir, self.cache_dir / "maps"

    def _prune_cache(self) -> None:
        """Thumbnails and maps of class galleries that are gone (removed to make room, or
        deleted from the command line) go too, so the cache stays bounded."""
        for folder in self._per_gallery_caches():
            for t in folder.glob("class-*"):
                m = re.fullmatch(r"class-([a-z0-9]{10})-[0-9a-f]{10}", t.name)
                if m and code_of(CLASS_PREFIX + m.group(1).upper()) and self.shared.read(m.group(1).upper()) is None:
                    shutil.rmtree(t, ignore_errors=True)

    def forget(self, gid: str) -> None:
        """Drop a class gallery from memory and its thumbnails and maps from the cache."""
        with self._uploaded_lock:
            self._uploaded.pop(gid, None)
        for folder in self._per_gallery_caches():
            for t in folder.glob(f"{_thumb_prefix(gid)}-*"):
                shutil.rmtree(t, ignore_errors=True)

    def _load_gallery(self, name: str, progress: Optional[ProgressFn]) -> LoadedGallery:
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
            raise GalleryStoreError(f"No gallery named “{name}” (no {GALLERY_FILE} in {d}). "
                               "Build one by uploading images, or with "
                               f"`python -m sbir_core index PHOTO_DIR --out {d}`.")
        try:
            g = Gallery.load(d)
        except GalleryError as exc:
            raise GalleryStoreError(f"Gallery “{name}” cannot be loaded: {exc}") from exc
        try:
            check_encoder(g, self.encoder)
        except StaleGalleryError as exc:
            if (lg := cached_copy()) is not None:
                return lg
            src = self._source_dir(d, g)
            if src is None or not self.auto_rebuild:
                raise GalleryStoreError(
                    f"Gallery “{name}” was built with another model ({g.encoder_id}) and its source images "
                    f"are not available to re-index it. {exc}") from exc
            inside = d == src or d in src.parents
            # The galleries folder (the shipped one included) is never rewritten: running
            # another checkpoint must not replace the index and map the default model ships.
            out = cached if inside or self.root in d.parents else d
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
        log.warning("indexing gallery %s from %s into %s (%s)", name, src, out, why)
        if progress:
            progress(0.0, f"Indexing gallery {name} ({why})…")
        t0 = time.perf_counter()
        try:
            with self._build_lock:
                g, report = build_gallery(src, out, self.encoder, modality=modality, checkpoint=self.checkpoint,
                                          progress=True)
        except (GalleryError, FileNotFoundError, ValueError) as exc:
            raise GalleryStoreError(f"Gallery “{name}” could not be re-indexed: {exc}") from exc
        notice = (f"(indexed for the current model in {time.perf_counter() - t0:.0f} s because {why}"
                  + (f"; {len(report.skipped)} unreadable files skipped" if report.skipped else "") + ")")
        return self._wrap(name, out, g, notice=notice)

    def _wrap(self, name: str, d: Path, g: Any, notice: str = "") -> LoadedGallery:
        # Item paths are stored relative to the source folder; if the gallery was built
        # elsewhere (another checkout), fall back to the images next to it.
        paths = g.paths
        if len(paths) and not Path(paths[0]).is_file() and (d / "images").is_dir():
            images = d / "images"
            if (images / g.items.value(0, "path")).is_file():
                paths = _ItemPaths(images, g.items)
        sig = hashlib.sha1(f"{d}|{g.encoder_id}|{g.meta.get('updated')}|{len(g)}".encode()).hexdigest()[:10]
        thumbs = self.thumbs_dir / f"{_thumb_prefix(name)}-{sig}"
        return LoadedGallery(name=name, directory=d, gallery=g, paths=paths, thumbs_dir=thumbs, notice=notice)

    def info(self, name: Optional[str] = None) -> dict[str, Any]:
        lg = self.get(name)
        return {"name": lg.name, "count": len(lg), "modality": lg.modality, "classes": lg.classes,
                "encoder": lg.gallery.encoder_id, "directory": str(lg.directory)}

    def thumbnail(self, lg: LoadedGallery, row: int) -> str:
        """A small JPEG of gallery row `row` (made once, then reused)."""
        t = lg._thumbs.get(row)
        if t is not None:
            return t
        src = lg.paths[row]
        out = lg.thumbs_dir / f"{row}.jpg"
        if not out.is_file():
            try:
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

    def build_from_uploads(self, files: Optional[Iterable[Any]], name: str, owner: str,
                           progress: Optional[ProgressFn] = None, modality: str = "photo",
                           pinned: bool = False) -> BuildOutcome:
        """Image files -> a class gallery (`class:<CODE>`, see `gallery.sharing`) owned by
        `owner` (a 32-hex-digit token). The owner's gallery of the same name is rebuilt in
        place (same code); anyone else's never is. The class of an image is its folder when
        its name has one (cat/1.jpg -> cat), else its file name without the number
        (cat_01.jpg -> cat). Every usable file is kept: identical files are stored once,
        different files with the same name are renamed; the outcome reports both, and every
        file that was skipped and why. `files`: uploads (Gradio FileData dicts, with
        `orig_name`), paths, or (path, name to read the class from) pairs."""
        files = [f for f in (files or []) if f is not None]
        clean = sanitize_gallery_name(name)
        if not clean:
            return BuildOutcome(False, "Give the new gallery a name (letters, digits, _ or -).")
        if not valid_owner(owner):
            return BuildOutcome(False, "This page session has expired; reload the page and upload again.")
        if not files:
            return BuildOutcome(False, "Choose some images to upload first.")
        if len(files) > MAX_UPLOAD_FILES:
            return BuildOutcome(False, f"Too many files ({len(files)}); the limit is {MAX_UPLOAD_FILES}.")
        try:
            info, is_new = self.shared.reserve(clean, owner, pinned=pinned)
        except ShareError as exc:
            return BuildOutcome(False, str(exc))
        gid = gallery_id(info.code)
        folder = self.shared.folder(info.code)
        src = folder / "images"
        shutil.rmtree(src, ignore_errors=True)  # a rebuild starts afresh
        copied, skipped, notes = self._copy_images(files, src, progress)
        if not copied:
            if is_new:
                self.shared.abandon(info.code)
            return BuildOutcome(False, "None of the uploaded files could be used: "
                                + "; ".join(f"{n}: {why}" for n, why in skipped[:5]), skipped=skipped)
        outcome = self._index_folder(src, folder / "index", gid, progress, modality)
        outcome.skipped = skipped + outcome.skipped
        if not outcome.ok:
            if is_new:
                self.shared.abandon(info.code)
            return outcome
        self.forget(gid)  # a rebuild: old thumbnails and map go
        self._prune_cache()
        with self._uploaded_lock:
            self._uploaded[gid] = self._wrap(gid, folder / "index", outcome.gallery)
        outcome.gallery = None
        if notes:
            outcome.message += f"\n\nKept all {copied} distinct file(s): " + "; ".join(notes[:10]) + (
                " …" if len(notes) > 10 else "")
        if skipped:
            outcome.message += f"\n\nSkipped {len(skipped)} upload(s): " + "; ".join(
                f"{n} ({why})" for n, why in skipped[:10]) + (" …" if len(skipped) > 10 else "")
        return outcome

    def share_folder(self, folder: PathLike, name: str, owner: str, progress: Optional[ProgressFn] = None,
                     modality: str = "photo") -> BuildOutcome:
        """The teacher's `index PHOTO_DIR --share NAME`: every file under the folder, copied
        and indexed as a class gallery the operator pinned (never removed to make room)."""
        src = Path(folder).expanduser().resolve()
        if not src.is_dir():
            return BuildOutcome(False, f"Not a folder: {src}")
        files = [(p, p.relative_to(src).as_posix()) for p in sorted(src.rglob("*"))
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)]
        return self.build_from_uploads(files, name, owner, progress=progress, modality=modality, pinned=True)

    def _copy_images(self, files: list[Any], src: Path, progress: Optional[ProgressFn]
                     ) -> tuple[int, list[tuple[str, str]], list[str]]:
        """Copy usable images into `src/<class>/` -> (how many, skipped (name, why), notes)."""
        skipped: list[tuple[str, str]] = []
        notes: list[str] = []
        seen: dict[str, str] = {}  # content hash -> stored relative path
        copied = 0
        for n, f in enumerate(files):
            if isinstance(f, tuple):
                path, orig_name = Path(f[0]), str(f[1])
            elif isinstance(f, dict):
                path = Path(f["path"])
                orig_name = str(f.get("orig_name") or path.name)
            else:
                path = Path(getattr(f, "name", f))
                orig_name = path.name
            orig = Path(orig_name)
            if progress:
                progress(0.1 * n / len(files), f"Checking {orig.name}")
            try:
                check_upload(path, self.max_upload_bytes, self.max_upload_pixels)
            except InputError as exc:
                skipped.append((orig_name, str(exc)))
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:
                notes.append(f"{orig.name} is identical to {seen[digest]} (kept once)")
                continue
            folder_label = sanitize_gallery_name(orig.parts[0]) if len(orig.parts) > 1 else ""
            label = folder_label or label_from_filename(orig.name)
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
        return copied, skipped, notes

    def delete_shared(self, gid: str, owner: object) -> str:
        """Delete a class gallery (its owner only) -> its name; GalleryStoreError otherwise."""
        code = self._code(gid)
        try:
            info = self.shared.delete(code, owner)
        except ShareError as exc:
            raise GalleryStoreError(str(exc)) from exc
        self.forget(gid)
        return info.name

    def rename_shared(self, gid: str, name: str, owner: object) -> str:
        """Rename a class gallery (its owner only; the code stays) -> its new page label."""
        try:
            info = self.shared.rename(self._code(gid), sanitize_gallery_name(name), owner)
        except ShareError as exc:
            raise GalleryStoreError(str(exc)) from exc
        return share_label(info)

    def owned(self, owner: object) -> list[tuple[str, str]]:
        """The class galleries `owner` built, as (page label, gallery id), oldest first."""
        return [(share_label(i), gallery_id(i.code)) for i in self.shared.owned(owner)]

    @staticmethod
    def _code(gid: object) -> str:
        code = code_of(gid)
        if code is None:
            raise GalleryStoreError("Only galleries built with a class code can be changed or deleted.")
        return code

    def _index_folder(self, src: Path, out: Path, name: str, progress: Optional[ProgressFn],
                      modality: str) -> BuildOutcome:
        if modality not in ("photo", "sketch"):
            return BuildOutcome(False, f"A gallery holds photos or sketches, not {modality!r}.")
        if progress:
            progress(0.1, f"Indexing {self.display_name(name)}…")
        try:
            with self._build_lock:
                g, report = build_gallery(src, out, self.encoder, modality=modality, checkpoint=self.checkpoint,
                                          progress=True)
        except (GalleryError, FileNotFoundError, ValueError, OSError) as exc:
            return BuildOutcome(False, f"The gallery could not be built: {exc}")
        skipped = [(Path(p).name, why) for p, why in report.skipped]
        n_cls = len(g.items.distinct("label"))
        msg = (f"Gallery {self.display_name(name)} is ready: {report.total} "
               f"{'sketches' if modality == 'sketch' else 'images'} in {n_cls} {'class' if n_cls == 1 else 'classes'}"
               f" ({report.seconds:.0f} s).")
        if skipped:
            msg += f" Skipped {len(skipped)} file(s): " + "; ".join(f"{n} ({why})" for n, why in skipped[:10])
        if report.warnings:
            msg += "\n\nCheck the class names: " + " ".join(report.warnings)
        out_ = BuildOutcome(True, msg, name, report, skipped)
        out_.gallery = g
        return out_

    def build_from_folder(self, folder: PathLike, name: Optional[str] = None,
                          progress: Optional[ProgressFn] = None, modality: str = "photo") -> BuildOutcome:
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
            outcome.gallery = None
        return outcome
