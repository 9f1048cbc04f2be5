"""`RetrievalSettings`: how a checkpoint searches, as one typed, validated value.

A checkpoint stores them in its metadata under "retrieval" (fine-tuning chooses them on
held-out classes, `training.finetune`); `SBIREncoder.retrieval` is the one place that
reads them. The same dict also keeps what was measured while choosing them (the
validation table, notes): that is data, kept as written and never read by search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from sbir_core.errors import InputError

# Keys of meta["retrieval"] that record how the settings were chosen (not settings).
RECORD_KEYS = frozenset({"validation", "note", "confidence", "val_mAP_by_diffusion_k"})


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SeenCalibrationSetting:
    """Seen-class calibration (`gallery.calibration`): softmax temperature and strength."""

    tau: float
    beta: float

    def __post_init__(self) -> None:
        if not (_number(self.tau) and _number(self.beta) and self.tau > 0 and self.beta >= 0):
            raise InputError(f"seen_calibration needs tau > 0 and beta >= 0, got tau={self.tau!r}, beta={self.beta!r}")

    def as_dict(self) -> dict[str, float]:
        return {"tau": float(self.tau), "beta": float(self.beta)}


@dataclass(frozen=True)
class RetrievalSettings:
    """How an encoder's searches run. The defaults are plain search (what a raw backbone
    or a checkpoint saved before the settings existed does)."""

    edge_weight: float = 0.0  # share of a photo's edge-map embedding mixed into its own
    diffusion_k: int = 0      # gallery diffusion neighbours (0 = off)
    flip_sketch: bool = False  # average each sketch with its mirror image
    seen_calibration: Optional[SeenCalibrationSetting] = None  # None = off

    def __post_init__(self) -> None:
        if not (_number(self.edge_weight) and 0.0 <= self.edge_weight < 1.0):
            raise InputError(f"retrieval edge_weight must be in [0, 1), got {self.edge_weight!r}")
        if isinstance(self.diffusion_k, bool) or not isinstance(self.diffusion_k, int) or self.diffusion_k < 0:
            raise InputError(f"retrieval diffusion_k must be a whole number >= 0, got {self.diffusion_k!r}")
        if not isinstance(self.flip_sketch, bool):
            raise InputError(f"retrieval flip_sketch must be true or false, got {self.flip_sketch!r}")
        if self.seen_calibration is not None and not isinstance(self.seen_calibration, SeenCalibrationSetting):
            raise InputError("retrieval seen_calibration must be a SeenCalibrationSetting or None")

    @classmethod
    def from_meta(cls, stored: Optional[Mapping[str, Any]]) -> "RetrievalSettings":
        """Parse a checkpoint's meta["retrieval"] (None or {} = plain search). Unknown keys
        and bad values raise InputError naming them."""
        if stored is None:
            return cls()
        if not isinstance(stored, Mapping):
            raise InputError(f"checkpoint retrieval settings must be a JSON object, got {type(stored).__name__}")
        fields = {"edge_weight", "diffusion_k", "flip_sketch", "seen_calibration"}
        unknown = sorted(set(stored) - fields - RECORD_KEYS)
        if unknown:
            raise InputError(f"unknown checkpoint retrieval setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(fields))}")
        cal = stored.get("seen_calibration")
        if cal is not None:
            if not isinstance(cal, Mapping) or set(cal) != {"tau", "beta"}:
                raise InputError(f"retrieval seen_calibration must be {{'tau': ..., 'beta': ...}} or null, got {cal!r}")
            # beta 0 is calibration off: one spelling for it
            cal = SeenCalibrationSetting(cal["tau"], cal["beta"]) if cal["beta"] else None
        return cls(edge_weight=stored.get("edge_weight", 0.0), diffusion_k=stored.get("diffusion_k", 0),
                   flip_sketch=stored.get("flip_sketch", False), seen_calibration=cal)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form stored in a checkpoint's meta["retrieval"]."""
        return {"edge_weight": float(self.edge_weight), "diffusion_k": int(self.diffusion_k),
                "flip_sketch": bool(self.flip_sketch),
                "seen_calibration": self.seen_calibration.as_dict() if self.seen_calibration else None}

    def merged_into(self, stored: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        """`stored` (a meta["retrieval"]) with these settings, its records kept."""
        return {**{k: v for k, v in (stored or {}).items() if k in RECORD_KEYS}, **self.as_dict()}


PLAIN_SEARCH = RetrievalSettings()
