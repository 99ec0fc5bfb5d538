"""The model card, ``models/README.md``: what the exported files are and how far to trust them.

Generated from the manifest and the run's reports (nothing typed by hand), with the YAML front
matter Hugging Face model cards use (license, tags, library, metrics, model-index).
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from common.files import write_text
from common.metrics import macro_f1
from common.run_layout import SINGLE, RunLayout

LICENSE = "apache-2.0"


def _report(run_dir: Path, name: str, training_run: str) -> dict:
    path = RunLayout(run_dir).model_files(name, training_run).report
    return json.loads(path.read_text()) if path.is_file() else {}


def _macro_f1(report: dict) -> float | None:
    """The validation macro-F1 the trainer stored; for reports from before it stored one,
    computed from the per-class figures by the same rule."""
    if report.get("val_macro_f1") is not None:
        return report["val_macro_f1"]
    return macro_f1(report["per_class"]) if report.get("per_class") else None


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def front_matter(entries: list[dict], reports: dict[str, dict], dataset: str) -> dict:
    model_index = []
    for entry in entries:
        report = reports.get(entry["name"], {})
        metrics = [{"type": "accuracy", "name": f"{split} accuracy", "value": round(report[f"{split}_accuracy"], 4)}
                   for split in ("val", "test") if report.get(f"{split}_accuracy") is not None]
        f1 = _macro_f1(report)
        if f1 is not None:
            metrics.append({"type": "f1", "name": "val macro-F1", "value": round(f1, 4)})
        model_index.append({"name": f"{entry['display_name']} ({entry['precision']})", "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"type": "imagefolder", "name": dataset},
            "metrics": metrics,
        }]})
    return {
        "license": LICENSE,
        "library_name": "onnx",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "onnx", "onnxruntime", "resnet", "resnet-34",
                 "squeeze-and-excitation"],
        "metrics": ["accuracy", "f1"],
        "model-index": model_index,
    }


def _selection(manifest: dict) -> list[tuple[str, str, str]]:
    """(model, run, how it was chosen) for each model exported from a study of several runs."""
    chosen = manifest.get("selection", {})
    return [(e["display_name"], e["training_run"], chosen[e["name"]]) for e in manifest["models"]
            if e["precision"] == "fp32" and e["training_run"] != SINGLE and e["name"] in chosen]


def calibration_lines(entries: list[dict]) -> list[str]:
    """How far the probabilities can be taken at their word, and when a model says unsure."""
    rows = [e for e in entries if "abstain_threshold" in e.get("calibration", {})]
    if not rows:
        return ["## Calibration", "", "These files were exported from checkpoints trained before "
                "calibration: `probabilities` are the plain softmax of the logits, and there is no "
                "abstention threshold.", ""]
    lines = ["## Calibration and \"unsure\"", "",
             "`probabilities` = softmax(logits / T), one temperature T per model fitted after training "
             "on the validation split by minimising the negative log-likelihood; `logits` and the "
             "heatmaps are the raw model's. ECE: expected calibration error, 15 equal-width bins of the "
             "top probability, on the validation split (the fit's own data; the run's `comparison.md` "
             "reports the test split, with intervals). A model is *unsure* when its top probability is "
             "below `abstain_threshold`, chosen on validation as the lowest at which the predictions "
             "kept reach the target accuracy (metadata keys `temperature`, `abstain_threshold`, "
             "`abstain_target_accuracy`).", "",
             "| file | T | val ECE before → after | unsure below | target accuracy | val images kept |",
             "|---|---:|---:|---:|---:|---:|"]
    for e in rows:
        c = e["calibration"]
        lines.append(f"| `{e['file']}` | {c['temperature']:.3f} | {c['val_ece_before']:.3f} → "
                     f"{c['val_ece_after']:.3f} | {c['abstain_threshold']:.3f} | "
                     f"{c['abstain_target_accuracy']:.0%} | {c['abstain_val_coverage']:.0%} |")
    return lines + [""]


def render(manifest: dict, run_dir: Path) -> str:
    entries = manifest["models"]
    reports = {e["name"]: _report(run_dir, e["name"], e["training_run"]) for e in entries}
    config_path = RunLayout(run_dir).config
    dataset = json.loads(config_path.read_text()).get("data", "?") if config_path.is_file() else "?"
    first = entries[0]
    spec = first["preprocessing"]
    _, height, width = spec["input_size"]
    lines = [
        "---", yaml.safe_dump(front_matter(entries, reports, dataset), sort_keys=False).rstrip(), "---", "",
        "# ResNet-34 variants: exported models", "",
        f"Trained on `{dataset}` (run `{manifest['run']}`), exported to ONNX with parity against "
        "the PyTorch checkpoints proven at export. Each file is self-contained: class names and "
        "preprocessing are in its metadata.", "",
        "## Models", "",
        "| file | model | precision | run | val accuracy | val macro-F1 | test accuracy | max logit diff vs PyTorch | size |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        report = reports[e["name"]]
        parity = e.get("parity") or {}
        fidelity = e.get("quantization", {}).get("validation", {})
        check = (f"{parity['max_abs_logit_diff']:.1e}" if parity else
                 f"INT8: {fidelity['top1_agreement']:.1%} top-1 agreement"
                 + ("" if fidelity.get("decisive_agreement") is None else
                    f" ({fidelity['decisive_agreement']:.1%} on decisive images)")
                 if fidelity.get("images") else "–")
        lines.append(f"| `{e['file']}` | {e['display_name']} | {e['precision']} | {e['training_run']} | "
                     f"{_pct(report.get('val_accuracy'))} | {_pct(_macro_f1(report))} | "
                     f"{_pct(report.get('test_accuracy'))} | {check} | {e['size_bytes'] / 1e6:.1f} MB |")
    lines += [
        "", "Metrics are those of each model's best epoch (lowest validation loss); the test "
        "split, where there is one, was never used to choose anything. `run` names the exported "
        "run of a study with several (`seed-<s>`, `fold-<k>`); the run folder's `comparison.md` "
        "compares the models over all of them, with intervals and paired tests.", "",
        *[f"- {name}: the `{run}` run, {why}." for name, run, why in _selection(manifest)],
        *([""] if _selection(manifest) else []),
        *calibration_lines(entries),
        "## Classes", "",
        ", ".join(f"`{c}`" for c in first["class_names"]) + f" ({len(first['class_names'])}, in output order).", "",
        "## Input and preprocessing", "",
        f"- input `image`: float32, N x 3 x {height} x {width} (N dynamic); outputs `logits` (raw) and "
        "`probabilities` (softmax(logits / T), T the file's `temperature`), N x classes;",
        "- decode to RGB (EXIF orientation applied, transparency composited on white), resize to "
        f"exactly {height} x {width} with {spec['interpolation']} interpolation (crop mode "
        f"`{spec['crop_mode']}`: aspect ratio not kept, no crop), scale to [0, 1], subtract mean "
        f"{spec['mean']}, divide by std {spec['std']}.", "",
        "The metadata keys `input_size`, `interpolation`, `crop_pct`, `crop_mode`, `mean` and `std` "
        "follow timm's `pretrained_cfg` names.", "",
        "## Architectures", "",
    ]
    seen = set()
    for e in entries:
        if e["name"] in seen:
            continue
        seen.add(e["name"])
        spec_text = ", ".join(f"{k} {v}" for k, v in e["architecture_spec"].items() if k != "display_name")
        lines.append(f"- **{e['display_name']}** (`{e['name']}`): {spec_text}.")
    lines += [
        "", "## Intended use and limits", "",
        "- Intended for classifying images like those the models were trained on, into exactly "
        "the classes above, and for comparing the three architectures side by side. Any other "
        "image still gets one of these classes: a model cannot say \"none of these\", only that it "
        "is unsure (top probability below its `abstain_threshold`), which out-of-distribution "
        "images do not always trigger (the run's `comparison.md` measures how often they do).",
        "- The metrics come from the exported run alone, on one split; small validation sets "
        "give wide uncertainty, so differences of a few points between models may be noise, and "
        "a run chosen as the best of several by validation loss looks better on validation than "
        "a fresh run would.",
        "- The models were trained from scratch (or from the weights named in the run's "
        "`config.json`) on the data named above; they inherit that data's biases and gaps and "
        "are not for decisions about people.",
        "",
    ]
    return "\n".join(lines)


def write(path: Path, manifest: dict, run_dir: Path) -> None:
    write_text(path, render(manifest, Path(run_dir)))
