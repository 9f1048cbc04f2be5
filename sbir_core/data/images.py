"""Opening images: the one place files become pixels.

`load_image` reads a gallery or query file the caller chose; `open_upload` reads a file a
web framework wrote for an upload (never a path a client named), with byte and pixel
limits. Both read the header first, so an oversized image is refused before it is decoded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps

from sbir_core.errors import InputError
from sbir_core.paths import PathLike



# The same limit as uploads in the app: a 100-megapixel file decodes to gigabytes.
MAX_IMAGE_PIXELS = 40_000_000


class ImageTooLargeError(InputError):
    """An image whose header announces more pixels than MAX_IMAGE_PIXELS (never decoded)."""


def load_image(path: PathLike, max_pixels: int = MAX_IMAGE_PIXELS, at_least: Optional[int] = None) -> Image.Image:
    """Decode an image fully (so corrupt files fail here, not later), EXIF-rotated.

    Rotation is applied because browsers show photos rotated; the index and the
    queries must see the same pixels the user sees. The size is checked from the
    header first, so an oversized file is refused before it is decoded.

    `at_least`: a JPEG at least twice that size on each side is decoded at 1/2, 1/4 or
    1/8 scale, never below `at_least` (a 12-megapixel photo for a 160-pixel encoder:
    10 ms instead of 110). Smaller files decode exactly as without it.
    """
    with Image.open(path) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageTooLargeError(f"too large ({w}×{h} = {w * h / 1e6:.0f} megapixels; "
                                     f"the limit is {max_pixels / 1e6:.0f} megapixels)")
        if at_least:
            im.draft(im.mode, (at_least, at_least))  # a no-op for formats other than JPEG
        im.load()
        out = ImageOps.exif_transpose(im)
        if out is im:  # exif_transpose returns the same object when there is nothing to do
            out = im.copy()
    return out


# Uploads (query photos and gallery images): refuse anything bigger before decoding it.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = MAX_IMAGE_PIXELS


def open_upload(path: PathLike, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS,
                what: str = "") -> Image.Image:
    """An uploaded file (a path the web framework wrote, never one a client named) ->
    the decoded image; InputError with one plain sentence otherwise.

    Only the header is read before the pixel check, so a decompression bomb is
    refused before it is decoded.
    """
    p = Path(path)
    name = what or p.name
    if not p.is_file():
        raise InputError(f"“{name}” was not received; please upload it again.")
    size = p.stat().st_size
    if size == 0:
        raise InputError(f"“{name}” is empty.")
    if size > max_bytes:
        raise InputError(f"“{name}” is too large ({size / 2**20:.1f} MB); the limit is {max_bytes / 2**20:.0f} MB.")
    try:
        return load_image(p, max_pixels)
    except ImageTooLargeError as exc:
        raise InputError(f"“{name}” is {exc}.") from exc
    except Exception as exc:  # PIL raises many kinds for files that are not images
        raise InputError(f"“{name}” is not an image that can be read (PNG, JPEG, WebP, GIF or BMP).") from exc


def check_upload(path: PathLike, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS) -> None:
    """Raise InputError unless `path` is a readable image within the size limits."""
    open_upload(path, max_bytes, max_pixels)
