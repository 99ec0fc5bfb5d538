"""The run folder's one home (common/run_layout.py): the folders each run of a study gets, the
"single" label of the exported files, the newest run, and the files training really writes."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from common.errors import EXIT_USER_ERROR, UserError
from common.run_layout import SINGLE, Member, ModelFiles, RunLayout, newest_run

ROOT = Path(__file__).resolve().parents[1]


def every_model_file(files: ModelFiles) -> set[Path]:
    return {files.best_checkpoint, files.last_checkpoint, files.report, files.predictions, files.history,
            files.logits, files.ood_logits, files.curves_png, files.confusion_png}


def test_a_single_run_writes_into_the_model_folder_and_a_study_one_folder_per_run(tmp_path):
    from training.config import make_config
    from training.study import members

    layout = RunLayout(tmp_path)
    [single] = members(make_config({"seed": 67}))
    assert single == Member(None, 67)
    assert layout.member_files("resnet34", single).folder == tmp_path / "resnet34"
    seeded = members(make_config({"seed": 67, "seeds": 2}))
    assert [layout.member_files("resnet34", m).folder for m in seeded] == [
        tmp_path / "resnet34" / "seed-67", tmp_path / "resnet34" / "seed-68"]
    folded = members(make_config({"seed": 67, "folds": 3}))
    assert [(m.seed, m.fold) for m in folded] == [(67, 0), (67, 1), (67, 2)]
    assert [layout.member_files("plain34", m).folder.relative_to(tmp_path).as_posix() for m in folded] == [
        "plain34/fold-1", "plain34/fold-2", "plain34/fold-3"]
    assert layout.member_files("plain34", folded[1]).best_checkpoint == tmp_path / "plain34" / "fold-2" / "best.pt"


def test_the_single_label_round_trips_to_the_model_folder(tmp_path):
    layout = RunLayout(str(tmp_path))
    assert SINGLE == "single"  # the manifest's and the ONNX metadata's training_run: never changes
    assert Member(None, 67).training_run == "single"
    assert layout.model_files("resnet34", "single") == layout.member_files("resnet34", Member(None, 67))
    assert layout.model_files("resnet34").report == tmp_path / "resnet34" / "report.json"
    for member in (Member.of_seed(68), Member.of_fold(1, 67)):
        assert layout.model_files("resnet34", member.training_run) == layout.member_files("resnet34", member)
    assert Member.of_seed(68).training_run == "seed-68" and Member.of_fold(1, 67).training_run == "fold-2"


def test_newest_run_is_the_run_folder_modified_last(tmp_path):
    with pytest.raises(UserError, match="no run to resume under") as info:
        newest_run(tmp_path / "absent")
    assert info.value.exit_code == EXIT_USER_ERROR
    for age, name in enumerate(("new", "old")):
        (tmp_path / name).mkdir()
        RunLayout(tmp_path / name).config.write_text("{}")
        os.utime(tmp_path / name, (1e9 - age, 1e9 - age))
    (tmp_path / "no-config").mkdir()  # newest of all, but no run
    assert newest_run(tmp_path) == tmp_path / "new"


def test_run_folder_names_are_written_once():
    """No code outside common/run_layout.py spells a file name of the run folder."""
    names = re.compile(r'"(best|last)\.pt"|"(report|config|splits|comparison|bad_files)\.json"'
                       r'|"(predictions|history|logits|ood)\.csv"|"comparison\.md"'
                       r'|"(comparison|calibration|heatmaps|errors|curves|confusion)\.png"')
    found = {p.relative_to(ROOT).as_posix(): set(m.group(0) for m in names.finditer(p.read_text()))
             for folder in ("common", "imaging", "training", "export", "serve", "benchmarks")
             for p in (ROOT / folder).rglob("*.py") if names.search(p.read_text())}
    # serve.evaluate writes a report.json of its own, into its --out folder, not into a run.
    assert set(found) == {"common/run_layout.py", "serve/evaluate.py"}
    assert found["serve/evaluate.py"] == {'"report.json"'}


def test_the_layout_names_every_file_a_single_run_writes(trained_run):
    from training.models import MODEL_NAMES

    layout = RunLayout(trained_run)
    assert {p for p in trained_run.iterdir() if p.is_file()} == {
        layout.config, layout.splits, layout.bad_files, layout.comparison_md, layout.comparison_json,
        layout.comparison_png, layout.calibration_png, layout.heatmaps_png}
    assert {p.name for p in trained_run.iterdir() if p.is_dir()} == set(MODEL_NAMES)
    for name in MODEL_NAMES:
        files = layout.model_files(name, SINGLE)  # as the exported manifest names this run
        assert set(files.folder.iterdir()) == every_model_file(files) | {layout.errors_png(name)}
