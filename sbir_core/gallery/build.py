"""Building a gallery folder from a folder of images (see `gallery.index` for the format).

Builds are incremental (files are identified by relative path + size + mtime, so
unchanged files are never re-encoded, even after the folder is moved) and atomic
(everything is written to a hidden sibling folder that is then swapped in with
renames), so an interrupted build leaves the previous gallery as it was.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from sbir_core.errors import InputError
from sbir_core.data.datasets import image_folder
from sbir_core.data.manifest import is_manifest, read_manifest
from sbir_core.gallery.calibration import PROTOTYPES_FILE, SeenCalibration
from sbir_core.gallery.encode import encode_all
from sbir_core.gallery.identity import _encoder_name, _normalize_checkpoint_arg, checkpoint_spec, encoder_probe
from sbir_core.gallery.ann import REQUESTABLE, build_index, choose_index_type, faiss_module
from sbir_core.gallery.format import (EMBEDDINGS_FILE, FORMAT_VERSION, GALLERY_FILE, GALLERY_MODALITIES, INDEX_FILE,
                                      SEEN_FILE, TOKENS_FILE, GalleryError, StoredGallery, read_gallery, recover,
                                      write_items)
from sbir_core.paths import PathLike

log = logging.getLogger(__name__)



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
    warnings: list[str] = field(default_factory=list)  # plain sentences, e.g. classes from camera file names


# Class names that are really a camera's or a phone's file naming (image_0001.jpg, IMG_1234.JPG,
# DSC00012.jpg, PXL_2023...), or what a bare number (0001.png) becomes: not a class a person meant.
_CAMERA_LABEL = re.compile(
    r"(?:image|img|imag|dsc|dscn|dscf|dcim|cimg|photo|pic|picture|pxl|mvimg|gopr|dji|sam|wp|p|screenshot|"
    r"screen_shot|scan|snapshot|file|untitled|download|whatsapp_image|uploaded)(?:[_\-. ]*\d[\w\-. ]*)?")
NAMING_HINT = ("The class comes from the folder or from the file name before its number: name files like "
               "cat_1.jpg and dog_1.jpg, or put them in folders like cat/1.jpg and dog/1.jpg, then build again.")


def naming_warnings(labels: list[str]) -> list[str]:
    """Warnings about classes a person did not mean: names a camera gave, pictures with no
    class, or one class for everything (plain sentences for the build report)."""
    out = []
    camera = sorted({lab for lab in labels if lab and _CAMERA_LABEL.fullmatch(lab.lower())})
    n_camera = sum(1 for lab in labels if lab in camera)
    n_none = sum(1 for lab in labels if not lab)
    if n_camera:
        names = ", ".join(f"“{c}”" for c in camera[:5])
        out.append(f"{n_camera} {'picture has a numbered name' if n_camera == 1 else 'pictures have numbered names'}"
                   f" like a camera gives (image_0001.jpg), so {'its' if n_camera == 1 else 'their'} class is just "
                   f"{names}{' …' if len(camera) > 5 else ''}.")
    if n_none:
        out.append(f"{n_none} {'picture is' if n_none == 1 else 'pictures are'} not in a class folder, so "
                   f"{'it has' if n_none == 1 else 'they have'} no class.")
    if len(labels) > 1 and len(set(labels)) == 1 and not (n_camera or n_none):
        out.append(f"All {len(labels)} pictures are in one class, “{labels[0]}”, so every result will have "
                   "the same name.")
    if out:
        out.append(NAMING_HINT)
    return out


@dataclass
class _Candidate:
    rel: str  # POSIX path relative to the source folder
    path: Path
    label: str
    size: int
    mtime_ns: int

    def record(self) -> dict[str, Any]:
        return {"path": self.rel, "label": self.label, "size": self.size, "mtime_ns": self.mtime_ns}


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


def _from_manifest(manifest: Path) -> tuple[Path, list[_Candidate], list[tuple[str, str]]]:
    """A manifest's pictures -> (their deepest common folder, which item paths are relative
    to, candidates sorted by that path, skipped rows: missing files and repeated paths)."""
    rows = read_manifest(manifest)
    skipped: list[tuple[str, str]] = []
    found: dict[Path, tuple[str, os.stat_result]] = {}
    for p, label in rows:
        if p in found:
            skipped.append((str(p), "listed twice in the manifest (the first row is kept)"))
            continue
        try:
            st = p.stat()
        except OSError as exc:
            skipped.append((str(p), f"cannot read: {exc.strerror or exc}"))
            continue
        if not p.is_file():
            skipped.append((str(p), "not a file"))
            continue
        found[p] = (label, st)
    root = Path(os.path.commonpath([str(p.parent) for p in found])) if found else manifest.resolve().parent
    candidates = [_Candidate(p.relative_to(root).as_posix(), p, label, st.st_size, st.st_mtime_ns)
                  for p, (label, st) in found.items()]
    candidates.sort(key=lambda c: c.rel)
    return root, candidates, skipped


def gather(source: Path, out: Path, modality: str) -> tuple[Path, list[_Candidate], list[tuple[str, str]]]:
    """What to index: a folder (class = first-level subfolder) or a manifest (.csv or .parquet
    with path and label columns) -> (the folder item paths are relative to, candidates sorted
    by that path, skipped files). Both engines start here."""
    if source.is_dir():
        return (source, *_scan(source, out, modality))
    if is_manifest(source):
        return _from_manifest(source)
    raise FileNotFoundError(f"not a folder or a manifest (.csv or .parquet with path and label columns): {source}")


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


def _previous_gallery(out: Path, encoder_id: str, modality: str,
                      store_tokens: bool) -> tuple[Optional[StoredGallery], Optional[str]]:
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
        old = read_gallery(out, mmap_embeddings=True)  # the rows reused are copied, not the whole file
    except GalleryError as exc:
        return None, f"the existing gallery is unreadable ({exc})"
    if old.encoder_id != encoder_id:
        return None, f"the existing gallery was built with {old.encoder_id}, the encoder is {encoder_id}"
    if old.modality != modality:
        return None, f"the existing gallery holds {old.modality} embeddings, {modality} were asked for"
    if store_tokens and old.tokens is None:
        return None, "the existing gallery has no tokens"
    return old, None


def write_gallery(
    source_dir: PathLike,
    out_dir: PathLike,
    encoder: Any,
    *,
    modality: str = "photo",
    index_type: str = "auto",
    store_tokens: bool = True,
    batch_size: int = 16,
    progress: bool = True,
    checkpoint: Optional[PathLike] = None,
    index_params: Optional[Mapping[str, Any]] = None,
    embed: Optional[Callable[..., Any]] = None,
    diffusion: bool = True,
) -> BuildReport:
    """Index the images under `source_dir` (a folder, or a manifest: see `gather`) into the
    gallery folder `out_dir`.

    Re-running updates the gallery: only new and changed files are encoded.
    `checkpoint` is what the encoder was created with ("default", "none" or a path);
    it is recorded so `search` can recreate the encoder (inferred when not given).
    `embed`: the engine that encodes the new files, called as `gallery.encode.encode_all`
    (the default: in this process) is; `gallery.embed_ray.RayEngine` embeds on Ray.
    `diffusion=False`: no gallery diffusion, whatever the checkpoint prescribes. Results then
    rank by similarity and calibration alone; a gallery of a million skips a build step of
    most of an hour on 2 cores (docs/SCALING.md).
    """
    t0 = time.perf_counter()
    if modality not in GALLERY_MODALITIES:
        raise InputError(f"gallery modality must be one of {', '.join(GALLERY_MODALITIES)}, not {modality!r}")
    if index_type not in REQUESTABLE:
        raise InputError(f"unknown index type {index_type!r}; choose from {', '.join(REQUESTABLE)}")
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    source = Path(source_dir).resolve()
    out = Path(out_dir).resolve()
    if not source.is_dir() and not is_manifest(source):
        raise FileNotFoundError(f"not a folder or a manifest (.csv or .parquet): {source}")
    encoder_id = str(encoder.encoder_id)
    ckpt = _normalize_checkpoint_arg(checkpoint) or checkpoint_spec(encoder)
    report = BuildReport(out_dir=str(out))

    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    old, reason = _previous_gallery(out, encoder_id, modality, store_tokens)
    if reason:
        log.warning("re-encoding everything: %s", reason)
        report.rebuilt_reason = reason

    source, candidates, skipped = gather(source, out, modality)
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
        new_rows, new_emb, grid, token_shape = (embed or encode_all)(
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
        report.warnings = naming_warnings([c.label for c in kept])
        if not kept:
            raise GalleryError(
                f"no readable images in {source} ({len(skipped)} files skipped); nothing to index"
            )
        if old is not None and grid is None:
            grid = old.grid
            if old.tokens is not None:
                token_shape = tuple(old.tokens.shape[1:])

        calibration = SeenCalibration.from_encoder(encoder)
        unchanged = (
            old is not None and not new_rows and report.removed == 0
            and (old.meta.get("requested_index_type") == index_type
                 or (index_type == "auto" and old.index_type == choose_index_type(len(kept))))
            and old.meta.get("has_tokens") == store_tokens
            and old.meta.get("source_dir") == str(source)
            and old.meta.get("checkpoint") == ckpt
            and not index_params
            # an index whose seen column was made for another calibration temperature is remade
            and (old.index_type == "flat" or not calibration
                 or old.meta.get("index_seen_tau") == calibration.tau)
        )
        if unchanged:
            # Nothing to do: leave the folder (and its possibly large token file) alone.
            shutil.rmtree(tmp, ignore_errors=True)
            report.written = False
            report.index_type = old.index_type
            report.seconds = time.perf_counter() - t0
            return report

        # Assemble rows in the final (sorted) order from the old gallery and the new encodings.
        n = len(kept)
        src_old = np.array([reuse.get(c.rel, -1) for c in kept], dtype=np.int64)
        src_new = np.array([new_rows.get(c.rel, -1) for c in kept], dtype=np.int64)
        is_old = src_old >= 0
        d = old.embeddings.shape[1] if old is not None else new_emb.shape[1]
        emb = np.empty((n, d), dtype=np.float32)
        if is_old.any():
            emb[is_old] = old.embeddings[src_old[is_old]]  # as encoded, not diffused
        if (~is_old).any():
            emb[~is_old] = new_emb[src_new[~is_old]]
        np.save(tmp / EMBEDDINGS_FILE, emb)
        if calibration is not None:
            np.save(tmp / PROTOTYPES_FILE, calibration.prototypes)
        if store_tokens:
            _assemble_tokens(tmp, n, token_shape, old, src_old, src_new, is_old)

        seen = calibration.seen_confidence(emb) if calibration is not None else None
        index, kind, params = build_index(emb, index_type, **dict(index_params or {}), seen=seen)
        if index is not None:
            faiss_module().write_index(index, str(tmp / INDEX_FILE))
            if seen is not None:
                np.save(tmp / SEEN_FILE, seen)  # so that searches need not compute it per shortlist
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
            "diffusion_k": encoder.retrieval.diffusion_k if diffusion else 0,
            # Seen-class calibration likewise (None = off; prototypes in PROTOTYPES_FILE).
            "seen_calibration": calibration.setting if calibration is not None else None,
            # The temperature of the index's seen column (gallery.index.build_index).
            "index_seen_tau": calibration.tau if calibration is not None and index is not None else None,
            # The encoder's fingerprint by content (see check_encoder).
            "probe": [round(float(v), 6) for v in encoder_probe(encoder, modality)],
        }
        write_items(tmp, meta, [c.record() for c in kept])  # gallery.json (+ items.arrow when many)
        del old  # release the previous gallery's memory maps before its folder moves
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.index_type = kind
    report.seconds = time.perf_counter() - t0
    return report


def _assemble_tokens(
    tmp: Path,
    n: int,
    token_shape: Optional[tuple[int, int]],
    old: Optional[StoredGallery],
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
