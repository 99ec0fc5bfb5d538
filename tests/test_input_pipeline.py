"""The input pipeline: training crops cut from real pixels, and the decoded-image cache on
disk (reuse, invalidation, rebuilding, one writer for many processes)."""
import json
import multiprocessing
import random
import re
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from conftest import TINY_SIZE
from imaging.preprocessing import Preprocessing
from training import image_cache
from training.data import SplitImages, TrainingSamples
from training.image_cache import ImageRows, decode_files
from training.transforms import TrainAugment, pixel_tensor, stored_size

SIZE = (TINY_SIZE, TINY_SIZE)
SPEC = Preprocessing(input_size=SIZE)
BIG = Preprocessing(input_size=(45, 45))


# --- crops from real pixels ------------------------------------------------------------------

def test_training_copies_are_stored_large_enough_not_to_enlarge_a_crop():
    assert stored_size((48, 48), 0.7) == (67, 67)  # 48 / sqrt(0.7 * 3/4) = 66.2
    assert stored_size((48, 64), 1.0) == (56, 74)  # even a whole-area crop may be 3:4
    assert stored_size((48, 48), 0.08) == (96, 96)  # capped at twice the size
    for scale in (0.4, 0.7, 1.0):  # below the cap, a crop is never smaller than 48 px
        h, w = stored_size((48, 48), scale)
        rng = random.Random(0)
        for _ in range(300):
            top, left, ch, cw = TrainAugment(size=(48, 48), crop_scale=scale).draw(rng, (h, w))[:4].tolist()
            assert min(ch, cw) >= 48 - 1  # (-1: the box's sides are rounded)


def _photo(height=384, width=288):
    """Fine texture a 48 px copy cannot hold: thin diagonal stripes in colour, plus noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = (np.sin((xx + 0.7 * yy) / 2.2) > 0).astype(np.float32)
    rng = np.random.default_rng(0)
    rgb = np.stack([stripes * 200 + 30, (1 - stripes) * 180 + 40, np.full_like(stripes, 90)], -1)
    return Image.fromarray(np.clip(rgb + rng.normal(0, 10, rgb.shape), 0, 255).astype(np.uint8))


def test_a_margin_crop_matches_random_resized_crop_of_the_photo():
    """The crop of the stored copy is the crop torchvision's RandomResizedCrop cuts from the
    photo itself (same box, scaled), and far closer to it than a crop of the H x W copy,
    enlarged (the old way)."""
    photo = _photo()
    size, scale = (48, 48), 0.7
    spec = Preprocessing(input_size=size)
    stored_spec = Preprocessing(input_size=stored_size(size, scale))
    stored = pixel_tensor(photo, stored_spec)
    small = pixel_tensor(photo, spec)
    full = torch.from_numpy(np.asarray(photo).transpose(2, 0, 1).copy())
    augment = TrainAugment(size=size, crop_scale=scale)
    rng = random.Random(3)
    margin_errors, old_errors = [], []
    for _ in range(12):
        parameters = augment.draw(rng, stored.shape[-2:])
        top, left, h, w = parameters[:4].tolist()
        sy, sx = full.shape[1] / stored.shape[1], full.shape[2] / stored.shape[2]
        reference = v2.RandomResizedCrop(size, antialias=True)
        with mock.patch.object(v2.RandomResizedCrop, "make_params",
                               return_value=dict(top=round(top * sy), left=round(left * sx),
                                                 height=round(h * sy), width=round(w * sx))):
            expected = reference(full).float()
        ours = augment.crop(stored, parameters).float()
        ky, kx = small.shape[1] / stored.shape[1], small.shape[2] / stored.shape[2]
        old = TF.resized_crop(small, round(top * ky), round(left * kx), max(1, round(h * ky)),
                              max(1, round(w * kx)), list(size), antialias=True).float()
        margin_errors.append((ours - expected).abs().mean().item())
        old_errors.append((old - expected).abs().mean().item())
    assert max(margin_errors) < 12  # of 255: resampling twice, not the same pixels to the last bit
    assert np.mean(margin_errors) < 0.6 * np.mean(old_errors)


def test_training_crops_come_from_the_stored_copy():
    augment = TrainAugment(size=SIZE)
    small = torch.randint(0, 256, (6, 3, *SIZE), dtype=torch.uint8)
    big = torch.randint(0, 256, (6, 3, 2 * SIZE[0], 2 * SIZE[1]), dtype=torch.uint8)
    stored = SplitImages(small, torch.arange(6) % 2, [f"{i}.png" for i in range(6)],
                         train_images=ImageRows.of(big))
    image, parameters, _ = TrainingSamples(stored, augment, seed=1)[0]
    assert image.shape == (3, *SIZE) and image.dtype == torch.uint8
    top, left, h, w = (int(v) for v in parameters[:4].tolist())
    assert h > SIZE[0] or w > SIZE[1]  # a box in the larger copy's pixels
    assert torch.equal(image, TF.resized_crop(big[0], top, left, h, w, list(SIZE), antialias=True))


# --- the decoded-image cache -----------------------------------------------------------------

def _write(folder: Path, count: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def counted(monkeypatch):
    """Counts the files actually decoded (in this process: the cache tests use processes=1)."""
    calls = []
    real = image_cache._decode_one
    monkeypatch.setattr(image_cache, "_decode_one", lambda job: calls.append(job[0]) or real(job))
    return calls


def _pixels(decoded):
    return [rows[:] for rows in decoded.images]


def test_a_second_run_reads_the_cache_instead_of_decoding(tmp_path, counted):
    paths = _write(tmp_path / "images", 5)
    first = decode_files(paths, [SPEC, BIG], tmp_path / "cache")
    assert len(counted) == 5 and first.good == list(range(5))
    second = decode_files(paths, [SPEC, BIG], tmp_path / "cache")
    assert len(counted) == 5  # nothing decoded again
    memory = decode_files(paths, [SPEC, BIG], None)
    for a, b, c in zip(_pixels(first), _pixels(second), _pixels(memory)):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert first.images[0].shape == (5, 3, *SIZE) and first.images[1].shape == (5, 3, 45, 45)
    assert torch.equal(first.images[0][2], torch.from_numpy(SPEC.pixels(Image.open(paths[2])).transpose(2, 0, 1)))


def test_decoding_says_what_it_did_and_shows_its_progress(tmp_path, monkeypatch):
    bars = []
    real_tqdm = image_cache.tqdm
    monkeypatch.setattr(image_cache, "tqdm", lambda it, **kw: bars.append(kw) or real_tqdm(it, **kw))
    paths = _write(tmp_path / "images", 5)
    cache = tmp_path / "cache"
    first = decode_files(paths, [SPEC, BIG], cache)
    assert (bars[-1]["total"], bars[-1]["unit"]) == (5, "file")  # tqdm shows files/s
    assert (first.work.decoded, first.work.reused) == (5, 0)
    assert re.fullmatch(rf"decoded 5 files into {re.escape(str(cache))} in \d+\.\d s", str(first.work))
    again = decode_files(paths, [SPEC, BIG], cache)
    assert str(again.work) == f"reused 5 decoded files from {cache}"
    assert len(bars) == 1  # no bar when nothing is decoded
    more = decode_files(paths + _write(tmp_path / "more", 2), [SPEC], cache)
    assert str(more.work).endswith(f"; reused 5 decoded files from {cache}")
    assert str(more.work).startswith(f"decoded 2 files into {cache}")
    assert str(image_cache.DecodeWork(cache, 20000, 0, 18.2)) == f"decoded 20,000 files into {cache} in 18 s"
    assert str(decode_files(paths, [SPEC], None).work).startswith("decoded 5 files in memory in ")


def test_changed_added_and_removed_files_are_noticed(tmp_path, counted):
    paths = _write(tmp_path / "images", 4)
    decode_files(paths, [SPEC], tmp_path / "cache")
    Image.new("RGB", (40, 50), (255, 0, 0)).save(paths[1])  # changed: size and time differ
    added = _write(tmp_path / "more", 1, seed=9)
    counted.clear()
    decoded = decode_files(paths[:3] + added, [SPEC], tmp_path / "cache")  # paths[3] removed
    assert sorted(counted) == sorted([paths[1], added[0]])
    assert decoded.images[0][1].float().mean(dim=(1, 2)).tolist() == [255.0, 0.0, 0.0]
    assert len(decoded.images[0]) == 4


def test_bad_files_are_remembered_and_reported_again(tmp_path, counted):
    paths = _write(tmp_path / "images", 2)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"not an image")
    for _ in range(2):
        decoded = decode_files(paths + [str(broken)], [SPEC], tmp_path / "cache")
        assert decoded.good == [0, 1] and decoded.bad[0]["path"] == str(broken)
    assert counted.count(str(broken)) == 1


def test_a_file_that_could_not_be_read_is_tried_again_next_run(tmp_path, monkeypatch):
    paths = _write(tmp_path / "images", 2)
    real = image_cache.imaging.load_rgb

    def locked(path, *args):
        if path == paths[1]:
            raise PermissionError(13, "Permission denied")
        return real(path, *args)
    monkeypatch.setattr(image_cache.imaging, "load_rgb", locked)
    first = decode_files(paths, [SPEC], tmp_path / "cache")
    assert first.good == [0] and "Permission denied" in first.bad[0]["reason"]
    monkeypatch.setattr(image_cache.imaging, "load_rgb", real)  # e.g. after chmod, same size and time
    assert decode_files(paths, [SPEC], tmp_path / "cache").good == [0, 1]


@pytest.mark.parametrize("damage", ["index", "pixels", "format"])
def test_a_damaged_cache_is_rebuilt_with_a_notice(tmp_path, counted, capsys, damage):
    paths = _write(tmp_path / "images", 3)
    expected = _pixels(decode_files(paths, [SPEC], tmp_path / "cache"))
    shard = next((tmp_path / "cache").glob("32x32-*"))
    if damage == "index":
        (shard / "index.json").write_text("{ not json")
    elif damage == "pixels":
        with open(shard / "pixels.u8", "r+b") as f:
            f.truncate(100)
    else:
        index = json.loads((shard / "index.json").read_text())
        (shard / "index.json").write_text(json.dumps({**index, "shape": [3, 8, 8]}))
    counted.clear()
    again = decode_files(paths, [SPEC], tmp_path / "cache")
    notice = capsys.readouterr().out
    assert "unreadable" in notice and "rebuilding" in notice and len(notice.splitlines()) == 1
    assert len(counted) == 3 and torch.equal(_pixels(again)[0], expected[0])


def test_rows_written_after_the_last_index_are_dropped(tmp_path):
    """A run killed while appending leaves pixels the index does not name: they are cut off,
    so the next rows land where the index says."""
    paths = _write(tmp_path / "images", 3)
    decode_files(paths[:2], [SPEC], tmp_path / "cache")
    shard = next((tmp_path / "cache").glob("32x32-*"))
    with open(shard / "pixels.u8", "ab") as f:
        f.write(b"\x07" * 1000)
    decoded = decode_files(paths, [SPEC], tmp_path / "cache")
    assert torch.equal(_pixels(decoded)[0], _pixels(decode_files(paths, [SPEC], None))[0])
    assert (shard / "pixels.u8").stat().st_size == 3 * 3 * SIZE[0] * SIZE[1]


def _decode_in_child(paths, cache, out):
    calls = []
    real = image_cache._decode_one
    slow = lambda job: calls.append(time.sleep(0.02)) or real(job)  # noqa: E731 (so they overlap)
    with mock.patch.object(image_cache, "_decode_one", slow):
        decoded = decode_files(paths, [SPEC], Path(cache))
    np.save(out, decoded.images[0][:].numpy())
    Path(out).with_suffix(".calls").write_text(str(len(calls)))


def test_processes_sharing_a_cache_decode_each_file_once(tmp_path):
    paths = _write(tmp_path / "images", 40)
    context = multiprocessing.get_context("fork")  # all three start at once
    children = [context.Process(target=_decode_in_child, args=(paths, str(tmp_path / "cache"),
                                                                str(tmp_path / f"{i}.npy")))
                for i in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    decoded = [int((tmp_path / f"{i}.calls").read_text()) for i in range(3)]
    assert sorted(decoded) == [0, 0, 40]  # one writer; the others waited and read its work
    index = json.loads(next((tmp_path / "cache").glob("32x32-*/index.json")).read_text())
    assert index["count"] == 40
    results = [np.load(tmp_path / f"{i}.npy") for i in range(3)]
    assert all(np.array_equal(results[0], r) for r in results[1:])


def test_cached_rows_read_the_same_in_loader_workers(tmp_path):
    paths = _write(tmp_path / "images", 8)
    rows = decode_files(paths, [SPEC], tmp_path / "cache").images[0].take([5, 1, 6])
    loader = torch.utils.data.DataLoader(rows, batch_size=2, num_workers=2)
    assert torch.equal(torch.cat(list(loader)), rows[:])
    assert torch.equal(rows[[2, 0]], torch.stack([rows[2], rows[0]]))


@pytest.mark.slow  # trains a model
def test_training_reads_the_same_pixels_from_the_cache_as_from_memory(tiny_dataset, tmp_path):
    from training.run import main

    histories = {}
    for name, flags in {"disk": ["--cache-dir", str(tmp_path / "cache")], "memory": ["--no-cache"]}.items():
        out = tmp_path / name
        assert main(["--data", str(tiny_dataset), "--models", "resnet34", "--epochs", "1",
                     "--image-size", str(TINY_SIZE), "--batch-size", "8", "--workers", "0",
                     "--out", str(out), *flags]) == 0
        histories[name] = (out / "resnet34" / "history.csv").read_text().splitlines()
        config = json.loads((out / "config.json").read_text())
        assert config["no_cache"] == (name == "memory")
    strip = lambda rows: [",".join(r.split(",")[:-1]) for r in rows]  # noqa: E731 (minus seconds)
    assert strip(histories["disk"]) == strip(histories["memory"])
    shards = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert shards == ["32x32", "45x45"]  # evaluation pixels, and the larger training copies
