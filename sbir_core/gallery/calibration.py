"""Seen-class calibration: keep pictures of the training classes from crowding out new ones.

Every real gallery mixes classes the model was trained on with classes it never saw. A
model trained with class-text prototypes pulls every query a little towards the training
classes, so for a drawing of something new, pictures of training classes ("seen" pictures)
fill the first row (issue 8: the generalized setting fell to 0.13 mAP@all).

Calibrated stacking (Chao et al., ECCV 2016) subtracts a constant from seen-class scores in
zero-shot classification. Retrieval has no labels, so both sides are estimated with the
checkpoint's own class-text prototypes of its training classes:

    score(q, g) = cos(q, g) - beta * (1 - s(q)) * s(g),    s(x) = max_c softmax(x . t_c / tau)

A picture that clearly shows a training class (s(g) near 1) loses up to `beta`, but only as
far as the drawing does not itself look like a training class (1 - s(q)): a drawn cat keeps
its cats, a drawn giraffe stops finding them. With beta = 0 it is plain cosine search.
tau and beta are chosen on held-out training classes (`training.finetune.choose_retrieval`)
and stored in the checkpoint with the prototypes; galleries store them next to their
embeddings, so a gallery searches the same way wherever it is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

PROTOTYPES_FILE = "seen_prototypes.npy"


def describe(setting: Optional[dict]) -> str:
    """A calibration setting ({"tau", "beta"} or None) as the command line prints it."""
    return f"tau={setting['tau']:g} beta={setting['beta']:g}" if setting else "off"


@dataclass(frozen=True)
class SeenCalibration:
    prototypes: np.ndarray  # (C, D) L2-normalised class-text embeddings of the training classes
    tau: float
    beta: float

    def __post_init__(self) -> None:
        p = np.asarray(self.prototypes, dtype=np.float32)
        if p.ndim != 2 or len(p) < 2 or not np.isfinite(p).all() or not (np.linalg.norm(p, axis=1) > 0).all():
            raise ValueError(f"seen-class prototypes must be finite non-zero rows (classes >= 2, dim), got {p.shape}")
        if not (self.tau > 0 and self.beta >= 0):
            raise ValueError(f"seen-class calibration needs tau > 0 and beta >= 0, got {self.tau}, {self.beta}")
        object.__setattr__(self, "prototypes", p / np.linalg.norm(p, axis=1, keepdims=True))

    @classmethod
    def from_encoder(cls, encoder: Any) -> Optional["SeenCalibration"]:
        """The calibration the encoder's checkpoint prescribes, or None (off, or a checkpoint
        made before it existed)."""
        protos = getattr(encoder, "seen_prototypes", None)
        setting = encoder.retrieval.seen_calibration
        if protos is None or setting is None:
            return None
        return cls(np.asarray(protos, dtype=np.float32), float(setting.tau), float(setting.beta))

    @property
    def setting(self) -> dict:
        return {"tau": self.tau, "beta": self.beta}

    def seen_confidence(self, x: np.ndarray) -> np.ndarray:
        """(N, D) unit vectors -> (N,) max softmax probability over the training classes."""
        out = np.empty(len(x), np.float32)
        for s in range(0, len(x), 65_536):  # in chunks: (N, classes) logits of a big gallery would not fit
            logits = np.asarray(x[s:s + 65_536], dtype=np.float32) @ self.prototypes.T / self.tau
            logits -= logits.max(axis=1, keepdims=True)
            out[s:s + 65_536] = 1.0 / np.exp(logits).sum(axis=1)  # the max's own term is exp(0) = 1
        return out

    def query_weight(self, queries: np.ndarray) -> np.ndarray:
        """(Q, D) -> (Q,) how much each query discounts seen pictures: beta * (1 - s(q))."""
        return (self.beta * (1.0 - self.seen_confidence(queries))).astype(np.float32)

    def adjust(self, scores: np.ndarray, queries: np.ndarray, gallery_seen: np.ndarray) -> np.ndarray:
        """Calibrated (Q, N) scores from plain ones; `gallery_seen` is `seen_confidence` of
        the gallery's (raw) embeddings."""
        return scores - self.query_weight(queries)[:, None] * gallery_seen[None, :]
