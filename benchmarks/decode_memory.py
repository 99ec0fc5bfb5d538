"""Peak memory of the serving decode path, per accepted format and pixel layout, at the pixel limit.

    python -m benchmarks.decode_memory                 # every kind at 32 M pixels
    python -m benchmarks.decode_memory --megapixels 8 --kinds png-rgba,gif

Each kind is written once as a file of ``--megapixels`` pixels, then decoded in a fresh process
exactly as a request is (imaging.load_rgb, the model-input resize, the page's preview); the
figure is that process's peak resident memory above its resting size with the file read (Linux
/proc: the peak count is restarted just before), in
bytes per pixel, beside what imaging.decode_cost predicts for the file from its header (the
estimate the server refuses uploads by). Memory, not time: the figures do not depend on load.
"""
from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import RESULTS_DIR, machine, write_json

PROBE = """
import io, sys
from pathlib import Path
import imaging
from serve.service import fit_preview
def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
data = open(sys.argv[1], "rb").read()
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
resting = status("VmRSS")
image = imaging.load_rgb(io.BytesIO(data), 10**9)
imaging.resize_exact(image, (224, 224))
fit_preview(image)
print(status("VmHWM") - resting)
"""


def png_16bit_rgb(path: Path, width: int, height: int) -> None:
    """A 48-bit RGB PNG (Pillow cannot write one): IHDR, one IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" + np.full((width, 3), 40000, ">u2").tobytes()
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def gradient(width: int, height: int, mode: str) -> Image.Image:
    """A smooth picture (not a flat one: some encoders shortcut flat data)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    grey = ((x + y) / 2).astype(np.uint8)
    rgb = np.stack([grey, np.broadcast_to(x.astype(np.uint8), grey.shape),
                    np.broadcast_to(y.astype(np.uint8), grey.shape)], -1)
    image = Image.fromarray(rgb)
    return image if mode == "RGB" else image.convert(mode)


def write(kind: str, path: Path, width: int, height: int) -> None:
    if kind == "png-rgb16":
        return png_16bit_rgb(path, width, height)
    if kind in ("png-grey16", "tiff-grey16"):
        deep = Image.fromarray((np.arange(width, dtype=np.uint16)[None, :] * 7 + np.zeros((height, 1), np.uint16)))
        return deep.save(path, "PNG" if kind.startswith("png") else "TIFF")
    if kind == "tiff-float":
        return Image.fromarray(np.full((height, width), 100.5, np.float32)).save(path, "TIFF")
    fmt, variant = kind.split("-", 1)
    mode = {"rgb": "RGB", "rgba": "RGBA", "grey": "L", "grey-alpha": "LA", "cmyk": "CMYK", "palette": "P",
            "palette-alpha": "P", "lossy": "RGB", "lossless": "RGBA", "animated": "RGB"}[variant]
    image = gradient(width, height, "RGB" if mode == "P" else mode)
    options = {"JPEG": {"quality": 85}, "WEBP": {"quality": 80}}.get(fmt.upper().replace("JPG", "JPEG"), {})
    if mode == "P":
        image = image.quantize(256)
        if variant == "palette-alpha":
            options["transparency"] = 0
    if fmt == "webp":
        options["lossless"] = variant == "lossless"
    if variant == "animated":
        second = gradient(width, height, "RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if fmt == "gif":
            image, second = image.quantize(256), second.quantize(256)
        options.update(save_all=True, append_images=[second], duration=100)
    image.save(path, fmt.upper(), **options)


KINDS = ("jpeg-rgb", "jpeg-grey", "jpeg-cmyk", "png-rgb", "png-rgba", "png-grey-alpha", "png-grey16", "png-rgb16",
         "png-palette", "png-palette-alpha", "webp-lossy", "webp-lossless", "webp-animated",
         "gif-palette", "gif-animated", "tiff-rgb", "tiff-rgba", "tiff-cmyk", "tiff-grey16",
         "tiff-float", "bmp-rgb", "bmp-palette")


def measure(kind: str, folder: Path, pixels: int) -> dict:
    import imaging

    width = int((pixels * 4 / 3) ** 0.5)
    height = pixels // width
    path = folder / f"{kind}.{kind.split('-')[0]}"
    write(kind, path, width, height)
    peak = int(subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True,
                              check=True).stdout.strip())
    with Image.open(path) as img:
        mode = img.mode
    predicted = imaging.decode_cost(path)
    path.unlink()
    return {"kind": kind, "mode": mode, "pixels": width * height, "file_bytes": None,
            "peak_bytes": peak, "bytes_per_pixel": round(peak / (width * height), 2),
            "predicted_bytes": predicted, "predicted_per_pixel": round(predicted / (width * height), 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=32)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of: {', '.join(KINDS)}")
    args = parser.parse_args(argv)
    pixels = int(args.megapixels * 1e6)
    rows = []
    print(f"{'kind':<18} {'mode':<6} {'peak MB':>8} {'B/px':>6} {'predicted B/px':>15}")
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.kinds.split(","):
            row = measure(kind, Path(folder), pixels)
            rows.append(row)
            print(f"{kind:<18} {row['mode']:<6} {row['peak_bytes'] / 2**20:8.0f} {row['bytes_per_pixel']:6.2f} "
                  f"{row['predicted_per_pixel']:15.2f}", flush=True)
    write_json(RESULTS_DIR / "decode_memory.json", {"machine": machine(), "megapixels": args.megapixels,
                                                     "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
