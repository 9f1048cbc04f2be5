"""A small dense correspondence head over the frozen encoder's feature maps.

The retrieval encoder's tokens are trained to say *what* a picture shows, not *where* a
part of it is; the explanation needs the second. This head reads four backbone levels of
an EfficientNet-Lite encoder (stride 8, 16, 16 and 32), resamples them to the token grid
and mixes them into one unit-length descriptor per cell, trained so that a drawing's cell
and the picture cell it was drawn from agree (`training.correspondence`: photos against
their own warped edge maps, doodles against their warped colour fill). It is small
(about 0.3 M weights): the explanation runs it on the live page.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from sbir_core.errors import InputError
from sbir_core.models.checkpoint import read_tensors, write_tensors
from sbir_core.paths import checkpoint_path

METADATA_KEY = "sbir_correspondence"
HEAD_BLOCKS = (2, 3, 4, 5)  # EfficientNet-Lite blocks read: stride 8, 16, 16, 32


class CorrespondenceHead(nn.Module):
    """Backbone maps -> (B, h*w, dim) unit descriptors on the token grid."""

    def __init__(self, in_channels: Sequence[int], dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.in_channels = [int(c) for c in in_channels]
        self.dim, self.hidden = int(dim), int(hidden)
        self.proj = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in self.in_channels)
        # Replicate padding: zero padding would make border cells look alike (a border
        # artefact the heatmap would show).
        self.mix = nn.Sequential(
            nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1, padding_mode="replicate"),
            nn.ReLU(), nn.Conv2d(hidden, dim, 1))

    def forward(self, maps: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        if len(maps) != len(self.proj):
            raise ValueError(f"the head reads {len(self.proj)} feature maps, got {len(maps)}")
        h = 0
        for p, m in zip(self.proj, maps):
            x = p(m.float())
            if tuple(x.shape[2:]) != tuple(grid):
                # Finer maps are averaged into the cell, coarser ones interpolated.
                x = F.adaptive_avg_pool2d(x, grid) if x.shape[2] > grid[0] \
                    else F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
            h = h + x
        out = self.mix(h)
        return F.normalize(out.flatten(2).transpose(1, 2), dim=-1)


def backbone_maps(encoder: Any, x: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
    """The outputs of EfficientNet-Lite `blocks` for the batch x (raw images in [0, 1])."""
    net = getattr(encoder.backbone, "net", None)
    if net is None or not hasattr(net, "blocks"):
        raise InputError("the correspondence head reads EfficientNet-Lite feature maps; this encoder has none")
    h = (x - encoder._mean) / encoder._std
    h = net.bn1(net.conv_stem(h.contiguous(memory_format=torch.channels_last)))
    out = {}
    for i, blk in enumerate(net.blocks):
        h = blk(h)
        if i in blocks:
            out[i] = h
        if i >= max(blocks):
            break
    return [out[i] for i in blocks]


def save_head(path: Union[str, Path], head: CorrespondenceHead, meta: dict[str, Any]) -> Path:
    meta = {**meta, "in_channels": head.in_channels, "dim": head.dim, "hidden": head.hidden,
            "blocks": list(HEAD_BLOCKS)}
    # fp16 weights: half the file, and descriptors differ by far less than a cell's margin.
    return write_tensors(path, {k: v.half() for k, v in head.state_dict().items()}, meta, key=METADATA_KEY)


def load_head(path: Union[str, Path]) -> CorrespondenceHead:
    state, meta = read_tensors(path, key=METADATA_KEY)
    head = CorrespondenceHead(meta["in_channels"], meta["dim"], meta["hidden"])
    head.load_state_dict({k: v.float() for k, v in state.items()})
    head.meta = meta
    return head.eval().requires_grad_(False)


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime: float) -> CorrespondenceHead:
    return load_head(path)


def head_for(encoder: Any, path: Union[str, Path, None] = None) -> Optional[CorrespondenceHead]:
    """The shipped head (or the one at `path`) when it was trained on this encoder's
    features, else None (explanations then use the backbone's tokens alone). Loaded once
    and cached (at most two files)."""
    p = Path(path) if path is not None else checkpoint_path("correspondence")
    if not p.is_file():
        return None
    head = _load_cached(str(p.resolve()), p.stat().st_mtime)
    if head.meta.get("encoder_id") != getattr(encoder, "encoder_id", None):
        return None
    return head
