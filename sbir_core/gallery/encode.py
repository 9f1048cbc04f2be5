"""The default engine of `index`: decode and encode pictures in batches, in this process.

`encode_batches` is the one loop that turns files into encoder outputs; the Ray engine's
actors (`gallery.embed_ray`) run it too, so both engines see the same pixels.
"""
from __future__ import annotations

import contextlib
import sys
from collections import deque
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


WAYS = ("turns", "streams", "overlap")


def default_way(encoder: Any, batches: int = 2) -> str:
    """How `encode_batches` runs for this encoder: "overlap" on a GPU (a thread decodes the
    next batch while the GPU computes), "streams" on a CPU with 2 or more torch threads and
    2 or more batches (a single batch is encoded fastest on all of torch's threads), "turns"
    otherwise (see `encode_batches`)."""
    import torch

    weight = next(encoder.parameters(), None)
    if weight is not None and weight.device.type != "cpu":
        return "overlap"
    return "streams" if torch.get_num_threads() >= 2 and batches >= 2 else "turns"


def streams_pool() -> ThreadPoolExecutor:
    """The two threads of the "streams" way, each with half of the caller's torch threads
    (torch's thread count is per thread: the caller's is left as it was)."""
    import torch

    return ThreadPoolExecutor(2, thread_name_prefix="encode", initializer=torch.set_num_threads,
                              initargs=(max(1, torch.get_num_threads() // 2),))


def encode_batches(
    encoder: Any,
    modality: str,
    todo: list[Any],
    batch_size: int,
    skipped: list[tuple[str, str]],
    progress: bool = False,
    way: Optional[str] = None,
) -> Iterator[tuple[list[Any], Any]]:
    """Decode and encode `todo` -> (a batch's candidates, their EncoderOutput), in order.

    Both engines encode through here (the Ray engine's actors too), so they see the same
    pixels. A file that cannot be decoded or encoded is added to `skipped` and left out.

    `way` (default: `default_way`):
      turns    decode a batch, then encode it, in this thread;
      streams  two threads, each with half of torch's threads, each decoding and encoding
               whole batches: while one decodes, the other encodes. On a CPU decoding needs
               the same cores as torch; a decoding thread beside torch's stalls them
               (every thread of a parallel op waits for the slowest), a second stream does
               not. On 2 cores, 2,000 photos alternated: 0.84 of the encoder's ceiling
               against 0.66 in turns, and steadier (docs/BENCHMARKS.md I33a, "Two streams");
      overlap  a thread decodes the next batch while this one encodes: for a GPU.
    """
    import torch  # here: importing the gallery writer stays light
    from tqdm import tqdm

    def decode(batch: list[Any]) -> list[tuple]:
        return [_model_input(encoder, modality, c) for c in batch]

    def encoded(rows: list[tuple]) -> tuple[list[tuple[list[Any], Any]], list[tuple[str, str]]]:
        """Encode decoded rows -> ([(candidates, output)], [(path, why)] for those that failed)."""
        failed = [(str(r[0].path), r[3]) for r in rows if r[3] is not None]
        rows = [r for r in rows if r[3] is None]
        if not rows:
            return [], failed
        try:
            x = torch.stack([r[1] for r in rows])
            edges = torch.stack([r[2] for r in rows]) if rows[0][2] is not None else None
            return [([r[0] for r in rows], encoder.encode(x, modality, edges=edges))], failed
        except (ValueError, OSError) as exc:  # find the file that fails, keep the rest
            if len(rows) == 1:
                return [], failed + [(str(rows[0][0].path), f"cannot encode: {exc}")]
            done: list[tuple[list[Any], Any]] = []
            for r in rows:
                d, f = encoded([r])
                done += d
                failed += f
            return done, failed

    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    way = way or default_way(encoder, len(batches))
    if way not in WAYS:
        raise ValueError(f"way must be one of {WAYS}, not {way!r}")
    if way == "streams":
        pool, work = streams_pool(), lambda batch: encoded(decode(batch))
    else:
        pool = ThreadPoolExecutor(1, thread_name_prefix="decode") if way == "overlap" else None
        work = decode
    # Work submitted ahead, bounded: outputs carry token grids, a million of them would not fit.
    ahead: deque = deque()
    depth = 4 if way == "streams" else 2  # streams: a batch queued behind each busy stream
    with pool or contextlib.nullcontext(), \
            tqdm(total=len(todo), desc="encoding", unit="img", disable=not progress or not todo,
                 file=sys.stderr) as bar:
        for k, batch in enumerate(batches):
            if pool is None:
                done, failed = encoded(decode(batch))
            else:
                while len(ahead) < depth and k + len(ahead) < len(batches):
                    ahead.append(pool.submit(work, batches[k + len(ahead)]))
                result = ahead.popleft().result()
                done, failed = result if way == "streams" else encoded(result)
            skipped += failed
            yield from done
            bar.update(len(batch))


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
