"""Cross-attention + relation network (ZSE-SBIR style) for re-ranking and explanations.

ZSE-SBIR (Lin et al., CVPR 2023) explains a sketch-photo match through token
correspondences: both images become token grids, a cross-attention layer lets each
side look at the other, and a small "relation network" reads the token-to-token
similarity matrix and outputs one match score. Here the tokens are the frozen
backbone's token grid (`SBIREncoder.backbone_features(x).tokens`, e.g. a 14x14 grid
of 112-d block-4 features for EfficientNet-Lite0 at 224 px), so the model is small
and trains on cached features in minutes on a CPU.

Pieces:

- `ink_cells(image, grid)`: which token cells of a preprocessed sketch hold ink;
  blank cells get no vote anywhere (not in attention keys, not in the score).
- `RelationModel`: shared token projection + modality embedding, one textbook
  cross-attention layer in both directions, cosine similarity matrix, masked
  quantile pooling of its row/column maxima, MLP -> one logit.
- `rerank(...)` / `rerank_gallery(...)`: mix the relation score into the embedding
  score of the top-K candidates only (K ~ 50, never the whole gallery).
- `train_relation(...)` (+ CLI `train-relation`): class-level pairs from the cached
  token grids of the training items (QuickDraw sketches x Caltech photos of the
  shared classes), held-out classes for early stopping and for choosing alpha.
- `evaluate_rerank(...)` (+ CLI `eval-relation`): mAP@all with and without
  re-ranking for any embedding scores (raw backbone cosine today, a trained
  checkpoint's scores later).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from sbir_core.paths import checkpoint_path  # noqa: E402

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RELATION = checkpoint_path("relation")
FORMAT_VERSION = 1
METADATA_KEY = "sbir_relation"
# A token cell counts as inked when at least this fraction of its pixels is ink.
INK_CELL_FRACTION = 0.02
DEFAULT_TOPK = 50

ArrayLike = Union[np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------- ink cells
def ink_cells(image: Union[Image.Image, np.ndarray], grid: Sequence[int],
              min_fraction: float = INK_CELL_FRACTION) -> np.ndarray:
    """(h, w) bool: cells of the token grid over `image` that hold enough ink.

    `image` is the preprocessed sketch (black ink on white, the encoder's input);
    a cell is inked when at least `min_fraction` of its pixels are ink
    (`preprocess.ink_mask` darker than `INK_THRESHOLD`). Row-major `.reshape(-1)`
    lines the cells up with the encoder's (N, C) tokens.
    """
    from sbir_core.preprocess import INK_THRESHOLD, ink_mask

    h, w = int(grid[0]), int(grid[1])
    on = ink_mask(image) > INK_THRESHOLD
    H, W = on.shape
    ys = np.linspace(0, H, h + 1).round().astype(int)
    xs = np.linspace(0, W, w + 1).round().astype(int)
    # Per-cell ink fraction via a summed-area table (works for any cell geometry).
    sat = np.pad(on.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = sat[ys[1:, None], xs[None, 1:]] - sat[ys[:-1, None], xs[None, 1:]] \
        - sat[ys[1:, None], xs[None, :-1]] + sat[ys[:-1, None], xs[None, :-1]]
    area = np.diff(ys)[:, None] * np.diff(xs)[None, :]
    return counts >= np.maximum(1, min_fraction * area)


# ----------------------------------------------------------------------------- the model
def masked_quantiles(x: torch.Tensor, mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantiles (linear interpolation, q=0 is the max, q=1 the min) of the masked
    entries of each row of x (B, N); rows with no valid entry use all entries.

    Pooling by quantiles of the sorted values gives a fixed-size summary whatever
    the number of inked cells, and stays differentiable (sort + gather).
    """
    mask = mask.clone()
    empty = ~mask.any(1)
    if empty.any():
        mask[empty] = True
    srt = x.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
    n = mask.sum(1, keepdim=True).to(x.dtype)  # (B, 1)
    pos = q.to(x.dtype)[None] * (n - 1)  # (B, Q)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = pos - lo.to(x.dtype)
    a, b = srt.gather(1, lo), srt.gather(1, hi)
    return a + (b - a) * frac


class CrossAttention(nn.Module):
    """Multi-head attention with queries from one token set and keys AND values from
    the other (separate q/k/v/o projections, like nn.MultiheadAttention, but with the
    projections exposed so a query's own projections are computed once and broadcast
    over its K candidates)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        return x.view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, h, N, D/h)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: Optional[torch.Tensor] = None, return_weights: bool = False):
        """q (Bq, h, Nq, dh) against k, v (Bk, h, Nk, dh) (batch dims broadcast);
        key_mask (B, Nk) True = may be attended to. -> (B, Nq, D)[, weights (B, h, Nq, Nk)]."""
        B = max(q.shape[0], k.shape[0])
        q, k, v = (t.expand(B, -1, -1, -1) if t.shape[0] != B else t for t in (q, k, v))
        amask = None if key_mask is None else key_mask[:, None, None, :].expand(B, -1, -1, -1)
        w = None
        if return_weights:
            logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            if amask is not None:
                logits = logits.masked_fill(~amask, float("-inf"))
            w = logits.softmax(-1)
            out = torch.matmul(w, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=amask,
                                                 dropout_p=self.dropout if self.training else 0.0)
        _, h, Nq, dh = out.shape
        out = self.o(out.transpose(1, 2).reshape(B, Nq, h * dh))
        return (out, w) if return_weights else out


class RelationModel(nn.Module):
    """Token projection -> cross-attention (both ways) -> similarity matrix -> score.

    forward(sketch_tokens (B, Ns, C), photo_tokens (B, Np, C), sketch_ink (B, Ns) bool)
    -> (B,) match logits (higher = same class); a single sketch (B=1) is broadcast
    over B photos. `alpha` (a buffer) is the weight of the relation score when mixed
    with the embedding score, chosen on held-out training classes by `train_relation`.
    """

    kind = "relation"

    def __init__(self, token_dim: int, dim: int = 64, heads: int = 4, grid: Sequence[int] = (14, 14),
                 n_quantiles: int = 8, hidden: int = 64, pos_embed: bool = True, dropout: float = 0.1) -> None:
        super().__init__()
        self.config = {"token_dim": int(token_dim), "dim": int(dim), "heads": int(heads),
                       "grid": [int(grid[0]), int(grid[1])], "n_quantiles": int(n_quantiles),
                       "hidden": int(hidden), "pos_embed": bool(pos_embed), "dropout": float(dropout)}
        n_tokens = int(grid[0]) * int(grid[1])
        self.grid = (int(grid[0]), int(grid[1]))
        # One projection for both modalities (a shared token space), told apart by a
        # learned modality embedding (0 = sketch, 1 = photo).
        self.norm_in = nn.LayerNorm(token_dim)
        self.proj = nn.Linear(token_dim, dim)
        self.modality = nn.Parameter(torch.zeros(2, dim))
        self.pos = nn.Parameter(torch.zeros(n_tokens, dim)) if pos_embed else None
        # One cross-attention layer (4 heads), used in both directions.
        self.cross = CrossAttention(dim, heads, dropout)
        self.norm_s = nn.LayerNorm(dim)
        self.norm_p = nn.LayerNorm(dim)
        self.register_buffer("quantiles", torch.linspace(0.0, 1.0, n_quantiles), persistent=False)
        n_feat = 2 * n_quantiles + 2
        self.head = nn.Sequential(nn.Linear(n_feat, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.register_buffer("alpha", torch.tensor(0.5))
        with torch.no_grad():
            if self.pos is not None:
                self.pos.normal_(0, 0.02)
            self.modality.normal_(0, 0.02)

    # ---- pieces (also used by explanations)
    def project(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, N, C) backbone tokens -> (B, N, d) in the shared token space."""
        x = self.proj(self.norm_in(tokens.float()))
        x = x + self.modality[0 if modality == "sketch" else 1]
        if self.pos is not None:
            if x.shape[1] != self.pos.shape[0]:
                raise ValueError(f"{x.shape[1]} tokens, the relation model was trained on a "
                                 f"{self.grid[0]}x{self.grid[1]} grid")
            x = x + self.pos
        return x

    def cross_attend(self, s: torch.Tensor, p: torch.Tensor, s_ink: Optional[torch.Tensor] = None,
                     return_weights: bool = False):
        """Textbook cross-attention, each side in turn:

        sketch' = LN(sketch + Attn(Q=sketch, K=photo,  V=photo))
        photo'  = LN(photo  + Attn(Q=photo,  K=sketch, V=sketch))   (blank sketch cells masked out as keys)

        Queries come from one modality, keys AND values from the other. (The released
        ZSE-SBIR code computes the attention weights against the other modality but
        multiplies them with the query side's own values, which is not cross-attention:
        no information from the other image reaches the output. We don't do that.)
        s (1 or B, Ns, d) is broadcast against p (B, Np, d).
        """
        kmask = None
        if s_ink is not None:
            ok = s_ink.bool()
            kmask = ok | ~ok.any(1, keepdim=True)  # a sketch with no inked cell keeps all
        qs, ks, vs = self.cross.qkv(s)
        qp, kp, vp = self.cross.qkv(p)
        r_sp = self.cross.attend(qs, kp, vp, return_weights=return_weights)
        r_ps = self.cross.attend(qp, ks, vs, key_mask=kmask, return_weights=return_weights)
        s_att, w_sp = r_sp if return_weights else (r_sp, None)
        p_att, w_ps = r_ps if return_weights else (r_ps, None)
        s2 = self.norm_s(s + s_att)
        p2 = self.norm_p(p + p_att)
        if return_weights:
            return s2, p2, w_sp, w_ps
        return s2, p2

    def embed_pair(self, sketch_tokens: torch.Tensor, photo_tokens: torch.Tensor,
                   sketch_ink: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected + cross-attended, L2-normalised tokens: ((B, Ns, d), (B, Np, d))."""
        if sketch_ink is not None and sketch_ink.dim() == 3:
            sketch_ink = sketch_ink.flatten(1)
        s = self.project(sketch_tokens, "sketch")
        p = self.project(photo_tokens, "photo")
        s2, p2 = self.cross_attend(s, p, sketch_ink)
        if s2.shape[0] != p2.shape[0]:
            s2 = s2.expand(p2.shape[0], -1, -1)
        return F.normalize(s2, dim=-1), F.normalize(p2, dim=-1)

    def similarity(self, sketch_tokens: torch.Tensor, photo_tokens: torch.Tensor,
                   sketch_ink: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, Ns, Np) cosine similarities after cross-attention."""
        s, p = self.embed_pair(sketch_tokens, photo_tokens, sketch_ink)
        return s @ p.transpose(1, 2)

    def score_similarity(self, sim: torch.Tensor, sketch_ink: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Relation network: (B, Ns, Np) similarity matrix (+ ink mask) -> (B,) logits.

        Per inked sketch cell its best photo cell, per photo cell its best inked
        sketch cell; each list pooled to fixed quantiles (+ mean), then an MLP.
        """
        B, Ns, Np = sim.shape
        ink = torch.ones(B, Ns, dtype=torch.bool, device=sim.device) if sketch_ink is None else sketch_ink.bool()
        if ink.shape[0] == 1 and B > 1:
            ink = ink.expand(B, -1)
        ink = ink | ~ink.any(1, keepdim=True)
        row = sim.amax(2)  # (B, Ns): each sketch cell's best photo cell
        col = sim.masked_fill(~ink[:, :, None], float("-inf")).amax(1)  # (B, Np): best inked sketch cell
        inkf = ink.to(sim.dtype)
        row_mean = (row * inkf).sum(1) / inkf.sum(1)
        feats = torch.cat([
            masked_quantiles(row, ink, self.quantiles),
            masked_quantiles(col, torch.ones_like(col, dtype=torch.bool), self.quantiles),
            row_mean[:, None], col.mean(1, keepdim=True),
        ], dim=1)
        return self.head(feats).squeeze(1)

    def forward(self, sketch_tokens: torch.Tensor, photo_tokens: torch.Tensor,
                sketch_ink: Optional[torch.Tensor] = None) -> torch.Tensor:
        if sketch_ink is not None and sketch_ink.dim() == 3:  # (B, h, w)
            sketch_ink = sketch_ink.flatten(1)
        if sketch_tokens.shape[0] == 1 and sketch_ink is not None and sketch_ink[0].any():
            # One sketch against many photos: its blank cells are neither keys nor
            # scored, so dropping them up front gives the same result, cheaper.
            s = self.project(sketch_tokens, "sketch")[:, sketch_ink[0].bool()]
            s2, p2 = self.cross_attend(s, self.project(photo_tokens, "photo"), None)
            sim = F.normalize(s2, dim=-1) @ F.normalize(p2, dim=-1).transpose(1, 2)
            return self.score_similarity(sim, None)
        if sketch_ink is not None and sketch_ink.shape[0] == sketch_tokens.shape[0] > 1:
            # A batch of sketches: keep only each one's inked cells (padded to the
            # largest count, padding masked) - same result as masking, ~3x cheaper.
            ink = sketch_ink.bool()
            ink = ink | ~ink.any(1, keepdim=True)
            n = ink.sum(1)
            order = torch.argsort((~ink).to(torch.int8), dim=1, stable=True)[:, : int(n.max())]
            valid = torch.arange(order.shape[1])[None] < n[:, None]
            s = self.project(sketch_tokens, "sketch")
            s = torch.gather(s, 1, order[:, :, None].expand(-1, -1, s.shape[2]))
            s2, p2 = self.cross_attend(s, self.project(photo_tokens, "photo"), valid)
            sim = F.normalize(s2, dim=-1) @ F.normalize(p2, dim=-1).transpose(1, 2)
            return self.score_similarity(sim, valid)
        sim = self.similarity(sketch_tokens, photo_tokens, sketch_ink)
        if sketch_ink is not None and sketch_ink.shape[0] == 1 and sim.shape[0] > 1:
            sketch_ink = sketch_ink.expand(sim.shape[0], -1)
        return self.score_similarity(sim, sketch_ink)

    @torch.inference_mode()
    def score_candidates(self, query_tokens: ArrayLike, query_ink: Optional[ArrayLike],
                         cand_tokens: ArrayLike, batch_size: int = 64) -> np.ndarray:
        """One sketch (N, C) against K photos (K, N, C) -> (K,) logits (eval mode)."""
        was = self.training
        self.eval()
        q = _as_tensor(query_tokens)
        if q.dim() == 2:
            q = q[None]
        ink = None if query_ink is None else _as_tensor(query_ink).bool().reshape(1, -1)
        c = _as_tensor(cand_tokens)
        out = []
        for i in range(0, c.shape[0], batch_size):
            out.append(self(q, c[i:i + batch_size], ink))
        self.train(was)
        return torch.cat(out).float().numpy() if out else np.zeros(0, np.float32)


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# ----------------------------------------------------------------------------- save / load
def save_relation(path: Union[str, Path], model: RelationModel, meta: dict[str, Any]) -> Path:
    """Atomically write the model's tensors with JSON metadata (config, alpha, ...)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "format_version": FORMAT_VERSION, "kind": RelationModel.kind, "config": model.config,
            "alpha": float(model.alpha)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_relation_metadata(path: Union[str, Path]) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a relation model (no '{METADATA_KEY}' metadata)")
    return json.loads(raw)


def load_relation(path: Union[str, Path, None] = None) -> RelationModel:
    """The trained relation model (default `checkpoints/relation.safetensors`), in eval mode.

    Raises FileNotFoundError (with how to get one) when the file is missing, and
    ValueError when it is not a relation checkpoint. Metadata is on `model.meta`.
    """
    from safetensors import safe_open

    path = Path(path) if path is not None else DEFAULT_RELATION
    if not path.is_file():
        raise FileNotFoundError(
            f"relation model not found: {path}. Train one with "
            "`python -m sbir_core train-relation --data ../shared/data` "
            "(or pass --checkpoint / path=... to an existing relation.safetensors)."
        )
    meta = read_relation_metadata(path)
    if meta.get("kind") != RelationModel.kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r}, not a relation model")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has relation format {meta.get('format_version')}, this code reads {FORMAT_VERSION}")
    model = RelationModel(**meta["config"])
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict(state, strict=True)
    model.meta = meta
    return model.eval()


# ----------------------------------------------------------------------------- re-ranking
def mix_scores(base: np.ndarray, rel: np.ndarray, alpha: float) -> np.ndarray:
    """Mix K embedding scores with K relation logits; result stays in [min(base), max(base)].

    Both are standardised over the K candidates, mixed as (1-alpha)*base + alpha*rel
    and mapped back onto the range of the base scores, so re-ranked candidates stay
    above everything outside the top K and alpha=0 keeps the base order.
    """
    base = np.asarray(base, dtype=np.float64)
    rel = np.asarray(rel, dtype=np.float64)
    if base.size <= 1 or alpha <= 0:
        return base.astype(np.float32)

    def z(v):
        s = v.std()
        return (v - v.mean()) / s if s > 1e-12 else np.zeros_like(v)

    mixed = (1 - alpha) * z(base) + alpha * z(rel)
    lo, hi = base.min(), base.max()
    span = mixed.max() - mixed.min()
    if span <= 1e-12 or hi <= lo:
        return base.astype(np.float32)
    return (lo + (mixed - mixed.min()) / span * (hi - lo)).astype(np.float32)


def rerank(model: RelationModel, query_tokens: ArrayLike, query_ink: Optional[ArrayLike],
           cand_tokens: ArrayLike, base_scores: ArrayLike, alpha: Optional[float] = None) -> np.ndarray:
    """New scores for K candidates (the top K of a search, K ~ 50).

    query_tokens (N, C), query_ink (N,) or (h, w) bool, cand_tokens (K, N, C),
    base_scores (K,) embedding scores; alpha None = the model's trained alpha.
    Returns (K,) float32 scores within [min, max] of base_scores.
    """
    base = np.asarray(base_scores, dtype=np.float32).reshape(-1)
    if len(base) != len(cand_tokens):
        raise ValueError(f"{len(base)} base scores for {len(cand_tokens)} candidates")
    a = float(model.alpha) if alpha is None else float(alpha)
    if len(base) == 0 or a <= 0:
        return base.copy()
    rel = model.score_candidates(query_tokens, query_ink, cand_tokens)
    return mix_scores(base, rel, a)


def rerank_gallery(model: RelationModel, query_tokens: ArrayLike, query_ink: Optional[ArrayLike],
                   gallery_tokens: Union[ArrayLike, Callable[[np.ndarray], ArrayLike]],
                   scores: ArrayLike, k: int = DEFAULT_TOPK, alpha: Optional[float] = None) -> np.ndarray:
    """Whole-gallery scores (G,) -> new (G,) scores where only the top k changed.

    gallery_tokens: (G, N, C) array/memmap, or a function indices -> (k, N, C)
    tokens, so a gallery can load just the candidates' tokens from disk.
    """
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    k = int(min(k, len(s)))
    out = s.copy()
    if k <= 1:
        return out
    top = np.argsort(-s, kind="stable")[:k]
    toks = gallery_tokens(top) if callable(gallery_tokens) else np.asarray(gallery_tokens[np.sort(top)])[
        np.argsort(np.argsort(top))]
    out[top] = rerank(model, query_tokens, query_ink, toks, s[top], alpha)
    return out


def evaluate_rerank(model: Optional[RelationModel], base_scores: np.ndarray, query_tokens: np.ndarray,
                    query_ink: np.ndarray, gallery_tokens: np.ndarray, query_labels: Sequence,
                    gallery_labels: Sequence, k: int = DEFAULT_TOPK, alphas: Sequence[float] = (),
                    progress: bool = False) -> dict[str, Any]:
    """mAP@all (and P@100, mAP@200) of `base_scores` (Q, G) with and without re-ranking the top k.

    Relation logits for each query's top k are computed once and mixed for every
    alpha in `alphas` (plus the model's own alpha). Works for any embedding scores
    (raw backbone cosine, a trained checkpoint's), so it can be re-run as they change.
    """
    from sbir_core.metrics import per_query_metrics

    base = np.asarray(base_scores, dtype=np.float32)
    Q, G = base.shape
    k = int(min(k, G))

    def summary(scores):
        m = per_query_metrics(scores, query_labels, gallery_labels, map_ks=(200,), precision_ks=(100,))
        return {"mAP@all": float(m["AP@all"].mean()), "mAP@200": float(m["AP@200"].mean()),
                "P@100": float(m["P@100"].mean())}

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
def _rekeyed(items: Sequence, old: str, new: str) -> list:
    class _K:
        __slots__ = ("key",)

        def __init__(self, key: str) -> None:
            self.key = key

    return [_K(new + it.key[len(old):] if it.key.startswith(old) else it.key) for it in items]


def cached_features(encoder, items: Sequence, view: str, data_root: Union[str, Path, None] = None,
                    tokens: bool = True, cache_dir: Union[str, Path, None] = None,
                    allow_extract: bool = True) -> dict[str, np.ndarray]:
    """`features.extract_features`, but also finding a cache written for the same files
    listed through another spelling of the data root (absolute vs relative path).

    Item keys are file paths as listed, and the cache is keyed by them: a cache built
    from `../shared/data` is missed by `/work/shared/data` although the files (and
    their order) are the same. Only the cache file name is recomputed here.
    """
    from sbir_core.features import DEFAULT_CACHE, cache_path, extract_features

    cdir = Path(cache_dir or DEFAULT_CACHE)
    name = encoder.backbone.name
    if cache_path(cdir, name, view, items, 0, tokens).is_file() or data_root is None:
        return extract_features(encoder, items, view, tokens=tokens, cache_dir=cdir)
    given = str(data_root)
    absolute = Path(given).resolve()
    spellings = {str(absolute), os.path.relpath(absolute, Path.cwd()), os.path.relpath(absolute, ROOT)}
    for alt in sorted(spellings - {given}):
        p = cache_path(cdir, name, view, _rekeyed(items, given, alt), 0, tokens)
        if p.is_file():
            log.info("using cache %s (items listed under %s)", p.name, alt)
            with np.load(p) as z:
                return {k: z[k] for k in z.files}
    if not allow_extract:
        raise FileNotFoundError(f"no cached {view} features for these {len(items)} items in {cdir}")
    return extract_features(encoder, items, view, tokens=tokens, cache_dir=cdir)


def sketch_ink_cells(items: Sequence, grid: Sequence[int], size: int = 224,
                     cache_dir: Union[str, Path, None] = None) -> np.ndarray:
    """(n, h*w) bool ink cells of sketch items (rendered by preprocess_sketch), cached."""
    from sbir_core.features import DEFAULT_CACHE
    from sbir_core.preprocess import preprocess_sketch

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


def _map_all(scores: np.ndarray, ql: Sequence, gl: Sequence) -> float:
    from sbir_core.metrics import map_all

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
) -> tuple[RelationModel, dict[str, Any]]:
    """Train the relation model on cached token grids of the training items.

    Pairs are class-level: a QuickDraw sketch and a Caltech photo of the same class
    are a positive, of different classes a negative (half of them hard negatives:
    photos the embedding ranks high for that sketch). ~15% of the classes both sides
    share (and of the photo-only classes, as distractors) are held out: after each
    epoch the held-out sketches re-rank their top-k embedding candidates among the
    held-out photos; the best epoch and the mixing alpha are chosen there. Benchmark
    classes never take part (training_items excludes them). `max_photos_per_class`
    must match the selection the feature cache was built with (80 by default).
    """
    from sbir_core.data import fingerprint, training_items
    from sbir_core.encoders import DEFAULT_ENCODER, create_encoder

    t_start = time.time()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    enc = create_encoder(encoder_name or DEFAULT_ENCODER, checkpoint="none")
    tr = training_items(data_root, max_photos_per_class=max_photos_per_class)
    P = [i for i in tr if i.modality == "photo"]
    S = [i for i in tr if i.modality == "sketch"]
    fP = cached_features(enc, P, "photo", data_root, cache_dir=cache_dir, allow_extract=allow_extract)
    fS = cached_features(enc, S, "sketch", data_root, cache_dir=cache_dir, allow_extract=allow_extract)
    grid = tuple(int(g) for g in fS["grid"])
    p_ok, s_ok = fP["ok"], fS["ok"]
    p_lab = np.array([i.label for i in P])
    s_lab = np.array([i.label for i in S])
    shared = sorted(set(p_lab[p_ok]) & set(s_lab[s_ok]))
    photo_only = sorted(set(p_lab[p_ok]) - set(s_lab))
    if len(shared) < 4:
        raise ValueError(f"only {len(shared)} classes have both photos and sketches; need at least 4")
    train_cls, val_cls = _split_classes(shared, val_fraction, rng, min_n=2)
    train_po, val_po = _split_classes(photo_only, val_fraction, rng)
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

    # Embedding scores (raw backbone cosine): hard negatives and the val base ranking.
    base_tr = _cosine(fS["raw"][s_tr], fP["raw"][p_tr])
    base_va = _cosine(fS["raw"][s_va], fP["raw"][p_va])
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
        "base_embedding": "raw backbone cosine",
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
                     embedding: str = "raw", k: int = DEFAULT_TOPK, alphas: Sequence[float] = (0.25, 0.5, 0.75),
                     cache_dir: Union[str, Path, None] = None, progress: bool = False) -> dict[str, Any]:
    """mAP on a benchmark split with and without relation re-ranking of the top k.

    embedding: "raw" (backbone's pooled feature, cosine) or a trained checkpoint path
    (its heads applied to the cached pooled features).
    """
    from sbir_core.data import benchmark
    from sbir_core.encoders import create_encoder

    model = load_relation(relation)
    enc = create_encoder(model.meta.get("encoder"), checkpoint="none")
    q, g = benchmark(data_root, split)
    fq = cached_features(enc, q, "sketch", data_root, cache_dir=cache_dir)
    fg = cached_features(enc, g, "photo", data_root, cache_dir=cache_dir)
    if embedding == "raw":
        base = _cosine(fq["raw"], fg["raw"])
    else:
        ce = create_encoder(checkpoint=embedding)
        with torch.inference_mode():
            eq = ce.head(torch.from_numpy(fq["pooled"].astype(np.float32)), "sketch").numpy()
            eg = ce.head(torch.from_numpy(fg["pooled"].astype(np.float32)), "photo").numpy()
        base = _cosine(eq, eg)
    ink = sketch_ink_cells(q, tuple(int(x) for x in fq["grid"]), enc.image_size, cache_dir)
    res = evaluate_rerank(model, base, fq["tokens"], ink, fg["tokens"], [i.label for i in q],
                          [i.label for i in g], k=k, alphas=alphas, progress=progress)
    res.update({"split": split, "embedding": embedding, "relation": str(relation or DEFAULT_RELATION)})
    return res
