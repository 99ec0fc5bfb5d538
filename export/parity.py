"""Proof that an ONNX file computes what its checkpoint computes.

PyTorch (eval mode) and ONNX Runtime (CPU) run on the same inputs: random tensors and real
images through the real preprocessing, at batch size 1 and at an odd batch size above 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import INPUT_NAME

MAX_LOGIT_DIFF = 1e-4
MAX_PROB_DIFF = 1e-5
BATCH_SIZES = (1, 7)
RANDOM_INPUTS = 32


@dataclass
class ParityReport:
    random_inputs: int
    image_inputs: int
    batch_sizes: list[int]
    max_abs_logit_diff: float
    max_abs_probability_diff: float
    top1_mismatches: int
    thresholds: dict
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: {self.random_inputs} random + {self.image_inputs} image inputs at batch "
                f"sizes {'/'.join(map(str, self.batch_sizes))}; max |logit diff| "
                f"{self.max_abs_logit_diff:.2e} (<= {MAX_LOGIT_DIFF:g}), max |prob diff| "
                f"{self.max_abs_probability_diff:.2e} (<= {MAX_PROB_DIFF:g}), "
                f"top-1 mismatches {self.top1_mismatches}")


def _batched(fn, inputs: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    outputs = [fn(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])


def check_parity(model: torch.nn.Module, session: ort.InferenceSession, images: np.ndarray,
                 seed: int = 0, random_inputs: int = RANDOM_INPUTS,
                 batch_sizes=BATCH_SIZES) -> ParityReport:
    """``images``: real preprocessed inputs (N x 3 x H x W float32), possibly empty."""
    model = model.eval()
    shape = tuple(session.get_inputs()[0].shape[1:])  # (3, H, W): only the batch is dynamic
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((random_inputs, *shape)).astype(np.float32)
    inputs = np.concatenate([noise, images.astype(np.float32)]) if len(images) else noise

    @torch.no_grad()
    def run_torch(x):
        logits = model(torch.from_numpy(x))
        return logits.numpy(), torch.softmax(logits, 1).numpy()

    def run_onnx(x):
        return session.run(None, {INPUT_NAME: x})

    logit_diff = prob_diff = 0.0
    mismatches = 0
    for batch_size in batch_sizes:
        reference = _batched(run_torch, inputs, batch_size)
        logits, probs = _batched(run_onnx, inputs, batch_size)
        logit_diff = max(logit_diff, float(np.abs(logits - reference[0]).max()))
        prob_diff = max(prob_diff, float(np.abs(probs - reference[1]).max()))
        mismatches += int((logits.argmax(1) != reference[0].argmax(1)).sum())
    passed = logit_diff <= MAX_LOGIT_DIFF and prob_diff <= MAX_PROB_DIFF and mismatches == 0
    return ParityReport(
        random_inputs, len(images), list(batch_sizes), logit_diff, prob_diff, mismatches,
        {"max_abs_logit_diff": MAX_LOGIT_DIFF, "max_abs_probability_diff": MAX_PROB_DIFF,
         "top1_mismatches": 0},
        passed,
    )
