"""Image decoding shared by training and serving (Pillow and numpy only, never torch).

Both sides must turn the same file into the same pixels, so the rules live here once:
- only the raster formats in ``FORMATS`` are opened: PostScript, PDF, SVG and the rest never
  reach a decoder (Pillow's EPS plugin would start Ghostscript);
- images above a pixel limit are refused from their header, before decoding;
- EXIF orientation is applied;
- animated images use their first frame;
- every mode becomes 8-bit RGB the same way (see ``to_rgb``), without float or full-size
  temporary copies; what decoding a file will cost is estimated from its header (decode_cost)
  and the serving side refuses what would take more than its memory bound;
- the model input is the RGB image resized as ``imaging.preprocessing.Preprocessing`` says.
"""
from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse anything larger than this before decoding it (a 9,000 x 8,000 photo still passes).
# It sits below Pillow's own bomb warning (about 89 M pixels), so ours is the check that speaks.
DEFAULT_MAX_PIXELS = 80_000_000
# Transparent pixels are composited onto this colour, so RGBA/LA/P images are deterministic.
BACKGROUND = (255, 255, 255)
# The formats Pillow may open, by its format names (MPO, the multi-picture JPEG of some
# cameras, is opened by the JPEG plugin). Everything else is refused before any decoder runs.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
FORMAT_NAMES = "JPEG, PNG, GIF, BMP, WebP or TIFF"
# What the serving side allows (the app, serve.predict, serve.evaluate): 32 M pixels, and at most
# 300 MB to decode, estimated from the header by format and mode (decode_cost): most layouts
# reach the pixel limit first, WebP (16 bytes per pixel) and float or grey-alpha ones do not.
SERVING_MAX_PIXELS = 32_000_000
SERVING_MAX_DECODE_BYTES = 300 * 2**20
# Bytes per pixel that decoding and converting to RGB takes at the peak, by the mode Pillow opens
# a file as: the decoded image, to_rgb's conversions and the RGB result alive together (RGBA:
# 4 + 3; a transparent palette: 1 + its RGBA expansion 4 + 3; float grey: 4 + its array 4 + 1 +
# 3), plus about 1.2 of Pillow's working memory; measured at 32 M pixels by
# benchmarks.decode_memory (docs/serving.md) and rounded up.
DECODE_BYTES_PER_PIXEL = {"1": 5.5, "L": 5.5, "P": 5.5, "PA": 9.5, "RGB": 4.5, "RGBA": 8.5, "RGBa": 8.5,
                          "LA": 12.5, "La": 12.5, "CMYK": 8.5, "YCbCr": 7.5, "LAB": 7.5, "HSV": 7.5,
                          "I;16": 7.5, "I;16B": 7.5, "I;16L": 7.5, "I;16N": 7.5, "I": 12.5, "F": 12.5}
# Formats whose decoder costs the same whatever the mode: Pillow's WebP decoder works through
# full RGBA frame buffers (16.1 bytes per pixel measured for lossy, lossless and animated files).
FORMAT_BYTES_PER_PIXEL = {"WEBP": 16.5}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Deep greyscale is converted this many pixels at a time: bounded temporary memory.
_CHUNK_PIXELS = 1 << 20
# 16-bit value -> 8-bit, rounded as np.rint(x / 257) (never a tie: 257 is odd).
_DEEP_TO_8BIT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)

Source = Union[str, os.PathLike, bytes, BinaryIO]


class ImageError(ValueError):
    """A file that is not a usable image; the message says why in one line."""


def decode_cost(source: Source) -> int:
    """The bytes of memory that decoding this file with ``load_rgb`` costs at most, from its header."""
    with Image.open(_seekable(source), formats=FORMATS) as img:
        return _cost(img)


def _seekable(source: Source):
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _cost(img: Image.Image) -> int:
    mode = "PA" if img.mode == "P" and "transparency" in img.info else img.mode
    per_pixel = FORMAT_BYTES_PER_PIXEL.get(img.format) or \
        DECODE_BYTES_PER_PIXEL.get(mode, max(DECODE_BYTES_PER_PIXEL.values()))
    if _orientation(img) is not None:
        per_pixel += 3  # the transposed copy of the RGB result
    return int(img.width * img.height * per_pixel)


def load_rgb(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS,
             max_bytes: int | None = None) -> Image.Image:
    """Open, check and fully decode an image file (path, bytes or file object) as RGB.

    ``max_bytes`` refuses, from the header, a file whose decoding would cost more memory than
    that (``decode_cost``): the pixel limit alone lets some layouts cost three times others."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        empty = os.path.getsize(source) == 0
    else:  # a file object (an upload): empty from where it stands
        start = source.tell()
        empty = source.seek(0, os.SEEK_END) == start
        source.seek(start)
    if empty:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(source, formats=FORMATS) as img:
            width, height = img.size  # read from the header; nothing is decoded yet
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width} x {height} = {width * height:,} pixels, "
                    f"above the limit of {max_pixels:,}"
                )
            if max_bytes is not None and _cost(img) > max_bytes:
                raise ImageError(
                    f"image is {width} x {height} {img.format} ({img.mode}), which would take about "
                    f"{_cost(img) / 2**20:,.0f} MB to decode, above the limit of {max_bytes / 2**20:,.0f} MB; "
                    "send a smaller image")
            img.seek(0)  # first frame of an animation
            img.load()
            transpose = _orientation(img)
            rgb = to_rgb(img)
        if rgb is not img:
            img.close()  # frees the decoded original before a transposed copy is made
        return rgb.transpose(transpose) if transpose is not None else rgb
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image file in an accepted format ({FORMAT_NAMES})") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageError(f"unreadable image data ({type(exc).__name__}: {exc})") from None


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The transpose that ImageOps.exif_transpose would apply (it also copies the whole image
    when there is none; per-pixel conversion and transposing commute, so it is applied last)."""
    orientation = img.getexif().get(0x0112, 1)
    return {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}.get(orientation)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, the same way every time.

    - transparency (RGBA, LA, PA, P or L with a transparent colour) is composited over white
      (pasted through the alpha channel: the same pixels as Image.alpha_composite over opaque
      white, without three full-size RGBA temporaries);
    - 16- and 32-bit integer greyscale (I;16*, I) is scaled from 0..65535 to 0..255, rounded;
    - float greyscale (F) is read as 0..255 and clipped;
    - everything else (L, 1, CMYK, YCbCr, LAB, HSV, P without transparency) uses Pillow's convert.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _deep_grey_to_l(img).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba)
        return out
    return img.convert("RGB")


def _deep_grey_to_l(img: Image.Image) -> Image.Image:
    """I;16*, I or F greyscale as 8-bit L, a block of rows at a time (no float64 image)."""
    arr = np.asarray(img)
    grey = np.empty(arr.shape, np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(1, arr.shape[1]))
    for top in range(0, arr.shape[0], rows):
        block = arr[top:top + rows]
        if img.mode == "F":
            grey[top:top + rows] = np.clip(np.rint(block), 0, 255)
        else:
            grey[top:top + rows] = _DEEP_TO_8BIT[np.clip(block, 0, 65535)]
    return Image.fromarray(grey)  # 2-D uint8: mode L


def resize_exact(img: Image.Image, size: tuple[int, int],
                 resample: Image.Resampling = Image.Resampling.BILINEAR) -> Image.Image:
    """Resize an RGB image to exactly ``size`` = (height, width), aspect ratio not kept."""
    height, width = size
    if img.size == (width, height):
        return img
    return img.resize((width, height), resample)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)
