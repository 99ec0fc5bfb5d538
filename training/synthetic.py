"""The built-in dataset: five classes of procedural textures, generated deterministically.

Each image shows one large blob (an ellipse or a random convex polygon covering roughly a
quarter to half of the picture) filled with the class's texture: ``checks`` (a rotated
checkerboard), ``dots`` (a rotated lattice of discs), ``rings`` (concentric circles around a
random centre), ``stripes`` (parallel bands) or ``zigzag`` (chevron bands). Scale, angle and
phase are random. The texture's ink has the class's typical hue with some spread (hues of
neighbouring classes overlap, so colour is a hint, not the answer) on a greyish paper; the
blob sits on a muted two-colour gradient with pixel noise, random clutter lines and up to two
small patches of *other* classes' textures as distractors; some images are blurred.

Sizes vary (72 to 128 px per side, rarely square) and files come in the formats and modes a
real dataset mixes: JPEG (60%), RGB, RGBA, palette and greyscale PNG. Two deliberately broken
files (a truncated JPEG and an empty PNG) show the bad-file report at work.

Beside it, never inside it, lies a held-out out-of-distribution set (``generate_ood``):
images of none of the classes (plain noise, smooth gradients, cloudy fields, scribbles of
lines and outlines, flat colours), on which a model should say it is unsure. It is never
trained or fitted on; the comparison only measures how often each model abstains on it.

Nothing is downloaded: the same seed always writes the same files.
"""
from __future__ import annotations

import colorsys
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common.files import atomic_folder

CLASSES = ("checks", "dots", "rings", "stripes", "zigzag")
VERSION = 1  # bump when the drawings change, so cached copies are regenerated
DEFAULT_IMAGES_PER_CLASS = 160
DEFAULT_DIR = Path("data") / f"builtin-v{VERSION}"
BROKEN_FILES = ("dots/dots_broken.jpg", "stripes/stripes_empty.png")
OOD_VERSION = 1  # likewise for the out-of-distribution drawings
OOD_KINDS = ("noise", "gradient", "clouds", "scribbles", "flat")
DEFAULT_OOD_IMAGES = 100
# A sibling of the dataset's folder, not a sub-folder: an ImageFolder would read one as a class.
DEFAULT_OOD_DIR = Path("data") / f"builtin-ood-v{OOD_VERSION}"


def _pattern(name: str, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A boolean texture of class ``name`` over pixel coordinates, at a random scale and angle."""
    period = rng.uniform(26, 50)  # pixels at the 2x drawing resolution
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, period)
    v = -xx * math.sin(angle) + yy * math.cos(angle) + rng.uniform(0, period)
    if name == "stripes":
        return np.sin(2 * math.pi * u / period) > rng.uniform(-0.4, 0.4)
    if name == "checks":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if name == "dots":
        du = (u / period) % 1 - 0.5
        dv = (v / period) % 1 - 0.5
        return du * du + dv * dv < rng.uniform(0.25, 0.4) ** 2
    if name == "rings":
        cx, cy = rng.uniform(0, xx.max()), rng.uniform(0, yy.max())
        return np.sin(2 * math.pi * np.hypot(xx - cx, yy - cy) / period) > 0
    if name == "zigzag":
        wave = np.abs((v / (1.5 * period)) % 2 - 1) * period * rng.uniform(0.8, 1.6)
        return np.sin(2 * math.pi * (u + wave) / period) > 0
    raise ValueError(name)


def _blob_mask(W: int, H: int, rng: np.random.Generator) -> np.ndarray:
    """A random ellipse or convex polygon covering roughly 25-60% of the image."""
    mask = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0.3, 0.7) * W, rng.uniform(0.3, 0.7) * H
    rx, ry = rng.uniform(0.28, 0.45) * W, rng.uniform(0.28, 0.45) * H
    if rng.random() < 0.5:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:
        t = np.sort(rng.uniform(0, 2 * math.pi, rng.integers(4, 8)))
        draw.polygon([(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in t], fill=255)
    return np.asarray(mask) > 127


def _color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(float)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255


def draw_image(label: int, rng: np.random.Generator) -> Image.Image:
    """One drawing of class ``label``; rendered at 2x and downscaled for smooth edges."""
    width, height = (int(v) for v in rng.integers(72, 129, 2))
    W, H = 2 * width, 2 * height
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    # Background: a gradient between two muted colours (noise is added at the end).
    c0, c1 = (_hsv(rng.uniform(), rng.uniform(0, 0.45), rng.uniform(0.1, 1)) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    canvas = c0 + (c1 - c0) * t[..., None]
    # Distractors: small patches of other classes' textures.
    for _ in range(rng.integers(0, 3)):
        other = CLASSES[(label + 1 + rng.integers(0, len(CLASSES) - 1)) % len(CLASSES)]
        r = rng.uniform(0.06, 0.12) * min(W, H)
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        spot = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) & _pattern(other, xx, yy, rng)
        canvas[spot] = _color(rng)
    # The class texture inside one large blob: the ink has the class's typical hue (classes
    # overlap in hue, so colour alone is a hint, not the answer), the paper is greyish.
    hue = (label / len(CLASSES) + rng.normal(0, 0.03)) % 1.0
    ink = _hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0))
    paper = _hsv(rng.uniform(), rng.uniform(0, 0.25), rng.uniform(0, 1))
    while abs(ink.mean() - paper.mean()) < 60:
        paper = _hsv(rng.uniform(), rng.uniform(0, 0.25), rng.uniform(0, 1))
    blob = _blob_mask(W, H, rng)
    texture = _pattern(CLASSES[label], xx, yy, rng)
    canvas[blob] = np.where(texture[blob][:, None], ink, paper)
    canvas += rng.normal(0, rng.uniform(0, 20), (H, W, 1))
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 4)):  # clutter lines across everything
        xy = [tuple(rng.uniform(0, [W, H])) for _ in range(2)]
        draw.line(xy, fill=tuple(int(c) for c in _color(rng)), width=int(rng.integers(2, 6)))
    img = img.resize((width, height), Image.Resampling.LANCZOS)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return img


def draw_ood_image(kind: str, rng: np.random.Generator) -> Image.Image:
    """One image of none of the classes: no blob, no class texture, sized like the dataset's."""
    width, height = (int(v) for v in rng.integers(72, 129, 2))
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    if kind == "noise":  # colour noise around a random mean, at a random grain
        grain = int(rng.integers(1, 6))
        small = rng.normal(_color(rng), rng.uniform(20, 90), (height // grain + 1, width // grain + 1, 3))
        canvas = np.kron(small, np.ones((grain, grain, 1)))[:height, :width]
    elif kind == "gradient":  # linear or radial, between two random colours
        c0, c1 = _color(rng), _color(rng)
        if rng.random() < 0.5:
            angle = rng.uniform(0, 2 * math.pi)
            t = xx * math.cos(angle) + yy * math.sin(angle)
        else:
            t = np.hypot(xx - rng.uniform(0, width), yy - rng.uniform(0, height))
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        canvas = c0 + (c1 - c0) * t[..., None]
    elif kind == "clouds":  # a smooth random field: coarse noise, upsampled
        coarse = rng.uniform(0, 255, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3)).astype(np.uint8)
        canvas = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), float)
    elif kind == "scribbles":  # random lines and outlines on a plain ground
        img = Image.new("RGB", (width, height), tuple(int(c) for c in _color(rng)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(3, 12)):
            xy = sorted(rng.uniform(0, [width, height], (2, 2)).tolist())
            box = [min(xy[0][0], xy[1][0]), min(xy[0][1], xy[1][1]), max(xy[0][0], xy[1][0]), max(xy[0][1], xy[1][1])]
            colour, line = tuple(int(c) for c in _color(rng)), int(rng.integers(1, 4))
            shape = rng.integers(0, 3)
            if shape == 0:
                draw.line([tuple(p) for p in xy], fill=colour, width=line)
            elif shape == 1:
                draw.ellipse(box, outline=colour, width=line)
            else:
                draw.rectangle(box, outline=colour, width=line)
        canvas = np.asarray(img, float)
    elif kind == "flat":  # one colour with faint pixel noise
        canvas = np.broadcast_to(_color(rng), (height, width, 3)).astype(float)
    else:
        raise ValueError(kind)
    canvas = canvas + rng.normal(0, rng.uniform(0, 8), (height, width, 1))
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


def _save(img: Image.Image, path_stem: Path, rng: np.random.Generator) -> None:
    """Save in one of the formats and modes a real dataset mixes."""
    kind = rng.choice(["jpeg"] * 6 + ["png", "png_rgba", "png_palette", "png_grey"])
    if kind == "jpeg":
        img.save(path_stem.with_suffix(".jpg"), quality=int(rng.integers(60, 95)))
    elif kind == "png":
        img.save(path_stem.with_suffix(".png"))
    elif kind == "png_rgba":  # a fully opaque alpha channel: converts back to the same RGB
        img.convert("RGBA").save(path_stem.with_suffix(".png"))
    elif kind == "png_palette":
        img.quantize(64).save(path_stem.with_suffix(".png"))
    else:
        img.convert("L").save(path_stem.with_suffix(".png"))


def generate(root: Path, images_per_class: int = DEFAULT_IMAGES_PER_CLASS, seed: int = 0) -> Path:
    """Write the dataset as an ImageFolder under ``root`` (atomically: all or nothing)."""
    root = Path(root)
    with atomic_folder(root) as tmp:
        for label, name in enumerate(CLASSES):
            (tmp / name).mkdir()
            for i in range(images_per_class):
                rng = np.random.default_rng([seed, label, i])
                _save(draw_image(label, rng), tmp / name / f"{name}_{i:04d}", rng)
        # The broken files a real dataset tends to have.
        jpeg = io.BytesIO()
        draw_image(1, np.random.default_rng([seed, 99])).save(jpeg, "JPEG")
        (tmp / BROKEN_FILES[0]).write_bytes(jpeg.getvalue()[:300])
        (tmp / BROKEN_FILES[1]).write_bytes(b"")
    return root


def generate_ood(root: Path, images: int = DEFAULT_OOD_IMAGES, seed: int = 0) -> Path:
    """Write the out-of-distribution set under ``root`` (atomically), the kinds in turn. Its
    seeds ([seed, 1000 + kind, i]) are not the dataset's ([seed, label, i], labels below 5)."""
    root = Path(root)
    with atomic_folder(root) as tmp:
        for i in range(images):
            k = i % len(OOD_KINDS)
            rng = np.random.default_rng([seed, 1000 + k, i])
            _save(draw_ood_image(OOD_KINDS[k], rng), tmp / f"{OOD_KINDS[k]}_{i:04d}", rng)
    return root


def ensure_builtin_ood(root: Path = DEFAULT_OOD_DIR) -> Path:
    """The out-of-distribution set's folder, generated first if it is missing."""
    root = Path(root)
    if not root.is_dir():
        print(f"Generating the out-of-distribution set in {root} ...", flush=True)
        generate_ood(root)
    return root


def ensure_builtin_dataset(root: Path = DEFAULT_DIR) -> Path:
    """Return the built-in dataset's folder, generating it first if it is missing."""
    root = Path(root)
    if not all((root / name).is_dir() for name in CLASSES):
        print(f"Generating the built-in dataset in {root} ...", flush=True)
        generate(root)
    return root
