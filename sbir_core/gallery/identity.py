"""Which model made a gallery: embeddings from two encoders live in different spaces, so
a gallery must be searched with the encoder that built it. Names are recorded, and a
probe embedding (the encoder's embedding of a fixed synthetic picture) checks the
weights themselves."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from sbir_core.gallery.backend import GalleryBackend
from sbir_core.gallery.format import StaleGalleryError
from sbir_core.paths import PathLike



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
    from sbir_core.models.checkpoint import checkpoint_digest
    from sbir_core.models.encoders import DEFAULT_CHECKPOINT

    try:
        st = DEFAULT_CHECKPOINT.stat()
        key = (str(DEFAULT_CHECKPOINT), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:  # hashing is cheap but not free; the file rarely changes
            _DIGESTS[key] = checkpoint_digest(DEFAULT_CHECKPOINT)
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


def rebuild_command(gallery: GalleryBackend, encoder_name: str, checkpoint: str) -> str:
    src = gallery.source_dir or "PHOTO_DIR"
    out = str(gallery.root) if gallery.root else "GALLERY_DIR"
    parts = ["python", "-m", "sbir_core", "index", src, "--out", out, "--encoder", encoder_name,
             "--checkpoint", checkpoint]
    kind = gallery.meta.get("requested_index_type", gallery.index_type)
    if kind not in ("flat", "auto"):  # auto: the default; flat: what it picks for a small folder
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


def check_encoder(gallery: GalleryBackend, encoder: Any, *, checkpoint: Optional[str] = None) -> None:
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
