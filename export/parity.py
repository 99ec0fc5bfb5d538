"""Proof that an ONNX file computes what its checkpoint computes.

PyTorch (eval mode) and ONNX Runtime (CPU) run on the same inputs: random tensors and real
images through the real preprocessing, at batch size 1 and at an odd batch size above 1.
The logits and probabilities (softmax(logits / T), T the checkpoint's temperature) are compared
with the checkpoint's forward pass, and the file's probabilities with softmax of its own logits
over the temperature its metadata records; the heatmaps
with Grad-CAM computed the usual way, by autograd (a hook on the last stage, the backward pass
of each logit), so the closed form in the graph is checked against its definition.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import INPUT_NAME, OUTPUT_NAMES

MAX_LOGIT_DIFF = 1e-4
MAX_PROB_DIFF = 1e-5
MAX_HEATMAP_DIFF = 1e-4  # relative to each map's maximum (see relative_heatmap_diff)
# A map whose maximum is below this share of the image's strongest map, or below an absolute
# 0.05, is noise-level: a ReLU of near-cancelling sums, whose float32 rounding is that of the
# logits themselves (up to about 1e-5, see MAX_LOGIT_DIFF). It is compared relative to that
# level instead of to its own tiny maximum (a one-epoch model's 1 x 1 maps are such maps).
NOISE_FLOOR = 1e-2
ABSOLUTE_FLOOR = 0.05
BATCH_SIZES = (1, 7)
RANDOM_INPUTS = 32


@dataclass
class ParityReport:
    random_inputs: int
    image_inputs: int
    batch_sizes: list[int]
    max_abs_logit_diff: float
    max_abs_probability_diff: float
    max_relative_heatmap_diff: float
    top1_mismatches: int
    thresholds: dict
    passed: bool
    temperature: float = 1.0  # the probabilities checked are softmax(logits / temperature)
    # |probabilities - softmax(logits / temperature)| within the file's own outputs
    max_abs_calibrated_probability_diff: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: {self.random_inputs} random + {self.image_inputs} image inputs at batch "
                f"sizes {'/'.join(map(str, self.batch_sizes))}; max |logit diff| "
                f"{self.max_abs_logit_diff:.2e} (<= {MAX_LOGIT_DIFF:g}), max |prob diff| "
                f"{self.max_abs_probability_diff:.2e} (<= {MAX_PROB_DIFF:g}; softmax of logits / "
                f"{self.temperature:.4g}: {self.max_abs_calibrated_probability_diff:.2e}), max heatmap diff "
                f"{self.max_relative_heatmap_diff:.2e} of the map's maximum (<= {MAX_HEATMAP_DIFF:g}), "
                f"top-1 mismatches {self.top1_mismatches}")


def autograd_gradcam(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, Grad-CAM of every class) by the book: keep layer4's output with a forward hook,
    backpropagate each class's logit to it, weight its channels by the spatial mean of the
    gradients, sum, ReLU."""
    kept = {}
    hook = model.layer4.register_forward_hook(lambda _m, _i, out: kept.setdefault("a", out))
    try:
        with torch.enable_grad():
            logits = model(x)
            features = kept["a"]
            maps = []
            for c in range(logits.shape[1]):
                (grad,) = torch.autograd.grad(logits[:, c].sum(), features, retain_graph=True)
                alpha = grad.mean(dim=(2, 3), keepdim=True)
                maps.append(torch.relu((alpha * features).sum(1)))
    finally:
        hook.remove()
    return logits.detach(), torch.stack(maps, 1).detach()


def relative_heatmap_diff(heatmaps: np.ndarray, reference: np.ndarray) -> float:
    """The largest |difference| of two sets of maps (N x C x h x w), each map's relative to its
    reference maximum, or to ``NOISE_FLOOR`` of the image's strongest map or ``ABSOLUTE_FLOOR``
    if either is larger (so maps that are zero everywhere count too)."""
    own = reference.max(axis=(2, 3), keepdims=True)
    strongest = own.max(axis=1, keepdims=True)
    scale = np.maximum(np.maximum(own, NOISE_FLOOR * strongest), ABSOLUTE_FLOOR)
    return float((np.abs(heatmaps - reference) / scale).max()) if heatmaps.size else 0.0


def _batched(fn, inputs: np.ndarray, batch_size: int) -> list[np.ndarray]:
    outputs = [fn(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return [np.concatenate([o[k] for o in outputs]) for k in range(3)]


def check_parity(model: torch.nn.Module, session: ort.InferenceSession, images: np.ndarray,
                 seed: int = 0, random_inputs: int = RANDOM_INPUTS,
                 batch_sizes=BATCH_SIZES, temperature: float = 1.0) -> ParityReport:
    """``images``: real preprocessed inputs (N x 3 x H x W float32), possibly empty;
    ``temperature``: the checkpoint's, which the file's probabilities must apply."""
    model = model.eval()
    shape = tuple(session.get_inputs()[0].shape[1:])  # (3, H, W): only the batch is dynamic
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((random_inputs, *shape)).astype(np.float32)
    inputs = np.concatenate([noise, images.astype(np.float32)]) if len(images) else noise

    def run_torch(x):
        logits, heatmaps = autograd_gradcam(model, torch.from_numpy(x))
        return logits.numpy(), torch.softmax(logits / temperature, 1).numpy(), heatmaps.numpy()

    def run_onnx(x):
        return session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})

    logit_diff = prob_diff = heatmap_diff = calibrated_diff = 0.0
    mismatches = 0
    for batch_size in batch_sizes:
        reference = _batched(run_torch, inputs, batch_size)
        logits, probs, heatmaps = _batched(run_onnx, inputs, batch_size)
        logit_diff = max(logit_diff, float(np.abs(logits - reference[0]).max()))
        prob_diff = max(prob_diff, float(np.abs(probs - reference[1]).max()))
        heatmap_diff = max(heatmap_diff, relative_heatmap_diff(heatmaps, reference[2]))
        mismatches += int((logits.argmax(1) != reference[0].argmax(1)).sum())
        own = torch.softmax(torch.from_numpy(logits).double() / temperature, 1).numpy()
        calibrated_diff = max(calibrated_diff, float(np.abs(probs - own).max()))
    passed = logit_diff <= MAX_LOGIT_DIFF and prob_diff <= MAX_PROB_DIFF \
        and calibrated_diff <= MAX_PROB_DIFF and heatmap_diff <= MAX_HEATMAP_DIFF and mismatches == 0
    return ParityReport(
        random_inputs, len(images), list(batch_sizes), logit_diff, prob_diff, heatmap_diff, mismatches,
        {"max_abs_logit_diff": MAX_LOGIT_DIFF, "max_abs_probability_diff": MAX_PROB_DIFF,
         "max_relative_heatmap_diff": MAX_HEATMAP_DIFF, "top1_mismatches": 0},
        passed, float(temperature), calibrated_diff,
    )
