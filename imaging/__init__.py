"""Image decoding shared by training and serving (Pillow and numpy only, never torch).

Both sides must turn the same file into the same pixels, so the rules live here once:
- EXIF orientation is applied;
- animated images use their first frame;
- every mode becomes 8-bit RGB the same way (see ``to_rgb``);
- images above a pixel limit are refused from their header, before decoding;
- the model input is the RGB image resized as ``imaging.preprocessing.Preprocessing`` says.
"""
from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse anything larger than this before decoding it (a 9,000 x 8,000 photo still passes).
# It sits below Pillow's own bomb warning (about 89 M pixels), so ours is the check that speaks.
DEFAULT_MAX_PIXELS = 80_000_000
# Transparent pixels are composited onto this colour, so RGBA/LA/P images are deterministic.
BACKGROUND = (255, 255, 255)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

Source = Union[str, os.PathLike, bytes, BinaryIO]


class ImageError(ValueError):
    """A file that is not a usable image; the message says why in one line."""


def load_rgb(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, check and fully decode an image file (path, bytes or file object) as RGB."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)) and os.path.getsize(source) == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(source) as img:
            width, height = img.size  # read from the header; nothing is decoded yet
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width} x {height} = {width * height:,} pixels, "
                    f"above the limit of {max_pixels:,}"
                )
            img.seek(0)  # first frame of an animation
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image file Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageError(f"unreadable image data ({type(exc).__name__}: {exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, the same way every time.

    - transparency (RGBA, LA, PA, P or L with a transparent colour) is composited over white;
    - 16- and 32-bit integer greyscale (I;16*, I) is scaled from 0..65535 to 0..255;
    - float greyscale (F) is read as 0..255 and clipped;
    - everything else (L, 1, CMYK, YCbCr, LAB, HSV, P without transparency) uses Pillow's convert.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            arr = arr / 257.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_exact(img: Image.Image, size: tuple[int, int],
                 resample: Image.Resampling = Image.Resampling.BILINEAR) -> Image.Image:
    """Resize an RGB image to exactly ``size`` = (height, width), aspect ratio not kept."""
    height, width = size
    if img.size == (width, height):
        return img
    return img.resize((width, height), resample)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)
