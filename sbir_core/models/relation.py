"""ZSE-SBIR relation re-ranking: an optional cross-attention + relation network that
re-scores a sketch search's first candidates (and the one module that holds it).

Optional: search, the map and explanations work without it. It needs
- a relation checkpoint (`checkpoints/relation.safetensors`, or one trained with
  `python -m sbir_core train-relation`, `sbir_core.training.relation_training`) made for the
  encoder in use: the same token grid and embedding (`relation_for` returns None otherwise);
- a photo gallery built with token grids (`index` without `--no-tokens`), since candidates
  are re-scored from their stored tokens (`gallery.query.search_reranked`);
- a sketch query (its token grid and ink cells). The app offers it only when all three hold.

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
Training and benchmarking live in `sbir_core.training.relation_training`.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from sbir_core.errors import InputError
from sbir_core.models.checkpoint import read_metadata, read_tensors, write_tensors
from sbir_core.paths import checkpoint_path  # noqa: E402

log = logging.getLogger(__name__)

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
    from sbir_core.data.preprocess import INK_THRESHOLD, cell_counts, ink_mask

    counts, area = cell_counts(ink_mask(image) > INK_THRESHOLD, grid)
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
    meta = {**meta, "format_version": FORMAT_VERSION, "kind": RelationModel.kind, "config": model.config,
            "alpha": float(model.alpha)}
    return write_tensors(path, dict(model.state_dict()), meta, key=METADATA_KEY)


def read_relation_metadata(path: Union[str, Path]) -> dict[str, Any]:
    return read_metadata(path, key=METADATA_KEY)


def load_relation(path: Union[str, Path, None] = None) -> RelationModel:
    """The trained relation model (default `checkpoints/relation.safetensors`), in eval mode.

    Raises FileNotFoundError (with how to get one) when the file is missing, and
    ValueError when it is not a relation checkpoint. Metadata is on `model.meta`.
    """
    path = Path(path) if path is not None else DEFAULT_RELATION
    if not path.is_file():
        raise FileNotFoundError(
            f"relation model not found: {path}. Train one with "
            "`python -m sbir_core train-relation` "
            "(or pass --checkpoint / path=... to an existing relation.safetensors)."
        )
    meta = read_relation_metadata(path)
    if meta.get("kind") != RelationModel.kind:
        raise InputError(f"{path} holds a {meta.get('kind')!r}, not a relation model")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path} has relation format {meta.get('format_version')}, this code reads {FORMAT_VERSION}")
    state, _ = read_tensors(path, key=METADATA_KEY)
    model = RelationModel(**meta["config"])
    model.load_state_dict(state, strict=True)
    model.meta = meta
    return model.eval()


def encoder_grid(encoder: Any) -> tuple[int, int]:
    """The token grid the encoder makes at its input size (one forward pass of zeros)."""
    with torch.inference_mode():
        x = torch.zeros(1, 3, encoder.image_size, encoder.image_size)
        return tuple(encoder.backbone_features(x).grid)


def relation_for(encoder: Any, path: Union[str, Path, None] = None) -> Optional[RelationModel]:
    """The relation model to use with `encoder`: the one at `path` (default: the shipped
    one, None when it is missing), or None when it reads another token grid than the
    encoder makes (the shipped 160 px encoder makes 10x10, the relation model reads
    14x14): explanations then use the backbone's tokens alone. A named `path` that
    cannot be used raises InputError instead."""
    p = Path(path) if path is not None else DEFAULT_RELATION
    if path is None and not p.is_file():
        return None
    model = load_relation(p)
    grid, mine = tuple(model.grid), encoder_grid(encoder)
    # Models from `train-relation --checkpoint` name the encoder whose tokens they read; the
    # same grid from another encoder (a raw backbone at 160 px) holds other features.
    trained_for, me = str(model.meta.get("base_embedding", "")), getattr(encoder, "encoder_id", "")
    if grid != mine:
        problem = f"reads {grid[0]}x{grid[1]} token grids; this encoder makes {mine[0]}x{mine[1]}"
    elif "@" in trained_for and trained_for != me:
        problem = f"was trained on the tokens of {trained_for}; this encoder is {me}"
    else:
        return model
    if path is not None:
        raise InputError(f"{p} {problem}")
    log.info("the relation model %s: not used", problem)
    return None


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
