"""Which engine and precision serve one model here: chosen by measurement at start-up.

The candidates are the (engine, precision) pairs this machine offers for the file (see
``serve.predictor.engine_precisions``). They are timed in interleaved blocks on a real image
at batch 1 (what a request of the app runs), medians taken, so load from other processes falls
on all of them alike. The fastest is kept if its outputs stay faithful to ONNX Runtime on the
same file (the engine the export proved parity on) on every check image: the same top-1, no
probability off by more than ``MAX_PROBABILITY_DIFF``, heatmaps correlated at least
``MIN_HEATMAP_CORRELATION``; otherwise the next fastest is tried. A switch away from ONNX
Runtime must gain at least ``MIN_GAIN``: a short timing on a shared machine cannot tell a few
percent from noise, and where nothing is clearly faster (a CPU without native bfloat16),
today's engine stays.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from serve.predictor import REFERENCE_ENGINE, ModelFileError, Predictor

MAX_PROBABILITY_DIFF = 0.01
MIN_HEATMAP_CORRELATION = 0.99
HEATMAP_NOISE_LEVEL = 0.05  # the export's parity calls maps below this noise-level (ABSOLUTE_FLOOR)
# How much faster than ONNX Runtime another engine must be to replace it: OpenVINO FP32 timed
# against ONNX Runtime FP32 on one busy 2-core machine came out 0.87x to 1.13x (the same
# arithmetic), while bfloat16 gains 1.6x and more where the CPU has it.
MIN_GAIN = 1.25
ROUNDS, PER_BLOCK = 3, 2  # 6 timed calls per candidate in 3 interleaved blocks: start-up stays short
CHECK_BATCH = 8


def stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def heatmap_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest per-image Pearson correlation of two N x C x h x w sets of maps (all the
    classes' maps of an image together). An image whose maps are all noise-level (below
    ``HEATMAP_NOISE_LEVEL``, ReLUs of near-cancelling sums) or have no variance (1 x 1 maps of
    one class) has no shape to correlate: it counts as 1 if the maps differ by at most that
    level, else 0."""
    worst = 1.0
    for x, y in zip(a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)):
        if max(np.abs(x).max(), np.abs(y).max()) < HEATMAP_NOISE_LEVEL or x.std() == 0 or y.std() == 0:
            r = 1.0 if np.abs(x - y).max() <= HEATMAP_NOISE_LEVEL else 0.0
        else:
            r = float(np.corrcoef(x, y)[0, 1])
        worst = min(worst, r)
    return worst


def outputs_on(predictor: Predictor, images: np.ndarray) -> list[np.ndarray]:
    names = [predictor.probability_output] + (["heatmaps"] if predictor.has_heatmaps else [])
    parts = [predictor.run(names, images[i:i + CHECK_BATCH]) for i in range(0, len(images), CHECK_BATCH)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]


def fidelity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """How far a candidate's outputs are from the reference's, and whether that is faithful."""
    probs, ref_probs = candidate[0], reference[0]
    figures = {
        "top1_mismatches": int((probs.argmax(1) != ref_probs.argmax(1)).sum()),
        "max_probability_diff": float(np.abs(probs - ref_probs).max()),
        "min_heatmap_correlation": heatmap_correlation(candidate[1], reference[1]) if len(reference) > 1 else None,
    }
    figures["faithful"] = (figures["top1_mismatches"] == 0
                           and figures["max_probability_diff"] <= MAX_PROBABILITY_DIFF
                           and (figures["min_heatmap_correlation"] is None
                                or figures["min_heatmap_correlation"] >= MIN_HEATMAP_CORRELATION))
    return figures


def interleaved_medians(runs: dict[str, Callable[[], object]], rounds: int = ROUNDS,
                        per_block: int = PER_BLOCK) -> dict[str, float]:
    """Median ms per call of each, timed in blocks whose order rotates every round."""
    keys = list(runs)
    samples = {k: [] for k in keys}
    for k in keys:  # warm-up: lazy set-up and first-call allocation are not timed
        runs[k]()
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            for _ in range(per_block):
                started = time.perf_counter()
                runs[k]()
                samples[k].append((time.perf_counter() - started) * 1000)
    return {k: float(np.median(v)) for k, v in samples.items()}


def label(engine: str, precision: str) -> str:
    return f"{engine} {precision}"


def choose(path: Path, pairs: list[tuple[str, str]], images: list | np.ndarray, threads: int | None = None,
           log: Callable[[str], None] = stderr) -> Predictor:
    """The Predictor of the fastest faithful pair of ``pairs`` for the file at ``path``, its
    ``choice`` holding the figures. ``images``: the Pillow images fidelity is checked on (none:
    a grey image), or those images preprocessed; the first is also the timed input."""
    if len(pairs) == 1:
        engine, precision = pairs[0]
        predictor = Predictor(path, threads, engine, precision)
        predictor.choice = {"mode": "fixed", "engine": engine, "precision": precision}
        return predictor
    loaded: dict[tuple[str, str], Predictor] = {}
    errors: dict[tuple[str, str], str] = {}
    for engine, precision in pairs:
        try:
            loaded[(engine, precision)] = Predictor(path, threads, engine, precision)
        except Exception as exc:  # noqa: BLE001 - an engine that cannot run the file is skipped
            errors[(engine, precision)] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if not loaded:
        raise ModelFileError(
            f"no engine can run '{path}': " + "; ".join(f"{label(*k)}: {v}" for k, v in errors.items()))
    any_predictor = next(iter(loaded.values()))
    reference_pair = (REFERENCE_ENGINE, any_predictor.file_precision)
    reference = loaded.get(reference_pair) or Predictor(path, threads, *reference_pair)
    if isinstance(images, np.ndarray):  # already preprocessed (benchmarks)
        check_images = images
    else:
        check_images = np.concatenate([reference.preprocess(image)
                                       for image in images or [_grey(reference.input_size)]])
    timed_input = check_images[:1]
    wanted = [reference.probability_output] + (["heatmaps"] if reference.has_heatmaps else [])
    contenders = {reference_pair: reference, **loaded}
    medians = interleaved_medians({k: (lambda p=p: p.run(wanted, timed_input)) for k, p in contenders.items()})
    reference_ms = medians[reference_pair]
    reference_outputs = outputs_on(reference, check_images)

    rows = {k: {"engine": k[0], "precision": k[1], "median_ms": round(ms, 3),
                "speedup": round(reference_ms / ms, 3), "faithful": None}
            for k, ms in medians.items() if k in loaded}
    for k, message in errors.items():
        rows[k] = {"engine": k[0], "precision": k[1], "error": message}
    chosen = None
    for k in sorted(loaded, key=medians.get):  # fastest first; the first faithful one wins
        if k == reference_pair:
            rows[k].update(faithful=True, top1_mismatches=0, max_probability_diff=0.0,
                           min_heatmap_correlation=1.0 if reference.has_heatmaps else None)
        else:
            rows[k].update(fidelity(reference_outputs, outputs_on(loaded[k], check_images)))
        if rows[k]["faithful"]:
            chosen = k
            break
    if chosen is None:  # nothing faithful outside the reference, and it is not a candidate
        raise ModelFileError(f"no candidate for '{path.name}' stays faithful to {label(*reference_pair)}: "
                           + "; ".join(f"{label(*k)}: {r}" for k, r in rows.items()))
    reason = "fastest faithful"
    if chosen != reference_pair and reference_pair in loaded and reference_ms / medians[chosen] < MIN_GAIN:
        reason = (f"{label(*chosen)} is only {reference_ms / medians[chosen]:.2f}x faster "
                  f"(a switch needs {MIN_GAIN:.2f}x): keeping {label(*reference_pair)}")
        chosen = reference_pair
        rows[chosen].update(faithful=True, top1_mismatches=0, max_probability_diff=0.0,
                            min_heatmap_correlation=1.0 if reference.has_heatmaps else None)
    predictor = loaded[chosen]
    predictor.choice = {
        "mode": "auto", "engine": chosen[0], "precision": chosen[1],
        "reference": label(*reference_pair), "reference_median_ms": round(reference_ms, 3),
        "speedup": round(reference_ms / medians[chosen], 3), "reason": reason,
        "check_images": int(len(check_images)),
        "timing": f"batch 1, median of {ROUNDS * PER_BLOCK} calls each, {ROUNDS} interleaved blocks",
        "thresholds": {"top1_mismatches": 0, "max_probability_diff": MAX_PROBABILITY_DIFF,
                       "min_heatmap_correlation": MIN_HEATMAP_CORRELATION, "min_gain": MIN_GAIN},
        "candidates": [rows[k] for k in pairs if k in rows],
    }
    log(summary(predictor))
    return predictor


def summary(predictor: Predictor) -> str:
    """One line: what serves the model, how fast against the reference, how faithful."""
    c = predictor.choice
    if not c or c.get("mode") != "auto":
        return f"{predictor.display_name}: {label(predictor.engine, predictor.precision)}"
    row = next(r for r in c["candidates"] if r["engine"] == c["engine"] and r["precision"] == c["precision"])
    others = ", ".join(f"{label(r['engine'], r['precision'])} " + other(r)
                       for r in c["candidates"] if r is not row)
    heat = "" if row.get("min_heatmap_correlation") is None else \
        f", heatmap correlation >= {row['min_heatmap_correlation']:.4f}"
    return (f"{predictor.display_name}: {label(c['engine'], c['precision'])} {row['median_ms']:.1f} ms "
            f"({c['speedup']:.2f}x {c['reference']} {c['reference_median_ms']:.1f} ms; {others}); "
            f"{c['check_images']} check image(s): top-1 mismatches {row['top1_mismatches']}, "
            f"max probability diff {row['max_probability_diff']:.2g}{heat}; {c['reason']}")


def other(row: dict) -> str:
    """A candidate that was not chosen, and why."""
    if "median_ms" not in row:
        return f"failed: {row['error']}"
    text = f"{row['median_ms']:.1f} ms"
    if row["faithful"] is False:
        correlation = row["min_heatmap_correlation"]
        text += (f" (not faithful: top-1 mismatches {row['top1_mismatches']}, max probability diff "
                 f"{row['max_probability_diff']:.2g}, heatmap correlation "
                 f"{'–' if correlation is None else f'{correlation:.4f}'})")
    return text


def _grey(size: tuple[int, int]):
    from PIL import Image

    return Image.new("RGB", size[::-1], (128, 128, 128))
