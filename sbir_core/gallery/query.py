"""Encoding a query: the one path the app, the command line and evaluation share.

`encode_query` turns a drawing (strokes, image), a photo or a text into the normalised
embedding a gallery is searched with; `encode_sketch_query` also returns what the
model was given (the cropped, padded, line-width-normalised drawing) and its token
grid, for the "what the model sees" panel, re-ranking and explanations.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from sbir_core.data.images import load_image
from sbir_core.data.preprocess import preprocess_sketch, read_sketch
from sbir_core.errors import InputError
from sbir_core.gallery.index import _normalize_rows
from sbir_core.paths import PathLike



@dataclass
class SketchQuery:
    embedding: np.ndarray  # (D,) float32, L2-normalised
    model_input: Image.Image  # the drawing as the encoder saw it
    tokens: Any  # (T, C) token grid of that view


def encode_sketch_query(encoder: Any, sketch: Any, brush: Optional[float] = None,
                        format: Optional[str] = None, batcher: Any = None) -> SketchQuery:
    """A drawing (strokes, image or array) -> embedding, model input and tokens.
    The embedding is exactly `encode_query(encoder, sketch=...)`'s (with the same brush).
    format: a stroke list's form (`read_sketch`). BlankSketchError when there is no ink.
    batcher: a `gallery.batching.SketchBatcher` of `encoder`, to share the forward pass with
    queries arriving at the same time (the app's many visitors)."""
    sk = preprocess_sketch(read_sketch(sketch, format), encoder.image_size, brush=brush)
    if batcher is not None:
        emb, tokens = batcher.encode(encoder.to_tensor(sk))
        return SketchQuery(emb, sk, tokens)
    out = encoder.encode(encoder.to_tensor(sk)[None], "sketch")
    return SketchQuery(np.ascontiguousarray(out.normalized()[0], dtype=np.float32), sk, out.tokens[0])


def encode_query(
    encoder: Any,
    *,
    sketch: Any = None,
    photo: Any = None,
    text: Optional[str] = None,
    format: Optional[str] = None,
) -> np.ndarray:
    """One query -> normalised float32 (D,). Give exactly one of sketch, photo, text.

    sketch: image path, PIL image, array or stroke list (BlankSketchError if no ink; a stroke
    list's form is `format`, "points" or "quickdraw", or detected once for the drawing);
    photo: image path, PIL image or array; text: a phrase (needs a text head).
    """
    given = [name for name, v in (("sketch", sketch), ("photo", photo), ("text", text)) if v is not None]
    if len(given) != 1:
        raise InputError(f"give exactly one of sketch=, photo=, text= (got {', '.join(given) or 'none'})")
    if text is not None:
        if not str(text).strip():
            raise InputError("the text query is empty")
        emb = np.asarray(encoder.encode_text([str(text).strip()]).float().cpu().numpy(), dtype=np.float32)
        return _normalize_rows(emb.reshape(1, -1))[0]
    if sketch is not None:
        img = _query_image(sketch) if isinstance(sketch, (str, os.PathLike)) else read_sketch(sketch, format)
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
        raise InputError(f"cannot read query image {path}: {exc}") from exc


def search_reranked(gallery: Any, relation: Any, query: SketchQuery, k: int = 10) -> list:
    """The top k of a sketch search, re-ranked by the relation network (ZSE-SBIR): the
    embedding's top max(k, DEFAULT_TOPK) candidates are re-scored from their token grids
    (the gallery must store tokens) and the first k returned as `SearchResult`s."""
    from sbir_core.gallery.results import SearchResult
    from sbir_core.models.relation import DEFAULT_TOPK, ink_cells, rerank

    if gallery.tokens is None:
        raise InputError("re-ranking needs a gallery built with token grids (index without --no-tokens)")
    grid = tuple(getattr(relation, "grid", ()) or ())
    if grid and gallery.grid is not None and grid != tuple(gallery.grid):
        raise InputError(f"the relation model reads {grid[0]}x{grid[1]} token grids, this gallery's encoder makes "
                         f"{gallery.grid[0]}x{gallery.grid[1]}; re-rank with the encoder it was trained for")
    cands = gallery.search(query.embedding, max(DEFAULT_TOPK, k))
    idx = np.array([c.index for c in cands])
    order = np.argsort(idx)  # read the memory-mapped tokens in file order
    toks = np.asarray(gallery.tokens[idx[order]], dtype=np.float32)[np.argsort(order)]
    ink = ink_cells(query.model_input, gallery.grid).reshape(-1)
    scores = rerank(relation, query.tokens, ink, toks, np.array([c.score for c in cands]))
    best = np.argsort(-scores, kind="stable")[:k]
    return [SearchResult(rank=r, index=int(idx[j]), path=cands[j].path, score=float(scores[j]), label=cands[j].label)
            for r, j in enumerate(best)]
