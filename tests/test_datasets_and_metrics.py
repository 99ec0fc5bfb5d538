"""The torch-free dataset indexer and classification metrics that training and serve.evaluate
share: the same files for the same folder, the same numbers for the same predictions."""
from pathlib import Path

import numpy as np
import pytest

from common import datasets, metrics
from common.errors import UserError
from serve import evaluate


def write_files(folder: Path, names: list[str]) -> None:
    """Placeholder files: the indexer lists files without opening them."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def write_classes(folder: Path) -> None:
    write_files(folder / "cat", ["b.png", "a.jpg", ".hidden.png", "nested/c.png", ".cache/d.png"])
    write_files(folder / "dog", ["e.png"])
    (folder / ".thumbnails").mkdir()  # a hidden folder is no class


def named(index: datasets.DatasetIndex, split: str) -> list[tuple[str, str]]:
    return [(s.path, index.class_names[s.label]) for s in index.splits[split]]


def test_training_and_evaluation_index_a_folder_of_classes_alike(tmp_path):
    write_classes(tmp_path)
    training = datasets.index_image_folder(tmp_path)
    evaluated, split = evaluate.labelled_images(tmp_path, None, None)
    expected = [(str(tmp_path / "cat" / n), "cat") for n in ("a.jpg", "b.png", "nested/c.png")] \
        + [(str(tmp_path / "dog" / "e.png"), "dog")]
    assert named(training, "all") == named(evaluated, "all") == expected and split is None


def test_training_and_evaluation_index_premade_splits_alike(tmp_path):
    for split in datasets.SPLITS:
        write_classes(tmp_path / split)
    training = datasets.index_image_folder(tmp_path)
    assert training.presplit and set(training.splits) == set(datasets.SPLITS)
    for split in datasets.SPLITS:
        evaluated, chosen = evaluate.labelled_images(tmp_path, None, split)
        assert chosen == split and named(evaluated, "all") == named(training, split)
    assert evaluate.labelled_images(tmp_path, None, None)[1] == "test"  # the held-out split by default


def test_a_lone_train_folder_is_one_pool_for_training_and_the_split_for_evaluation(tmp_path):
    write_classes(tmp_path / "train")
    training = datasets.index_image_folder(tmp_path)
    evaluated, split = evaluate.labelled_images(tmp_path, None, None)
    assert not training.presplit and split == "train"
    assert named(training, "all") == named(evaluated, "all")


def test_a_folder_with_only_test_is_evaluable(tmp_path):
    write_classes(tmp_path / "test")
    evaluated, split = evaluate.labelled_images(tmp_path, None, None)
    assert split == "test" and evaluated.where == str(tmp_path / "test")
    assert {label for _, label in named(evaluated, "all")} == {"cat", "dog"}
    with pytest.raises(UserError, match=r"no 'val' folder in '.*' \(found: test\)"):
        evaluate.labelled_images(tmp_path, None, "val")


def test_macro_f1_averages_the_classes_present_in_the_true_labels():
    truth, predicted = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2])  # "c" predicted once, never true
    per_class = metrics.per_class_metrics(metrics.confusion_matrix(truth, predicted, 3), ["a", "b", "c"])
    assert per_class["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert per_class["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics.macro_f1(per_class) == pytest.approx((2 / 3 + 0.5) / 2)  # "c" left out
    served = evaluate.metrics(truth, predicted, ["a", "b", "c"])
    assert served["macro_f1"] == metrics.macro_f1(per_class)
    assert served["per_class"] == {k: v for k, v in per_class.items() if k != "c"}  # the classes present

