"""A model's heatmap drawn over the image it explains (numpy and Pillow only, for every side).

The map (h x w, e.g. 7 x 7 Grad-CAM cells) is scaled to [0, 1] by its maximum, upsampled to the
image with Pillow's bilinear filter, coloured with a perceptual colour map and blended over
the image where it is hot, so cold regions still show the picture.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# matplotlib's "inferno" at 9 evenly spaced points (perceptually uniform, dark to bright),
# interpolated to 256 entries: the serving side has no matplotlib, and 9 anchors reproduce it
# to within a few levels.
INFERNO_ANCHORS = np.array([
    (0.0015, 0.0005, 0.0139), (0.1293, 0.0473, 0.2908), (0.3415, 0.0623, 0.4294),
    (0.5409, 0.1347, 0.4151), (0.7357, 0.2159, 0.3302), (0.8943, 0.3534, 0.1936),
    (0.9784, 0.5579, 0.0349), (0.9746, 0.7977, 0.2063), (0.9884, 0.9984, 0.6449),
])
_STEPS = np.linspace(0, 1, 256)
COLOUR_MAP = np.stack([np.interp(_STEPS, np.linspace(0, 1, len(INFERNO_ANCHORS)), INFERNO_ANCHORS[:, c])
                       for c in range(3)], 1)  # 256 x 3, in [0, 1]
MAX_OPACITY = 0.65  # of the colour where the map is hottest


def normalized(heatmap: np.ndarray) -> np.ndarray:
    """The map scaled to [0, 1] by its maximum (all zeros stay zeros)."""
    heatmap = np.maximum(np.asarray(heatmap, dtype=np.float32), 0)
    top = float(heatmap.max()) if heatmap.size else 0.0
    return heatmap / top if top > 0 else np.zeros_like(heatmap)


def overlay(image: Image.Image, heatmap: np.ndarray) -> Image.Image:
    """``image`` (any mode; shown as RGB) with ``heatmap`` (h x w) blended over it."""
    rgb = image.convert("RGB")
    heat = Image.fromarray(normalized(heatmap)).resize(rgb.size, Image.Resampling.BILINEAR)  # float32: mode F
    heat = np.clip(np.asarray(heat), 0, 1)[..., None]
    colour = COLOUR_MAP[np.rint(heat[..., 0] * 255).astype(np.uint8)]
    alpha = MAX_OPACITY * heat
    blended = (1 - alpha) * (np.asarray(rgb, np.float32) / 255) + alpha * colour
    return Image.fromarray(np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8))
