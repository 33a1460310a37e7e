"""engine.preprocess against OpenCLIP's eval transform written out with Pillow calls in its
order, on a real photograph, plus every pixel mode, EXIF orientation, the limits and errors.
(tests/test_goldens.py checks the same against outputs of the real OpenCLIP + torchvision.)

Fixture images are generated in tmp_path at test time; the only file read from disk is the
photograph matplotlib ships (``mpl-data/sample_data/grace_hopper.jpg``, 512x600 JPEG).
"""
from __future__ import annotations

import importlib.util
import io
import resource
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import filip_engine.preprocess as pp
from filip_engine.errors import ImageDecodeError, InvalidInputError
from filip_engine.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform, load_image

SIZES = (32, 224, 336)
ORIENTATION = 0x0112


# --- the independent reference -------------------------------------------------------------
def reference_clip_transform(img: Image.Image, size: int) -> np.ndarray:
    """OpenCLIP ``image_transform(size, is_train=False)`` written out with PIL + numpy:
    torchvision Resize(size, BICUBIC) -> CenterCrop(size) -> convert("RGB") -> ToTensor ->
    Normalize(CLIP mean, std). Computed in float64; returns [3, size, size]."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)       # torchvision truncates
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    x = np.asarray(img, dtype=np.float64) / 255.0
    x = (x - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return x.transpose(2, 0, 1)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo_path() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    assert spec is not None, "matplotlib (dev extra) ships the test photograph"
    path = Path(spec.submodule_search_locations[0]) / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def photo(photo_path) -> Image.Image:
    with Image.open(photo_path) as im:
        assert im.mode == "RGB" and im.size == (512, 600)
        return im.convert("RGB")


CROPS = {                                   # (left, top, right, bottom) of the 512x600 photo
    "full": None,
    "landscape": (0, 150, 512, 450),        # 512x300
    "portrait": (150, 0, 350, 600),         # 200x600
    "small": (170, 120, 350, 240),          # 180x120: enlarged at every size but 32
}
FORMATS = {"JPEG": {"quality": 90}, "PNG": {}, "WEBP": {"quality": 85}}


@pytest.fixture(scope="module")
def encoded_photos(photo, tmp_path_factory):
    """{(crop, format): path} of the photo's crops re-encoded."""
    d = tmp_path_factory.mktemp("photos")
    out = {}
    for crop, box in CROPS.items():
        img = photo if box is None else photo.crop(box)
        for fmt, kw in FORMATS.items():
            path = d / f"{crop}.{fmt.lower()}"
            img.save(path, fmt, **kw)
            out[crop, fmt] = path
    return out


# --- parity with the reference on real photographs ----------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_original_photo_matches_reference(photo_path, size):
    with Image.open(photo_path) as im:
        ref = reference_clip_transform(im, size)
    out = ImageTransform(size)(photo_path)
    assert out.dtype == np.float32 and out.shape == (3, size, size)
    assert max_abs(out, ref) <= 1e-6


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("crop", list(CROPS))
def test_reencoded_photo_all_input_kinds(encoded_photos, crop, fmt, size):
    path = encoded_photos[crop, fmt]
    t = ImageTransform(size)
    with Image.open(path) as im:
        ref = reference_clip_transform(im, size)
        pil = im.copy()
    data = path.read_bytes()
    outs = {
        "path": t(path), "str": t(str(path)), "bytes": t(data), "bytearray": t(bytearray(data)),
        "memoryview": t(memoryview(data)), "pil": t(pil), "array": t(np.asarray(pil.convert("RGB"))),
    }
    for kind, out in outs.items():
        assert out.dtype == np.float32 and out.shape == (3, size, size), kind
        np.testing.assert_array_equal(out, outs["path"], err_msg=kind)
    assert max_abs(outs["path"], ref) <= 1e-6


def test_normalisation_is_torchvision_to_the_bit(photo):
    """ToTensor + Normalize with torch's own float32 ops gives exactly our numbers."""
    torch = pytest.importorskip("torch")
    t = ImageTransform(224)
    crop = np.asarray(pp._resize_crop(photo, 224, 224))                # uint8 [224, 224, 3]
    x = torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    x = x.sub(torch.tensor(CLIP_MEAN)[:, None, None]).div(torch.tensor(CLIP_STD)[:, None, None])
    np.testing.assert_array_equal(t.from_rgb(photo), x.numpy())


def test_custom_mean_std(photo):
    t = ImageTransform(64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    expect = np.asarray(pp._resize_crop(photo, 64, 64), np.float64).transpose(2, 0, 1) / 255 * 2 - 1
    assert max_abs(t(photo), expect) <= 1e-6


THIN_MODES = ("RGB", "L", "P", "1", "RGBA", "LA", "CMYK", "PA")


def test_thin_images_crop_path_is_exact(photo, monkeypatch):
    """Enlarging a thin image computes only the cropped window of the long axis; it must
    equal Pillow's full resize + crop bit for bit in every mode Pillow resizes its own way
    (NEAREST for P and 1, premultiplied alpha for RGBA and LA), for both offset rules and a
    resize larger than the crop (this also pins Pillow's pass order)."""
    rng = np.random.default_rng(7)
    cases = []
    for i in range(48):
        size = int(rng.choice([7, 32, 224]))
        resize = size + int(rng.choice([0, 0, 5]))
        short = int(rng.integers(1, resize))
        long = int(rng.integers(short, 2500))
        w, h = (short, long) if i % 2 else (long, short)
        rgb = (Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) if i % 3 == 0
               else photo.resize((w, h), Image.BILINEAR))
        mode = THIN_MODES[i % len(THIN_MODES)]
        if mode in ("RGBA", "LA", "PA"):
            alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
            base = {"RGBA": rgb, "LA": rgb.convert("L"), "PA": rgb.quantize(32)}[mode].convert(mode)
            base.putalpha(alpha)
            img = base
        else:
            img = rgb.quantize(32) if mode == "P" else rgb.convert(mode)
        assert img.mode == mode
        cases.append((img, resize, size, pp._offset_floor if i % 4 == 1 else pp._offset_round))
    # the full resize; P and 1 windows are picked from the RGB image, so compare in RGB
    exact = [pp._resize_crop(*case) for case in cases]
    exact = [np.asarray(im.convert("RGB") if im.mode in ("P", "1") else im) for im in exact]
    monkeypatch.setattr(pp, "_EXACT_RESIZE_MAX_PIXELS", 0)
    for case, want in zip(cases, exact):
        got = pp._resize_crop(*case)
        assert got.mode == ("RGB" if case[0].mode in ("P", "1") else case[0].mode)
        np.testing.assert_array_equal(np.asarray(got), want,
                                      err_msg=f"{case[0].mode} {case[0].size} -> {case[1]}/{case[2]}")


def test_nearest_sources_equal_pillow():
    """Pillow's NEAREST picks come from a running sum of doubles, not a closed form."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        n_in = int(rng.integers(1, 200))
        n_out = int(rng.integers(n_in, 40_000))
        src = Image.fromarray(np.arange(n_in, dtype=np.int32)[None, :]).convert("I")
        picks = np.asarray(src.resize((n_out, 1), Image.NEAREST))[0]
        start = int(rng.integers(0, n_out))
        count = min(int(rng.integers(1, 300)), n_out - start)
        np.testing.assert_array_equal(pp._nearest_sources(n_in, n_out, start, count), picks[start:start + count],
                                      err_msg=f"{n_in} -> {n_out} from {start}")


def test_extreme_banner_is_fast_and_bounded():
    """2 x 200,000: a full resize to 224 would be 224 x 22.4M pixels (20 GB)."""
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (200_000, 2, 3), dtype=np.uint8)), "PNG")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = ImageTransform(224)(data)
    assert time.perf_counter() - t0 < 5
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 200 * 1024   # KiB
    assert out.shape == (3, 224, 224) and np.isfinite(out).all()


# --- mode conversions ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(photo) -> Image.Image:
    return photo.crop((100, 80, 420, 320))  # 320x240 RGB


def test_greyscale_equals_openclip_order(small):
    """L: converting first (ours) or last (OpenCLIP) gives the same bits."""
    grey = Image.open(io.BytesIO(encode(small.convert("L"), "JPEG")))
    assert grey.mode == "L"
    for size in (32, 224):
        assert max_abs(ImageTransform(size)(grey), reference_clip_transform(grey, size)) <= 1e-6
    rgb = np.asarray(load_image(grey))
    assert (rgb == np.asarray(grey)[:, :, None]).all()


def test_la_and_rgba_resize_premultiplied_then_drop_alpha(small):
    """OpenCLIP resizes RGBA / LA in their own mode (Pillow premultiplies alpha for that)
    and drops alpha only at its final convert("RGB"); converting first would differ."""
    rng = np.random.default_rng(1)
    t = ImageTransform(48)
    rgb = np.asarray(small)
    alpha = rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    rgba = Image.open(io.BytesIO(encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG")))
    assert rgba.mode == "RGBA"
    assert max_abs(t(rgba), reference_clip_transform(rgba, 48)) <= 1e-6
    assert max_abs(t(rgba), t(rgb)) > 0.1                                      # alpha matters
    np.testing.assert_array_equal(t(np.dstack([rgb, alpha])), t(rgba))         # HxWx4 array = RGBA
    grey = np.asarray(small.convert("L"))
    la = Image.open(io.BytesIO(encode(Image.fromarray(np.dstack([grey, alpha])), "PNG")))
    assert la.mode == "LA"
    assert max_abs(t(la), reference_clip_transform(la, 48)) <= 1e-6
    np.testing.assert_array_equal(t(grey), t(grey[:, :, None]))               # HxW, HxWx1
    opaque = Image.fromarray(np.dstack([rgb, np.full_like(alpha, 255)]))      # opaque: same as RGB
    np.testing.assert_array_equal(t(opaque), t(rgb))
    assert max_abs(t(opaque), reference_clip_transform(opaque, 48)) <= 1e-6


def test_real_rgba_png(photo_path):
    path = photo_path.parent / "Minduka_Present_Blue_Pack.png"                 # 128x128 RGBA
    with Image.open(path) as im:
        assert im.mode == "RGBA"
        assert max_abs(ImageTransform(64)(path), reference_clip_transform(im, 64)) <= 1e-6


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_resizes_nearest_like_openclip(small, transparency):
    """Pillow resizes "P" with NEAREST whatever filter is asked, and OpenCLIP converts to RGB
    after resizing, so palette images are resampled NEAREST; transparency is dropped."""
    p = small.quantize(64)
    data = encode(p, "PNG", **({"transparency": 5} if transparency else {}))
    dec = Image.open(io.BytesIO(data))
    assert dec.mode == "P" and ("transparency" in dec.info) == transparency
    assert max_abs(ImageTransform(40)(data), reference_clip_transform(dec, 40)) <= 1e-6
    palette = np.array(dec.getpalette(), np.uint8).reshape(-1, 3)
    rgb = palette[np.asarray(dec)]                                             # palette lookup by hand
    nearest = np.asarray(Image.fromarray(rgb).resize((53, 40), Image.NEAREST).crop((6, 0, 46, 40)))
    x = (nearest.astype(np.float32) / np.float32(255) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    assert max_abs(ImageTransform(40)(data), x.transpose(2, 0, 1)) <= 1e-6


def test_cmyk_jpeg(small):
    data = encode(small.convert("CMYK"), "JPEG", quality=95)
    dec = Image.open(io.BytesIO(data))
    assert dec.mode == "CMYK"
    t = ImageTransform(40)
    np.testing.assert_array_equal(t(data), t(dec.convert("RGB")))
    rgb = np.asarray(load_image(data), np.float64)
    assert np.abs(rgb - np.asarray(small, np.float64)).mean() < 3    # not inverted, not garbled


def test_sixteen_bit_grey_scales_not_saturates(tmp_path):
    t = ImageTransform(16)
    mid = encode(Image.fromarray(np.full((20, 30), 32768, np.uint16)), "PNG")
    assert Image.open(io.BytesIO(mid)).mode == "I;16"
    np.testing.assert_array_equal(t(mid), t(np.full((20, 30), 128, np.uint8)))
    assert np.asarray(load_image(mid))[0, 0].tolist() == [128, 128, 128]      # mid-grey, not white
    rng = np.random.default_rng(2)
    v = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    want = t((v >> 8).astype(np.uint8))
    np.testing.assert_array_equal(t(encode(Image.fromarray(v), "PNG")), want)
    (tmp_path / "g16.tif").write_bytes(encode(Image.fromarray(v), "TIFF"))
    np.testing.assert_array_equal(t(tmp_path / "g16.tif"), want)
    big_endian = Image.fromarray(v.astype(">u2"))
    assert big_endian.mode == "I;16B"
    np.testing.assert_array_equal(t(big_endian), want)
    as_i = Image.fromarray(v.astype(np.int32))
    assert as_i.mode == "I"
    np.testing.assert_array_equal(t(as_i), want)
    clipped = Image.fromarray(np.array([[-5, 70000]], np.int32))
    assert np.asarray(load_image(clipped))[0, :, 0].tolist() == [0, 255]


def test_one_bit(small):
    bw = small.convert("1")
    data = encode(bw, "PNG")
    dec = Image.open(io.BytesIO(data))
    assert dec.mode == "1"
    assert max_abs(ImageTransform(40)(data), reference_clip_transform(dec, 40)) <= 1e-6   # NEAREST
    assert len(np.unique(ImageTransform(40)(data)[0])) == 2                   # black and white only


@pytest.mark.parametrize("orientation,k", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation(small, orientation, k):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = encode(small, "JPEG", exif=exif)
    stored = np.asarray(Image.open(io.BytesIO(data)))                           # as stored, not rotated
    upright = np.rot90(stored, k)                                              # rotated by hand
    assert load_image(data).size == (upright.shape[1], upright.shape[0])
    for size in (32, 224):
        t = ImageTransform(size)
        np.testing.assert_array_equal(t(data), t(np.ascontiguousarray(upright)))
        np.testing.assert_array_equal(t(Image.open(io.BytesIO(data))), t(data))   # PIL input too


def test_exif_all_orientations_match_pillow_exif_transpose(small):
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        for fmt in ("JPEG", "PNG"):
            data = encode(small, fmt, exif=exif)
            want = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
            np.testing.assert_array_equal(np.asarray(load_image(data)), np.asarray(want),
                                          err_msg=f"{fmt} orientation {orientation}")


def test_corrupt_exif_is_ignored(small):
    data = encode(small, "JPEG")
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x13" * 20
    bad = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(ImageTransform(32)(bad), ImageTransform(32)(data))


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_uses_first_frame(fmt):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    frames = [Image.new("RGB", (40, 30), c) for c in colours]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert np.asarray(load_image(data))[5, 5].tolist() == list(colours[0])
    np.testing.assert_array_equal(ImageTransform(32)(data), ImageTransform(32)(np.asarray(frames[0])))


# --- errors --------------------------------------------------------------------------------
def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG (a few dozen bytes) whose IHDR declares width x height RGB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def raises(src, match: str, **kw) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError, match=match) as info:
        load_image(src, **kw)
    return info.value


def test_error_type_is_an_invalid_input():
    assert issubclass(ImageDecodeError, InvalidInputError) and issubclass(ImageDecodeError, ValueError)


def test_missing_file_and_directory(tmp_path):
    raises(tmp_path / "no_such_photo.jpg", r"no_such_photo\.jpg' does not exist")
    raises(str(tmp_path), "is a directory")
    (tmp_path / "empty.png").write_bytes(b"")
    raises(tmp_path / "empty.png", r"empty\.png' is empty")


def test_empty_and_corrupt_bytes():
    raises(b"", "empty")
    raises(bytearray(), "empty")
    err = raises(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes(),
                 "not an image in a supported format")
    assert err.__cause__ is not None
    raises(b"%PDF-1.7\n...", "PDF document")
    raises(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIC")


def test_truncated(small):
    for fmt in ("JPEG", "PNG", "GIF", "TIFF"):
        data = encode(small, fmt)
        err = raises(data[: len(data) // 2], "truncated")
        assert err.__cause__ is not None, fmt


def test_unsupported_format_and_mode(small):
    raises(encode(small, "ICO"), r"supported format \(JPEG, PNG")
    raises(Image.new("F", (4, 4)), "unsupported pixel mode 'F'")
    raises(encode(Image.fromarray(np.ones((4, 4), np.float32)), "TIFF"), "unsupported pixel mode 'F'")


def test_bomb_refused_fast_with_bounded_memory():
    data = bomb_png(50_000, 50_000)                     # 2.5 G pixels declared in ~100 bytes
    assert len(data) < 200
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    err = raises(data, "too many pixels")
    assert time.perf_counter() - t0 < 1.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 50 * 1024    # KiB
    assert err.__cause__ is not None
    with pytest.raises(ImageDecodeError, match="pixels"):
        ImageTransform(224)(data)


def test_pixel_limit_is_ours_not_a_pillow_warning():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        raises(bomb_png(10_000, 9_000), r"10000x9000 = 90,000,000 pixels, over the max_pixels limit of 89,478,485")
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    raises(bomb_png(40, 40), "max_pixels limit of 1,000", max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        ImageTransform(32, max_pixels=1000)(np.zeros((40, 40, 3), np.uint8))
    assert load_image(np.zeros((40, 25, 3), np.uint8), max_pixels=1000).size == (25, 40)


def test_byte_limit(small, tmp_path):
    data = encode(small, "PNG")
    raises(data, "max_bytes limit of 100", max_bytes=100)
    (tmp_path / "a.png").write_bytes(data)
    raises(tmp_path / "a.png", r"a\.png' is \d+ bytes, over the max_bytes limit of 100", max_bytes=100)
    with pytest.raises(ImageDecodeError, match="max_bytes"):
        ImageTransform(32, max_bytes=100)(data)


def test_numpy_dtype_and_shape():
    raises(np.zeros((8, 8, 3), np.float32), r"dtype float32, expected uint8")
    raises(np.zeros((8, 8, 3), np.uint16), r"dtype uint16, expected uint8")
    raises(np.zeros((3, 8, 8), np.uint8), r"shape \(3, 8, 8\).*channels-first")
    raises(np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)")
    raises(np.zeros((1, 8, 8, 3), np.uint8), r"shape \(1, 8, 8, 3\)")
    raises(np.zeros((0, 8, 3), np.uint8), "no pixels")


def test_unsupported_python_type():
    raises(42, "unsupported image input of type builtins.int")
    raises([b"\xff\xd8"], "unsupported image input of type builtins.list")
    raises(None, "NoneType")


def test_from_rgb_wants_rgb(small):
    with pytest.raises(ImageDecodeError, match="mode 'L'"):
        ImageTransform(32).from_rgb(small.convert("L"))


def test_settings_are_validated():
    for kw in ({"image_size": 0}, {"image_size": 2.5}, {"image_size": 32, "std": (1, 0, 1)},
               {"image_size": 32, "mean": (0.5, 0.5)}, {"image_size": 32, "mean": 0.5},
               {"image_size": 32, "std": ("a", 1, 1)}, {"image_size": 32, "max_pixels": 0},
               {"image_size": 32, "max_bytes": -1}):
        with pytest.raises(InvalidInputError):
            ImageTransform(**kw)
    t = ImageTransform(32, mean=[0, 0, 0], std=[1, 1, 1])
    assert t.mean == (0.0, 0.0, 0.0) and hash(t) == hash(ImageTransform(32, mean=(0, 0, 0), std=(1, 1, 1)))


@pytest.mark.filterwarnings("ignore")
def test_fuzzed_files_decode_or_raise_image_decode_error(small):
    """Seeded mutations and truncations of real JPEG/PNG/GIF/WebP bytes."""
    rng = np.random.default_rng(1234)
    seeds = [encode(small.resize((64, 48)), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP")]
    t = ImageTransform(32, max_pixels=1 << 22)
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(200):
        data = bytearray(seeds[i % len(seeds)])
        op = i % 5
        if op == 0:                                         # flip a few bytes
            for pos in rng.integers(0, len(data), int(rng.integers(1, 8))):
                data[pos] ^= int(rng.integers(1, 256))
        elif op == 1:                                       # truncate
            data = data[: int(rng.integers(0, len(data)))]
        elif op == 2:                                       # insert random bytes
            pos = int(rng.integers(0, len(data)))
            data[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
        elif op == 3:                                       # corrupt the header region
            for pos in rng.integers(0, min(64, len(data)), 2):
                data[pos] = int(rng.integers(0, 256))
        else:                                               # duplicate a slice
            a = int(rng.integers(0, len(data)))
            data[a:a] = data[a: a + int(rng.integers(1, 200))]
        try:
            out = t(bytes(data))
        except ImageDecodeError:
            outcomes["refused"] += 1
        else:
            assert out.shape == (3, 32, 32) and np.isfinite(out).all()
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 20 and outcomes["decoded"] > 20, outcomes


# --- batches -------------------------------------------------------------------------------
def test_batch_matches_single_images(small, tmp_path):
    path = tmp_path / "b.png"
    small.save(path)
    items = [path, encode(small.rotate(90, expand=True), "JPEG"), small.convert("L"),
             np.asarray(small.crop((0, 0, 100, 60)))]
    t = ImageTransform(32)
    out = t.batch(items)
    assert out.shape == (4, 3, 32, 32) and out.dtype == np.float32
    for i, item in enumerate(items):
        np.testing.assert_array_equal(out[i], t(item))
    assert t.batch([]).shape == (0, 3, 32, 32)
    stack = np.stack([np.asarray(small.crop((0, 0, 50, 40)))] * 2)             # N x H x W x 3
    np.testing.assert_array_equal(t.batch(stack), np.stack([t(stack[0])] * 2))


def test_batch_error_names_the_bad_indices(small):
    good = encode(small, "JPEG")
    t = ImageTransform(32)
    one_bad = r"image 2 could not be read: encoded image \(4 bytes\) is not"
    with pytest.raises(ImageDecodeError, match=one_bad):
        t.batch([good, small, b"junk", good])
    with pytest.raises(ImageDecodeError, match=r"image 12 could not be read"):   # numbered from start
        t.batch([good, small, b"junk", good], start=10)
    with pytest.raises(ImageDecodeError, match=r"2 of 3 images.*image 0: .*image 2: numpy image has dtype"):
        t.batch([b"", good, np.zeros((4, 4), np.float64)])
    with pytest.raises(ImageDecodeError, match="single bytes"):
        t.batch(good)


def test_polyglot_files(small):
    """A JPEG with a ZIP archive appended decodes as the JPEG it starts with; a PNG signature
    glued onto JPEG data (or an HTML/script payload) is refused with our error."""
    jpeg = encode(small, "JPEG")
    zip_tail = b"PK\x03\x04" + bytes(26) + b"payload.txt" + b"hello" * 20 + b"PK\x05\x06" + bytes(18)
    t = ImageTransform(32)
    np.testing.assert_array_equal(t(jpeg + zip_tail), t(jpeg))
    for blob in (b"\x89PNG\r\n\x1a\n" + jpeg, b"<html><script>alert(1)</script>" + jpeg, b"GIF89a" + jpeg[:100]):
        with pytest.raises(ImageDecodeError):
            t(blob)
