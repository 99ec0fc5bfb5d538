"""Checkpoint -> standalone ONNX file: softmax in the graph, everything an app needs in metadata.

The file has one input ``image`` (float32, N x 3 x H x W, N dynamic) and three outputs,
``logits`` (raw) and ``probabilities`` (N x classes: softmax(logits / T), T the temperature
fitted on validation after training, 1 for checkpoints without one) and ``heatmaps`` (N x classes x h x w: every
class's Grad-CAM map on the last stage, computed in the graph; see training.layers.GradCam). Its ``metadata_props`` carry the class names, the
preprocessing spec under timm's ``pretrained_cfg`` names (``input_size`` as [3, H, W],
``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``, plus the rule in words,
``resize``) and the architecture spec (see METADATA_KEYS), so any app can use it with nothing else.
Calibrated checkpoints add CALIBRATION_KEYS: the temperature's validation ECE before and after,
and ``abstain_threshold``: a model is unsure when its top probability is below it.
"""
from __future__ import annotations

import datetime
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from common import calibration
from common.errors import Failure
from common.files import temporary_path
from common.run_layout import SINGLE
from imaging import preprocessing
from training.checkpoint import architecture_of, preprocessing_of, rebuild_model
from training.models import HEATMAP_LAYER

DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAMES = "image", ("logits", "probabilities", "heatmaps")
METADATA_KEYS = (
    "class_names", *preprocessing.METADATA_KEYS, "architecture", "architecture_spec",
    "display_name", "heatmap_layer", "heatmap_size", "training_run", "val_accuracy", "checkpoint_sha256", "torch_version", "onnx_version",
    "exported_at", "precision", "temperature",
)
# Written for checkpoints calibrated after training (training/calibrate.py): ECE with
# common.calibration.BINS bins on the validation split; the threshold on the top probability
# chosen there for the target accuracy of the predictions kept, and the share it keeps.
CALIBRATION_KEYS = ("val_ece_before", "val_ece_after", "abstain_threshold", "abstain_target_accuracy",
                    "abstain_val_coverage")


class ExportError(Failure):
    """An export that cannot be completed, with a one-line reason."""


class Exported(nn.Module):
    """What the file computes: the raw logits, softmax(logits / temperature), and every class's
    Grad-CAM heatmap (of the raw logits: the temperature changes no map's shape)."""

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.model = model
        # A division (ONNX Div), which INT8 quantization leaves float like the softmax.
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, image: torch.Tensor):
        logits, heatmaps = self.model.classify_and_explain(image)
        return logits, torch.softmax(logits / self.temperature, dim=1), heatmaps


def exportable(model: nn.Module, temperature: float = 1.0) -> nn.Module:
    """The eval-mode graph to export: the model's export form (fast Mish), the temperature's
    softmax and heatmaps added."""
    return Exported(model.export_form(), temperature).eval()


def temperature_of(ckpt: dict) -> float:
    """The checkpoint's fitted temperature (1, plain softmax, for one made before calibration),
    as the float32 the graph holds, so that the metadata records the very number it divides by."""
    return float(np.float32((ckpt.get("calibration") or {}).get("temperature", 1.0)))


def calibration_metadata(ckpt: dict, abstain_accuracy: float = calibration.DEFAULT_TARGET_ACCURACY) -> dict[str, str]:
    """CALIBRATION_KEYS for a calibrated checkpoint (none for an older one). The threshold is
    chosen for ``abstain_accuracy`` from the validation images' calibrated top probabilities
    and correctness that the checkpoint keeps."""
    record = ckpt.get("calibration")
    if not record:
        return {}
    chosen = calibration.abstention_threshold(record["val_confidence"], record["val_correct"], abstain_accuracy)
    return {"val_ece_before": f"{record['val_ece_before']:.6f}", "val_ece_after": f"{record['val_ece_after']:.6f}",
            "abstain_threshold": repr(chosen.threshold), "abstain_target_accuracy": repr(abstain_accuracy),
            "abstain_val_coverage": f"{chosen.coverage:.6f}"}


def heatmap_size(model: nn.Module, input_size: tuple[int, int]) -> list[int]:
    """[h, w] of the heatmaps (the last stage's output) for an input of ``input_size``."""
    with torch.no_grad():
        return list(model.eval().features(torch.zeros(1, 3, *input_size)).shape[2:])


def metadata_for(ckpt: dict, checkpoint_sha256: str, precision: str = "fp32",
                 training_run: str = SINGLE,
                 abstain_accuracy: float = calibration.DEFAULT_TARGET_ACCURACY) -> dict[str, str]:
    """``training_run``: which run of the study the checkpoint is (seed-68, fold-2, single);
    ``abstain_accuracy``: the target the abstention threshold is chosen for."""
    arch = architecture_of(ckpt)
    spec = preprocessing_of(ckpt)
    return {
        "class_names": json.dumps(ckpt["class_names"]),
        **spec.to_metadata(),
        "architecture": ckpt["architecture"],
        "architecture_spec": json.dumps(arch.to_dict()),
        "display_name": arch.display_name,
        "heatmap_layer": HEATMAP_LAYER,
        "heatmap_size": json.dumps(heatmap_size(rebuild_model(ckpt), spec.input_size)),
        "training_run": training_run,
        "val_accuracy": f"{ckpt.get('val_accuracy', float('nan')):.6f}",
        "checkpoint_sha256": checkpoint_sha256,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "precision": precision,
        "temperature": repr(temperature_of(ckpt)),
        **calibration_metadata(ckpt, abstain_accuracy),
    }


def set_metadata(model_proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    del model_proto.metadata_props[:]
    for key, value in metadata.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value


# Node metadata the exporter writes that names this machine's files (source paths and line
# numbers): a file must not depend on, or tell, where it was built.
BUILD_PATH_METADATA = ("pkg.torch.onnx.stack_trace",)


def drop_build_paths(model_proto: onnx.ModelProto) -> None:
    for node in [*model_proto.graph.node, *(n for f in model_proto.functions for n in f.node)]:
        kept = [p for p in node.metadata_props if p.key not in BUILD_PATH_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def export_model(ckpt: dict, checkpoint_sha256: str, out_path: Path, opset: int = DEFAULT_OPSET,
                 training_run: str = SINGLE,
                 abstain_accuracy: float = calibration.DEFAULT_TARGET_ACCURACY) -> Path:
    """Export to ``out_path`` via a temporary file; returns the temporary file's path.

    The caller renames it into place once parity is proven (or deletes it), so a failed export
    never leaves a half-written or unproven .onnx file under its final name.
    """
    model = exportable(rebuild_model(ckpt), temperature_of(ckpt))
    height, width = preprocessing_of(ckpt).input_size
    example = torch.randn(2, 3, height, width)
    tmp = temporary_path(out_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
                opset_version=opset, dynamo=True, external_data=False, verbose=False,
            )
        proto = onnx.load(str(tmp))
        drop_build_paths(proto)
        set_metadata(proto, metadata_for(ckpt, checkpoint_sha256, training_run=training_run,
                                         abstain_accuracy=abstain_accuracy))
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])  # loads, or raises
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{ckpt['architecture']}: export failed: {str(exc).splitlines()[0]}") from None
    return tmp
