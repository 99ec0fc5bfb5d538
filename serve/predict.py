"""``python -m serve.predict``: classify image files and folders with every served model.

    python -m serve.predict photos/                         # CSV on stdout
    python -m serve.predict a.jpg b/ --out results.jsonl    # JSON Lines (by the extension)
    python -m serve.predict photos/ --precision int8 --batch-size 32 --out results.csv

Every image under the given files and folders (folders: the image extensions, recursively)
goes through every model of the chosen precision in DIR/manifest.json, in batches. Each
output row has the path, and per model its top class, whether it is unsure (its top
probability below the threshold in the file's metadata: true or false, empty for files
exported without one) and the probability of every class;
files that cannot be used get a row with the reason, and are listed on stderr at the end.
Exit code 0 when anything was classified, 2 for a user mistake (no such path, no images, no
models, nothing usable).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import imaging
from common.errors import UserError, run_cli
from common.files import atomic_write
from serve.batch import Progress, classify_files, default_batch_size, default_workers, model_key
from serve.catalog import add_engine_arguments, load_catalog

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve.predict", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders")
    parser.add_argument("--models", default="models", help="folder with manifest.json (default: models)")
    add_engine_arguments(parser)
    parser.add_argument("--out", help="output file: .csv, or .jsonl for JSON Lines (default: CSV on stdout)")
    parser.add_argument("--batch-size", type=positive_int, default=default_batch_size(),
                        help=f"images per model run (default here: {default_batch_size()})")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help=f"decoding processes, 0 to decode in this one (default here: {default_workers()})")
    parser.add_argument("--max-pixels", type=positive_int, default=imaging.SERVING_MAX_PIXELS,
                        help=f"refuse larger images before decoding (default: {imaging.SERVING_MAX_PIXELS:,})")
    return parser.parse_args(argv)


def find_images(paths: list[str]) -> list[str]:
    """Files named directly (whatever their extension), and the images under folders."""
    found = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*")
                            if p.is_file() and imaging.is_image_name(p.name)
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            found.append(str(path))
        else:
            raise UserError(f"no such file or folder: '{name}'")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UserError(f"no images in {', '.join(paths)} "
                        f"(looked for {', '.join(imaging.IMAGE_EXTENSIONS)})")
    return unique


class Writer:
    """CSV or JSON Lines rows: one per file, classified or not."""

    def __init__(self, stream, kind: str, predictors):
        self.stream, self.kind, self.predictors = stream, kind, predictors
        if kind == "csv":
            self.csv = csv.writer(stream)
            header = ["path"]
            for p in predictors:
                header += [f"{p.name}.top_class", f"{p.name}.unsure"] + [f"{p.name}.{c}" for c in p.class_names]
            self.csv.writerow(header + ["error"])

    def result(self, path: str, probabilities: dict, row: int) -> None:
        if self.kind == "csv":
            cells = [path]
            for p in self.predictors:
                probs = probabilities[model_key(p)][row]
                unsure = p.is_unsure(probs)
                cells += [p.class_names[int(probs.argmax())], "" if unsure is None else str(unsure).lower()]
                cells += [f"{float(v):.6g}" for v in probs]
            self.csv.writerow(cells + [""])
        else:
            models = {}
            for p in self.predictors:
                probs = probabilities[model_key(p)][row]
                models[p.name] = {"top_class": p.class_names[int(probs.argmax())], "unsure": p.is_unsure(probs),
                                  "probabilities": {c: float(v) for c, v in zip(p.class_names, probs)}}
            self.stream.write(json.dumps({"path": path, "models": models}) + "\n")

    def failure(self, path: str, reason: str) -> None:
        if self.kind == "csv":
            width = sum(2 + len(p.class_names) for p in self.predictors)
            self.csv.writerow([path] + [""] * width + [reason])
        else:
            self.stream.write(json.dumps({"path": path, "error": reason}) + "\n")


def main(argv=None) -> int:
    return run_cli(lambda: predict(parse_args(argv)))


def predict(args: argparse.Namespace) -> int:
    kind = "csv"
    if args.out:
        kind = FORMATS.get(Path(args.out).suffix.lower())
        if kind is None:
            raise UserError(f"--out '{args.out}': use a .csv or .jsonl file")
        if not Path(args.out).parent.is_dir():
            raise UserError(f"--out '{args.out}': folder '{Path(args.out).parent}' does not exist")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    paths = find_images(args.paths)
    catalog = load_catalog(args.models, args.precision, engine=args.engine)
    print(f"Classifying {len(paths)} file(s) with {', '.join(p.display_name for p in catalog.predictors)} "
          f"({catalog.precision}), batches of {args.batch_size}", file=sys.stderr, flush=True)
    if args.out:
        with atomic_write(args.out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
            classified, failures = run(paths, catalog, args, Writer(stream, kind, catalog.predictors))
    else:
        stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", line_buffering=True)
        classified, failures = run(paths, catalog, args, Writer(stream, kind, catalog.predictors))
        stream.detach()
    if failures:
        print(f"{len(failures)} file(s) could not be used:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
    if not classified:
        raise UserError(f"none of the {len(paths)} file(s) could be classified")
    print(f"Classified {classified} file(s)" + (f"; wrote {args.out}" if args.out else ""),
          file=sys.stderr)
    return 0


def run(paths, catalog, args, writer: Writer) -> tuple[int, list[tuple[str, str]]]:
    classified, failures = 0, []
    progress = Progress(len(paths))
    for batch in classify_files(paths, catalog.predictors, args.batch_size, args.workers,
                                args.max_pixels, progress):
        for row, path in enumerate(batch.paths):
            writer.result(path, batch.probabilities, row)
        for path, reason in batch.failures:
            writer.failure(path, reason)
        classified += len(batch.paths)
        failures += batch.failures
    progress.close()
    return classified, failures


if __name__ == "__main__":
    sys.exit(main())
