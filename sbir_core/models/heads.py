"""The trained part of the model: small heads on top of the frozen backbone.

MA-SBIR's decomposition: every embedding is z = s + m, a modality-free semantic
part s plus a learned encoding m of its modality (photo, sketch, text). Retrieval
uses s. ZSCMR's decoders map one image modality's embedding to the other's.

The heads see the backbone's pooled multi-level features after per-modality
standardisation (mean/std measured on training data): removing each modality's
mean is the cheapest fix for the sketch/photo gap.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

IMAGE_MODALITIES = ("photo", "sketch")
MODALITY_INDEX = {"photo": 0, "sketch": 1, "text": 2}


def mlp(d_in: int, d_hidden: int, d_out: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out)
    )


class SBIRHead(nn.Module):
    """Semantic encoders for images and text, modality encodings, cross-modal decoders."""

    def __init__(
        self,
        in_dim: int,
        text_dim: int,
        embed_dim: int = 256,
        hidden: int = 1024,
        dropout: float = 0.1,
        text_source: str = "minilm",
        photo_edge_weight: float = 0.0,
        **_: Any,
    ) -> None:
        super().__init__()
        self.config = dict(
            in_dim=in_dim, text_dim=text_dim, embed_dim=embed_dim, hidden=hidden, dropout=dropout,
            text_source=text_source, photo_edge_weight=photo_edge_weight,
        )
        self.embed_dim = embed_dim
        self.text_source = text_source
        # Fraction of a photo's embedding taken from its edge map (0 = photo only).
        self.photo_edge_weight = photo_edge_weight
        # Per-modality feature standardisation, measured on training data.
        self.register_buffer("feat_mean", torch.zeros(2, in_dim))
        self.register_buffer("feat_std", torch.ones(2, in_dim))
        self.image_encoder = mlp(in_dim, hidden, embed_dim, dropout)
        self.text_encoder = mlp(text_dim, hidden // 2, embed_dim, dropout)
        self.modality = nn.Parameter(torch.zeros(3, embed_dim))  # m_photo, m_sketch, m_text
        # ZSCMR decoders between the image modalities' embeddings.
        self.photo_to_sketch = mlp(embed_dim, hidden // 2, embed_dim)
        self.sketch_to_photo = mlp(embed_dim, hidden // 2, embed_dim)

    def standardize(self, pooled: torch.Tensor, modality: str) -> torch.Tensor:
        i = MODALITY_INDEX[modality]
        return (pooled - self.feat_mean[i]) / self.feat_std[i]

    def semantic(self, pooled: torch.Tensor, modality: str) -> torch.Tensor:
        """s: the modality-free embedding of backbone features."""
        return self.image_encoder(self.standardize(pooled, modality))

    def forward(self, pooled: torch.Tensor, modality: str) -> torch.Tensor:
        """Retrieval embedding (s) of an image batch."""
        return self.semantic(pooled, modality)

    def with_modality(self, s: torch.Tensor, modality: str) -> torch.Tensor:
        """z = s + m."""
        return s + self.modality[MODALITY_INDEX[modality]]

    def embed_text(self, text_feats: torch.Tensor) -> torch.Tensor:
        """Retrieval embedding (s) of raw text features."""
        return self.text_encoder(text_feats)

    def decode(self, s: torch.Tensor, src: str) -> torch.Tensor:
        return self.photo_to_sketch(s) if src == "photo" else self.sketch_to_photo(s)


HEADS = {"sbir_head": SBIRHead}


def build_head(kind: str, config: dict) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"unknown head type {kind!r}; known: {sorted(HEADS)}")
    return HEADS[kind](**config)
