"""How alike two cells look: token features of a drawing and a photo, and their
similarity (the appearance half of the correspondences; `explain.correspondence`
places and matches with it).

The cosine of mean-centred tokens (an image's mean token mostly says "sketch" or
"photo"; removing it leaves what differs between cells), averaged over two backbone
levels and over two views of the photo: the photo and its edge map. The drawing is also
encoded shrunk (SKETCH_SCALES): CNN tokens are not scale invariant.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sbir_core.data.preprocess import cell_counts



EDGE_WEIGHT = 0.5  # share of the photo's edge-map view in the appearance similarity


RELATION_WEIGHT = 0.25  # share of the relation model's similarity when one is given


STRUCTURE_FULL = 0.06  # outline-pixel fraction at which a photo cell counts as full outline


STRUCTURE_GRADIENT = 60.0  # colour gradient (Sobel, 0-255 images) of an outline pixel: a step of ~15 levels


SKETCH_SCALES = (1.0, 0.6, 0.36)  # drawing sizes tried against the photo (object scale search)


@dataclass
class PairFeatures:
    """Token levels of one preprocessed sketch/photo pair (see `encode_pair_features`).

    Each list holds (N, C) tensors on the same (h, w) grid: the backbone's token level
    first (what `encode_pair_tokens` returns), then coarser levels resampled to the
    grid. `photo_edges` are the tokens of the photo's own edge map (`photo_edge_view`),
    the photo seen in the sketch domain; `edge_image` is that edge map.
    `sketch_scaled[s]` are the tokens of the drawing shrunk by s (centred on white), read
    back at each original cell's shrunk position: what a sketch cell looks like when the
    object is s times smaller in the photo (CNN tokens are not scale invariant)."""

    sketch: list
    photo: list
    photo_edges: Optional[list]
    grid: tuple[int, int]
    edge_image: Optional[Image.Image] = None
    sketch_scaled: dict = field(default_factory=dict)
    # The correspondence head's unit descriptors ((N, D) each; None without a head), the
    # drawing's also per shrink factor, read back like `sketch_scaled`.
    head_sketch: Optional[torch.Tensor] = None
    head_photo: Optional[torch.Tensor] = None
    head_scaled: dict = field(default_factory=dict)


def _token_levels(encoder, x: torch.Tensor, head=None) -> tuple[list, tuple[int, int], Optional[torch.Tensor]]:
    """[(B, N, C) tokens per level], grid, (B, N, D) head descriptors or None: the
    backbone's token block and, for EfficientNet-Lite backbones, the next (coarser,
    stride 32) block upsampled to the same grid; the correspondence `head` reads the
    same pass. Other backbones give their one token level."""
    from sbir_core.models.correspondence_head import HEAD_BLOCKS

    bb = encoder.backbone
    net, tb = getattr(bb, "net", None), getattr(bb, "TOKEN_BLOCK", None)
    if net is None or tb is None or not hasattr(net, "blocks"):
        f = encoder.backbone_features(x)
        return [f.tokens], (int(f.grid[0]), int(f.grid[1])), None
    h = (x - encoder._mean) / encoder._std
    h = net.bn1(net.conv_stem(h.contiguous(memory_format=torch.channels_last)))
    maps = []
    last = max(tb + 1, max(HEAD_BLOCKS) if head is not None else 0)
    for i, blk in enumerate(net.blocks):
        h = blk(h)
        maps.append(h)
        if i >= last:
            break
    grid = (int(maps[tb].shape[2]), int(maps[tb].shape[3]))
    levels = [maps[tb]]
    if len(maps) > tb + 1:
        levels.append(F.interpolate(maps[tb + 1], size=grid, mode="bilinear", align_corners=False))
    desc = head([maps[i] for i in HEAD_BLOCKS], grid) if head is not None else None
    return [m.flatten(2).transpose(1, 2).contiguous() for m in levels], grid, desc


def photo_edge_view(photo_image: Image.Image) -> Image.Image:
    """The preprocessed photo's edge map (black on white, same geometry): the edges
    `preprocess.photo_to_edges` draws, computed inside the photo's area only, so the
    white padding around a non-square photo draws no frame."""
    import cv2

    rgb = np.asarray(photo_image.convert("RGB"))
    g = np.asarray(photo_image.convert("L"))
    pad = (rgb >= 254).all(-1)
    rows, cols = np.flatnonzero(~pad.all(1)), np.flatnonzero(~pad.all(0))
    out = np.full(g.shape, 255, np.uint8)
    if len(rows) == 0 or len(cols) == 0:
        return Image.fromarray(out).convert("RGB")
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = cv2.GaussianBlur(np.ascontiguousarray(g[y0:y1, x0:x1]), (5, 5), 1.2)
    med = float(np.median(crop))
    lo, hi = int(max(0, 0.66 * med)), int(min(255, 1.33 * med))
    if hi <= lo:
        lo, hi = 50, 150
    edges = cv2.dilate(cv2.Canny(crop, lo, hi), np.ones((2, 2), np.uint8))
    out[y0:y1, x0:x1] = 255 - edges
    return Image.fromarray(out).convert("RGB")


def shrink_sketch(sketch_image: Image.Image, factor: float) -> Image.Image:
    """The drawing shrunk by `factor` about the image centre, on white."""
    W, H = sketch_image.size
    w, h = max(1, int(round(W * factor))), max(1, int(round(H * factor)))
    out = Image.new("RGB", (W, H), (255, 255, 255))
    out.paste(sketch_image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS), ((W - w) // 2, (H - h) // 2))
    return out


def _sample_shrunk(tokens: torch.Tensor, grid: tuple[int, int], factor: float) -> torch.Tensor:
    """(N, C) tokens of a shrunk drawing read at each original cell's shrunk position."""
    h, w = grid
    z = cell_xy(grid)
    x = (factor * (z.real - w / 2) + w / 2) / w * 2 - 1
    y = (factor * (z.imag - h / 2) + h / 2) / h * 2 - 1
    g = torch.from_numpy(np.stack([x, y], -1).astype(np.float32)).view(1, h, w, 2)
    m = tokens.T.reshape(1, -1, h, w).float()
    return F.grid_sample(m, g, mode="bilinear", align_corners=False)[0].flatten(1).T.contiguous()


@torch.inference_mode()
def encode_pair_features(encoder, sketch_image: Image.Image, photo_image: Image.Image,
                         edge_view: bool = True, sketch_scales: Optional[Sequence[float]] = None,
                         head="auto") -> PairFeatures:
    """Token levels of the sketch (also shrunk by each of `sketch_scales` < 1, default
    SKETCH_SCALES), the photo and (edge_view) the photo's edge map, in one backbone batch;
    with a correspondence head ("auto": the shipped one when it was trained on this
    encoder, `models.correspondence_head.head_for`; None: none) its descriptors too."""
    if isinstance(head, str) and head == "auto":
        from sbir_core.models.correspondence_head import head_for

        head = head_for(encoder)
    scales = [float(f) for f in (SKETCH_SCALES if sketch_scales is None else sketch_scales) if f < 1]
    edge = photo_edge_view(photo_image) if edge_view else None
    imgs = [sketch_image, photo_image] + ([edge] if edge is not None else [])
    imgs += [shrink_sketch(sketch_image, f) for f in scales]
    levels, grid, desc = _token_levels(encoder, torch.stack([encoder.to_tensor(im) for im in imgs]), head)
    n0 = 3 if edge is not None else 2
    scaled = {f: [_sample_shrunk(lv[n0 + i], grid, f) for lv in levels] for i, f in enumerate(scales)}
    hs = {} if desc is None else {f: F.normalize(_sample_shrunk(desc[n0 + i], grid, f), dim=-1)
                                  for i, f in enumerate(scales)}
    return PairFeatures(sketch=[lv[0] for lv in levels], photo=[lv[1] for lv in levels],
                        photo_edges=[lv[2] for lv in levels] if edge is not None else None, grid=grid,
                        edge_image=edge, sketch_scaled=scaled,
                        head_sketch=None if desc is None else desc[0], head_photo=None if desc is None else desc[1],
                        head_scaled=hs)


WHITE_LEVEL = 235  # a pixel whose every channel is at least this is white paper / padding


def object_mask(image: Image.Image) -> np.ndarray:
    """(H, W) bool: the picture's non-white pixels. On clip-art (a drawing on white) this
    is the object; on a photo nearly every pixel."""
    return (np.asarray(image.convert("RGB")) < WHITE_LEVEL).any(-1)


def content_cells(image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """(h*w,) bool: cells that are not (near-)white, by the same rule as sketch ink
    (`relation.ink_cells` on a white background): white padding and blank paper are
    not content. For a sketch image this equals its ink cells."""
    from sbir_core.data.preprocess import INK_THRESHOLD
    from sbir_core.models.relation import INK_CELL_FRACTION

    g = np.asarray(image.convert("L"), dtype=np.float32)
    return _cell_fraction(g < 255.0 - INK_THRESHOLD, grid) >= INK_CELL_FRACTION


def _cell_fraction(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h*w,) fraction of True pixels per cell."""
    counts, area = cell_counts(mask, grid)
    return (counts / np.maximum(area, 1)).reshape(-1)


def photo_structure(photo_image: Image.Image, grid: tuple[int, int],
                    edge_image: Optional[Image.Image] = None) -> np.ndarray:
    """(h*w,) in [0, 1]: how much outline a photo cell holds: the share of its pixels on
    a colour boundary (any channel's gradient after a light blur, so a red-green border
    of equal brightness counts) or on the photo's edge map, saturating at
    STRUCTURE_FULL. Sketch lines are outlines: a cell of flat colour or white background
    has nothing a line could correspond to."""
    import cv2

    rgb = cv2.GaussianBlur(np.asarray(photo_image.convert("RGB"), np.float32), (5, 5), 1.2)
    gx = cv2.Sobel(rgb, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(rgb, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.sqrt(gx ** 2 + gy ** 2).max(-1)
    outline = mag >= STRUCTURE_GRADIENT
    if edge_image is not None:
        outline |= np.asarray(edge_image.convert("L")) < 128
    return np.clip(_cell_fraction(outline, grid) / STRUCTURE_FULL, 0.0, 1.0).astype(np.float32)


def _centered_cosine(a: torch.Tensor, b: torch.Tensor, a_mask: Optional[torch.Tensor] = None,
                     b_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cosine similarity of mean-centred tokens: each image's mean token (over its
    inked / content cells) removed, since it mostly encodes the domain."""
    def centre(x, m):
        x = x.float()
        mu = x[m].mean(0, keepdim=True) if m is not None and m.any() else x.mean(0, keepdim=True)
        return F.normalize(x - mu, dim=-1)

    return centre(a, a_mask) @ centre(b, b_mask).T


def pair_similarity(sketch: Sequence[torch.Tensor], photo: Sequence[torch.Tensor],
                    photo_edges: Optional[Sequence[torch.Tensor]], sketch_ink: np.ndarray,
                    photo_content: np.ndarray, edge_weight: float = 0.5) -> np.ndarray:
    """(Ns, Np) appearance similarity: the mean-centred cosine of sketch and photo tokens,
    averaged over the token levels, and mixed (`edge_weight`) with the same against the
    photo's edge-map tokens (line drawing against line drawing)."""
    ink_t = torch.from_numpy(np.asarray(sketch_ink, bool))
    cont_t = torch.from_numpy(np.asarray(photo_content, bool))

    def view(ps):
        return sum(_centered_cosine(s, p, ink_t, cont_t) for s, p in zip(sketch, ps)) / len(ps)

    sim = view(photo)
    if photo_edges is not None and edge_weight > 0:
        sim = (1 - edge_weight) * sim + edge_weight * view(photo_edges)
    return sim.numpy().astype(np.float32)


def cell_xy(grid: tuple[int, int]) -> np.ndarray:
    """(h*w,) complex cell centres x + iy in cell units."""
    h, w = grid
    r, c = np.divmod(np.arange(h * w), w)
    return (c + 0.5) + 1j * (r + 0.5)
