"""Image preprocessing: decode any accepted input, then the checkpoint's own eval transform.

Two stages, both exact and both usable alone:

1. :func:`decode_image` turns a path, encoded bytes, a PIL image or a uint8 numpy array into
   an upright ``PIL.Image`` in its own pixel mode: size limits checked from the header
   before any pixel is decoded, full decode (``.load()``, so a truncated file fails here,
   not later), EXIF orientation applied, the first frame of an animation.
   :func:`load_image` is the same converted to RGB.
2. :class:`ImageTransform` is the eval transform of the checkpoint's own library, a recipe
   that travels with the exported repository (:meth:`ImageTransform.to_dict`):

   - ``"openclip"``: OpenCLIP's ``image_transform(size, is_train=False)`` (resize_mode
     ``'shortest'``; OpenAI CLIP's ``preprocess`` is the same), i.e. torchvision
     ``Resize(size, BICUBIC) -> CenterCrop(size) -> convert("RGB") -> ToTensor ->
     Normalize``, reproduced with the same Pillow calls in the same order, so the result
     is identical to the bit in every pixel mode:

     - Resize: shortest side to ``size``, long side ``int(size * long / short)``
       (truncated), ``PIL.Image.resize(..., BICUBIC)`` *in the image's own mode*, which
       carries Pillow's per-mode rules: "P" and "1" are resampled NEAREST whatever filter
       is asked, "RGBA" and "LA" in premultiplied alpha;
     - CenterCrop: offsets ``int(round((h - size) / 2.0))``;
     - then ``convert("RGB")`` (alpha and palette transparency dropped, no compositing);
     - ToTensor / Normalize: ``uint8 / 255`` then ``(x - mean) / std``, float32, CHW.
   - ``"transformers"``: Hugging Face's ``CLIPImageProcessor`` as its Pillow backend
     computes it (``CLIPImageProcessorPil`` in transformers 5, the only one in 4.x): RGB
     *first* (transparency composited onto white, as transformers' ``convert_to_rgb``
     does), the same Resize, a centre crop with floored offsets (``(h - size) // 2``),
     rescale by ``1/255`` in float64 then float32, normalise.

   Enlarging a thin image can make the resized image itself huge (a 2 x 100,000 banner
   resized to 224 x 11,200,000). Past ``_EXACT_RESIZE_MAX_PIXELS``, the long-axis pass is
   computed only for the pixels the crop keeps, replicating Pillow's fixed-point bicubic
   arithmetic (and, for NEAREST, its running sum of source positions), so the result stays
   identical (a test checks it bit for bit against the full resize in every such mode,
   which also pins Pillow's pass order) while memory stays bounded. Shrinking never needs
   this: Pillow's buffers then stay within the source's size.

Where the engine deliberately differs from the references (documented in the README):

- EXIF orientation is applied (OpenCLIP and transformers apply none: a phone photo stored
  sideways would be embedded sideways).
- 16-bit samples (modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) keep their high byte
  (``v >> 8``), so mid-grey stays mid-grey; ``convert("RGB")`` in the references clips
  everything above 255 to white. Mode ``I`` (32-bit integer, how Pillow holds some 16-bit
  files) is taken as 16-bit data: clipped to 0..65535, then ``>> 8``. Floating-point images
  (mode ``F``) have no defined 0..255 scale and are refused.
- Palette + alpha (``PA``) is read as RGBA, its palette looked up: resized as it stands,
  Pillow would interpolate the palette *indices* as plain numbers and drop the palette, and
  the references' output is black in every pixel.
- PIL images in modes no image file stores (``La``, ``RGBa``, ``HSV``:
  :data:`filip_contract.images.UNSTORED_MODES`) are first converted to ``LA``, ``RGBA``,
  ``RGB``, as the client sends them, so in-process and served results agree.

Other conventions:

- No colour management: embedded ICC profiles are ignored, as in CLIP.
- A numpy array is HxW (grey), HxWx1, HxWx3 (RGB, not OpenCV's BGR) or HxWx4 (RGBA), uint8;
  it is the image Pillow's ``fromarray`` makes of it (L, RGB or RGBA).
- A PIL image is used as given (its current frame), with its EXIF orientation applied.
- An EXIF block that cannot be parsed is treated as "no orientation", as browsers do.
- Only common raster formats are decoded (:data:`SUPPORTED_FORMATS`); Pillow's other
  plugins (EPS, which runs Ghostscript, PSD, ICO, ...) never see untrusted bytes.

Limits (constructor arguments of :class:`ImageTransform`, keywords of :func:`load_image`):
``max_pixels`` (default 89,478,485, Pillow's own decompression-bomb threshold) is checked
against the size the header declares, before decoding; ``max_bytes`` (default 64 MiB)
bounds encoded input, bytes or file. Pillow's global ``PIL.Image.MAX_IMAGE_PIXELS`` still
refuses anything over twice its value on its own; raise it too if ``max_pixels`` must go
beyond that. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left as Pillow's default (False);
code that sets it to True disables the truncation check for the whole process.

Every failure is an :class:`~filip_engine.errors.ImageDecodeError` (an ``InvalidInputError``)
with one sentence naming the input, raised ``from`` the underlying exception.
"""
from __future__ import annotations

import functools
import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from filip_contract.images import UNSTORED_MODES

from .errors import ImageDecodeError, InvalidInputError

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_BYTES", "SUPPORTED_FORMATS",
    "ImageInput", "ImageTransform", "RECIPES", "decode_image", "load_image",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MAX_PIXELS = 89_478_485            # Pillow's default MAX_IMAGE_PIXELS: 1024**3 // 4 // 3
DEFAULT_MAX_BYTES = 64 * 1024 * 1024       # encoded input (bytes or file size)

# Formats handed to Pillow; the rest of its plugins are never tried on untrusted input.
# JPEG includes MPO (the multi-picture JPEG of cameras and phones: Pillow opens it through
# its JPEG plugin). AVIF is used where this Pillow build has libavif.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# Above this many pixels in Pillow's resize buffers, resize only what the crop keeps.
_EXACT_RESIZE_MAX_PIXELS = 1 << 24

_BICUBIC = Image.Resampling.BICUBIC
_PRECISION_BITS = 22                       # Pillow's fixed-point coefficients (Resample.c)

# EXIF Orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB")


# --- stage 1: any input -> an upright PIL image in its own mode -------------------------
def decode_image(src: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """Decode ``src`` fully and return it upright (EXIF orientation applied), in its own
    pixel mode (what the reference resizes in), except that 16-bit and 32-bit integer
    greyscale become 8-bit "L" (``v >> 8``). Raises :class:`ImageDecodeError` for anything
    that is not a readable image within the limits or has a mode the engine cannot convert."""
    _check_limit("max_pixels", max_pixels)
    _check_limit("max_bytes", max_bytes)
    if isinstance(src, Image.Image):
        what = f"PIL image (mode {src.mode}, {src.width}x{src.height})"
        _check_pixels(src.size, max_pixels, what)
        _decode(src, what)
    elif isinstance(src, np.ndarray):
        return _from_array(src, max_pixels)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = src.tobytes() if isinstance(src, memoryview) else src
        what = f"encoded image ({len(data)} bytes)"
        if not data:
            raise ImageDecodeError("encoded image is empty (0 bytes)")
        if len(data) > max_bytes:
            raise ImageDecodeError(f"{what} is over the max_bytes limit of {max_bytes}")
        src = _open(data, what, max_pixels)
    elif isinstance(src, (str, os.PathLike)):
        data, what = _read_file(src, max_bytes)
        src = _open(data, what, max_pixels)
    else:
        raise ImageDecodeError(
            f"unsupported image input of type {type(src).__module__}.{type(src).__qualname__}; "
            "expected a path, encoded bytes, a PIL image or a uint8 numpy array")
    return _source_mode(_upright(src), what)


def load_image(src: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """:func:`decode_image`, then converted to RGB (alpha and palette transparency dropped,
    as ``convert("RGB")`` drops them). The result may be ``src`` itself when that is an
    upright RGB PIL image."""
    return _to_rgb(decode_image(src, max_pixels=max_pixels, max_bytes=max_bytes))


def _check_limit(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"{what} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageDecodeError(
            f"{what} has {w}x{h} = {w * h:,} pixels, over the max_pixels limit of {max_pixels:,} "
            "(refused before decoding: a possible decompression bomb)")


def _read_file(src: str | os.PathLike, max_bytes: int) -> tuple[bytes, str]:
    path = os.fsdecode(os.fspath(src))
    shown = path if len(path) <= 200 else path[:200] + "..."
    what = f"image file '{shown}'"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ImageDecodeError(f"{what} is {size} bytes, over the max_bytes limit of {max_bytes}")
            data = f.read(max_bytes + 1)
    except FileNotFoundError as e:
        raise ImageDecodeError(f"{what} does not exist") from e
    except IsADirectoryError as e:
        raise ImageDecodeError(f"{what} is a directory, not a file") from e
    except (OSError, ValueError) as e:      # permissions, name too long, NUL in the path, ...
        raise ImageDecodeError(f"{what} cannot be read: {e}") from e
    if not data:
        raise ImageDecodeError(f"{what} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageDecodeError(f"{what} is over the max_bytes limit of {max_bytes}")
    return data, what


def _open(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """Identify ``data`` from its header, check its declared size, then decode it fully."""
    formats = _available_formats()
    try:
        # Our max_pixels check below replaces Pillow's warning (its hard error at twice
        # MAX_IMAGE_PIXELS stays). catch_warnings is process-global: a concurrent thread
        # could briefly see this filter, which only hides that one warning category.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{what} has too many pixels; Pillow refused it before decoding "
                               f"as a possible decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        kind = _sniff(data)
        raise ImageDecodeError(
            f"{what} is {kind + ', ' if kind else ''}not an image in a supported format "
            f"({', '.join(formats)}), or its header is corrupt") from e
    except MemoryError:
        raise
    except Exception as e:                  # a decoder's header parser failing on bad data
        raise ImageDecodeError(f"{what} is corrupt: its header could not be read ({e})") from e
    _check_pixels(img.size, max_pixels, what)
    _decode(img, what)
    return img


@functools.lru_cache(maxsize=None)
def _available_formats() -> tuple[str, ...]:
    """SUPPORTED_FORMATS that this Pillow build can open (AVIF needs libavif)."""
    Image.init()
    return tuple(f for f in SUPPORTED_FORMATS if f in Image.OPEN)


def _decode(img: Image.Image, what: str) -> None:
    """``img.load()`` with Pillow's many failure types turned into one sentence."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except MemoryError:
        raise
    except Image.DecompressionBombError as e:   # a frame larger than the declared canvas
        raise ImageDecodeError(f"{what} has too many pixels; Pillow refused it as a possible "
                               f"decompression bomb: {e}") from e
    except Exception as e:
        if "truncated" in str(e).lower():
            raise ImageDecodeError(f"{what} is truncated: the data ends before the image does ({e})") from e
        raise ImageDecodeError(f"{what} is corrupt: its pixel data could not be decoded "
                               f"({type(e).__name__}: {e})") from e


def _sniff(data: bytes) -> str | None:
    """Name a few formats people send that are not supported, for a clearer message."""
    head = data[:64]
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
        return "a HEIC/HEIF image"
    if head.lstrip().startswith((b"<svg", b"<?xml")):
        return "an SVG/XML document"
    return None


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF Orientation tag (same table as ``ImageOps.exif_transpose``)."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:                       # unreadable EXIF: no orientation, as browsers do
        return img
    method = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return img if method is None else img.transpose(method)


def _source_mode(img: Image.Image, what: str) -> Image.Image:
    """Check the mode; 16-bit / 32-bit integer greyscale -> "L" by ``v >> 8``."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        samples = np.asarray(img)           # uint16 (either byte order) or int32 for "I"
        if mode == "I":
            samples = np.clip(samples, 0, 65535)
        return Image.fromarray((samples >> 8).astype(np.uint8))
    if mode in UNSTORED_MODES:              # modes no file stores: as the client sends them
        return img.convert(UNSTORED_MODES[mode])
    if mode == "PA":                        # resized as it stands, its palette indices would be blended
        return img.convert("RGBA")
    if mode == "RGB" or mode in _CONVERTIBLE_MODES:
        return img
    raise ImageDecodeError(
        f"{what} has unsupported pixel mode {mode!r}; supported: RGB, "
        f"{', '.join(_CONVERTIBLE_MODES + tuple(UNSTORED_MODES) + _SIXTEEN_BIT_MODES)}")


def _composite_on_white(img: Image.Image) -> Image.Image:
    """transformers' ``convert_to_rgb``: an image with alpha (or palette transparency) is
    composited onto white, any other converted with ``convert("RGB")``."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """``convert("RGB")`` of a mode :func:`_source_mode` accepted (it drops alpha)."""
    mode = img.mode
    return img if mode == "RGB" else img.convert("RGB")


def _from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageDecodeError(
            f"numpy image has dtype {arr.dtype}, expected uint8 (0..255); "
            "convert it first, e.g. (x * 255).round().clip(0, 255).astype(np.uint8) for floats in [0, 1]")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        hint = (" (it looks channels-first; transpose to HxWxC)"
                if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) else "")
        raise ImageDecodeError(
            f"numpy image has shape {arr.shape}, expected HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA){hint}")
    what = f"numpy image of shape {arr.shape}"
    _check_pixels((arr.shape[1], arr.shape[0]), max_pixels, what)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(arr))   # L, RGB or RGBA


# --- stage 2: resize + centre crop in the image's own mode, then RGB, then normalise -----
def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """``Resize(size)`` for an int size (torchvision and transformers agree): shortest side
    -> size, long side ``int(size * long / short)`` (truncated)."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def _offset_round(excess: int) -> int:
    """torchvision ``CenterCrop``: ``int(round(excess / 2.0))`` (half to even)."""
    return int(round(excess / 2.0))


def _offset_floor(excess: int) -> int:
    """transformers ``center_crop``: ``excess // 2``."""
    return excess // 2


def _resize_crop(img: Image.Image, resize: int, crop: int, offset=_offset_round) -> Image.Image:
    """``Resize(resize, BICUBIC)`` then ``CenterCrop(crop)`` (``crop <= resize``) in the
    image's own mode, as torchvision and transformers call Pillow: ``img.resize`` (so
    Pillow's per-mode rules hold: NEAREST for "P" and "1", premultiplied alpha for "RGBA"
    and "LA") and ``img.crop``. Returns a ``crop`` x ``crop`` image in the same mode."""
    w, h = img.size
    new_w, new_h = _resized_size(w, h, resize)
    left, top = offset(new_w - crop), offset(new_h - crop)
    # Shrinking keeps Pillow's buffers within the source's size; enlarging a thin image
    # does not (its long side grows by resize / short), so past a budget only the cropped
    # window of the long axis is computed.
    if min(w, h) >= resize or new_w * max(h, new_h) <= _EXACT_RESIZE_MAX_PIXELS:
        return img.resize((new_w, new_h), _BICUBIC).crop((left, top, left + crop, top + crop))
    return _resize_crop_window(img, (new_w, new_h), (left, top), crop)


def _channels(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _resize_crop_window(img: Image.Image, new_size: tuple[int, int], corner: tuple[int, int],
                        crop: int) -> Image.Image:
    """:func:`_resize_crop` for an enlarged thin image, computing only the kept window."""
    (w, h), (new_w, new_h), (left, top) = img.size, new_size, corner
    mode = img.mode
    if mode in ("P", "1"):
        # Pillow resizes these with NEAREST whatever filter is asked; a palette lookup (or
        # 0/1 -> 0/255) commutes with picking pixels, so pick from the RGB image.
        rows = _nearest_sources(h, new_h, top, crop)
        cols = _nearest_sources(w, new_w, left, crop)
        return Image.fromarray(np.ascontiguousarray(np.asarray(img.convert("RGB"))[rows][:, cols]))
    # Pillow resizes RGBA and LA in premultiplied alpha (RGBa, La) and converts back.
    work = img.convert({"RGBA": "RGBa", "LA": "La"}[mode]) if mode in ("RGBA", "LA") else img
    # Enlarging: Pillow runs the horizontal pass first (it goes vertical-first only when the
    # height shrinks), each pass a 1-D filter applied row by row / column by column.
    if w < h:       # portrait: horizontal pass (Pillow), then the long vertical pass (ours)
        first, taps = _bicubic_taps(h, new_h, top, crop)
        lo, hi = int(first.min()), min(int((first + taps.shape[1]).max()), h)
        band = _channels(work.crop((0, lo, w, hi)).resize((new_w, hi - lo), _BICUBIC))
        out = _resample_axis(np.ascontiguousarray(band[:, left:left + crop]), 0, first - lo, taps)
    else:           # landscape: the long horizontal pass (ours), then the vertical one (Pillow)
        first, taps = _bicubic_taps(w, new_w, left, crop)
        lo, hi = int(first.min()), min(int((first + taps.shape[1]).max()), w)
        cols = _resample_axis(_channels(work.crop((lo, 0, hi, h))), 1, first - lo, taps)  # [h, crop, C]
        tall = Image.frombytes(work.mode, (crop, h), cols.tobytes()).resize((crop, new_h), _BICUBIC)
        out = _channels(tall)[top:top + crop]
    window = Image.frombytes(work.mode, (crop, crop), np.ascontiguousarray(out).tobytes())
    return window.convert(mode) if work.mode != mode else window


def _nearest_sources(in_size: int, out_size: int, start: int, count: int) -> np.ndarray:
    """Source indices of Pillow's NEAREST resize for outputs ``start .. start+count-1`` of a
    whole-axis resize ``in_size -> out_size``. Pillow (``ImagingScaleAffine``) starts at
    ``x = a / 2`` with ``a = in_size / out_size`` and *adds* ``a`` once per output, in
    doubles, taking ``int(x)``; the accumulated rounding matters (a closed form
    ``int((i + 0.5) * a)`` differs), so the sum is reproduced exactly. Within one binade
    every addition adds the same rounded step unless ``a`` sits exactly halfway between
    two representable steps, so whole binades are skipped at once."""
    a = in_size / out_size
    x, n = a * 0.5, 0
    while n < start:
        ulp = math.ulp(x)
        top = 2.0 ** (math.frexp(x)[1])          # x lies in [top / 2, top)
        step = (x + a) - x
        if math.fmod(a, ulp) * 2 != ulp and step > 0:
            # x + j * step stays exact and equals j additions while the sums stay below `top`
            room = int((top - ulp - a - x) // step)
            jump = min(max(room, 0), start - n)
            if jump > 0:
                x, n = x + jump * step, n + jump
                continue
        x, n = x + a, n + 1
    out = np.empty(count, np.int64)
    for i in range(count):
        out[i] = int(x)
        x += a
    return np.minimum(out, in_size - 1)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), same operation order as its C code."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bicubic_taps(in_size: int, out_size: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's 8-bit fixed-point bicubic coefficients (``precompute_coeffs`` and
    ``normalize_coeffs_8bpc`` in Resample.c) for outputs ``start .. start+count-1`` of a
    whole-axis resize ``in_size -> out_size``. Returns the first input index of each
    output [count] and its integer weights [count, ksize] (zero past the window)."""
    scale = float(np.float32(in_size)) / out_size          # Pillow passes the box as C floats
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(start, start + count, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    n_taps = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - first
    k = np.arange(ksize)
    weights = _bicubic(((k[None, :] + first[:, None]).astype(np.float64) - center[:, None] + 0.5)
                       * (1.0 / filterscale))
    weights[k[None, :] >= n_taps[:, None]] = 0.0
    total = np.zeros(count)
    for j in range(ksize):                  # sequential sum, as in C
        total = total + weights[:, j]
    weights = weights / np.where(total == 0.0, 1.0, total)[:, None]      # C skips the division when 0
    scaled = weights * (1 << _PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return first, fixed


def _resample_axis(arr: np.ndarray, axis: int, first: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """One Pillow 8-bit resampling pass along ``axis`` of a uint8 HxWxC array."""
    shape = [1, 1, 1]
    shape[axis] = len(first)
    acc = np.int64(1 << (_PRECISION_BITS - 1))
    last = arr.shape[axis] - 1
    for j in range(taps.shape[1]):          # taps past a window have weight 0
        src = np.take(arr, np.minimum(first + j, last), axis=axis).astype(np.int64)
        acc = acc + src * taps[:, j].reshape(shape)
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


RECIPES = ("openclip", "transformers")


@dataclass(frozen=True)
class ImageTransform:
    """A checkpoint's eval preprocessing for ``image_size`` x ``image_size`` towers, as its
    own library computes it (``recipe``):

    - ``"openclip"``: OpenCLIP's ``image_transform(image_size, is_train=False)`` (and OpenAI
      CLIP's ``preprocess``): Resize(shortest side -> ``resize_size``, BICUBIC) and
      CenterCrop(``image_size``, offsets rounded) in the image's own mode, then
      ``convert("RGB")``, ToTensor (``uint8 / 255`` in float32), Normalize.
    - ``"transformers"``: ``CLIPImageProcessor`` (its Pillow backend): RGB first
      (transparency composited onto white, as ``convert_to_rgb`` does), then the same
      Resize, a centre crop with floored offsets, rescale (``uint8 * (1/255)`` in float64,
      then float32) and normalise.

    ``transform(src)`` -> float32 [3, S, S]; ``transform.batch(srcs)`` -> [N, 3, S, S].
    Build it once and reuse it; it holds no state besides these settings.
    """
    image_size: int                         # the crop: the tower's input resolution
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_pixels: int = DEFAULT_MAX_PIXELS    # checked from the header, before decoding
    max_bytes: int = DEFAULT_MAX_BYTES      # encoded input: bytes or file size
    recipe: str = "openclip"
    resize_size: int | None = None          # shortest side before the crop; None: image_size

    def __post_init__(self):
        for name in ("image_size", "resize_size"):
            v = getattr(self, name)
            if name == "resize_size" and v is None:
                object.__setattr__(self, name, self.image_size)
            elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
        if self.resize_size < self.image_size:
            raise InvalidInputError(f"resize_size {self.resize_size} is smaller than the crop "
                                    f"image_size {self.image_size}")
        if self.recipe not in RECIPES:
            raise InvalidInputError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        for name in ("mean", "std"):
            given = getattr(self, name)
            try:
                value = tuple(float(v) for v in given)
            except (TypeError, ValueError):
                value = ()
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise InvalidInputError(f"{name} must be 3 finite numbers (R, G, B), got {given!r}")
            object.__setattr__(self, name, value)
        if min(self.std) <= 0:
            raise InvalidInputError(f"std must be positive, got {self.std!r}")
        _check_limit("max_pixels", self.max_pixels)
        _check_limit("max_bytes", self.max_bytes)

    # --- the recipe as data (it travels in a repository's manifest) -----------------------
    def to_dict(self) -> dict:
        """The recipe (not the limits, which are the server's)."""
        return {"recipe": self.recipe, "image_size": self.image_size, "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict, **limits) -> "ImageTransform":
        try:
            return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]), recipe=str(d["recipe"]),
                       resize_size=int(d["resize_size"]), **limits)
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInputError(f"invalid preprocessing recipe {d!r}: {e}") from e

    @classmethod
    def from_image_processor(cls, config: dict, **limits) -> "ImageTransform":
        """The recipe of a transformers ``CLIPImageProcessor`` from its
        ``preprocessor_config.json`` (already validated by the checkpoint loader)."""
        crop = config["crop_size"]
        crop = crop["height"] if isinstance(crop, dict) else int(crop)
        size = config["size"]
        size = size["shortest_edge"] if isinstance(size, dict) else int(size)
        return cls(int(crop), tuple(config["image_mean"]), tuple(config["image_std"]),
                   recipe="transformers", resize_size=int(size), **limits)

    # --- applying it ------------------------------------------------------------------------
    def __call__(self, src: ImageInput) -> np.ndarray:
        """One image (any :data:`ImageInput`) -> float32 [3, S, S]."""
        img = decode_image(src, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        if self.recipe == "transformers":
            img = _composite_on_white(img)
            window = _resize_crop(img, self.resize_size, self.image_size, _offset_floor)
        else:
            window = _to_rgb(_resize_crop(img, self.resize_size, self.image_size, _offset_round))
        return self._normalise(np.asarray(window))

    def batch(self, srcs: Sequence[ImageInput], *, start: int = 0) -> np.ndarray:
        """Images -> float32 [N, 3, S, S]. Every item is tried; the error lists each bad index
        (numbered from ``start``, for callers that feed a long list in slices)."""
        if isinstance(srcs, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)) or (
                isinstance(srcs, np.ndarray) and srcs.ndim != 4):
            raise ImageDecodeError(f"batch expects a sequence of images, got a single {type(srcs).__name__}; "
                                   "call the transform itself for one image")
        items = list(srcs)
        s = self.image_size
        out = np.empty((len(items), 3, s, s), np.float32)
        failures: list[tuple[int, ImageDecodeError]] = []
        for i, src in enumerate(items):
            try:
                out[i] = self(src)
            except ImageDecodeError as e:
                failures.append((i, e))
        if len(failures) == 1:
            i, e = failures[0]
            raise ImageDecodeError(f"image {i + start} could not be read: {e}") from e
        if failures:
            detail = "; ".join(f"image {i + start}: {e}" for i, e in failures)
            raise ImageDecodeError(f"{len(failures)} of {len(items)} images could not be read: "
                                   f"{detail}") from failures[0][1]
        return out

    def from_rgb(self, img: Image.Image) -> np.ndarray:
        """Resize + centre crop + normalise an RGB PIL image -> float32 [3, S, S]."""
        if not isinstance(img, Image.Image) or img.mode != "RGB":
            got = f"mode {img.mode!r}" if isinstance(img, Image.Image) else type(img).__name__
            raise ImageDecodeError(f"from_rgb expects an RGB PIL image, got {got}; "
                                   "call the transform itself (or load_image) to convert other inputs")
        offset = _offset_floor if self.recipe == "transformers" else _offset_round
        return self._normalise(np.asarray(_resize_crop(img, self.resize_size, self.image_size, offset)))

    def _normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [S, S, 3] -> normalised float32 [3, S, S] in the recipe's arithmetic."""
        if self.recipe == "transformers":      # rescale in float64 (numpy's default), then float32
            x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        else:                                  # torchvision ToTensor: float32 division
            x = pixels.astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))
