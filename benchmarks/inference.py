"""``python -m benchmarks.inference``: PyTorch eager vs ONNX Runtime FP32 and INT8 vs OpenVINO.

For each model, in one process: the weights (a run's best checkpoints, or untrained ones with
``--untrained``) are exported to ONNX at ``--size`` px and quantized to INT8 exactly as
``python -m export.run --quantize int8`` does (calibrated on the run's training images, or on
drawings of the built-in dataset), then the three engines are timed in alternating blocks at
each batch size, beside OpenVINO on the same files (FP32; bf16 where the CPU has native
bfloat16; INT8) where it is installed, and beside what ``--engine auto`` chooses for the
FP32 file (serve.engine_choice, run as the app runs it: probabilities and heatmaps, against
ONNX Runtime FP32 doing the same). Then one request's worth of work, the three models one after another as the
app runs them, is timed against the sum of the models alone (the thread pools must not fight).

Prints tables and writes benchmarks/results/inference.json (see ``--out``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (RESULTS_DIR, command_line, interleaved, machine, markdown_table,
                               median_ms, write_json)
from common.files import sha256_of
from common.run_layout import RUNS_DIR, RunLayout, newest_run
from export.onnx_export import INPUT_NAME, export_model, metadata_for
from export.fidelity import compare_files
from export.quantize import quantize_file
from imaging.preprocessing import Preprocessing
from common.cpu import usable_logical_cpus
from serve import engine_choice
from serve.catalog import candidate_pairs
from serve.predictor import Predictor, create_session, engine_precisions, openvino_available
from training import checkpoint
from training.models import MODEL_NAMES, create_model
from training.transforms import EvalTransform, pixel_tensor

ENGINES = ("torch", "ort_fp32", "ort_fp32_heatmaps", "ort_int8")
OPENVINO_ENGINES = ("ov_fp32", "ov_bf16", "ov_int8")  # those this CPU offers, where installed


def openvino_predictors(fp32_path: Path, int8_path: Path, threads: int) -> dict[str, Predictor]:
    if not openvino_available():
        return {}
    found = {f"ov_{p}": Predictor(fp32_path, threads, "openvino", p) for p in engine_precisions("openvino", "fp32")}
    found["ov_int8"] = Predictor(int8_path, threads, "openvino", "int8")
    return found


def check_images(run_dir: Path | None, preprocessing: Preprocessing, calibration: np.ndarray) -> np.ndarray:
    """What serve.app checks fidelity on: the run's validation images (up to the app's cap;
    the examples are some of them), else 16 of the calibration drawings."""
    if run_dir is not None:
        from export.run import validation_images
        from serve.catalog import CHECK_VALIDATION_IMAGES

        images, _ = validation_images(run_dir, preprocessing, limit=CHECK_VALIDATION_IMAGES)
        if len(images):
            return images
    return calibration[:16]


def auto_choice(fp32_path: Path, images: np.ndarray, threads: int) -> Predictor:
    """What serve.app --engine auto --precision auto serves for this file (its choice logged)."""
    return engine_choice.choose(fp32_path, candidate_pairs("auto", "auto"), images, threads,
                                log=lambda line: print(f"  auto: {line}", flush=True))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference",
                                     description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", help="run folder whose best checkpoints to time (default: the newest "
                                      "under runs/, else untrained weights)")
    source.add_argument("--untrained", action="store_true", help="untrained weights (no run needed)")
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated model names")
    parser.add_argument("--size", type=int, default=224, help="image size in px (default: 224)")
    parser.add_argument("--batches", default="1,16", help="batch sizes (default: 1,16)")
    parser.add_argument("--calls", type=int, default=30,
                        help="timed calls per engine at batch 1 (fewer at larger batches)")
    parser.add_argument("--calibration-images", type=int, default=64,
                        help="images INT8 is calibrated on (default: 64)")
    parser.add_argument("--int8-from", metavar="DIR",
                        help="keep float the layers that python -m export.run --quantize int8 kept "
                        "float in DIR (its <model>.int8.json; default: every layer INT8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every engine (default: the cores this process may use)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time (default); cpu: this thread's CPU time, needs "
                             "--threads 1 (steadier on a machine others are using)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "inference.json"), help="JSON results file")
    return parser.parse_args(argv)


def load_weights(name: str, run_dir: Path | None, size: int) -> tuple[dict, str]:
    """A checkpoint dict (at ``size`` px: convolution weights fit any size) and its sha256."""
    if run_dir is not None:
        path = RunLayout(run_dir).model_files(name).best_checkpoint
        ckpt, sha = checkpoint.load(path), sha256_of(path)
    else:
        from training.synthetic import CLASSES

        torch.manual_seed(0)
        model = create_model(name, len(CLASSES))
        ckpt = checkpoint.model_record(name, model, list(CLASSES), Preprocessing(input_size=(size, size)))
        sha = "untrained"
    at_size = dataclasses.replace(checkpoint.preprocessing_of(ckpt), input_size=(size, size))
    return {**ckpt, "format": checkpoint.FORMAT_VERSION, "preprocessing": at_size.to_dict(),
            "architecture_spec": checkpoint.architecture_of(ckpt).to_dict()}, sha


def calibration_images(run_dir: Path | None, size: int, count: int) -> np.ndarray:
    """Real preprocessed images: the run's training split, else drawings of the built-in dataset."""
    if run_dir is not None:
        from export.run import split_images

        images, _, _ = split_images(run_dir, "train", Preprocessing(input_size=(size, size)), count)
        if len(images):
            return images
    from training.synthetic import CLASSES, draw_image

    spec = Preprocessing(input_size=(size, size))
    transform = EvalTransform(spec)
    drawn = [transform(pixel_tensor(draw_image(i % len(CLASSES), np.random.default_rng([7, i])), spec))
             for i in range(count)]
    return torch.stack(drawn).numpy()


def float_layers_of(int8_dir: str | None, name: str) -> list[str]:
    """The layers an export kept float32 (its <model>.int8.json), none without one."""
    report = Path(int8_dir) / f"{name}.int8.json" if int8_dir else None
    if report is None or not report.is_file():
        return []
    return [f["layer"] for f in json.loads(report.read_text()).get("float_layers", [])]


def build(name: str, run_dir: Path | None, size: int, calibration: np.ndarray, work: Path, threads: int,
          float_layers: list[str] = ()):
    """The three engines of one model, ready to call, and a few facts about them."""
    ckpt, sha = load_weights(name, run_dir, size)
    fp32_path, int8_path = work / f"{name}.onnx", work / f"{name}.int8.onnx"
    os.replace(export_model(ckpt, sha, fp32_path), fp32_path)
    os.replace(quantize_file(fp32_path, int8_path, calibration, metadata_for(ckpt, sha, "int8"),
                             float_layers=float_layers), int8_path)
    model = checkpoint.rebuild_model(ckpt)
    fp32, int8 = create_session(fp32_path, threads), create_session(int8_path, threads)
    with torch.inference_mode():
        reference = model(torch.from_numpy(calibration[:8])).numpy()
    agreement = compare_files(fp32, int8, calibration, np.zeros(len(calibration), np.int64))
    facts = {
        "fp32_max_abs_logit_diff": float(np.abs(fp32.run(["logits"], {INPUT_NAME: calibration[:8]})[0]
                                                - reference).max()),
        "int8_top1_agreement_on_calibration": agreement["top1_agreement"],
        "int8_max_abs_probability_diff": agreement["max_probability_change"],
        "fp32_bytes": fp32_path.stat().st_size, "int8_bytes": int8_path.stat().st_size,
        "int8_float_layers": list(float_layers),
    }
    others = openvino_predictors(fp32_path, int8_path, threads)
    auto = auto_choice(fp32_path, check_images(run_dir, checkpoint.preprocessing_of(ckpt), calibration), threads)
    facts["auto"] = auto.choice
    for key, predictor in others.items():
        got = predictor.run(["logits"], calibration[:8])[0]
        facts[f"{key}_max_abs_logit_diff_vs_torch"] = float(np.abs(got - reference).max())
    return model, fp32, int8, facts, others, auto


def time_engines(model, fp32, int8, batch: int, size: int, calls: int, clock,
                 others: dict | None = None, auto: Predictor | None = None) -> dict[str, list[float]]:
    x = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
    xt = torch.from_numpy(x)
    per_block = max(1, min(5, calls // 6))
    rounds = max(3, calls // per_block)
    contenders = {
        "torch": lambda: model(xt),
        "ort_fp32": lambda: fp32.run(["probabilities"], {INPUT_NAME: x}),
        "ort_fp32_heatmaps": lambda: fp32.run(["probabilities", "heatmaps"], {INPUT_NAME: x}),
        "ort_int8": lambda: int8.run(["probabilities"], {INPUT_NAME: x}),
    }
    for key, predictor in (others or {}).items():
        contenders[key] = lambda p=predictor: p.run(["probabilities"], x)
    if auto is not None:
        contenders["auto_heatmaps"] = lambda: auto.run(["probabilities", "heatmaps"], x)
    with torch.inference_mode():
        return interleaved(contenders, rounds=rounds, per_block=per_block, clock=clock)


def time_request(sessions: dict[str, object], size: int, calls: int, clock) -> dict[str, list[float]]:
    """The models one after another (one app request) against each model alone."""
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    contenders = {name: (lambda s=s: s.run(None, {INPUT_NAME: x})) for name, s in sessions.items()}
    contenders["all, one after another"] = lambda: [s.run(None, {INPUT_NAME: x}) for s in sessions.values()]
    return interleaved(contenders, rounds=max(3, calls // 5), per_block=5, clock=clock)


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = None
    if args.run:
        run_dir = Path(args.run)
        if not run_dir.is_dir():
            print(f"error: run folder '{run_dir}' does not exist", file=sys.stderr)
            return 1
    elif not args.untrained:
        try:
            run_dir = newest_run(RUNS_DIR)
        except Exception:
            run_dir = None
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [n for n in names if n not in MODEL_NAMES]
    missing = [n for n in names
               if run_dir is not None and not RunLayout(run_dir).model_files(n).best_checkpoint.is_file()]
    if unknown or missing or not names:
        print(f"error: unknown model(s) {', '.join(unknown)}" if unknown else
              f"error: no best.pt for {', '.join(missing) or 'any model'} in '{run_dir}'", file=sys.stderr)
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    threads = args.threads or usable_logical_cpus()
    if args.clock == "cpu" and threads != 1:
        print("error: --clock cpu needs --threads 1 (other threads' time would be missed)", file=sys.stderr)
        return 1
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(threads)
    source = f"run {run_dir}" if run_dir else "untrained weights"
    print(f"Inference benchmark: {', '.join(names)} ({source}), {args.size} px, batch "
          f"{'/'.join(map(str, batches))}, {threads} thread(s), {args.clock} clock", flush=True)

    results = {"command": command_line(argv, "benchmarks.inference"), "machine": machine(),
               "weights": source, "size": args.size, "threads": threads, "clock": args.clock,
               "models": {}, "request": {}}
    rows, engine_rows, sessions = [], [], {"fp32": {}, "int8": {}}
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as work:
        calibration = calibration_images(run_dir, args.size, args.calibration_images)
        for name in names:
            print(f"{name}: exporting and quantizing ...", flush=True)
            float_layers = float_layers_of(args.int8_from, name)
            if float_layers:
                print(f"  INT8 keeps float: {', '.join(float_layers)}", flush=True)
            model, fp32, int8, facts, others, auto = build(name, run_dir, args.size, calibration,
                                                           Path(work), threads, float_layers)
            sessions["fp32"][name], sessions["int8"][name] = fp32, int8
            results["models"][name] = {"facts": facts, "batches": {}}
            for batch in batches:
                calls = max(6, args.calls // batch * 2) if batch > 1 else args.calls
                times = time_engines(model, fp32, int8, batch, args.size, calls, clock, others, auto)
                ms = {e: median_ms(t) for e, t in times.items()}
                entry = {
                    "calls": len(times["torch"]),
                    "median_ms": ms,
                    "images_per_second": {e: batch * 1000 / ms[e] for e in ms},
                    "fp32_vs_torch": ms["torch"] / ms["ort_fp32"],
                    "int8_vs_fp32": ms["ort_fp32"] / ms["ort_int8"],
                    "int8_vs_torch": ms["torch"] / ms["ort_int8"],
                    # What also fetching every class's Grad-CAM map costs (target <= 1.05x).
                    "heatmaps_vs_probabilities": ms["ort_fp32_heatmaps"] / ms["ort_fp32"],
                    # Every engine and precision as a ratio to ONNX Runtime FP32 (> 1: faster).
                    "vs_ort_fp32": {e: ms["ort_fp32"] / ms[e] for e in ("ort_int8", *others)},
                }
                if "auto_heatmaps" in ms:  # the app's call (probabilities + heatmaps) on each side
                    entry["auto"] = f"{auto.engine} {auto.precision}"
                    entry["auto_vs_ort_fp32"] = ms["ort_fp32_heatmaps"] / ms["auto_heatmaps"]
                engine_rows.append([name, batch, ms["ort_fp32"]]
                                   + [f"{ms[e]:.1f} ({ms['ort_fp32'] / ms[e]:.2f}x)" if e in ms else "-"
                                      for e in ("ort_int8", *OPENVINO_ENGINES)]
                                   + ([f"{entry['auto']}: {ms['auto_heatmaps']:.1f} vs "
                                       f"{ms['ort_fp32_heatmaps']:.1f} ({entry['auto_vs_ort_fp32']:.2f}x)"]
                                      if "auto" in entry else ["-"]))
                results["models"][name]["batches"][str(batch)] = entry
                rows.append([name, batch, ms["torch"], ms["ort_fp32"], ms["ort_int8"],
                             f"{entry['fp32_vs_torch']:.2f}x", f"{entry['int8_vs_fp32']:.2f}x",
                             f"{entry['int8_vs_torch']:.2f}x",
                             f"{entry['images_per_second']['ort_int8']:.1f}",
                             f"{entry['heatmaps_vs_probabilities']:.3f}x"])
                print(f"  batch {batch}: torch {ms['torch']:.1f} ms, FP32 {ms['ort_fp32']:.1f} ms, "
                      f"INT8 {ms['ort_int8']:.1f} ms", flush=True)
            del model, others, auto
        request_rows = []
        if len(names) > 1:
            for precision, by_name in sessions.items():
                times = time_request(by_name, args.size, args.calls, clock)
                alone = sum(median_ms(times[n]) for n in by_name)
                together = median_ms(times["all, one after another"])
                results["request"][precision] = {"sum_of_models_alone_ms": alone,
                                                 "one_after_another_ms": together,
                                                 "ratio": together / alone}
                request_rows.append([precision.upper(), alone, together, f"{together / alone:.2f}x"])

    results["machine"]["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print("\nMedian latency in ms (ratios: how many times faster)\n")
    print(markdown_table(["model", "batch", "PyTorch eager", "ORT FP32", "ORT INT8", "FP32 vs eager",
                          "INT8 vs FP32", "INT8 vs eager", "INT8 images/s",
                          "FP32 + heatmaps vs FP32"], rows))
    print("\nEngines: median ms (ratio to ONNX Runtime FP32; > 1 is faster). auto: what --engine auto "
          "serves, probabilities and heatmaps, vs ONNX Runtime FP32 doing the same\n")
    print(markdown_table(["model", "batch", "ORT FP32", "ORT INT8", "OpenVINO FP32", "OpenVINO BF16",
                          "OpenVINO INT8", "--engine auto"], engine_rows))
    print(f"\nCPU: {results['machine']['cpu']}; flags: {', '.join(results['machine']['cpu_flags']) or 'none of note'}"
          f"; load average {results['machine']['load_average_1min']} at the start, "
          f"{results['machine']['load_average_1min_end']} at the end")
    if request_rows:
        print("\nOne request (all models, batch 1) vs the models alone\n")
        print(markdown_table(["precision", "sum of models alone (ms)", "one after another (ms)",
                              "ratio"], request_rows))
    out = write_json(Path(args.out), results)
    print(f"\nWrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
