import numpy as np
import pytest
from PIL import Image, ImageDraw

from sbir_core.data.preprocess import (
    BlankSketchError, ink_mask, photo_to_edges, preprocess_photo, preprocess_sketch, render_strokes,
)
from sbir_core.data.strokes import read_strokes

SQUARE = [[[20, 80, 80, 20, 20], [20, 20, 80, 80, 20]]]  # QuickDraw form


def dark_fraction(img: Image.Image) -> float:
    return float((np.asarray(img.convert("L")) < 128).mean())


def canvas(mode="RGB", bg="white", ink="black", size=(400, 300), box=(100, 50, 200, 250), width=4):
    img = Image.new(mode, size, bg)
    ImageDraw.Draw(img).rectangle(box, outline=ink, width=width)
    return img


@pytest.mark.parametrize("img", [
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)),
    Image.new("RGB", (300, 300), "white"),
    Image.new("L", (300, 300), 0),
    np.full((50, 50, 3), 255, np.uint8),
])
def test_blank_canvas_raises_clear_error(img):
    with pytest.raises(BlankSketchError, match="empty"):
        preprocess_sketch(img)


def test_empty_stroke_list_is_blank():
    with pytest.raises(BlankSketchError):
        preprocess_sketch([])


def test_polarity_detected_and_output_is_black_on_white():
    a = preprocess_sketch(canvas())
    b = preprocess_sketch(canvas(bg="black", ink="white"))
    c = preprocess_sketch(canvas(mode="L", bg=255, ink=0))
    for img in (a, b, c):
        g = np.asarray(img.convert("L"))
        assert img.size == (224, 224) and img.mode == "RGB"
        assert g[0, 0] > 250  # white background
        assert 0.01 < dark_fraction(img) < 0.3
    assert np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() < 2


def test_transparent_rgba_canvas_ink_is_the_opaque_pixels():
    img = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    ImageDraw.Draw(img).line([(50, 50), (250, 250)], fill=(20, 20, 20, 255), width=5)
    m = ink_mask(img)
    assert m[150, 150] > 200 and m[10, 280] == 0
    assert dark_fraction(preprocess_sketch(img)) > 0.01


def test_crop_to_ink_with_margin_and_square():
    # Ink in a small corner of a big canvas fills the output after cropping.
    img = canvas(size=(1000, 1000), box=(10, 10, 110, 60), width=3)
    out = np.asarray(preprocess_sketch(img, margin=0.1).convert("L")) < 128
    ys, xs = np.nonzero(out)
    assert xs.min() >= 224 * 0.1 - 6 and xs.max() <= 224 * 0.9 + 6  # margin kept (lines may thicken a little)
    assert (xs.max() - xs.min()) > 150  # the box was scaled up to fill the square
    assert (ys.max() - ys.min()) < (xs.max() - xs.min())  # aspect ratio kept


def test_thin_lines_stay_readable_after_large_downscale():
    img = canvas(size=(3000, 3000), box=(100, 100, 2900, 2900), width=3)
    out = preprocess_sketch(img)
    assert dark_fraction(out) > 0.02  # a 3 px line on a 3000 px canvas would vanish without thickening


def test_stroke_forms_agree():
    qd = SQUARE
    pts = [[(x, y) for x, y in zip(*SQUARE[0])]]
    assert np.allclose(read_strokes(qd)[0], read_strokes(pts)[0])
    a, b = render_strokes(qd), render_strokes(pts)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert dark_fraction(a) > 0.02


def test_photo_padding_keeps_aspect_and_edges_draw_no_frame():
    photo = Image.new("RGB", (400, 200), (40, 90, 160))
    ImageDraw.Draw(photo).ellipse((150, 50, 250, 150), fill=(240, 200, 30))
    p = preprocess_photo(photo)
    assert p.size == (224, 224) and np.asarray(p)[0, 0].tolist() == [255, 255, 255]
    e = np.asarray(photo_to_edges(photo).convert("L"))
    assert (e < 128).any()  # the disc's outline
    # no edges along the photo's own border (the padding seam)
    assert (e[56 + 3:56 + 112 - 3, 2] > 128).all()


def test_contour_pseudo_sketches_keep_the_outline_and_drop_texture():
    """experiments/with_contour_edges.py: the object's outline stays where
    Canny draws it; short texture fragments inside it, which Canny also draws, go."""
    from scripts_loader import load_experiment

    contour_edges = load_experiment("with_contour_edges").contour_edges
    rng = np.random.default_rng(0)
    photo = Image.new("RGB", (300, 300), (200, 200, 200))
    d = ImageDraw.Draw(photo)
    d.rectangle((50, 50, 250, 250), fill=(60, 60, 60))
    for x, y in rng.integers(70, 225, size=(40, 2)):  # specks of texture on the object
        d.rectangle((int(x), int(y), int(x) + 4, int(y) + 4), fill=(150, 150, 150))
    canny = np.asarray(photo_to_edges(photo).convert("L")) < 128
    contour = np.asarray(contour_edges(photo).convert("L")) < 128
    assert contour.shape == canny.shape
    inside = np.zeros_like(canny)
    inside[60:165, 60:165] = True  # the object's interior at 224 px (box 37..187)
    outline = np.zeros_like(canny)
    outline[30:45, 60:165] = True  # a band across the top side
    assert canny[inside].sum() > 50 and contour[inside].sum() < canny[inside].sum() / 10
    assert contour[outline].sum() > 0.8 * canny[outline].sum() > 0


def test_model_inputs_are_the_preprocessed_pixels_over_255(raw_encoder):
    """The encoder's transforms give exactly the 8-bit pixels / 255 as float32, whatever the
    photo's mode (the gallery engines and the queries must see the same numbers)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8))
    for img in (rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P")):
        expected = np.asarray(preprocess_photo(img, raw_encoder.image_size).convert("RGB"), np.float32) / 255.0
        x = raw_encoder.photo_transform(img)
        assert x.dtype.is_floating_point and tuple(x.shape) == (3, raw_encoder.image_size, raw_encoder.image_size)
        np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), expected)


def test_line_thickening_is_pils_max_filter(monkeypatch):
    """The dilation before a large downscale gives what PIL's MaxFilter gave (OpenCV's is
    separable: a 3000 px scan took 19 s with PIL's)."""
    import cv2
    from PIL import ImageFilter

    img = canvas(size=(900, 700), box=(60, 40, 850, 660), width=2)
    fast = preprocess_sketch(img, size=160)

    kernels = []

    def pil_max(a, kernel):
        kernels.append(kernel.shape[0])
        return np.asarray(Image.fromarray(a).filter(ImageFilter.MaxFilter(kernel.shape[0])))

    monkeypatch.setattr(cv2, "dilate", pil_max)
    assert np.array_equal(np.asarray(fast), np.asarray(preprocess_sketch(img, size=160)))
    assert kernels and kernels[0] >= 5  # the lines were thickened
