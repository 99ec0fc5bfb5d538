"""Where a training run keeps its files: every name in a run folder, and which folder each run
of a study (``--seeds``, ``--folds``) writes to.

    runs/                           RUNS_DIR; newest_run() finds the one modified last
    └── <run>/                      RunLayout(run_dir)
        ├── config.json             .config: the settings the run was started with
        ├── splits.json             .splits: the images of each split (or fold)
        ├── bad_files.json          .bad_files: the files the data check skipped
        ├── comparison.md, comparison.json, comparison.png, calibration.png, heatmaps.png
        └── <model>/
            ├── errors.png          .errors_png(model)
            ├── best.pt, ...        a single run (training_run "single"): its ModelFiles here,
            └── seed-<s>/, fold-<k>/    or a study of several runs: each run's ModelFiles

    ModelFiles: best.pt, last.pt, report.json, predictions.csv, history.csv, logits.csv,
    ood.csv (with an out-of-distribution check), curves.png, confusion.png

A merged comparison (``python -m training.compare --out``) writes the comparison files and
``<model>/errors.png`` into a folder of its own under the same names. Torch-free, so that the
model card and serving code find a run's files the way training wrote them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

RUNS_DIR = Path("runs")
# The training_run of a run folder's only run, as the ONNX metadata and manifest.json name it:
# its files are in the model folder itself.
SINGLE = "single"


@dataclass(frozen=True)
class Member:
    """One training run of every model: its seed, and its fold of the cross-validation."""

    label: str | None  # seed-<s> or fold-<k>, its folder under each model; None: a single run
    seed: int
    fold: int | None = None  # 0-based; the folder says fold-<fold + 1>

    @classmethod
    def of_seed(cls, seed: int) -> Member:
        """One of several runs on one split, told apart by their seed (--seeds)."""
        return cls(f"seed-{seed}", seed)

    @classmethod
    def of_fold(cls, fold: int, seed: int) -> Member:
        """The run validated on fold ``fold`` (0-based) of the cross-validation (--folds)."""
        return cls(f"fold-{fold + 1}", seed, fold)

    @property
    def training_run(self) -> str:
        """Its name in the exported files: the label, or SINGLE."""
        return self.label or SINGLE


@dataclass(frozen=True)
class ModelFiles:
    """What one training run of one model writes into its folder."""

    folder: Path

    @property
    def best_checkpoint(self) -> Path:
        return self.folder / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.folder / "last.pt"

    @property
    def report(self) -> Path:
        return self.folder / "report.json"

    @property
    def predictions(self) -> Path:
        return self.folder / "predictions.csv"

    @property
    def history(self) -> Path:
        return self.folder / "history.csv"

    @property
    def logits(self) -> Path:
        """The raw logits of the validation and test images."""
        return self.folder / "logits.csv"

    @property
    def ood_logits(self) -> Path:
        """The raw logits of the out-of-distribution images."""
        return self.folder / "ood.csv"

    @property
    def curves_png(self) -> Path:
        return self.folder / "curves.png"

    @property
    def confusion_png(self) -> Path:
        return self.folder / "confusion.png"


class RunLayout:
    """The paths of one run folder (or of a merged comparison's folder)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def bad_files(self) -> Path:
        return self.root / "bad_files.json"

    @property
    def comparison_md(self) -> Path:
        return self.root / "comparison.md"

    @property
    def comparison_json(self) -> Path:
        return self.root / "comparison.json"

    @property
    def comparison_png(self) -> Path:
        return self.root / "comparison.png"

    @property
    def calibration_png(self) -> Path:
        return self.root / "calibration.png"

    @property
    def heatmaps_png(self) -> Path:
        return self.root / "heatmaps.png"

    def errors_png(self, model: str) -> Path:
        """The validation images the model got wrong, beside its runs' folders."""
        return self.root / model / "errors.png"

    def model_files(self, model: str, training_run: str = SINGLE) -> ModelFiles:
        """The files of one model's run named ``training_run`` (seed-<s>, fold-<k> or SINGLE)."""
        folder = self.root / model
        return ModelFiles(folder if training_run == SINGLE else folder / training_run)

    def member_files(self, model: str, member: Member) -> ModelFiles:
        return self.model_files(model, member.training_run)


def newest_run(runs_dir: Path = RUNS_DIR) -> Path:
    """The run folder (one with a config.json) under ``runs_dir`` modified last."""
    runs = sorted((p for p in runs_dir.glob("*") if RunLayout(p).config.is_file()),
                  key=lambda p: p.stat().st_mtime) if runs_dir.is_dir() else []
    if not runs:
        raise UserError(f"no run to resume under '{runs_dir}/'")
    return runs[-1]
