"""Checkpoints: trained models as safetensors, with their metadata (JSON) in the header.

The one checkpoint I/O of every model kind: `write_tensors` / `read_tensors` (atomic
write, metadata under a key that names the kind: "sbir" for the retrieval model,
"sbir_relation" for the relation network), used by `save_checkpoint`/`load_checkpoint`
here and by `models.relation`.

A checkpoint holds the heads and, when the backbone was fine-tuned, the backbone's
weights too (keys `backbone.*`, without the ImageNet classifier, which retrieval never
runs). Weights are stored as fp16 (`as_stored`), biases and normalisation statistics as
fp32: the embeddings match fp32 to within 1e-3, and `finetune` checks that validation
does not move (`Finetuner.fp16_check`). Safetensors load without executing pickled code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sbir_core.errors import InputError
from sbir_core.models.heads import build_head

FORMAT_VERSION = 1
METADATA_KEY = "sbir"


BACKBONE_PREFIX = "backbone."
UNUSED_BACKBONE_KEYS = ("classifier.",)  # the ImageNet classifier: features never reach it
# The training classes' class-text prototypes, for seen-class calibration (gallery.calibration).
PROTOTYPES_KEY = "seen_prototypes"


def write_tensors(path: Union[str, Path], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  key: str = METADATA_KEY) -> Path:
    """Atomically write `tensors` with `meta` (JSON-able) under the header key `key`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={key: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_metadata(path: Union[str, Path], key: str = METADATA_KEY) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(key)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own types for files that are not safetensors
        raise InputError(f"cannot read checkpoint {path}: {exc}") from exc
    if raw is None:
        raise InputError(f"{path} is not an sbir_core {'checkpoint' if key == METADATA_KEY else key} file "
                         f"(no '{key}' metadata)")
    return json.loads(raw)


def read_tensors(path: Union[str, Path], key: str = METADATA_KEY) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (tensors, metadata) of a file written by `write_tensors`."""
    meta = read_metadata(path, key)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc}") from exc


def as_stored(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` as a checkpoint stores it: weight tensors (2-D and up) in fp16, the rest as is."""
    return {k: v.detach().half() if v.is_floating_point() and v.dim() >= 2 else v.detach() for k, v in state.items()}


def load_backbone_state(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's backbone weights into `net` (built with its ImageNet weights): every
    weight must fit, and only the unused classifier may be missing (it keeps ImageNet's)."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(UNUSED_BACKBONE_KEYS)] + list(unexpected)
    if bad:
        raise InputError(f"the checkpoint's backbone weights do not fit this backbone: {bad[:5]}")


def save_checkpoint(path: Union[str, Path], head: torch.nn.Module, meta: dict[str, Any],
                    backbone: Optional[torch.nn.Module] = None,
                    prototypes: Optional[torch.Tensor] = None) -> Path:
    """Atomically write `head`, optionally a fine-tuned `backbone` (fp16) and the training
    classes' prototypes (fp16), and `meta` (JSON-able; must name 'encoder')."""
    if "encoder" not in meta:
        raise InputError("checkpoint metadata must name the backbone ('encoder')")
    meta = {**meta, "format_version": FORMAT_VERSION, "head_type": getattr(head, "kind", "sbir_head"),
            "head_config": head.config}
    tensors = as_stored(head.state_dict())
    if backbone is not None:
        kept = {k: v for k, v in backbone.state_dict().items() if not k.startswith(UNUSED_BACKBONE_KEYS)}
        tensors.update({BACKBONE_PREFIX + k: v for k, v in as_stored(kept).items()})
    if prototypes is not None:
        tensors[PROTOTYPES_KEY] = prototypes.detach().half()
    return write_tensors(path, tensors, meta)


def load_checkpoint(path: Union[str, Path]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """-> (head in eval mode, metadata). Strict: every tensor must match. A fine-tuned
    backbone's weights come back as float32 in `meta["backbone_state"]`, prototypes in
    `meta["seen_prototypes"]`."""
    state, meta = read_tensors(path)
    if PROTOTYPES_KEY in state:
        meta[PROTOTYPES_KEY] = state.pop(PROTOTYPES_KEY).float()
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    bb = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
    if bb:
        meta["backbone_state"] = bb
    head = build_head(meta.get("head_type", "sbir_head"), meta["head_config"])
    head.load_state_dict(state, strict=True)
    return head.eval(), meta
