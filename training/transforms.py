"""The preprocessing pipelines, each stated once (after torchvision's classification presets).

Images reach these pipelines already decoded to RGB and resized to exactly H x W as uint8
CHW tensors (see ``decode``): the data loader decodes each file once and caches that tensor,
so the random augmentation is drawn fresh every epoch from the cached copy.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

import imaging

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode(source: imaging.Source | Image.Image, size: tuple[int, int],
           max_pixels: int = imaging.DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """A file (or Pillow image) as the model sees it before normalisation: uint8, 3 x H x W."""
    img = source if isinstance(source, Image.Image) else imaging.load_rgb(source, max_pixels)
    return torch.from_numpy(np.ascontiguousarray(imaging.model_pixels(img, size).transpose(2, 0, 1)))


class TrainTransform:
    """The original recipe's augmentation, applied to a decoded H x W uint8 image."""

    def __init__(self, *, size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.pipeline = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomRotation(15),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
            v2.RandomAffine(degrees=0, translate=(0.05, 0.05)),
            v2.GaussianBlur(kernel_size=3, sigma=(0.1, 1.0)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            v2.RandomErasing(p=0.2, scale=(0.02, 0.15)),
        ])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.pipeline(image)


class EvalTransform:
    """Validation and inference: the decoded image, scaled to [0, 1] and normalised."""

    def __init__(self, *, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.pipeline = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.pipeline(image)
