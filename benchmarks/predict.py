"""``python -m benchmarks.predict``: images/s of ``serve.predict`` vs bare ONNX Runtime sessions.

In one process, in alternating rounds, the same N image files and the same batch size:
- ``bare``: the served models' ONNX Runtime sessions fed batches that were decoded,
  resized and normalised beforehand (kept in memory): the compute bound;
- ``predict``: ``serve.batch.classify_files``, what ``python -m serve.predict`` runs after
  loading the models: decoding in ``--workers`` processes (started each round, as each
  command run starts them) a bounded number of batches ahead, then the same sessions.
The ratio is predict's images/s over bare's (target >= 0.9x). The files are photo-like
JPEGs made here (``--size``), unless ``--images`` names a folder.
Prints a table and writes benchmarks/results/predict.json (see ``--out``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

import imaging
from benchmarks.common import RESULTS_DIR, command_line, machine, markdown_table, write_json
from serve.batch import classify_files, default_batch_size, default_workers
from serve.catalog import PRECISIONS, load_catalog


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models", help="models folder (default: models)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--images", help="folder of images (default: photo-like JPEGs made here)")
    parser.add_argument("--count", type=int, default=256, help="images made here (default: 256)")
    parser.add_argument("--size", default="640x480", help="their width x height (default: 640x480)")
    parser.add_argument("--batch-size", type=int, default=default_batch_size())
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "predict.json"), help="JSON results file")
    return parser.parse_args(argv)


def make_photos(folder: Path, count: int, width: int, height: int) -> list[str]:
    """Smooth colour fields with some texture: JPEGs that decode like photos of that size."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
        path = folder / f"{i:04d}.jpg"
        image.filter(ImageFilter.SMOOTH).save(path, quality=90)
        paths.append(str(path))
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    catalog = load_catalog(args.models, args.precision)
    predictors = catalog.predictors
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            paths = sorted(str(p) for p in Path(args.images).rglob("*") if imaging.is_image_name(p.name))
        else:
            width, height = (int(v) for v in args.size.lower().split("x"))
            paths = make_photos(Path(tmp), args.count, width, height)
        spec = predictors[0].preprocessing
        pixels = np.stack([spec.pixels(imaging.load_rgb(p)) for p in paths]).transpose(0, 3, 1, 2)
        batches = [{p.name: p.preprocessing.normalize(pixels[i:i + args.batch_size]) for p in predictors}
                   for i in range(0, len(paths), args.batch_size)]

        def bare():
            for batch in batches:
                for p in predictors:
                    p.probabilities(batch[p.name])

        def predict():
            done = sum(len(b.paths) for b in classify_files(paths, predictors, args.batch_size, args.workers))
            assert done == len(paths)

        seconds = {"bare": [], "predict": []}
        bare()  # warm-up
        for r in range(args.rounds):
            for name, fn in (("bare", bare), ("predict", predict))[:: 1 if r % 2 == 0 else -1]:
                started = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - started)
    per_s = {name: len(paths) / float(np.median(s)) for name, s in seconds.items()}
    ratio = per_s["predict"] / per_s["bare"]
    size = predictors[0].input_size
    print(f"{len(predictors)} {args.precision} models at {size[0]}x{size[1]}, {len(paths)} images "
          f"({args.images or args.size}), batch {args.batch_size}, {args.workers} decoding worker(s)")
    print(markdown_table(["bare sessions (images/s)", "serve.predict (images/s)", "ratio"],
                         [[per_s["bare"], per_s["predict"], f"{ratio:.2f}x"]]))
    out = write_json(Path(args.out), {
        "command": command_line(argv, "benchmarks.predict"), "machine": machine(),
        "models": [p.name for p in predictors], "precision": args.precision, "input_size": list(size),
        "images": len(paths), "image_source": args.images or f"made here, {args.size} JPEG",
        "batch_size": args.batch_size, "workers": args.workers, "seconds": seconds,
        "images_per_s": per_s, "ratio": ratio,
    })
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
