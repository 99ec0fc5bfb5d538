"""The training-side pipelines, each stated once (after torchvision's classification presets).

Images reach these pipelines already decoded to RGB uint8 CHW tensors (see ``pixel_tensor``): the
data loader decodes each file once and caches it, so the random augmentation is drawn fresh
every epoch from the cached copy. Evaluation uses the exact H x W resize, built from
``imaging.preprocessing.Preprocessing``, the spec serving uses too. Training crops from a
larger copy of the same squash (``stored_size``), so a crop is cut from the pixels the photo
has, as torchvision's RandomResizedCrop cuts it from the photo, instead of enlarging a part of
the H x W copy.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

import imaging
from imaging.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def pixel_tensor(source: imaging.Source | Image.Image, preprocessing: Preprocessing,
                 max_pixels: int = imaging.DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """A file (or Pillow image) as the model sees it before normalisation: uint8, 3 x H x W."""
    img = source if isinstance(source, Image.Image) else imaging.load_rgb(source, max_pixels)
    return torch.from_numpy(np.ascontiguousarray(preprocessing.pixels(img).transpose(2, 0, 1)))


# The original recipe's augmentation (see TrainAugment); the crop's smallest scale is a setting
# (TrainConfig.crop_scale, 0.7 in the original recipe).
CROP_RATIO = (3 / 4, 4 / 3)
MAX_MARGIN = 2.0  # the stored training copy is at most this many times the training size per side
FLIP_P, DEGREES, TRANSLATE = 0.5, 15.0, 0.05
JITTER = (0.3, 0.3, 0.3, 0.1)  # brightness, contrast, saturation, hue
BLUR_SIGMA = (0.1, 1.0)  # 3 x 3 kernel
ERASE_P, ERASE_SCALE, ERASE_RATIO = 0.2, (0.02, 0.15), (0.3, 3.3)
GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision
# One image's parameters, in this order and these widths (see TrainAugment.draw).
PARAMETER_LAYOUT = {"crop": 4, "flip": 1, "angle": 1, "jitter": 4, "order": 4, "shift": 2,
                    "sigma": 1, "erase": 5}


def stored_size(size: tuple[int, int], crop_scale: float) -> tuple[int, int]:
    """The size training copies are stored at: large enough that a crop of the smallest scale
    and the most extreme aspect ratio still has the training size's pixels (is not enlarged),
    within MAX_MARGIN per side. A crop of w = M sqrt(scale * aspect) must reach the size S, so
    M = S / sqrt(scale * 3/4) (1.38 S at the original's 0.7)."""
    factor = min(MAX_MARGIN, 1 / math.sqrt(crop_scale * min(CROP_RATIO[0], 1 / CROP_RATIO[1])))
    return tuple(math.ceil(n * max(1.0, factor) - 1e-9) for n in size)


def _box(rng: random.Random, height: int, width: int, scale, ratio, tries: int = 10):
    """A random box of the image: (top, left, h, w), or None, as torchvision draws crops."""
    for _ in range(tries):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return None


class TrainAugment:
    """The original recipe's augmentation, drawn per image and applied to a whole batch.

    Per image: RandomResizedCrop (scale ``crop_scale``-1, aspect 3/4-4/3), horizontal flip (p 0.5),
    rotation (+-15 deg), ColorJitter (brightness, contrast, saturation 0.3, hue 0.1, in a random
    order), translation (+-5%), Gaussian blur (3 x 3, sigma 0.1-1), normalisation and
    RandomErasing (p 0.2, 2-15% of the area, set to 0). ``draw`` picks one image's parameters
    from a generator of its own, so they depend on nothing else in the batch. ``crop`` cuts one
    image's crop from its stored copy (torchvision's own ``resized_crop``, antialiased, as
    RandomResizedCrop does); ``__call__`` applies the rest to a batch of crops on the batch's
    device. Flip, rotation and translation are one bilinear warp (one resampling instead of
    three; what rotation and translation uncover is black, and the translation now comes
    before the colour steps, which only changes that uncovered strip), the other steps batched
    tensor operations: per-image Python calls would cost more than the model's own work at
    small image sizes.
    """

    def __init__(self, *, size: tuple[int, int], crop_scale: float = 0.7, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.size, self.crop_scale = size, crop_scale
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def draw(self, rng: random.Random, source_size: tuple[int, int] | None = None) -> torch.Tensor:
        """One image's parameters; the crop box is in the pixels of the stored copy
        (``source_size``, default the training size), everything else at the training size."""
        height, width = self.size
        source_h, source_w = source_size or self.size
        crop = _box(rng, source_h, source_w, (self.crop_scale, 1.0), CROP_RATIO) or (0, 0, source_h, source_w)
        flip = float(rng.random() < FLIP_P)
        angle = rng.uniform(-DEGREES, DEGREES)
        jitter = [rng.uniform(1 - j, 1 + j) for j in JITTER[:3]] + [rng.uniform(-JITTER[3], JITTER[3])]
        order = rng.sample(range(4), 4)
        shift = [round(rng.uniform(-TRANSLATE * n, TRANSLATE * n)) for n in (width, height)]
        sigma = rng.uniform(*BLUR_SIGMA)
        erase = _box(rng, height, width, ERASE_SCALE, ERASE_RATIO) if rng.random() < ERASE_P else None
        erase = (1, *erase) if erase else (0, 0, 0, 0, 0)
        return torch.tensor([*crop, flip, angle, *jitter, *order, *shift, sigma, *erase], dtype=torch.float32)

    def crop(self, image: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """One stored uint8 image 3 x h x w -> its crop (``parameters``' box), resized to the
        training size: uint8 3 x H x W."""
        top, left, h, w = (int(v) for v in parameters[:PARAMETER_LAYOUT["crop"]].tolist())
        return v2.functional.resized_crop(image, top, left, h, w, list(self.size),
                                          interpolation=v2.InterpolationMode.BILINEAR, antialias=True)

    def __call__(self, images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """uint8 crops N x 3 x H x W (see ``crop``) and their N drawn parameter rows ->
        normalised float32."""
        device = images.device
        p = dict(zip(PARAMETER_LAYOUT, parameters.split(list(PARAMETER_LAYOUT.values()), dim=1)))
        x = images.float().div_(255)
        x = _warp(x, *(p[k].to(device) for k in ("flip", "angle", "shift")))
        x = _jitter(x, p["jitter"].to(device), p["order"].long())
        x = _blur(x, p["sigma"].to(device))
        x = (x - self.mean.to(device)) / self.std.to(device)
        erase = p["erase"].long()
        for row in torch.nonzero(erase[:, 0]).flatten().tolist():
            _, top, left, h, w = erase[row].tolist()
            x[row, :, top:top + h, left:left + w] = 0
        return x


def _warp(x, flip, angle, shift):
    """Flip, rotate and translate each image in one bilinear resampling."""
    n, _, height, width = x.shape
    a = torch.deg2rad(angle[:, 0])
    cos, sin = a.cos(), a.sin()
    mirror = 1 - 2 * flip[:, 0]
    # Output -> input coordinates ([-1, 1] spans the image): undo the translation,
    # the rotation (in pixel units, so non-square images turn rigidly), then the flip.
    rows = torch.stack([
        torch.stack([mirror * cos, -mirror * sin * height / width], 1),
        torch.stack([sin * width / height, cos], 1),
    ], 1)
    t = torch.stack([2 * shift[:, 0] / width, 2 * shift[:, 1] / height], 1)
    theta = torch.cat([rows, -(rows @ t[:, :, None])], 2)
    grid = F.affine_grid(theta, [n, 3, height, width], align_corners=False)
    inside = (grid.abs() <= 1).all(-1)[:, None]
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return warped * inside


def _gray(x):
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b)[:, None]


def _brightness(x, f):
    return (x * f).clamp(0, 1)


def _contrast(x, f):
    return (f * x + (1 - f) * _gray(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)


def _saturation(x, f):
    return (f * x + (1 - f) * _gray(x)).clamp(0, 1)


def _hue(x, f):
    """Rotate the hue by f turns (RGB -> HSV -> RGB)."""
    value, _ = x.max(1)
    delta = value - x.min(1)[0]
    saturation = delta / value.clamp_min(1e-12)
    r, g, b = ((value[:, None] - x) / torch.where(delta > 0, delta, 1)[:, None]).unbind(1)
    hue = torch.where(x[:, 0] == value, b - g, torch.where(x[:, 1] == value, 2 + r - b, 4 + g - r))
    hue = torch.where(delta > 0, hue / 6, 0)
    hue = (hue + f.view(-1, 1, 1)).remainder(1) * 6
    sector = hue.floor()
    frac = hue - sector
    p, q, t = value * (1 - saturation), value * (1 - saturation * frac), value * (1 - saturation * (1 - frac))
    sector = sector.long().remainder(6)[:, None]
    channels = [(value, q, p, p, t, value), (t, value, value, q, p, p), (p, p, t, value, value, q)]
    return torch.cat([torch.stack(c, 1).gather(1, sector) for c in channels], 1)


COLOR_STEPS = (_brightness, _contrast, _saturation, _hue)  # the order of JITTER


def _jitter(x, factors, order):
    """ColorJitter with each image's own factors and order of the four steps."""
    for position in range(4):
        for step, adjust in enumerate(COLOR_STEPS):
            chosen = torch.nonzero(order[:, position] == step).flatten().to(x.device)
            if len(chosen):
                f = factors[chosen, step]
                x[chosen] = adjust(x[chosen], f.view(-1, 1, 1, 1) if step < 3 else f)
    return x


def _blur(x, sigma):
    """3 x 3 Gaussian blur with each image's own sigma, reflecting at the edges."""
    n, c, height, width = x.shape
    taps = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    k = torch.exp(-0.5 * (taps[None] / sigma) ** 2)
    k = k / k.sum(1, keepdim=True)
    kernels = (k[:, :, None] * k[:, None, :]).repeat_interleave(c, 0)[:, None]
    padded = F.pad(x.reshape(1, n * c, height, width), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernels, groups=n * c).view(n, c, height, width)


class EvalTransform:
    """Validation and inference: the decoded image (``pixel_tensor``), scaled to [0, 1] and
    normalised with the spec's mean and std."""

    def __init__(self, preprocessing: Preprocessing):
        self.pipeline = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                                    v2.Normalize(list(preprocessing.mean), list(preprocessing.std))])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.pipeline(image)
