"""The evaluation preprocessing, stated once as data (torch-free).

Training decides it, the checkpoint and the ONNX file's metadata carry it, and both the
training side's ``EvalTransform`` and the serving ``Predictor`` are built from it, so a model
is always fed the pixels it was validated on. The keys follow timm's ``pretrained_cfg`` names
(``input_size`` as [3, H, W], ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``),
so tools that know timm's configuration read it as they expect.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

import imaging

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# timm's "squash": resize to exactly H x W, aspect ratio not kept, nothing cropped (crop_pct 1).
CROP_MODES = ("squash",)
METADATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "resize")


@dataclass(frozen=True)
class Preprocessing:
    """Decoded RGB image -> model input: resize to ``input_size`` = (H, W) with Pillow's
    ``interpolation`` (squash, no crop), scale to [0, 1], subtract ``mean``, divide by ``std``."""

    input_size: tuple[int, int]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "squash"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        height, width = self.input_size
        if height < 1 or width < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; "
                             f"choose from {', '.join(INTERPOLATIONS)}")
        if self.crop_mode not in CROP_MODES or self.crop_pct != 1.0:
            raise ValueError(f"crop_mode {self.crop_mode!r} with crop_pct {self.crop_pct} is not "
                             "supported: only 'squash' with crop_pct 1.0")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")
        # Tuples of plain numbers, whatever came in (lists from JSON, numpy scalars).
        object.__setattr__(self, "input_size", (int(height), int(width)))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def resize_rule(self) -> str:
        """The rule in words (the ``resize`` metadata key of files exported before these keys)."""
        return f"exact HxW, {self.interpolation} (Pillow), aspect ratio not kept, no crop"

    # --- as data -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """timm's names and forms: input_size is [3, H, W]."""
        return {"input_size": [3, *self.input_size], "interpolation": self.interpolation,
                "crop_pct": self.crop_pct, "crop_mode": self.crop_mode,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        """Read ``to_dict``'s form; ``input_size`` may also be [H, W] (files exported before)."""
        size = list(values["input_size"])
        if len(size) == 3:
            if size[0] != 3:
                raise ValueError(f"input_size {size} is not [3, H, W]: the models take RGB")
            size = size[1:]
        if len(size) != 2:
            raise ValueError(f"input_size must be [3, H, W] or [H, W], got {size}")
        return cls(input_size=tuple(size),
                   interpolation=values.get("interpolation", "bilinear"),
                   crop_pct=float(values.get("crop_pct", 1.0)),
                   crop_mode=values.get("crop_mode", "squash"),
                   mean=tuple(values.get("mean", IMAGENET_MEAN)),
                   std=tuple(values.get("std", IMAGENET_STD)))

    def to_metadata(self) -> dict[str, str]:
        """ONNX ``metadata_props`` values: strings, lists as JSON."""
        values = self.to_dict()
        meta = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in values.items()}
        meta["resize"] = self.resize_rule
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "Preprocessing":
        """Read ``to_metadata``'s keys (or the older input_size [H, W] / mean / std alone)."""
        values = {k: meta[k] for k in ("interpolation", "crop_mode") if k in meta}
        for key in ("input_size", "mean", "std", "crop_pct"):
            if key in meta:
                values[key] = json.loads(meta[key])
        return cls.from_dict(values)

    # --- as computation (numpy and Pillow) ---------------------------------------------------------
    def pixels(self, img: Image.Image) -> np.ndarray:
        """What the model is fed before scaling: the RGB image at exactly H x W, H x W x 3 uint8."""
        resized = imaging.resize_exact(imaging.to_rgb(img), self.input_size,
                                       INTERPOLATIONS[self.interpolation])
        return np.asarray(resized, dtype=np.uint8)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ... x 3 x H x W -> float32 model input, (x / 255 - mean) / std."""
        mean = np.asarray(self.mean, np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(3, 1, 1)
        return (pixels.astype(np.float32) / np.float32(255.0) - mean) / std

    def __call__(self, img: Image.Image) -> np.ndarray:
        """A Pillow image (any mode) as the model's 1 x 3 x H x W float32 input."""
        return self.normalize(self.pixels(img).transpose(2, 0, 1))[None]
