"""The default engine of `index`: decode and encode pictures in batches, in this process.

`encode_batches` is the one loop that turns files into encoder outputs; the Ray engine's
actors (`gallery.embed_ray`) run it too, so both engines see the same pixels.
"""
from __future__ import annotations

import contextlib
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from sbir_core.data.images import load_image
from sbir_core.gallery.format import FLOAT16_MAX


def _model_input(encoder: Any, modality: str, c: Any) -> tuple[Any, Any, Any, Optional[str]]:
    """Decode and preprocess one picture -> (candidate, input, edge map or None, why it failed
    or None), with the encoder's own transforms (what `encode_photos` / `encode_sketches` apply)."""
    try:
        # A photo is resized whole to the encoder's size, so a big JPEG may decode at a
        # reduced scale; a sketch is cropped to its lines first, and keeps every pixel.
        img = load_image(c.path, at_least=encoder.image_size if modality == "photo" else None)
    except Exception as exc:  # corrupt, truncated, not really an image, too large...
        return c, None, None, f"unreadable image: {exc}"
    try:
        if modality == "photo":
            return (c, encoder.photo_transform(img),
                    encoder.edge_transform(img) if encoder.photo_uses_edges else None, None)
        return c, encoder.sketch_transform(img), None, None
    except (ValueError, OSError) as exc:  # e.g. a blank sketch
        return c, None, None, f"cannot encode: {exc}"


def encode_batches(
    encoder: Any,
    modality: str,
    todo: list[Any],
    batch_size: int,
    skipped: list[tuple[str, str]],
    progress: bool = False,
    overlap: Optional[bool] = None,
) -> Iterator[tuple[list[Any], Any]]:
    """Decode and encode `todo` -> (a batch's candidates, their EncoderOutput), in order.

    Both engines encode through here (the Ray engine's actors too), so they see the same
    pixels. A file that cannot be decoded or encoded is added to `skipped` and left out.
    `overlap` (default: when the encoder is not on the CPU) decodes the next batch in a
    thread while this one encodes: a GPU computes while the CPU decodes. On a CPU the two
    take turns in this thread, since torch's threads want every core: on 2 cores a decoding
    thread beside them, or two, made the loop slower (docs/BENCHMARKS.md I33a).
    """
    import torch  # here: importing the gallery writer stays light
    from tqdm import tqdm

    if overlap is None:
        weight = next(encoder.parameters(), None)
        overlap = weight is not None and weight.device.type != "cpu"

    def encoded(rows: list[tuple]) -> Iterator[tuple[list[Any], Any]]:
        try:
            x = torch.stack([r[1] for r in rows])
            edges = torch.stack([r[2] for r in rows]) if rows[0][2] is not None else None
            output = encoder.encode(x, modality, edges=edges)
        except (ValueError, OSError) as exc:  # find the file that fails, keep the rest
            if len(rows) == 1:
                skipped.append((str(rows[0][0].path), f"cannot encode: {exc}"))
            else:
                for r in rows:
                    yield from encoded([r])
            return
        yield [r[0] for r in rows], output

    def decode(batch: list[Any]) -> list[tuple]:
        return [_model_input(encoder, modality, c) for c in batch]

    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    # A decoding thread only where it overlaps with the encoder (see above).
    with ThreadPoolExecutor(1, thread_name_prefix="decode") if overlap else contextlib.nullcontext() as pool, \
            tqdm(total=len(todo), desc="encoding", unit="img", disable=not progress or not todo,
                 file=sys.stderr) as bar:
        ahead = pool.submit(decode, batches[0]) if overlap and batches else None
        for k in range(len(batches)):
            if overlap:
                rows = ahead.result()
                if k + 1 < len(batches):
                    ahead = pool.submit(decode, batches[k + 1])
            else:
                rows = decode(batches[k])
            skipped += [(str(r[0].path), r[3]) for r in rows if r[3] is not None]
            rows = [r for r in rows if r[3] is None]
            if rows:
                yield from encoded(rows)
            bar.update(len(batches[k]))


def float16_tokens(output: Any) -> np.ndarray:
    """A batch's token grids as stored: (B, T, C) float16, clipped (float16 overflow would store inf)."""
    t = output.tokens.float().cpu().numpy()
    np.clip(t, -FLOAT16_MAX, FLOAT16_MAX, out=t)
    return np.ascontiguousarray(t.astype(np.float16))


def encode_all(
    encoder: Any,
    modality: str,
    todo: list[Any],
    tmp: Path,
    store_tokens: bool,
    batch_size: int,
    progress: bool,
    skipped: list[tuple[str, str]],
) -> tuple[dict[str, int], Optional[np.ndarray], Optional[tuple[int, int]], Optional[tuple[int, int]]]:
    """The default engine: encode `todo` in this process -> (rel -> row in the new arrays,
    embeddings, grid, (T, C)), token grids in `tmp`/tokens.partial (what `embed` engines return).

    Tokens are streamed to a scratch file instead of kept in memory: at 196 x 112
    float16 values per image they outgrow RAM long before the embeddings do.
    """
    rows: dict[str, int] = {}
    embs: list[np.ndarray] = []
    grid: Optional[tuple[int, int]] = None
    token_shape: Optional[tuple[int, int]] = None
    with open(tmp / "tokens.partial", "wb") if store_tokens else contextlib.nullcontext(None) as scratch:
        for batch, output in encode_batches(encoder, modality, todo, batch_size, skipped, progress):
            embs.append(output.normalized())
            grid = tuple(int(v) for v in output.grid)
            if scratch is not None:
                t = float16_tokens(output)
                token_shape = (int(t.shape[1]), int(t.shape[2]))
                scratch.write(t.tobytes())
            for c in batch:
                rows[c.rel] = len(rows)
    emb = np.concatenate(embs) if embs else None
    return rows, emb, grid, token_shape
