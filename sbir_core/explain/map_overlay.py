"""The per-query layer of a map picture (`EmbeddingMap.draw`): on a copy of the cached base
layer (the gallery's thumbnails or dots), the title, the results' frames, the class names,
the rank numbers and the query's star or drawing, where `EmbeddingMap.marks` put them."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sbir_core.explain.map_drawing import (BACKGROUND, HIGHLIGHT, INK, MAX_RANK_NUMBERS, MapMarks, badge_spot,
                                           draw_caption, map_font, overlap, paste_badge, paste_dot, paste_ring,
                                           paste_star)
from sbir_core.explain.map_labels import draw_labels


def draw_marks(base: Image.Image, mk: MapMarks) -> Image.Image:
    """The picture of `marks()`'s answer over `base` (left untouched)."""
    lay, title = mk.layout, mk.title
    img = base.copy()
    draw = ImageDraw.Draw(img)
    u, (W, H) = lay.unit, lay.size
    if title:
        tpx = lay.title_px
        while tpx > 9 and map_font(tpx, bold=False).getlength(title) > W - 8:
            tpx -= 1  # a long title shrinks to fit the width
        draw.text((W / 2, lay.title_h / 2), title, fill=INK, font=map_font(tpx, bold=False), anchor="mm")
    if mk.tiles:
        fw = max(3, round(3 * u))
        lw = max(2, round(2 * u))
        for p0, p1, b in zip(mk.places, mk.centres, mk.boxes):
            if np.abs(p1 - p0).max() > (b[2] - b[0]) / 4:  # a line from a moved result to its place
                draw.line((tuple(p0), tuple(p1)), fill=HIGHLIGHT, width=lw)
                paste_dot(img, p0, max(2.5, 3 * u), HIGHLIGHT)
        for rank in range(len(mk.tiles) - 1, -1, -1):  # best on top
            t, (x0, y0, x1, y1) = mk.tiles[rank], mk.boxes[rank]
            draw.rectangle((x0 - 1, y0 - 1, x1, y1), fill=BACKGROUND)
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=HIGHLIGHT)
            img.paste(t, (int(x0 + fw), int(y0 + fw)))
    else:
        rr = lay.dot_r + max(3.0, 3 * u)
        for rank in range(len(mk.centres) - 1, -1, -1):
            paste_ring(img, mk.centres[rank], rr, max(2.0, 2 * u), HIGHLIGHT)
    draw_labels(img, mk.labels, lay.label_px)  # over the pictures, readable in their white outline
    r_q = mk.query_r
    taken = [(p[0] - r_q, p[1] - r_q, p[0] + r_q, p[1] + r_q) for p in mk.query]
    taken += [mk.caption[2]] if mk.caption else []
    # Rank numbers 1-5 next to their result: at a corner of the frame if one is free
    # (covering no other result if possible), else a little further out with a line to
    # it; never over the query, its caption or another number.
    bd = max(15, round(16 * u))
    boxes = mk.boxes
    for rank, box in enumerate(boxes[:MAX_RANK_NUMBERS]):
        others = [o for k, o in enumerate(boxes) if k != rank] + [lab.box for lab in mk.labels]
        spot = badge_spot(box, bd, (0, lay.title_h, W, H), taken, others)
        if spot is None:
            continue
        if not overlap(spot, box, 1):
            cx, cy = (spot[0] + spot[2]) / 2, (spot[1] + spot[3]) / 2
            ex, ey = min(max(cx, box[0]), box[2]), min(max(cy, box[1]), box[3])
            draw.line(((cx, cy), (ex, ey)), fill=HIGHLIGHT, width=max(1, round(1.5 * u)))
        paste_badge(img, ((spot[0] + spot[2]) / 2, (spot[1] + spot[3]) / 2), bd, str(rank + 1))
        taken.append(spot)
    draw = ImageDraw.Draw(img)
    if mk.caption is not None and len(mk.query):  # a caption set apart: a line to its star
        (cx, cy), b = mk.query[0], mk.caption[2]
        ex, ey = min(max(cx, b[0]), b[2]), min(max(cy, b[1]), b[3])
        if np.hypot(ex - cx, ey - cy) > mk.query_r + 8:
            draw.line(((cx, cy), (ex, ey)), fill=INK, width=max(1, round(1.5 * u)))
    qimg = mk.query_image
    for p in mk.query:
        if qimg is not None:
            x0, y0 = int(round(p[0] - qimg.width / 2)), int(round(p[1] - qimg.height / 2))
            fw = max(3, round(3 * u))
            draw.rectangle((x0 - fw - 2, y0 - fw - 2, x0 + qimg.width + fw + 1, y0 + qimg.height + fw + 1),
                           fill=BACKGROUND)
            draw.rectangle((x0 - fw, y0 - fw, x0 + qimg.width + fw - 1, y0 + qimg.height + fw - 1), fill=INK)
            img.paste(qimg, (x0, y0))
            paste_star(img, (x0 - fw, y0 - fw), max(9, round(10 * u)))
        else:
            paste_star(img, p, r_q)
    if mk.caption is not None:
        draw_caption(img, mk.caption, lay)
    return img
