"""What the client sends for each kind of image decodes on the server to exactly what the
engine computes in-process for the same input: the server decodes with the engine's own
transform, so ``transform(encode_image(x)) == transform(x)`` pixel for pixel."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from filip_client import FilipInvalidInputError
from filip_client._protocol import encode_image
from filip_engine.preprocess import ImageTransform

T = ImageTransform(32)


def _photo(w: int = 45, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _jpeg_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    _photo().save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


def _modes() -> dict[str, Image.Image]:
    rgb = _photo()
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, rgb.width).astype(np.uint8), (rgb.height, 1))))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    ramp16 = Image.fromarray((np.arange(30 * 45).reshape(30, 45) * 48).astype(np.uint16))
    return {"RGB": rgb, "RGBA": rgba, "L": rgb.convert("L"), "LA": rgba.convert("LA"), "La": rgba.convert("LA").convert("La"),
            "1": rgb.convert("1"), "P": pal, "P+transparency": pal_t, "PA": rgba.convert("PA"), "CMYK": rgb.convert("CMYK"),
            "YCbCr": rgb.convert("YCbCr"), "LAB": rgb.convert("LAB"), "HSV": rgb.convert("HSV"), "RGBa": rgba.convert("RGBa"),
            "RGBX": rgb.convert("RGBX"), "I;16": ramp16, "I": ramp16.convert("I")}


@pytest.mark.parametrize("name", list(_modes()))
def test_pil_image_of_every_mode_arrives_as_in_process(name):
    img = _modes()[name]
    want = T(img)
    got = T(encode_image(img, 0))
    assert np.array_equal(got, want), (name, np.abs(got - want).max())


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_of_a_pil_image_is_kept(orientation):
    data = _jpeg_with_orientation(orientation)
    img = Image.open(io.BytesIO(data))                  # a phone photo opened with PIL, not rotated by the user
    want = T(img)
    assert np.array_equal(T(encode_image(img, 0)), want)
    assert np.array_equal(T(encode_image(data, 0)), T(data))       # bytes are sent as they are
    if orientation in (6, 8):
        assert want.shape == T(_photo()).shape and not np.array_equal(want, T(_photo()))


def test_uint8_arrays_and_unencodable_images():
    arr = np.asarray(_photo())
    assert np.array_equal(T(encode_image(arr, 0)), T(arr))
    assert np.array_equal(T(encode_image(arr[..., :1], 0)), T(arr[..., 0]))
    with pytest.raises(FilipInvalidInputError, match="image 3: cannot encode"):
        encode_image(Image.new("RGB", (0, 0)), 3)
