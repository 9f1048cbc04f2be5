"""`eval`: zero-shot retrieval metrics for an encoder on a benchmark split or on folders.

Backbone features go through the on-disk feature cache (`features.py`), so
re-evaluating another checkpoint on the same data costs seconds, not minutes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from sbir_core.errors import InputError
from sbir_core.data.datasets import Item, benchmark, image_folder, training_items
from sbir_core.models.encoders import SBIREncoder
from sbir_core.eval.features import extract_features
from sbir_core.gallery.calibration import SeenCalibration
from sbir_core.gallery.index import Gallery
from sbir_core.eval.metrics import retrieval_report
from sbir_core.eval.product import DEFAULT_GALLERY, product_queries

log = logging.getLogger(__name__)


def embed_items(
    encoder: SBIREncoder, items: Sequence[Item], modality: str, cache_dir: Union[str, Path, None] = None
) -> tuple[np.ndarray, np.ndarray]:
    """-> (L2-normalised float32 embeddings, ok mask) of items seen as `modality`."""
    if modality == "sketch":
        # The same embedding SBIREncoder.encode gives (flip averaging included), from cached features.
        f = extract_features(encoder, items, "sketch", cache_dir=cache_dir, desc="queries")
        with torch.inference_mode():
            emb = encoder.embed_sketch(torch.from_numpy(f["pooled"]).float(), torch.from_numpy(f["raw"]).float())
            if encoder.retrieval.flip_sketch:
                m = extract_features(encoder, items, "sketch_flip", cache_dir=cache_dir, desc="mirrored queries")
                mirror = encoder.embed_sketch(torch.from_numpy(m["pooled"]).float(), torch.from_numpy(m["raw"]).float())
                emb = F.normalize(emb.float(), dim=-1) + F.normalize(mirror.float(), dim=-1)
        ok = f["ok"]
    else:
        f = extract_features(encoder, items, "photo", cache_dir=cache_dir, desc="gallery")
        ok = f["ok"]
        edge = None
        if encoder.photo_uses_edges:
            fe = extract_features(encoder, items, "edges_sketch", cache_dir=cache_dir, desc="gallery edges")
            edge = torch.from_numpy(fe["pooled"]).float()
            ok = ok & fe["ok"]
        with torch.inference_mode():
            emb = encoder.embed_photo(torch.from_numpy(f["pooled"]).float(), torch.from_numpy(f["raw"]).float(), edge)
    return F.normalize(emb.float(), dim=-1).numpy(), ok


def embedded_benchmarks(
    encoder: SBIREncoder, data_root: Union[str, Path], splits: Sequence[str] = ("pacs", "doodle")
) -> dict[str, tuple[np.ndarray, list, np.ndarray, list]]:
    """{name: (query embeddings, their labels, gallery embeddings, its labels)} for the product
    benchmark's groups ("product zero-shot", "product seen") against the default gallery, then
    each split, embedded as `eval` embeds them (unreadable items left out). What the scripts
    that sweep a scoring rule over every benchmark start from."""
    def embedded(items: Sequence[Item], modality: str) -> tuple[np.ndarray, list]:
        e, ok = embed_items(encoder, items, modality)
        return e[ok], [it.label for it, k in zip(items, ok) if k]

    data_root = Path(data_root)
    out = {}
    g = embedded(image_folder(DEFAULT_GALLERY), "photo")
    for group, items in product_queries(data_root).items():
        out[f"product {group}"] = (*embedded(items, "sketch"), *g)
    for split in splits:
        queries, photos = benchmark(data_root, split)
        out[split] = (*embedded(queries, "sketch"), *embedded(photos, "photo"))
    return out


def evaluate(
    encoder: SBIREncoder,
    queries: Sequence[Item],
    gallery: Sequence[Item],
    cache_dir: Union[str, Path, None] = None,
    diffusion: bool = True,
    calibration: bool = True,
    per_query: bool = False,
) -> dict:
    """Embed queries (in their own modality) and gallery, rank, and report metrics.

    `diffusion` and `calibration` apply the gallery diffusion and the seen-class calibration
    the checkpoint prescribes (as searches do); both off ranks by the embedding alone.
    `per_query` adds each query's figures (`retrieval_report`), to compare models query by query."""
    if not queries or not gallery:
        raise InputError(f"nothing to evaluate: {len(queries)} queries, {len(gallery)} gallery items")
    q, qok = embed_items(encoder, queries, queries[0].modality, cache_dir)
    g, gok = embed_items(encoder, gallery, gallery[0].modality, cache_dir)
    if not qok.all() or not gok.all():
        log.warning("dropping %d queries and %d gallery items that failed to load", (~qok).sum(), (~gok).sum())
    ql = [it.label for it, k in zip(queries, qok) if k]
    gl = [it.label for it, k in zip(gallery, gok) if k]
    k = encoder.retrieval.diffusion_k if diffusion else 0
    cal = SeenCalibration.from_encoder(encoder) if calibration else None
    # The same Gallery class the app and `search` use, so eval measures what ships.
    scores = Gallery.from_embeddings(g[gok], labels=gl, diffusion_k=k, calibration=cal).score_all(q[qok])
    report = retrieval_report(scores, ql, gl, ks=(100, 200), per_query=per_query)
    report["encoder"] = encoder.encoder_id
    report["diffusion_k"] = k
    report["seen_calibration"] = cal.setting if cal is not None else None
    return report


def evaluate_split(encoder: SBIREncoder, data_root: Union[str, Path], split: str,
                   cache_dir: Union[str, Path, None] = None, diffusion: bool = True,
                   generalized: bool = False, calibration: bool = True, per_query: bool = False) -> dict:
    """A benchmark split. `generalized` adds every Caltech photo of the training classes
    to the gallery (as distractors): real galleries mix seen and unseen classes."""
    queries, gallery = benchmark(data_root, split)
    if generalized:
        gallery = gallery + [i for i in training_items(data_root, hold_out_doodles=False) if i.modality == "photo"]
    report = evaluate(encoder, queries, gallery, cache_dir, diffusion, calibration, per_query)
    return {"split": split, "generalized": generalized, **report}
