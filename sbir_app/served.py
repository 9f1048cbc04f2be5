"""Pictures handed to Gradio as files written whole, once, named by content."""
from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from sbir_core.service import RetrievalService


class ServedImages:
    """Pictures a callback returns, handed to Gradio as files written whole.

    Gradio stores a returned PIL image by rewriting a file named after its content each time
    (`save_pil_to_cache`), so two visitors getting the same picture at once (a class
    clicking the same example) can be sent a half-written file. A file path is copied into
    Gradio's cache atomically instead. Files are named by content, written under a temporary
    name and renamed; at most `limit` are kept (the oldest go first). WebP, as Gradio would
    have sent them (a third of PNG's size for the map)."""

    def __init__(self, folder: Path, limit: int = 256, webp_method: int = 0, lossless: bool = True) -> None:
        # webp_method: WebP's effort, 0-6 (Pillow's default 4). Lossless by default: the
        # explanations' thin coloured lines on white blur when lossy and are hardly smaller;
        # at effort 0 the three explanation pictures take 20 ms, not 250 ms at effort 4 (the
        # click-to-explanation time). The map of photos is lossy, also at effort 0.
        self.folder, self.limit, self.webp_method, self.lossless = Path(folder), limit, webp_method, lossless
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._unpruned = 0  # files written since the last prune

    def path(self, img: Image.Image) -> str:
        buf = io.BytesIO()
        img.save(buf, "WEBP", method=self.webp_method, lossless=self.lossless)
        data = buf.getvalue()
        out = self.folder / f"{hashlib.sha256(data).hexdigest()[:32]}.webp"
        with self._lock:
            if not out.exists():
                tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, out)
                self._unpruned += 1
                # Listing the folder costs more than writing a map: prune once per limit/8
                # writes, so at most limit * 9/8 files are kept.
                if self._unpruned >= max(1, self.limit // 8):
                    self._prune()
                    self._unpruned = 0
            else:
                out.touch()  # recently used: pruned last
        return str(out)

    def _prune(self) -> None:
        files = sorted(self.folder.glob("*.webp"), key=lambda f: f.stat().st_mtime)
        for f in files[: max(0, len(files) - self.limit)]:
            f.unlink(missing_ok=True)

    def convert(self, value: Any) -> Any:
        if isinstance(value, Image.Image):
            return self.path(value)
        if isinstance(value, dict) and isinstance(value.get("value"), Image.Image):  # gr.update(value=...)
            return {**value, "value": self.path(value["value"])}
        return value

    def __call__(self, fn: Any) -> Any:
        """`fn` with every picture it returns converted (its signature kept for Gradio)."""
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            return tuple(self.convert(v) for v in out) if isinstance(out, tuple) else self.convert(out)
        return wrapped


def served_folder(service: RetrievalService) -> Path:
    """Where `ServedImages` writes: next to the thumbnails, and like them allowed to Gradio."""
    return service.thumbs_dir.parent / "served"

