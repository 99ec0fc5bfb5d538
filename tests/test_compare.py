"""The comparison built from saved run files (synthetic predictions, no training) and
``python -m training.compare``: claims on the held-out split, what each claim covers, Holm,
the merge of runs made by separate commands and the refusal of runs that do not match."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from common import statistics
from training import comparison
from training.compare import main as compare_main
from training.config import make_config, to_dict

N_VAL, N_TEST = 60, 80


def _write_member(folder: Path, name: str, correct: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "path", "label", "predicted", "prob_x", "prob_y"])
        for split, right in correct.items():
            for i, ok in enumerate(right):
                writer.writerow([split, f"/data/{split}/{i}.png", "x", "x" if ok else "y", "0.5", "0.5"])
    report = {"display_name": name.upper(), "best_epoch": 1, "epochs_run": 1, "train_accuracy": 0.5,
              "train_loss": 1.0, "parameters": 10, "mult_adds": 1e9, "seconds": 1.0,
              "per_class": {"x": {"f1": 0.5}, "y": {"f1": 0.5}}}
    for split, right in correct.items():
        report.update({f"{split}_accuracy": float(right.mean()), f"{split}_macro_f1": float(right.mean()),
                       f"{split}_loss": float(1 - right.mean())})
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "history.csv").write_text("epoch,lr,train_loss,train_accuracy,val_loss,val_accuracy,seconds\n"
                                        f"1,0.1,1.0,0.5,{report['val_loss']},{report['val_accuracy']},1.0\n")


def make_run(run_dir: Path, correct: dict, seed: int = 67, test: bool = True, **settings) -> Path:
    """A run folder as training.run leaves it. ``correct``: {model: [per seed: {split: bools}]}
    (a list of one: a single run)."""
    models = list(correct)
    runs = len(correct[models[0]])
    config = to_dict(make_config({"data": "/data", "models": models, "seed": seed, "seeds": runs,
                                  "test_fraction": 0.5 if test else 0.0, **settings}))
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    splits = {"class_names": ["x", "y"], "train": [["/data/train/0.png", 0]],
              "val": [[f"/data/val/{i}.png", 0] for i in range(N_VAL)]}
    if test:
        splits["test"] = [[f"/data/test/{i}.png", 0] for i in range(N_TEST)]
    (run_dir / "splits.json").write_text(json.dumps(splits))
    for name, per_seed in correct.items():
        for k, splits_correct in enumerate(per_seed):
            folder = run_dir / name if runs == 1 else run_dir / name / f"seed-{seed + k}"
            _write_member(folder, name, splits_correct)
    return run_dir


def bools(n: int, right: int, offset: int = 0) -> np.ndarray:
    """n images, ``right`` of them correct, starting at ``offset`` (wrapping)."""
    out = np.zeros(n, bool)
    out[(offset + np.arange(right)) % n] = True
    return out


def seeded(val_rights, test_rights, offsets=None):
    offsets = offsets or [0] * len(val_rights)
    return [{"val": bools(N_VAL, v, o), "test": bools(N_TEST, t, o)}
            for v, t, o in zip(val_rights, test_rights, offsets)]


def rebuild(*run_dirs, out=None) -> dict:
    assert compare_main([*map(str, run_dirs), *(["--out", str(out)] if out else [])]) == 0
    where = Path(out or run_dirs[0])
    return json.loads((where / "comparison.json").read_text())


def intervals(text: str) -> list[tuple[str, str]]:
    return re.findall(r"(-?\d+\.?\d*) to (-?\d+\.?\d*)", text)


def test_claims_rest_on_the_test_split_and_validation_is_labelled(tmp_path):
    # On validation M leads clearly; on the test split the two are level.
    run = make_run(tmp_path / "run", {"resnet34": seeded([50], [40]), "plain34": seeded([30], [40])})
    summary = rebuild(run)
    text = (run / "comparison.md").read_text()
    claims = text.split("## What the data supports")[1].split("\n## ")[0]
    assert summary["claims_split"] == "test" and "Claims on the test split (80 images" in claims
    (test_pair,) = summary["pairs"]["test"]
    assert test_pair["sentence"] in claims and "cannot tell them apart" in test_pair["sentence"]
    (val_pair,) = summary["pairs"]["val"]
    assert "beats" in val_pair["sentence"] and val_pair["sentence"] not in claims
    assert "## Validation (the split that chose each run's epoch)" in text
    assert "descriptive and optimistic" in text.split("## Validation")[1]
    # One run: the report says plainly what is not covered and what would be.
    assert "training randomness is not covered" in claims and "--seeds 3 or more" in claims


def test_no_test_split_says_the_claims_are_on_the_selecting_split(tmp_path):
    run = make_run(tmp_path / "run", {"resnet34": [{"val": bools(N_VAL, 50)}], "plain34": [{"val": bools(N_VAL, 30)}]},
                   test=False)
    summary = rebuild(run)
    claims = (run / "comparison.md").read_text().split("## What the data supports")[1].split("\n## ")[0]
    assert summary["claims_split"] == "val" and "There is no test split" in claims


def test_two_seeds_winner_and_difference_from_the_mean_the_table_shows(tmp_path):
    # Seed 67: N ahead by 20 images; seed 68: M ahead by 35. The mean puts M ahead by 7.5 on
    # 80 test images: the pair, its difference and the table must all say so.
    run = make_run(tmp_path / "run", {"resnet34": seeded([30, 55], [30, 75]), "plain34": seeded([40, 40], [50, 40])})
    summary = rebuild(run)
    (pair,) = summary["pairs"]["test"]
    mean = {name: summary["models"][name]["test"]["accuracy"]["mean"] for name in ("resnet34", "plain34")}
    assert pair["models"] == ["resnet34", "plain34"]
    assert pair["difference_points"] == pytest.approx(100 * (mean["resnet34"] - mean["plain34"]))
    assert pair["primary"]["test"] == "exact sign-flip test over images (2 runs)"
    assert pair["primary"]["covers"] == statistics.IMAGES and pair["primary"]["p_fresh_run"] is None
    text = (run / "comparison.md").read_text()
    assert "2 runs per model are too few to estimate training randomness" in text


def test_three_seeds_cover_images_and_runs_with_holm_over_the_pairs(tmp_path):
    correct = {"resnet34": seeded([50, 52, 49], [70, 72, 69], [0, 3, 5]),
               "plain34": seeded([48, 47, 50], [66, 70, 67], [1, 4, 2]),
               "resnet34_modified": seeded([30, 33, 29], [40, 42, 38], [0, 2, 7])}
    run = make_run(tmp_path / "run", correct)
    summary = rebuild(run)
    pairs = summary["pairs"]["test"]
    assert len(pairs) == 3
    assert [p["p_holm"] for p in pairs] == pytest.approx(statistics.holm([p["primary"]["p_value"] for p in pairs]))
    for pair in pairs:
        primary = pair["primary"]
        assert primary["covers"] == statistics.IMAGES_AND_RUNS and 0 <= primary["p_fresh_run"] <= 1
        assert primary["test"].startswith("t over 3 runs x 80 images")
        assert "Holm-adjusted over 3 pairs" in pair["sentence"] and "training randomness" in pair["sentence"]
        assert pair["difference_points"] >= 0
        a, b = pair["models"]
        table = [summary["models"][m]["test"]["accuracy"]["mean"] for m in (a, b)]
        assert pair["difference_points"] == pytest.approx(100 * (table[0] - table[1]))
    text = (run / "comparison.md").read_text()
    assert "Holm's correction over the 3 pairs" in text and "P(fresh run of A beats B)" in text


def test_no_degenerate_interval_is_printed(tmp_path):
    # Every seed the same answers: zero spread over runs, for the models and for the pairs.
    same = seeded([40, 40, 40], [60, 60, 60])
    run = make_run(tmp_path / "run", {"resnet34": same, "plain34": seeded([30, 30, 30], [50, 50, 50]), "resnet34_modified": same})
    rebuild(run)
    text = (run / "comparison.md").read_text()
    for low, high in intervals(text) + re.findall(r"\((\d\.\d+)–(\d\.\d+)\)", text):
        assert low != high, (low, high)
    assert "(no spread)" in text and "undefined" not in text


def test_compare_rebuilds_the_same_comparison(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"resnet34": seeded([50, 52, 49], [70, 72, 69]), "plain34": seeded([48, 47, 50], [66, 70, 67])})
    first = rebuild(run)
    (run / "comparison.md").unlink()
    again = rebuild(run)
    assert first == again and (run / "comparison.md").is_file() and (run / "resnet34" / "errors.png").is_file()
    capsys.readouterr()
    assert compare_main([str(run), "--claims"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("## What the data supports") and "## Test" not in printed
    assert all(pair["sentence"] in printed for pair in again["pairs"]["test"])


def test_merge_of_seeds_from_separate_commands_equals_one_run(tmp_path):
    m, n = seeded([50, 52, 49], [70, 72, 69], [0, 1, 2]), seeded([48, 47, 50], [66, 70, 67], [3, 4, 5])
    whole = rebuild(make_run(tmp_path / "whole", {"resnet34": m, "plain34": n}))
    part1 = make_run(tmp_path / "part1", {"resnet34": m[:1], "plain34": n[:1]})  # the default run, seed 67
    part2 = make_run(tmp_path / "part2", {"resnet34": m[1:], "plain34": n[1:]}, seed=68)  # --seed 68 --seeds 2
    merged = rebuild(part2, part1, out=tmp_path / "merged")
    assert merged["runs"] == ["seed-67", "seed-68", "seed-69"]
    assert merged["pairs"] == whole["pairs"] and merged["models"] == whole["models"]


@pytest.mark.parametrize("change, message", [
    ("split", "different split"),
    ("epochs", "differs from"),
    ("seed", "seed 67 is in both"),
])
def test_compare_refuses_runs_that_cannot_be_merged_in_one_line(tmp_path, capsys, change, message):
    correct = {"resnet34": seeded([50], [70]), "plain34": seeded([48], [66])}
    first = make_run(tmp_path / "a", correct)
    second = make_run(tmp_path / "b", correct, seed=67 if change == "seed" else 68,
                      **({"epochs": 3} if change == "epochs" else {}))
    if change == "split":
        splits = json.loads((second / "splits.json").read_text())
        splits["val"] = splits["val"][1:]
        (second / "splits.json").write_text(json.dumps(splits))
    assert compare_main([str(first), str(second), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not (tmp_path / "out" / "comparison.md").exists()


def test_compare_refuses_a_missing_or_unfinished_run(tmp_path, capsys):
    assert compare_main([str(tmp_path / "nowhere")]) == 2
    run = make_run(tmp_path / "run", {"resnet34": seeded([50], [70]), "plain34": seeded([48], [66])})
    (run / "plain34" / "predictions.csv").unlink()
    assert compare_main([str(run)]) == 2
    assert "not finished" in capsys.readouterr().err
    assert compare_main([str(run), str(run), "--out", str(tmp_path / "resnet34_modified")]) == 2


def test_folds_use_the_corrected_test_and_say_validation_chose_the_epochs(tmp_path):
    run = tmp_path / "folds"
    config = to_dict(make_config({"data": "/data", "models": ["resnet34", "plain34"], "folds": 3, "test_fraction": 0.2}))
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config))
    folds = [[[f"/data/{k}/{i}.png", 0] for i in range(20)] for k in range(3)]
    (run / "splits.json").write_text(json.dumps({"class_names": ["x", "y"], "folds": folds,
                                                 "test": [[f"/data/test/{i}.png", 0] for i in range(N_TEST)]}))
    rights = {"resnet34": [(16, 60), (15, 62), (17, 59)], "plain34": [(12, 55), (14, 50), (11, 52)]}
    for name, per_fold in rights.items():
        for k, (v, t) in enumerate(per_fold):
            folder = run / name / f"fold-{k + 1}"
            _write_member(folder, name, {"val": bools(20, v, k), "test": bools(N_TEST, t, k)})
            predictions = (folder / "predictions.csv").read_text().replace("/data/val/", f"/data/{k}/")
            (folder / "predictions.csv").write_text(predictions)
    summary = rebuild(run)
    (val_pair,) = summary["pairs"]["val"]
    assert val_pair["primary"]["test"] == "corrected resampled t-test over 3 folds"
    assert val_pair["over_images"]["images"] == 60  # pooled: each image once
    (test_pair,) = summary["pairs"]["test"]
    assert test_pair["primary"]["covers"] == statistics.IMAGES_AND_RUNS
    text = (run / "comparison.md").read_text()
    assert "Each fold's validation images also chose that fold's epoch" in text.split("## Validation")[1]
    assert "training sets overlap" in text.split("## What the data supports")[1].split("\n## ")[0]
    assert "3 folds of 60 images, test 80" in text


def test_extra_sections_go_into_the_page_and_the_json(tmp_path, monkeypatch):
    def extra(ctx):
        return comparison.Section("extra", ["", "## Extra", "", f"{len(ctx.sources)} run(s)."], {"runs": len(ctx.sources)})

    monkeypatch.setattr(comparison, "EXTRA_SECTIONS", [extra, lambda ctx: None])
    run = make_run(tmp_path / "run", {"resnet34": seeded([50], [70]), "plain34": seeded([48], [66])})
    summary = rebuild(run)
    text = (run / "comparison.md").read_text()
    assert summary["sections"] == {"extra": {"runs": 1}}
    assert text.index("## Extra") < text.index("## Training") and "1 run(s)." in text
