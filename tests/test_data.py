"""Dataset layouts, bad-file handling, one-line data errors and the stratified split."""
import io
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.datasets import DataError, Sample, index_csv, index_image_folder
from conftest import TINY_SIZE, run_python
from training.data import prepare_data, stratified_split
from imaging.preprocessing import Preprocessing
from training.synthetic import BROKEN_FILES, CLASSES

SIZE = (TINY_SIZE, TINY_SIZE)
SPEC = Preprocessing(input_size=SIZE)


def write_images(folder: Path, count: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    """``count`` small noise PNGs of varied sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(8, 20, 2))
        path = folder / f"{prefix}{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_bad_files(folder: Path) -> dict[str, Path]:
    """One file of every kind the loader must skip."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "whole.jpg"
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    good.unlink()
    bad = {
        "truncated": folder / "truncated.jpg",
        "zero-byte": folder / "zero.png",
        "non-image": folder / "notes.jpg",
        "unreadable": folder / "gone.png",  # a dangling link: listed, but cannot be opened
    }
    bad["truncated"].write_bytes(data[: len(data) // 3])
    bad["zero-byte"].write_bytes(b"")
    bad["non-image"].write_text("a text file with an image name\n")
    os.symlink(folder / "does-not-exist.png", bad["unreadable"])
    if os.geteuid() != 0:  # root reads anything, so a permission test only means something without it
        bad["no-permission"] = folder / "locked.png"
        write_images(folder, 1, prefix="locked-src")[0].rename(bad["no-permission"])
        bad["no-permission"].chmod(0)
    return bad


# --- ImageFolder layout ----------------------------------------------------------------------

def test_image_folder_without_splits(tiny_dataset):
    index = index_image_folder(tiny_dataset)
    assert index.class_names == list(CLASSES)
    assert not index.presplit
    assert len(index.splits["all"]) == 12 * len(CLASSES) + len(BROKEN_FILES)
    data = prepare_data(index, SPEC, val_fraction=0.2, test_fraction=0.0, seed=67, processes=1)
    assert sorted(Path(b["path"]).relative_to(tiny_dataset).as_posix() for b in data.bad_files) \
        == sorted(BROKEN_FILES)
    assert set(data.splits) == {"train", "val"}
    for split in data.splits.values():
        assert split.images.shape == (len(split), 3, *SIZE) and split.images.dtype == torch.uint8
        # Every label is the image's class folder.
        assert [CLASSES[label] for label in split.labels.tolist()] == [Path(p).parent.name for p in split.paths]
    # 20% of each class's 12 valid images, stratified.
    assert Counter(data.splits["val"].labels.tolist()) == {c: 2 for c in range(len(CLASSES))}
    assert len(data.splits["train"]) == 50
    assert not set(data.splits["train"].paths) & set(data.splits["val"].paths)


def test_image_folder_with_premade_splits(tmp_path):
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for label, name in enumerate(("cat", "dog")):
            write_images(tmp_path / split / name, count, seed=label, prefix=f"{split}-")
    index = index_image_folder(tmp_path)
    assert index.presplit and index.class_names == ["cat", "dog"]
    data = prepare_data(index, SPEC, val_fraction=0.2, test_fraction=0.0, seed=0, processes=1)
    assert set(data.splits) == {"train", "val", "test"}
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        paths = data.splits[split].paths
        assert len(paths) == 2 * count  # used as given, not re-split
        assert all(Path(p).parent.parent.name == split for p in paths)
        assert [("cat", "dog")[y] for y in data.splits[split].labels.tolist()] == [Path(p).parent.name for p in paths]


def test_premade_val_may_lack_a_class(tmp_path):
    write_images(tmp_path / "train" / "a", 3)
    write_images(tmp_path / "train" / "b", 3)
    write_images(tmp_path / "val" / "a", 2)
    data = prepare_data(index_image_folder(tmp_path), SPEC, 0.2, 0.0, 0, processes=1)
    assert data.splits["val"].labels.tolist() == [0, 0]


def test_train_folder_alone_is_split_like_a_plain_layout(tmp_path):
    for label, name in enumerate(("cat", "dog")):
        write_images(tmp_path / "train" / name, 5, seed=label)
    index = index_image_folder(tmp_path)
    assert not index.presplit and index.class_names == ["cat", "dog"]
    data = prepare_data(index, SPEC, 0.2, 0.0, 0, processes=1)
    assert Counter(data.splits["val"].labels.tolist()) == {0: 1, 1: 1}
    assert len(data.splits["train"]) == 8


def test_premade_train_class_without_valid_images_is_an_error(tmp_path):
    write_images(tmp_path / "train" / "a", 3)
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "empty.png").write_bytes(b"")
    write_images(tmp_path / "val" / "a", 1)
    write_images(tmp_path / "val" / "b", 1)  # images to validate on, none to learn from
    with pytest.raises(DataError, match="class\\(es\\) b have no valid training images"):
        prepare_data(index_image_folder(tmp_path), SPEC, 0.2, 0.0, 0, processes=1)


def test_decoded_pixels_match_the_file(tmp_path):
    from training.transforms import pixel_tensor

    paths = write_images(tmp_path / "a", 2) + write_images(tmp_path / "b", 2, seed=1)
    data = prepare_data(index_image_folder(tmp_path), SPEC, 0.5, 0.0, 0, processes=1)
    for split in data.splits.values():
        for image, path in zip(split.images, split.paths):
            assert torch.equal(image, pixel_tensor(path, SPEC))
    assert sorted(p for s in data.splits.values() for p in s.paths) == sorted(map(str, paths))


def test_parallel_decoding_gives_the_same_result(tmp_path):
    for name in ("a", "b"):
        write_images(tmp_path / name, 40, seed=len(name))
    write_bad_files(tmp_path / "a")
    index = index_image_folder(tmp_path)
    one = prepare_data(index, SPEC, 0.2, 0.0, 5, processes=1)
    two = prepare_data(index, SPEC, 0.2, 0.0, 5, processes=2)
    assert one.bad_files == two.bad_files
    for name in one.splits:
        assert one.splits[name].paths == two.splits[name].paths
        assert torch.equal(one.splits[name].images[:], two.splits[name].images[:])


# --- CSV layout ------------------------------------------------------------------------------

def _csv_layout(tmp_path: Path, rows: list[tuple[str, str]], header="filename,label") -> tuple[Path, Path]:
    images = tmp_path / "images"
    write_images(images, 8)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(header + "\n" + "".join(f"{f},{label}\n" for f, label in rows))
    return csv_path, images


def test_csv_layout(tmp_path):
    rows = [(f"img{i:02d}.png", "rendang" if i % 2 else "bakso") for i in range(8)]
    csv_path, images = _csv_layout(tmp_path, rows + [("missing.png", "bakso")])
    index = index_csv(csv_path, images)
    assert index.class_names == ["bakso", "rendang"]
    assert len(index.splits["all"]) == 8
    # A row naming a missing file is reported, not fatal.
    assert len(index.bad_files) == 1
    assert index.bad_files[0]["path"] == str(images / "missing.png")
    assert "line 10" in index.bad_files[0]["reason"] and "missing" in index.bad_files[0]["reason"]
    data = prepare_data(index, SPEC, 0.25, 0.0, 0, processes=1)
    assert data.bad_files == index.bad_files
    assert data.total_files == 9
    labels = dict(rows)
    for split in data.splits.values():
        assert [index.class_names[y] for y in split.labels.tolist()] == [labels[Path(p).name] for p in split.paths]
    assert Counter(data.splits["val"].labels.tolist()) == {0: 1, 1: 1}


def test_csv_with_only_missing_files_is_an_error(tmp_path):
    csv_path, images = _csv_layout(tmp_path, [("nope1.png", "a"), ("nope2.png", "b")])
    with pytest.raises(DataError, match=r"no images found .*2 listed files are missing"):
        index_csv(csv_path, images)


def test_csv_bad_image_in_a_listed_file_is_skipped(tmp_path):
    csv_path, images = _csv_layout(tmp_path, [(f"img{i:02d}.png", "ab"[i % 2]) for i in range(8)]
                                   + [("zero.png", "a")])
    (images / "zero.png").write_bytes(b"")
    data = prepare_data(index_csv(csv_path, images), SPEC, 0.25, 0.0, 0, processes=1)
    assert [b["path"] for b in data.bad_files] == [str(images / "zero.png")]
    assert sum(len(s) for s in data.splits.values()) == 8


# --- bad files in a real run -----------------------------------------------------------------

def test_a_jpeg_cut_inside_its_scan_data_is_skipped_and_reported(tmp_path):
    # Cut after the header: Pillow opens it and reads its size; only decoding the pixels fails.
    # (Cuts inside the header are covered above; a loader that let Pillow fill in missing
    # data, ImageFile.LOAD_TRUNCATED_IMAGES, would train on grey blocks.)
    root = tmp_path / "data"
    write_images(root / "apples", 4)
    write_images(root / "pears", 4, seed=1)
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    data = jpeg.getvalue()
    start_of_scan = data.index(b"\xff\xda")
    cut = data[: start_of_scan + (len(data) - start_of_scan) // 2]
    (root / "pears" / "cut.jpg").write_bytes(cut)
    with Image.open(io.BytesIO(cut)) as img:
        assert img.size == (64, 64)  # the header is whole
    data = prepare_data(index_image_folder(root), SPEC, 0.25, 0.0, 0, processes=1)
    assert [Path(b["path"]).name for b in data.bad_files] == ["cut.jpg"]
    assert "truncated" in data.bad_files[0]["reason"]
    assert all("cut.jpg" not in p for split in data.splits.values() for p in split.paths)


@pytest.mark.slow  # trains a model
def test_bad_files_are_skipped_and_reported(tmp_path, capsys):
    from training.run import main

    root = tmp_path / "data"
    write_images(root / "apples", 6)
    write_images(root / "pears", 6, seed=1)
    bad = write_bad_files(root / "pears")
    run_dir = tmp_path / "run"
    code = main(["--data", str(root), "--models", "resnet34", "--epochs", "1", "--image-size",
                 str(TINY_SIZE), "--batch-size", "4", "--workers", "0", "--out", str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0
    listed = json.loads((run_dir / "bad_files.json").read_text())
    assert sorted(entry["path"] for entry in listed) == sorted(str(p) for p in bad.values())
    reasons = {Path(entry["path"]).name: entry["reason"] for entry in listed}
    assert "empty" in reasons["zero.png"]
    assert "not an image" in reasons["notes.jpg"]
    assert "unreadable" in reasons["truncated.jpg"] or "truncated" in reasons["truncated.jpg"]
    assert "cannot read" in reasons["gone.png"]
    assert all(reason and "\n" not in reason for reason in reasons.values())
    # One line on the console says how many were skipped and where they are listed.
    summary = [line for line in out.splitlines() if "bad file" in line]
    assert len(summary) == 1
    assert f"skipped {len(bad)} bad file(s)" in summary[0] and str(run_dir / "bad_files.json") in summary[0]
    # Bad files are in no split; every good file is in one.
    splits = json.loads((run_dir / "splits.json").read_text())
    used = [p for name in ("train", "val") for p, _ in splits[name]]
    assert len(used) == 12 and not set(used) & {str(p) for p in bad.values()}
    assert (run_dir / "resnet34" / "best.pt").is_file()


# --- one-line errors from the command line -----------------------------------------------------

def _case_missing_folder(tmp: Path) -> list[str]:
    return ["--data", str(tmp / "nowhere")]


def _case_no_images(tmp: Path) -> list[str]:
    (tmp / "data" / "a").mkdir(parents=True)
    (tmp / "data" / "b").mkdir()
    return ["--data", str(tmp / "data")]


def _case_one_class(tmp: Path) -> list[str]:
    write_images(tmp / "data" / "only", 3)
    return ["--data", str(tmp / "data")]


def _case_class_without_valid_images(tmp: Path) -> list[str]:
    write_images(tmp / "data" / "good", 3)
    (tmp / "data" / "broken").mkdir()
    (tmp / "data" / "broken" / "empty.jpg").write_bytes(b"")
    (tmp / "data" / "broken" / "text.png").write_text("hello")
    return ["--data", str(tmp / "data")]


def _case_unknown_val_class(tmp: Path) -> list[str]:
    for split, names in (("train", ("a", "b")), ("val", ("a", "c"))):
        for name in names:
            write_images(tmp / "data" / split / name, 2)
    return ["--data", str(tmp / "data")]


def _case_csv_empty_label(tmp: Path) -> list[str]:
    csv_path, images = _csv_layout(tmp, [("img00.png", "a"), ("img01.png", ""), ("img02.png", "b")])
    return ["--data", str(images), "--labels-csv", str(csv_path)]


def _case_csv_wrong_columns(tmp: Path) -> list[str]:
    csv_path, images = _csv_layout(tmp, [("img00.png", "a"), ("img01.png", "b")], header="file,class")
    return ["--data", str(images), "--labels-csv", str(csv_path)]


ERROR_CASES = {
    "missing folder": (_case_missing_folder, r"data folder '.*nowhere' does not exist"),
    "no images": (_case_no_images, r"no images found"),
    "one class": (_case_one_class, r"only one class \(only\)"),
    "class without valid images": (_case_class_without_valid_images,
                                   r"class\(es\) broken have no valid images left after skipping 2 bad file"),
    "unknown val class": (_case_unknown_val_class, r"unknown label\(s\) c in '.*val'"),
    "csv empty label": (_case_csv_empty_label, r"line 3: unknown label \(empty\) for 'img01.png'"),
    "csv wrong columns": (_case_csv_wrong_columns, r"needs a header with columns filename,label \(found: file,class\)"),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    """Every error case run as ``python -m training.run``, a few at a time (each imports torch)."""
    def run(name):
        tmp = tmp_path_factory.mktemp("error-case")
        args = ERROR_CASES[name][0](tmp)
        out = tmp / "run"
        result = run_python(["-m", "training.run", *args, "--out", str(out), "--workers", "0"],
                            timeout=300)
        return result, out

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(ERROR_CASES, pool.map(run, ERROR_CASES)))


@pytest.mark.parametrize("case", ERROR_CASES)
def test_data_errors_are_one_line_with_exit_code_2(error_runs, case):
    result, run_dir = error_runs[case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert re.search(ERROR_CASES[case][1], lines[0]), lines[0]
    assert not (run_dir / "config.json").exists()  # nothing is written for a run that never started


# --- splitting ---------------------------------------------------------------------------------

def _samples(sizes: dict[int, int]) -> list[Sample]:
    return [Sample(f"{label}/{i}", label) for label, n in sizes.items() for i in range(n)]


def test_stratified_split_proportions():
    samples = _samples({0: 50, 1: 20, 2: 7, 3: 2})
    splits = stratified_split(samples, {"val": 0.2, "test": 0.1}, seed=67)
    counts = {name: Counter(s.label for s in members) for name, members in splits.items()}
    assert counts["val"] == {0: 10, 1: 4, 2: 1, 3: 1}
    assert counts["test"] == {0: 5, 1: 2, 2: 1}  # the 2-image class keeps one for training
    assert counts["train"] == {0: 35, 1: 14, 2: 5, 3: 1}
    every = [s.path for members in splits.values() for s in members]
    assert sorted(every) == sorted(s.path for s in samples)  # a partition: nothing lost or doubled


def test_split_is_driven_by_the_seed():
    samples = _samples({0: 30, 1: 30})
    def paths(seed):
        return {k: [s.path for s in v] for k, v in stratified_split(samples, {"val": 0.2}, seed).items()}

    assert paths(1) == paths(1)
    assert paths(1)["val"] != paths(2)["val"]


def test_prepare_data_split_is_driven_by_the_seed(tiny_dataset):
    index = index_image_folder(tiny_dataset)
    def val_paths(seed):
        return prepare_data(index, SPEC, 0.2, 0.1, seed, processes=1).splits["val"].paths

    assert val_paths(3) == val_paths(3)
    assert val_paths(3) != val_paths(4)
