"""What the subcommands share: the parser's mirrored library constants, the error type the
command line reports as one line, and how a command loads an encoder or opens a gallery."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

# Copies of library constants, so that building the parser imports no heavy module.
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")  # ann.REQUESTABLE
GALLERY_MODALITIES = ("photo", "sketch")  # format.GALLERY_MODALITIES
RELATION_TOPK = 50  # relation.DEFAULT_TOPK
CLASS_TEXTS = ("names", "glosses")  # models.text.CLASS_TEXTS
LITE_BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")  # encoders.LITE_PACKAGES


class CLIError(Exception):
    """An error the command line reports as one clear line, without a traceback."""


def load_encoder(name: Optional[str], checkpoint: Optional[str]) -> Any:
    """The one place commands load an encoder (tests substitute an already-loaded one)."""
    from sbir_core.models.encoders import create_encoder

    return create_encoder(name, checkpoint=checkpoint)


def search_encoder_spec(gallery: Any, name: Optional[str], checkpoint: Optional[str]) -> tuple[Optional[str], str]:
    """Which encoder to query `gallery` with: the gallery's own unless the user names another."""
    g_name = gallery.meta.get("encoder_name") or gallery.encoder_id.rsplit("@", 1)[0]
    g_ckpt = gallery.meta.get("checkpoint") or "none"
    if checkpoint is None and name is None:
        if g_ckpt.startswith("<"):
            raise CLIError(f"gallery {gallery.root} does not record its checkpoint file; pass --checkpoint PATH")
        return g_name, g_ckpt
    ckpt = checkpoint if checkpoint is not None else g_ckpt
    if ckpt.lower() == "none":
        return name or g_name, "none"
    return name, ckpt  # a checkpoint names its own backbone


def gallery_roots(extra: Optional[str] = None) -> list[Path]:
    """Where named galleries live: --galleries, the checkout's galleries/, $SBIR_HOME/galleries."""
    from sbir_core.paths import SHIPPED_GALLERIES, galleries_dir

    return [Path(r) for r in ([extra] if extra else []) + [str(SHIPPED_GALLERIES), str(galleries_dir())]]


def open_gallery(arg: str, encoder_name: Optional[str], checkpoint: Optional[str], roots: Optional[str] = None,
                  ef_search: Optional[int] = None, nprobe: Optional[int] = None) -> tuple[Any, Any, str]:
    """--gallery as a folder (queried with the encoder that built it) or as a name (as the
    app opens it: with the shipped model unless --checkpoint says otherwise, re-indexed
    into the cache if it was built with another model). -> (gallery, encoder, checkpoint)."""
    from sbir_core.gallery.identity import check_encoder
    from sbir_core.gallery.index import GALLERY_FILE, Gallery

    folder = Path(arg)
    if folder.is_dir():
        nested = sorted(folder.glob(f"*/{GALLERY_FILE}"))
        if not (folder / GALLERY_FILE).is_file() and len(nested) == 1:  # galleries/x/index/ beside x/images/
            folder = nested[0].parent
        gallery = Gallery.load(folder, ef_search=ef_search, nprobe=nprobe)
        name, ckpt = search_encoder_spec(gallery, encoder_name, checkpoint)
        encoder = load_encoder(name, ckpt)
        check_encoder(gallery, encoder, checkpoint=ckpt)
        return gallery, encoder, ckpt
    from sbir_core.gallery.store import GalleryStore

    ckpt = checkpoint or "default"
    encoder = load_encoder(encoder_name, ckpt)
    if arg.lower().startswith("class:"):  # a class gallery, as the page opens it: class:CODE
        from sbir_core.gallery.sharing import gallery_id, parse_code

        gallery = GalleryStore(encoder, ckpt).get(gallery_id(parse_code(arg[len("class:"):]))).gallery
        gallery.set_search_params(ef_search=ef_search, nprobe=nprobe)
        return gallery, encoder, ckpt
    known = []
    for root in gallery_roots(roots):
        store = GalleryStore(encoder, ckpt, root)
        names = store.list_galleries()
        known += names
        if arg in names:
            gallery = store.get(arg).gallery
            gallery.set_search_params(ef_search=ef_search, nprobe=nprobe)
            return gallery, encoder, ckpt
    raise CLIError(f"no gallery folder or name {arg!r}; named galleries: {', '.join(sorted(set(known))) or 'none'} "
                   "(see `gallery list`)")


DATA_HELP = "the shared data folder holding splits.json (default: $SBIR_DATA, else ../shared/data)"  # datasets.DATA_HELP


def data_folder(arg: Optional[str]) -> Path:
    """--data, else $SBIR_DATA, else ../shared/data (`datasets.data_root`, the one place that decides)."""
    from sbir_core.data.datasets import data_root

    return data_root(arg)
