"""sbir_core: zero-shot sketch-based image retrieval.

    import sbir_core
    enc = sbir_core.create_encoder()                       # the shipped trained model
    gal = sbir_core.Gallery.build("photos/", enc)          # or sbir_core.Gallery.load(path)
    hits = gal.search(enc.encode_sketch(strokes_or_image), k=10)
    expl = sbir_core.explain_pair(enc, sketch, hits[0].path)  # correspondences, synthesis, heatmap

Names are imported on first use, so `import sbir_core` (and `python -m sbir_core --help`)
does not load torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> module that defines it
_EXPORTS = {
    "create_encoder": "sbir_core.models.encoders",
    "SBIREncoder": "sbir_core.models.encoders",
    "RetrievalSettings": "sbir_core.models.settings",
    "list_backbones": "sbir_core.models.encoders",
    "Gallery": "sbir_core.gallery.index",
    "SearchResult": "sbir_core.gallery.results",
    "GalleryError": "sbir_core.gallery.index",
    "StaleGalleryError": "sbir_core.gallery.index",
    "build_gallery": "sbir_core.gallery.index",
    "encode_query": "sbir_core.gallery.query",
    "explain_pair": "sbir_core.explain.correspondence",
    "Explanation": "sbir_core.explain.explanation",
    "gallery_map": "sbir_core.explain.embedding_map",
    "preprocess_sketch": "sbir_core.data.preprocess",
    "BlankSketchError": "sbir_core.data.preprocess",
    "load_stroke_file": "sbir_core.data.drawing",
    "list_checkpoints": "sbir_core.paths",
    "checkpoint_path": "sbir_core.paths",
    "retrieval_report": "sbir_core.eval.metrics",
    "paired_difference": "sbir_core.eval.metrics",
    "SBIRError": "sbir_core.errors",
    "InputError": "sbir_core.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sbir_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
