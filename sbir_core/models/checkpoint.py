"""Checkpoints: trained models as safetensors, with their metadata (JSON) in the header.

The one checkpoint I/O of every model kind: `write_tensors` / `read_tensors` (atomic
write, metadata under a key that names the kind: "sbir" for the retrieval model,
"sbir_relation" for the relation network), used by `save_checkpoint`/`load_checkpoint`
here and by `models.relation`. A checkpoint may also be stored as shards under 10 MB with
a Hugging Face index (`split_checkpoint`; the shipped model is, for Spaces): every reader
here takes the file's name or the index and reads the shards as one file.

A checkpoint holds the heads and, when the backbone was fine-tuned, the backbone's
weights too (keys `backbone.*`, without the ImageNet classifier, which retrieval never
runs). Weights are stored as fp16 (`as_stored`), biases and normalisation statistics as
fp32: the embeddings match fp32 to within 1e-3, and `finetune` checks that validation
does not move (`Finetuner.fp16_check`). Safetensors load without executing pickled code.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from sbir_core.errors import InputError
from sbir_core.paths import INDEX_SUFFIX, shard_index, stored_checkpoint
from sbir_core.models.heads import build_head

FORMAT_VERSION = 1
METADATA_KEY = "sbir"
# Shards stay under the 10 MB a Hugging Face Space takes in plain git (headers add ~0.2 MB).
MAX_SHARD_BYTES = 9_000_000


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


def _header(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own types for files that are not safetensors
        raise InputError(f"cannot read checkpoint {path}: {exc}") from exc


def _shards(index: Path) -> dict[Path, list[str]]:
    """A shard index -> {shard file: its tensor names}, in shard order."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{index} is not a checkpoint shard index: {exc}") from exc
    if not files or any(Path(f).name != f for f in files):  # shards live beside their index
        raise InputError(f"{index} is not a checkpoint shard index (no shards, or shards outside its folder)")
    return {index.parent / f: sorted(k for k, v in weight_map.items() if v == f) for f in files}


def read_stored(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the header metadata of a checkpoint file or shard index, as stored.
    Each shard carries the whole checkpoint's header metadata; they must agree."""
    p = stored_checkpoint(path)
    if not p.name.endswith(INDEX_SUFFIX):
        header = _header(p)
        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, header
    tensors: dict[str, torch.Tensor] = {}
    header: Optional[dict[str, str]] = None
    for shard, names in _shards(p).items():
        h = _header(shard)
        if header is not None and h != header:
            raise InputError(f"the shards of {p} disagree (metadata of {shard.name}): re-split the checkpoint")
        header = h
        with safe_open(str(shard), framework="pt") as f:
            if set(f.keys()) != set(names):
                raise InputError(f"{shard.name} does not hold the tensors {p.name} lists: re-split the checkpoint")
            tensors.update({k: f.get_tensor(k) for k in names})
    return tensors, header or {}


def _meta(header: dict[str, str], path: Union[str, Path], key: str) -> dict[str, Any]:
    raw = header.get(key)
    if raw is None:
        raise InputError(f"{path} is not an sbir_core {'checkpoint' if key == METADATA_KEY else key} file "
                         f"(no '{key}' metadata)")
    return json.loads(raw)


def read_metadata(path: Union[str, Path], key: str = METADATA_KEY) -> dict[str, Any]:
    """The metadata of a checkpoint file or of a sharded one (named by its file name or index)."""
    p = stored_checkpoint(path)
    first = next(iter(_shards(p))) if p.name.endswith(INDEX_SUFFIX) else p
    return _meta(_header(first), path, key)


def read_tensors(path: Union[str, Path], key: str = METADATA_KEY) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (tensors, metadata) of a file written by `write_tensors`, or of its shards
    (`split_checkpoint`), named by the file's name or the shard index."""
    meta = read_metadata(path, key)
    try:
        tensors, _ = read_stored(path)
    except (InputError, FileNotFoundError):
        raise
    except Exception as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc}") from exc
    return tensors, meta


def checkpoint_digest(path: Union[str, Path], n: int = 12) -> str:
    """The checkpoint's id: the sha256 of its single-file form. For a sharded checkpoint that
    form is rebuilt in memory (safetensors writes it byte for byte as `write_tensors` did), so
    splitting a checkpoint keeps its id, and the galleries and feature caches made with it."""
    p = stored_checkpoint(path)
    h = hashlib.sha256()
    if p.name.endswith(INDEX_SUFFIX):
        tensors, header = read_stored(p)
        h.update(save(tensors, metadata=header))
        return h.hexdigest()[:n]
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def split_checkpoint(src: Union[str, Path], dest: Union[str, Path, None] = None,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Store checkpoint `src` as shards of at most `max_shard_bytes` of tensors each, named
    after `dest` (default `src`: default.safetensors -> default-00001-of-00002.safetensors ...
    and default.safetensors.index.json, Hugging Face's layout). Every tensor is copied as
    stored (bit-identical) and each shard keeps the whole header metadata. The single file
    `dest` and shards of an earlier split are removed. -> the index."""
    src, dest = Path(src), Path(dest or src)
    dest = dest.with_name(dest.name.removesuffix(INDEX_SUFFIX))  # named by its index: the file it stands for
    tensors, header = read_stored(src)
    groups: list[list[str]] = [[]]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    dest.parent.mkdir(parents=True, exist_ok=True)
    index = shard_index(dest)
    old = set(_shards(index)) if index.is_file() else set()
    stem = dest.name.removesuffix(".safetensors")
    weight_map = {}
    for i, names in enumerate(groups, 1):
        shard = dest.with_name(f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors")
        tmp = shard.with_name(shard.name + ".tmp")
        save_file({k: tensors[k].contiguous() for k in names}, str(tmp), metadata=header)
        os.replace(tmp, shard)
        old.discard(shard)
        weight_map.update({k: shard.name for k in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    tmp = index.with_name(index.name + ".tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    os.replace(tmp, index)
    for stale in old | ({dest} if dest.is_file() else set()):
        stale.unlink(missing_ok=True)
    return index


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
