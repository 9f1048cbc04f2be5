"""Checkpoints: the trained heads as safetensors, with their metadata in the header.

A checkpoint holds the heads and, when the backbone was fine-tuned, the backbone's
weights too (keys `backbone.*`, stored as fp16: the embeddings they give match fp32
to within 1e-3). Safetensors load without executing pickled code.
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


BACKBONE_PREFIX = "backbone."


def save_checkpoint(path: Union[str, Path], head: torch.nn.Module, meta: dict[str, Any],
                    backbone: Optional[torch.nn.Module] = None) -> Path:
    """Atomically write `head`, optionally a fine-tuned `backbone` (fp16), and `meta`
    (JSON-able; must name 'encoder')."""
    if "encoder" not in meta:
        raise InputError("checkpoint metadata must name the backbone ('encoder')")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "format_version": FORMAT_VERSION, "head_type": getattr(head, "kind", "sbir_head"),
            "head_config": head.config}
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    if backbone is not None:
        for k, v in backbone.state_dict().items():
            v = v.detach().cpu()
            tensors[BACKBONE_PREFIX + k] = (v.half() if v.is_floating_point() else v).contiguous()
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"sbir": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_metadata(path: Union[str, Path]) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("sbir")
    if raw is None:
        raise InputError(f"{path} is not an sbir_core checkpoint (no 'sbir' metadata)")
    return json.loads(raw)


def load_checkpoint(path: Union[str, Path]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """-> (head in eval mode, metadata). Strict: every tensor must match. A fine-tuned
    backbone's weights come back as float32 in `meta["backbone_state"]`."""
    path = Path(path)
    try:
        meta = read_metadata(path)
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, json.JSONDecodeError, Exception) as exc:  # safetensors raises its own types
        if isinstance(exc, ValueError) and "sbir_core" in str(exc):
            raise
        raise InputError(f"cannot read checkpoint {path}: {exc}") from exc
    bb = {k[len(BACKBONE_PREFIX):]: v.float() if v.is_floating_point() else v
          for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
    if bb:
        meta["backbone_state"] = bb
    head = build_head(meta.get("head_type", "sbir_head"), meta["head_config"])
    head.load_state_dict(state, strict=True)
    return head.eval(), meta
