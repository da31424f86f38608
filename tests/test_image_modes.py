"""Images of every PIL mode decode to RGB by their real range: a 16-bit or float picture is not washed out to white
(PIL's own ``convert("RGB")`` clips such values at 255), a transparent one is shown over white."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ivtlr.data.example import decode_image

SIDE = 256


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gray(decoded: Image.Image) -> np.ndarray:
    """The decoded picture's one channel, after checking it is gray (R = G = B)."""
    pixels = np.asarray(decoded)
    assert decoded.mode == "RGB"
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[..., 0].astype(int)


def assert_gradient_kept(values: np.ndarray) -> None:
    """A left-to-right ramp over the full range keeps its steps and its order, from black to white."""
    row = values[0]
    assert len(np.unique(row)) >= 200
    assert (np.diff(row) >= 0).all()
    assert row[0] == 0 and row[-1] == 255
    assert (values == row).all()


def ramp(maximum: float, dtype) -> np.ndarray:
    return np.tile(np.linspace(0, maximum, SIDE * 4), (8, 1)).astype(dtype)


def test_a_16_bit_grayscale_png_keeps_its_gradient():
    image = Image.fromarray(ramp(65535, np.uint16))  # mode I;16
    data = encoded(image)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    assert_gradient_kept(gray(decode_image(data)))


def test_a_32_bit_integer_image_is_read_at_16_bit_depth():
    # PIL's "I" mode is what 16-bit PNG and TIFF files open as; their values run over 0..65535.
    image = Image.fromarray(ramp(65535, np.int32))  # mode I
    assert_gradient_kept(gray(decode_image(encoded(image, "TIFF"))))


@pytest.mark.parametrize("maximum", [1.0, 255.0])
def test_a_float_image_is_read_as_0_to_1_or_0_to_255(maximum):
    image = Image.fromarray(ramp(maximum, np.float32))  # mode F
    assert_gradient_kept(gray(decode_image(encoded(image, "TIFF"))))


def test_8_bit_modes_are_unchanged():
    ramp8 = ramp(255, np.uint8)
    assert_gradient_kept(gray(decode_image(encoded(Image.fromarray(ramp8)))))  # L
    palette = Image.fromarray(ramp8).convert("P")
    assert_gradient_kept(gray(decode_image(encoded(palette))))


def test_transparency_is_shown_over_white():
    black = np.zeros((4, 4), np.uint8)
    alpha = np.array([[0, 255, 0, 255]] * 4, np.uint8)
    la = Image.fromarray(np.stack([black, alpha], -1))  # mode LA
    assert (gray(decode_image(encoded(la)))[0] == [255, 0, 255, 0]).all()
    palette = Image.fromarray(black).convert("P")
    palette.info["transparency"] = 0  # the palette entry of black is fully transparent
    assert (gray(decode_image(encoded(palette, transparency=0))) == 255).all()
