"""imaging.load_rgb: any file Pillow reads becomes the same RGB pixels every time, or ImageError."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import imaging
from imaging import ImageError, load_rgb
from imaging.preprocessing import Preprocessing

WHITE = (255, 255, 255)


def _encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def _rgb(data: bytes) -> np.ndarray:
    img = load_rgb(data)
    assert img.mode == "RGB"
    return np.asarray(img)


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    img.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    img.info["transparency"] = 1  # blue is the transparent colour
    return img


def _i16() -> Image.Image:
    values = np.array([[0, 257, 257 * 100, 65535]], dtype=np.uint16)
    return Image.fromarray(values, mode="I;16")


# mode -> (an image in that mode, the RGB pixels it must become)
CASES = {
    "P-transparent": (_palette_with_transparency(),
                      [[(255, 0, 0), WHITE, (255, 0, 0), WHITE], [WHITE, WHITE, (255, 0, 0), (255, 0, 0)]]),
    "RGBA": (Image.fromarray(np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], np.uint8), "RGBA"),
             [[(10, 20, 30), WHITE, (127, 127, 127)]]),
    "LA": (Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA"), [[(50, 50, 50), WHITE]]),
    "L": (Image.fromarray(np.array([[0, 128, 255]], np.uint8), "L"), [[(0, 0, 0), (128,) * 3, WHITE]]),
    "CMYK": (Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK"),
             [[WHITE, (0, 255, 255), (0, 0, 0)]]),
    "I;16": (_i16(), [[(0, 0, 0), (1, 1, 1), (100, 100, 100), WHITE]]),
    "1": (Image.fromarray(np.array([[0, 1]], bool)).convert("1"), [[(0, 0, 0), WHITE]]),
}
# The formats that store each mode losslessly.
FORMATS = {"CMYK": "TIFF"}


@pytest.mark.parametrize("case", CASES)
def test_every_mode_becomes_the_same_rgb(case):
    img, expected = CASES[case]
    data = _encode(img, FORMATS.get(case, "PNG"))
    assert Image.open(io.BytesIO(data)).mode == img.mode  # the file really holds that mode
    first = _rgb(data)
    np.testing.assert_array_equal(first, np.array(expected, np.uint8))
    # The same every time, from bytes, a file object or the in-memory image.
    np.testing.assert_array_equal(_rgb(data), first)
    np.testing.assert_array_equal(np.asarray(load_rgb(io.BytesIO(data))), first)
    np.testing.assert_array_equal(np.asarray(imaging.to_rgb(img)), first)


def test_rgb_files_load_from_a_path(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), pixels)
    np.testing.assert_array_equal(np.asarray(load_rgb(str(path))), pixels)


def test_exif_orientation_is_applied():
    # 40 x 20: left half red, right half blue; orientation 6 = rotate 90 degrees clockwise to view.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    out = _rgb(data)
    assert out.shape == (40, 20, 3)  # portrait now
    assert np.abs(out[5, 10].astype(int) - (255, 0, 0)).max() < 20  # the left side is on top
    assert np.abs(out[35, 10].astype(int) - (0, 0, 255)).max() < 20
    without = _encode(Image.fromarray(pixels), "JPEG", quality=95)
    assert _rgb(without).shape == (20, 40, 3)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (6, 4), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = _rgb(data)
    assert out.shape == (4, 6, 3)
    assert (out == (255, 0, 0)).all()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height in its header but carries almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_bomb_is_refused_from_the_header():
    # 85.5 M pixels: above our limit, below Pillow's own warning, so our check is what refuses it;
    # the pixel data is a few bytes, so decoding would fail differently.
    with pytest.raises(ImageError, match=r"9,500 x 9,000|9500 x 9000") as info:
        load_rgb(_png_header_only(9500, 9000))
    assert "above the limit of 80,000,000" in str(info.value)
    # A caller's lower limit applies the same way.
    with pytest.raises(ImageError, match="above the limit of 1,000"):
        load_rgb(_png_header_only(100, 100), max_pixels=1000)
    # A header far beyond Pillow's hard limit is refused too, as an ImageError.
    with pytest.raises(ImageError):
        load_rgb(_png_header_only(100_000, 100_000))


def test_small_image_with_the_same_header_trick_is_merely_truncated():
    with pytest.raises(ImageError, match="unreadable image data"):
        load_rgb(_png_header_only(100, 100))


def test_truncated_file_is_an_image_error(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = _encode(Image.fromarray(pixels), "JPEG")
    with pytest.raises(ImageError, match="unreadable"):
        load_rgb(jpeg[: len(jpeg) // 3])
    path = tmp_path / "cut.png"
    path.write_bytes(_encode(Image.fromarray(pixels))[:200])
    with pytest.raises(ImageError, match="unreadable"):
        load_rgb(path)


def test_zero_byte_file_is_an_image_error(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_rgb(path)
    with pytest.raises(ImageError, match="empty file"):
        load_rgb(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_rgb(io.BytesIO(b""))  # an upload's file object


def test_non_image_is_an_image_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image"):
        load_rgb(path)
    with pytest.raises(ImageError, match="not an image"):
        load_rgb(b"%PDF-1.4 not an image either")


def test_image_error_messages_are_one_line(tmp_path):
    for data in (b"", b"garbage", _png_header_only(100, 100), _png_header_only(9500, 9000)):
        with pytest.raises(ImageError) as info:
            load_rgb(data)
        assert "\n" not in str(info.value) and str(info.value)


def test_preprocessing_pixels_resize_exactly_with_the_named_filter():
    pixels = np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    out = Preprocessing(input_size=(16, 24)).pixels(img)
    assert out.shape == (16, 24, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(img.resize((24, 16), Image.Resampling.BILINEAR)))
    bicubic = Preprocessing(input_size=(16, 24), interpolation="bicubic").pixels(img)
    np.testing.assert_array_equal(bicubic, np.asarray(img.resize((24, 16), Image.Resampling.BICUBIC)))
    np.testing.assert_array_equal(Preprocessing(input_size=(30, 50)).pixels(img), pixels)  # right size: as is
    # Any mode is converted first, the same way load_rgb does it.
    img, _ = CASES["P-transparent"]
    np.testing.assert_array_equal(Preprocessing(input_size=(2, 4)).pixels(img), np.asarray(imaging.to_rgb(img)))


def test_preprocessing_spec_round_trips_in_timm_form():
    spec = Preprocessing(input_size=(24, 40), interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1))
    assert spec.to_dict() == {"input_size": [3, 24, 40], "interpolation": "bicubic", "crop_pct": 1.0,
                              "crop_mode": "squash", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]}
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    assert Preprocessing.from_metadata(spec.to_metadata()) == spec
    # Files exported before the timm keys: input_size [H, W], no interpolation or crop keys.
    old = {"input_size": "[24, 40]", "mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.5, 1.0]"}
    assert Preprocessing.from_metadata(old) == Preprocessing(input_size=(24, 40), mean=(0.5,) * 3,
                                                             std=(0.25, 0.5, 1.0))
    x = spec(Image.new("RGB", (7, 3), (255, 0, 128)))
    assert x.shape == (1, 3, 24, 40) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (128 / 255 - 0.5) / 1], atol=1e-6)
    for bad in ({"crop_mode": "center"}, {"crop_pct": 0.875}, {"interpolation": "area"}, {"std": (1, 0, 1)}):
        with pytest.raises(ValueError):
            Preprocessing(input_size=(8, 8), **bad)
    with pytest.raises(ValueError, match="RGB"):
        Preprocessing.from_dict({"input_size": [1, 8, 8]})
