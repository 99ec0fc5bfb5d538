"""``python -m training.compare RUN_DIR [RUN_DIR ...]``: rebuild the comparison without training.

    python -m training.compare runs/a                       # comparison.md/.json/.png in runs/a again
    python -m training.compare runs/a runs/b --out runs/ab  # merge seeds trained by separate commands
    python -m training.compare runs/a --claims              # print only "What the data supports"

Reads only what the runs saved (``config.json``, ``splits.json`` and each run's
``report.json``, ``predictions.csv``, ``history.csv``). Runs are merged only when they were
made on the same split with the same settings (the seed aside); anything else is refused in
one line, since a mean over runs of different splits or recipes would compare nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import UserError, run_cli
from common.run_layout import RunLayout
from training.comparison import CLAIMS_TITLE, Source, write
from training.study import run_members

# Settings that may differ between merged runs: the seed (what merging adds) and how they ran.
MAY_DIFFER = {"seed", "seeds", "out", "device", "workers", "cache_dir", "no_cache"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s) of training.run")
    parser.add_argument("--out", help="where to write (default: the run folder; required with several)")
    parser.add_argument("--claims", action="store_true",
                        help="print only the first section, what the data supports (as the README quotes it)")
    return parser.parse_args(argv)


def _read(run_dir: Path) -> tuple[dict, dict]:
    layout = RunLayout(run_dir)
    for path in (layout.config, layout.splits):
        if not path.is_file():
            raise UserError(f"'{run_dir}' is not a finished run folder (no {path.name})")
    try:
        return json.loads(layout.config.read_text()), json.loads(layout.splits.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"'{run_dir}': unreadable config.json or splits.json ({exc})") from None


def gather(run_dirs: list[Path]) -> tuple[list[Source], dict, dict]:
    """The runs of every folder, checked to be mergeable: (sources, first config, first splits)."""
    first_dir, (config, splits) = run_dirs[0], _read(run_dirs[0])
    sources, seen = [], {}
    for run_dir in run_dirs:
        other_config, other_splits = (config, splits) if run_dir == first_dir else _read(run_dir)
        if other_splits != splits:
            raise UserError(f"'{run_dir}' was trained on a different split from '{first_dir}' "
                            "(splits.json differs); only runs of the same split can be merged")
        differ = sorted(k for k in set(config) | set(other_config)
                        if k not in MAY_DIFFER and config.get(k) != other_config.get(k))
        if differ:
            raise UserError(f"'{run_dir}' differs from '{first_dir}' in {', '.join(differ)}; "
                            "only runs with the same settings (the seed aside) can be merged")
        if config.get("folds") and len(run_dirs) > 1:
            raise UserError("runs with --folds cannot be merged: each is a whole cross-validation")
        for member in run_members(run_dir):
            key = (member.seed, member.fold)
            if key in seen:
                raise UserError(f"seed {member.seed} is in both '{seen[key]}' and '{run_dir}'")
            seen[key] = run_dir
            source = Source(run_dir, member)
            for model in config["models"]:
                files = source.files(model)
                missing = [p.name for p in (files.report, files.predictions, files.history) if not p.is_file()]
                if missing:
                    raise UserError(f"'{files.folder}' has no {missing[0]}: that run is not "
                                    "finished (continue it with python -m training.run --resume)")
            sources.append(source)
    if not config.get("folds"):
        sources.sort(key=lambda s: s.member.seed)
    return sources, config, splits


def run_info(run_dir: Path, config: dict, splits: dict) -> dict:
    """The header facts, from the saved files (the device from an earlier comparison.json)."""
    if "folds" in splits:
        pool = sum(len(fold) for fold in splits["folds"])
        sizes = f"{len(splits['folds'])} folds of {pool} images" + (
            f", test {len(splits['test'])}" if "test" in splits else "")
    else:
        sizes = ", ".join(f"{k} {len(splits[k])}" for k in ("train", "val", "test") if k in splits)
    device = "not recorded"
    try:
        device = json.loads(RunLayout(run_dir).comparison_json.read_text()).get("device", device)
    except (OSError, ValueError):
        pass
    return {"dataset": config.get("data", "?"), "classes": len(splits["class_names"]),
            "split_sizes": sizes, "image_size": config.get("image_size", "?"), "device": device}


def claims_of(markdown: str) -> str:
    """The "What the data supports" section of a comparison.md, heading included."""
    section = markdown[markdown.index(f"## {CLAIMS_TITLE}"):]
    return section.split("\n## ", 1)[0].rstrip() + "\n"


def compare(args: argparse.Namespace) -> int:
    run_dirs = [Path(p) for p in args.runs]
    if len(run_dirs) > 1 and not args.out:
        raise UserError("merging several run folders needs --out (a folder for the merged comparison)")
    if len(set(p.resolve() for p in run_dirs)) < len(run_dirs):
        raise UserError("a run folder is named twice")
    sources, config, splits = gather(run_dirs)
    out = Path(args.out) if args.out else run_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    write(out, sources, list(config["models"]), int(config.get("folds") or 0), run_info(run_dirs[0], config, splits))
    written = RunLayout(out).comparison_md
    print(f"Wrote {written} from {len(sources)} run(s) per model "
          f"({', '.join(s.label for s in sources)})", file=sys.stderr)
    text = written.read_text()
    print(claims_of(text) if args.claims else text)
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: compare(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
