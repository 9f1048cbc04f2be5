"""Sketch augmentation: more sketch variety from the few doodles we have.

Stroke-level changes (drop strokes, jitter points, vary thickness, small affine)
mimic how different people draw the same object; edge maps get thickness and
dropout changes so pseudo-sketches look less like clean Canny output.
"""
from __future__ import annotations

from typing import Union

import numpy as np
from PIL import Image, ImageFilter

from sbir_core.data.preprocess import LINE_WIDTH_RANGE, preprocess_sketch, render_strokes
from sbir_core.data.strokes import read_strokes


def augment_strokes(strokes: list, rng: np.random.Generator, drop: float = 0.15, jitter: float = 0.015) -> list[np.ndarray]:
    pts = read_strokes(strokes)
    if len(pts) > 2:
        keep = rng.random(len(pts)) >= drop
        keep[np.argmax([len(p) for p in pts])] = True  # never drop the main outline
        pts = [p for p, k in zip(pts, keep) if k]
    allp = np.concatenate(pts)
    extent = float(max(allp.max(0) - allp.min(0))) or 1.0
    theta = rng.uniform(-0.2, 0.2)
    sx, sy = rng.uniform(0.85, 1.15, size=2)
    shear = rng.uniform(-0.15, 0.15)
    a = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) @ np.array([[sx, shear], [0, sy]])
    out = []
    for p in pts:
        q = p @ a.T + rng.normal(0, jitter * extent, size=p.shape)
        out.append(q.astype(np.float32))
    return out


def augment_sketch(sketch: Union[list, Image.Image], size: int, rng: np.random.Generator) -> Image.Image:
    """One random variant of a sketch (strokes or image), preprocessed to `size`."""
    width = float(rng.uniform(*LINE_WIDTH_RANGE))
    if isinstance(sketch, Image.Image):
        img = preprocess_sketch(sketch, size, line_width=width)
        return _image_affine(img, rng)
    return render_strokes(augment_strokes(sketch, rng), size=size, line_width=width)


def augment_edges(edges: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Thicken or thin a pseudo-sketch, drop random blobs of it, then re-crop like a sketch."""
    g = np.asarray(edges.convert("L")).copy()
    h, w = g.shape
    for _ in range(int(rng.integers(0, 4))):  # erase patches: incomplete drawings
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        r = int(rng.integers(h // 12, h // 5))
        g[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = 255
    img = Image.fromarray(g)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.MinFilter(3))  # thicker black lines
    try:
        return _image_affine(preprocess_sketch(img, size), rng)
    except ValueError:  # everything erased: fall back to the plain edge map
        return preprocess_sketch(edges, size)


def _image_affine(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = float(rng.uniform(-10, 10))
    scale = float(rng.uniform(0.85, 1.05))
    out = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(255, 255, 255))
    if scale != 1.0:
        s = img.size[0]
        small = out.resize((int(s * scale),) * 2, Image.Resampling.BILINEAR)
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(small, ((s - small.size[0]) // 2,) * 2)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def colorize_doodle(strokes: list, size: int, rng: np.random.Generator) -> Image.Image:
    """A doodle turned into a flat-colour picture, like clip-art: every closed region of
    the drawing is filled with a random colour, outlines stay dark.

    The photo side of training has photos of only ~76 classes but doodles of ~320; seen
    this way, doodles give the photo side the other classes too (class labels only, no
    sketch-photo pairs)."""
    from scipy import ndimage

    width = float(rng.uniform(2.0, 5.0))
    g = np.asarray(render_strokes(augment_strokes(strokes, rng, drop=0.05), size=size, line_width=width).convert("L"))
    ink = g < 160
    regions, n = ndimage.label(~ink)
    border = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    palette = rng.integers(0, 256, size=(n + 1, 3))
    base = palette[rng.integers(1, n + 1)] if n else np.array([128, 128, 128])
    for r in range(1, n + 1):  # most inner regions share one main colour, as clip-art does
        if rng.random() < 0.6:
            palette[r] = np.clip(base + rng.integers(-25, 26, 3), 0, 255)
    palette[border] = 255  # the outside stays white
    palette[0] = 0
    out = palette[regions].astype(np.float32)
    outline = np.array(rng.integers(0, 70, 3), dtype=np.float32)
    a = (1 - g.astype(np.float32) / 255.0)[..., None]  # anti-aliased ink coverage
    out = out * (1 - a) + outline * a
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
