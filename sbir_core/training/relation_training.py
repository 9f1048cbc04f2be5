"""Training and benchmarking the relation network of the optional ZSE-SBIR re-ranking
(`sbir_core.models.relation`, which says what re-ranking needs).

- `train_relation(...)` (CLI `train-relation`): class-level pairs from the cached token
  grids of the training items (QuickDraw sketches x Caltech photos of the shared
  classes), held-out classes for early stopping and for choosing alpha.
- `evaluate_rerank(...)` / `benchmark_rerank(...)` (CLI `eval-relation`): mAP@all with
  and without re-ranking for any embedding scores.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sbir_core.data.preprocess import preprocess_sketch
from sbir_core.errors import InputError
from sbir_core.models.relation import (DEFAULT_RELATION, DEFAULT_TOPK, INK_CELL_FRACTION, RelationModel, ink_cells, load_relation,
                                       mix_scores, save_relation)

log = logging.getLogger(__name__)

def evaluate_rerank(model: Optional[RelationModel], base_scores: np.ndarray, query_tokens: np.ndarray,
                    query_ink: np.ndarray, gallery_tokens: np.ndarray, query_labels: Sequence,
                    gallery_labels: Sequence, k: int = DEFAULT_TOPK, alphas: Sequence[float] = (),
                    progress: bool = False) -> dict[str, Any]:
    """mAP@all (and P@100, mAP@200) of `base_scores` (Q, G) with and without re-ranking the top k.

    Relation logits for each query's top k are computed once and mixed for every
    alpha in `alphas` (plus the model's own alpha). Works for any embedding scores
    (raw backbone cosine, a trained checkpoint's), so it can be re-run as they change.
    """
    from sbir_core.eval.metrics import per_query_metrics

    base = np.asarray(base_scores, dtype=np.float32)
    Q, G = base.shape
    k = int(min(k, G))

    def summary(scores):
        m = per_query_metrics(scores, query_labels, gallery_labels, map_ks=(200,), precision_ks=(5, 100),
                              hit_ks=(1, 5))
        return {name: float(m[name.replace("mAP", "AP")].mean())
                for name in ("mAP@all", "mAP@200", "hit@1", "hit@5", "P@5", "P@100")}

    out: dict[str, Any] = {"k": k, "n_queries": Q, "n_gallery": G, "base": summary(base)}
    if model is None:
        return out
    a_model = float(model.alpha)
    alphas = sorted(set([float(a) for a in alphas] + [a_model, 1.0]))
    top = np.argsort(-base, axis=1, kind="stable")[:, :k]
    rel = np.zeros((Q, k), np.float32)
    t0 = time.time()
    it = range(Q)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="re-rank", unit="query", leave=False)
    for qi in it:
        idx = top[qi]
        order = np.argsort(idx)
        toks = np.asarray(gallery_tokens[idx[order]])[np.argsort(order)]
        rel[qi] = model.score_candidates(query_tokens[qi], query_ink[qi], toks)
    out["rerank_seconds_per_query"] = (time.time() - t0) / max(Q, 1)
    out["rerank"] = {}
    for a in alphas:
        s = base.copy()
        for qi in range(Q):
            s[qi, top[qi]] = mix_scores(base[qi, top[qi]], rel[qi], a)
        out["rerank"][f"{a:g}"] = summary(s)
    out["alpha_model"] = a_model
    out["with_rerank"] = out["rerank"][f"{a_model:g}"]
    return out


# ----------------------------------------------------------------------------- cached features
def cached_features(encoder, items: Sequence, view: str, tokens: bool = True,
                    cache_dir: Union[str, Path, None] = None, allow_extract: bool = True) -> dict[str, np.ndarray]:
    """`features.extract_features` with tokens, from the per-item cache (extracting what
    is missing unless `allow_extract` is False)."""
    from sbir_core.eval.features import extract_features

    return extract_features(encoder, items, view, tokens=tokens, cache_dir=cache_dir, allow_extract=allow_extract)


def sketch_ink_cells(items: Sequence, grid: Sequence[int], size: int = 224,
                     cache_dir: Union[str, Path, None] = None) -> np.ndarray:
    """(n, h*w) bool ink cells of sketch items (rendered by preprocess_sketch), cached."""
    from sbir_core.eval.features import DEFAULT_CACHE
    
    h = hashlib.sha256()
    for it in items:
        h.update(it.key.encode())
        h.update(b"\n")
    cdir = Path(cache_dir or DEFAULT_CACHE)
    path = cdir / f"inkcells-{grid[0]}x{grid[1]}-{size}-{INK_CELL_FRACTION:g}-{h.hexdigest()[:12]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["ink"]
    out = np.zeros((len(items), int(grid[0]) * int(grid[1])), bool)
    for i, it in enumerate(items):
        try:
            out[i] = ink_cells(preprocess_sketch(it.load(), size), grid).reshape(-1)
        except Exception as exc:  # blank or unreadable: all cells (no mask) rather than none
            log.warning("ink cells of %s: %s", it.key, exc)
            out[i] = True
    cdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, ink=out)
    os.replace(tmp, path)
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


# ----------------------------------------------------------------------------- training
def _split_classes(classes: Sequence[str], frac: float, rng: np.random.Generator, min_n: int = 1) -> tuple[list, list]:
    classes = sorted(classes)
    n_val = max(min_n, int(round(frac * len(classes)))) if classes else 0
    perm = rng.permutation(len(classes))
    val = sorted(classes[i] for i in perm[:n_val])
    return sorted(set(classes) - set(val)), val


def relation_split(shared: Sequence[str], photo_only: Sequence[str], encoder_heldout: Sequence[str],
                   val_fraction: float, rng: np.random.Generator) -> tuple[list, list, list, list]:
    """-> (train, val) classes with both sides, (train, val) photo-only classes. A fine-tuned
    encoder was selected on classes it never trained on (`encoder_heldout`); those are the
    validation classes, since on any other the embedding being re-ranked has memorised them."""
    held = set(encoder_heldout)
    if held & set(shared):
        return ([c for c in shared if c not in held], [c for c in shared if c in held],
                [c for c in photo_only if c not in held], [c for c in photo_only if c in held])
    train_cls, val_cls = _split_classes(shared, val_fraction, rng, min_n=2)
    return (train_cls, val_cls, *_split_classes(photo_only, val_fraction, rng))


def _map_all(scores: np.ndarray, ql: Sequence, gl: Sequence) -> float:
    from sbir_core.eval.metrics import map_all

    return map_all(scores, np.asarray(ql), np.asarray(gl))


def train_relation(
    data_root: Union[str, Path],
    out: Union[str, Path, None] = DEFAULT_RELATION,
    epochs: int = 25,
    seed: int = 0,
    encoder_name: Optional[str] = None,
    val_fraction: float = 0.15,
    batch_size: int = 32,
    negatives: int = 3,
    lr: float = 2e-3,
    k: int = DEFAULT_TOPK,
    patience: int = 6,
    config: Optional[dict] = None,
    cache_dir: Union[str, Path, None] = None,
    allow_extract: bool = True,
    max_photos_per_class: Optional[int] = 80,
    checkpoint: str = "none",
) -> tuple[RelationModel, dict[str, Any]]:
    """Train the relation model on cached token grids of the training items.

    Pairs are class-level: a QuickDraw sketch and a Caltech photo of the same class
    are a positive, of different classes a negative (half of them hard negatives:
    photos the embedding ranks high for that sketch). ~15% of the classes both sides
    share (and of the photo-only classes, as distractors) are held out, or, for a
    fine-tuned encoder, the classes it was selected on (`relation_split`): after each
    epoch the held-out sketches re-rank their top-k embedding candidates among the
    held-out photos; the best epoch and the mixing alpha are chosen there. Benchmark
    classes never take part (training_items excludes them). `max_photos_per_class`
    must match the selection the feature cache was built with (80 by default).
    `checkpoint`: the encoder whose tokens the model reads and whose embedding it
    re-ranks ("none": the raw backbone at 224 px, 14x14 tokens; "default": the shipped
    160 px model, 10x10).
    """
    from sbir_core.data.datasets import fingerprint, training_items
    from sbir_core.eval.evaluate import embed_items
    from sbir_core.models.encoders import DEFAULT_ENCODER, create_encoder

    t_start = time.time()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    enc = create_encoder(encoder_name or DEFAULT_ENCODER, checkpoint=checkpoint)
    tr = training_items(data_root, max_photos_per_class=max_photos_per_class)
    P = [i for i in tr if i.modality == "photo"]
    S = [i for i in tr if i.modality == "sketch"]
    fP = cached_features(enc, P, "photo", cache_dir=cache_dir, allow_extract=allow_extract)
    fS = cached_features(enc, S, "sketch", cache_dir=cache_dir, allow_extract=allow_extract)
    grid = tuple(int(g) for g in fS["grid"])
    p_ok, s_ok = fP["ok"], fS["ok"]
    p_lab = np.array([i.label for i in P])
    s_lab = np.array([i.label for i in S])
    shared = sorted(set(p_lab[p_ok]) & set(s_lab[s_ok]))
    photo_only = sorted(set(p_lab[p_ok]) - set(s_lab))
    if len(shared) < 4:
        raise ValueError(f"only {len(shared)} classes have both photos and sketches; need at least 4")
    held = (getattr(enc, "meta", None) or {}).get("heldout_classes") or []
    train_cls, val_cls, train_po, val_po = relation_split(shared, photo_only, held, val_fraction, rng)
    log.info("relation: %d shared classes (%d train / %d val: %s), %d photo-only (%d as val distractors)",
             len(shared), len(train_cls), len(val_cls), ", ".join(val_cls), len(photo_only), len(val_po))

    def sel(labels, ok, classes):
        cs = set(classes)
        return np.array([i for i, (l, o) in enumerate(zip(labels, ok)) if o and l in cs], dtype=int)

    s_tr, s_va = sel(s_lab, s_ok, train_cls), sel(s_lab, s_ok, val_cls)
    p_tr, p_va = sel(p_lab, p_ok, train_cls + train_po), sel(p_lab, p_ok, val_cls + val_po)
    s_idx = np.concatenate([s_tr, s_va])
    ink_all = sketch_ink_cells([S[i] for i in s_idx], grid, enc.image_size, cache_dir)
    ink = {int(i): ink_all[j] for j, i in enumerate(s_idx)}
    s_tok, p_tok = fS["tokens"], fP["tokens"]

    # The encoder's own embedding scores (what re-ranking starts from): hard negatives and
    # the val base ranking.
    eS, eP = embed_items(enc, S, "sketch", cache_dir)[0], embed_items(enc, P, "photo", cache_dir)[0]
    base_tr = eS[s_tr] @ eP[p_tr].T
    base_va = eS[s_va] @ eP[p_va].T
    hard = []
    for r, si in enumerate(s_tr):
        order = np.argsort(-base_tr[r])
        neg = order[p_lab[p_tr[order]] != s_lab[si]][:100]
        hard.append(p_tr[neg])
    by_class = {c: p_tr[p_lab[p_tr] == c] for c in train_cls}

    cfg = {"token_dim": int(s_tok.shape[2]), "grid": grid, **(config or {})}
    model = RelationModel(**cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(s_tr) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch),
                                                pct_start=0.15)
    kv = int(min(k, len(p_va)))
    top_va = np.argsort(-base_va, axis=1, kind="stable")[:, :kv]
    q_va_lab, g_va_lab = s_lab[s_va], p_lab[p_va]
    base_map = _map_all(base_va, q_va_lab, g_va_lab)
    alphas = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

    def validate() -> tuple[float, float, dict]:
        model.eval()
        rel = np.stack([model.score_candidates(s_tok[si], ink[int(si)], p_tok[p_va[top_va[r]]])
                        for r, si in enumerate(s_va)])
        res = {}
        for a in alphas:
            s = base_va.copy()
            for r in range(len(s_va)):
                s[r, top_va[r]] = mix_scores(base_va[r, top_va[r]], rel[r], a)
            res[a] = _map_all(s, q_va_lab, g_va_lab)
        best_a = max(alphas, key=lambda a: (round(res[a], 6), -abs(a - 0.5)))
        model.train()
        return res[best_a], best_a, res

    best = (-1.0, 0.0, None, -1)
    history = []
    bad = 0
    for epoch in range(epochs):
        model.train()
        perm = rng.permutation(len(s_tr))
        losses = []
        t0 = time.time()
        for b in range(0, len(perm), batch_size):
            rows = perm[b:b + batch_size]
            sk, ph, y, grp = [], [], [], []
            for g, r in enumerate(rows):
                si = s_tr[r]
                pos = rng.choice(by_class[s_lab[si]])
                n_hard = negatives // 2 + (negatives % 2) * int(rng.random() < 0.5)
                neg = list(rng.choice(hard[r][:50], size=n_hard, replace=False))
                while len(neg) < negatives:
                    j = rng.choice(p_tr)
                    if p_lab[j] != s_lab[si]:
                        neg.append(j)
                for j, lab in [(pos, 1.0)] + [(j, 0.0) for j in neg]:
                    sk.append(si)
                    ph.append(j)
                    y.append(lab)
                    grp.append(g)
            st = torch.from_numpy(s_tok[np.array(sk)].astype(np.float32))
            pt = torch.from_numpy(p_tok[np.array(ph)].astype(np.float32))
            ik = torch.from_numpy(np.stack([ink[int(i)] for i in sk]))
            yt = torch.tensor(y)
            logits = model(st, pt, ik)
            # BCE (balanced: 1 positive per `negatives` negatives) + a softmax ranking
            # term over each sketch's group (its positive must beat its negatives).
            bce = F.binary_cross_entropy_with_logits(logits, yt, pos_weight=torch.tensor(float(negatives)))
            grouped = logits.view(len(rows), negatives + 1)
            rank = F.cross_entropy(grouped, torch.zeros(len(rows), dtype=torch.long))
            loss = bce + rank
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        val_map, val_a, res = validate()
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_mAP": val_map, "alpha": val_a,
                        "val_mAP_rel_only": res[1.0], "seconds": time.time() - t0})
        log.info("epoch %d: loss %.4f, val mAP@all %.4f (alpha %.1f; base %.4f, relation only %.4f) %.0fs",
                 epoch + 1, np.mean(losses), val_map, val_a, base_map, res[1.0], time.time() - t0)
        if val_map > best[0] + 1e-6:
            best = (val_map, val_a, {k_: v.detach().clone() for k_, v in model.state_dict().items()}, epoch + 1)
            bad = 0
        else:
            bad += 1
            if bad >= patience:
                log.info("early stop after epoch %d (best %d)", epoch + 1, best[3])
                break
    model.load_state_dict(best[2])
    model.alpha.fill_(float(best[1]))
    model.eval()
    meta = {
        "encoder": enc.backbone.name,
        "token_grid": list(grid),
        "image_size": enc.image_size,
        "data_fingerprint": fingerprint([S[i] for i in s_idx] + [P[i] for i in np.concatenate([p_tr, p_va])]),
        "train_classes": train_cls,
        "val_classes": val_cls,
        "val_distractor_classes": val_po,
        "val_mAP_all": best[0],
        "val_mAP_all_base": base_map,
        "val_k": kv,
        "best_epoch": best[3],
        "epochs": epochs,
        "seed": seed,
        "history": history,
        "train_seconds": time.time() - t_start,
        "base_embedding": enc.encoder_id,
        # a name ("none", "default") as given; a file by its absolute path, so eval-relation
        # finds it from any folder
        "checkpoint": str(Path(checkpoint).resolve()) if Path(checkpoint).is_file() else checkpoint,
        "max_photos_per_class": max_photos_per_class,
    }
    meta["alpha"] = float(model.alpha)
    model.meta = meta
    if out is not None:
        save_relation(out, model, meta)
        log.info("saved %s (val mAP@all %.4f vs base %.4f, alpha %.1f)", out, best[0], base_map, best[1])
    return model, meta


# ----------------------------------------------------------------------------- benchmark evaluation
def benchmark_rerank(data_root: Union[str, Path], split: str = "pacs", relation: Union[str, Path, None] = None,
                     embedding: str = "encoder", k: int = DEFAULT_TOPK, alphas: Sequence[float] = (0.25, 0.5, 0.75),
                     cache_dir: Union[str, Path, None] = None, progress: bool = False) -> dict[str, Any]:
    """The first row and mAP on a benchmark split with and without relation re-ranking of the top k.

    The tokens come from the encoder the relation model was trained with (its `checkpoint`;
    "none", the raw backbone, for models that do not name one). embedding: what is
    re-ranked: "encoder" (that encoder's embedding, as a search ranks), "raw" (its
    backbone's pooled feature, cosine) or a heads-only checkpoint path (its heads applied
    to the cached pooled features of a frozen backbone).
    """
    from sbir_core.data.datasets import benchmark
    from sbir_core.eval.evaluate import embed_items
    from sbir_core.models.encoders import create_encoder

    model = load_relation(relation)
    enc = create_encoder(model.meta.get("encoder"), checkpoint=model.meta.get("checkpoint", "none"))
    if embedding not in ("encoder", "raw"):
        ce = create_encoder(checkpoint=embedding)
        if ce.meta.get("backbone_trained"):
            raise InputError(f"{embedding} fine-tuned its backbone, so its heads do not read this relation model's "
                             "features; train a relation model for it (train-relation --checkpoint) and use "
                             "--embedding encoder")
    q, g = benchmark(data_root, split)
    fq = cached_features(enc, q, "sketch", cache_dir=cache_dir)
    fg = cached_features(enc, g, "photo", cache_dir=cache_dir)
    if embedding == "encoder":
        base = embed_items(enc, q, "sketch", cache_dir)[0] @ embed_items(enc, g, "photo", cache_dir)[0].T
    elif embedding == "raw":
        base = _cosine(fq["raw"], fg["raw"])
    else:
        with torch.inference_mode():
            eq = ce.head(torch.from_numpy(fq["pooled"].astype(np.float32)), "sketch").numpy()
            eg = ce.head(torch.from_numpy(fg["pooled"].astype(np.float32)), "photo").numpy()
        base = _cosine(eq, eg)
    ink = sketch_ink_cells(q, tuple(int(x) for x in fq["grid"]), enc.image_size, cache_dir)
    res = evaluate_rerank(model, base, fq["tokens"], ink, fg["tokens"], [i.label for i in q],
                          [i.label for i in g], k=k, alphas=alphas, progress=progress)
    res.update({"split": split, "embedding": embedding, "relation": str(relation or DEFAULT_RELATION)})
    return res
