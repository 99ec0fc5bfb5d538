"""Decoded images, each file decoded once: kept on disk between runs, or in memory.

A run needs every image as uint8 pixels at one or two sizes (the evaluation size, and the
larger copy random crops are cut from). Decoding is the slow part, and keeping every copy in
memory makes memory grow with the dataset; so decoded images go to a cache on disk and are
read back a batch at a time.

Layout: ``<cache dir>/<size>-<interpolation>-pil<version>-v<FORMAT>/`` holds
- ``pixels.u8``: rows of 3 x H x W uint8, appended in decoding order (``np.memmap`` or
  ``np.fromfile`` read it as an N x 3 x H x W array);
- ``index.json``: ``{"format", "shape", "count", "rows": {file key: row}, "failed": {file key: reason}}``.
A file's key is its absolute path, size and modification time, so a changed file is decoded
again under its new key (its old row stays, unused: delete the folder to reclaim the space),
and a file that is not an image Pillow decodes is reported again without being opened again
(a file that could not be read, e.g. for its permissions, is tried again next run). One lock
for the whole cache: the processes of one machine (torchrun) take turns, so the first decodes
and the others find everything in place. An unreadable cache is rebuilt with a one-line notice.

The default folder: ``$RESNET_TRIO_CACHE``, else ``$XDG_CACHE_HOME/resnet-trio``, else
``~/.cache/resnet-trio``; ``--cache-dir`` chooses another, ``--no-cache`` keeps the pixels in
memory only (today's small-data behaviour, nothing written).
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import PIL
import torch
from filelock import FileLock
from tqdm import tqdm

import imaging
from common.errors import UserError
from common.files import write_json
from imaging.preprocessing import Preprocessing

FORMAT = 1  # bump when the layout or the decoding changes: old folders are then left unused
FIRST_INDEX_WRITE = 2000  # files decoded before the index is first written, then at 2x, 4x, ...:
# a killed first run keeps most of its work, and the index is not rewritten per file


def default_cache_dir() -> Path:
    if os.environ.get("RESNET_TRIO_CACHE"):
        return Path(os.environ["RESNET_TRIO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resnet-trio"


class ImageRows:
    """Some rows of an N x 3 x H x W uint8 array, in memory or in a cache file, read on demand.

    Indexing (an int, a slice, a list or tensor of positions) returns a uint8 tensor. A file is
    read with ``readinto`` rather than mapped: mapped pages would count as the process's own
    resident memory, which is what the cache is there to keep flat.
    """

    def __init__(self, source: np.ndarray | Path, shape: tuple[int, int, int], rows: np.ndarray):
        self.source, self.shape_of_one, self.rows = source, tuple(shape), np.asarray(rows, np.int64)
        self._file, self._pid = None, None

    @classmethod
    def of(cls, array: np.ndarray | torch.Tensor) -> "ImageRows":
        """Rows of an array in memory (N x 3 x H x W uint8)."""
        array = array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
        return cls(np.ascontiguousarray(array, np.uint8), array.shape[1:], np.arange(len(array)))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.shape_of_one)

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def take(self, positions) -> "ImageRows":
        """A subset (no pixels read)."""
        return ImageRows(self.source, self.shape_of_one, self.rows[_positions(positions)])

    def concat(self, other: "ImageRows") -> "ImageRows":
        same = other.source is self.source or (
            isinstance(self.source, Path) and isinstance(other.source, Path) and other.source == self.source)
        if not same:
            raise ValueError("only rows of the same decoded array can be joined")
        return ImageRows(self.source, self.shape_of_one, np.concatenate([self.rows, other.rows]))

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        rows = self.rows[_positions(index)]
        if isinstance(self.source, np.ndarray):
            return torch.from_numpy(self.source[rows])
        out = np.empty((len(rows), *self.shape_of_one), np.uint8)
        f, size = self._open(), out[0].nbytes if len(rows) else 0
        for i, row in enumerate(rows.tolist()):
            f.seek(row * size)
            if f.readinto(memoryview(out[i]).cast("B")) != size:
                raise OSError(f"decoded-image cache '{self.source}' is shorter than its index")
        return torch.from_numpy(out)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def _open(self):
        if self._pid != os.getpid():  # one file object per process (DataLoader workers fork)
            self._file, self._pid = open(self.source, "rb", buffering=0), os.getpid()
        return self._file

    def __getstate__(self):  # picklable for spawned workers: they reopen the file
        return {**self.__dict__, "_file": None, "_pid": None}


def _positions(index) -> np.ndarray | slice:
    if isinstance(index, slice):
        return index
    if isinstance(index, torch.Tensor):
        index = index.numpy()
    return np.asarray(index, np.int64).reshape(-1)


@dataclass(frozen=True)
class DecodeWork:
    """How many files were decoded now (in how many seconds) and how many the cache already held."""

    where: Path | None  # the cache folder; None: in memory
    decoded: int = 0
    reused: int = 0
    seconds: float = 0.0

    def __add__(self, other: "DecodeWork") -> "DecodeWork":
        return DecodeWork(self.where, self.decoded + other.decoded, self.reused + other.reused,
                          self.seconds + other.seconds)

    def __str__(self) -> str:
        """One line: "decoded 20,000 files into CACHE in 18 s" or "reused 20,000 decoded files from CACHE"."""
        seconds = f"{self.seconds:.0f}" if self.seconds >= 10 else f"{self.seconds:.1f}"
        if self.where is None:
            return f"decoded {self.decoded:,} files in memory in {seconds} s"
        reused = f"reused {self.reused:,} decoded files from {self.where}"
        if not self.decoded:
            return reused
        return f"decoded {self.decoded:,} files into {self.where} in {seconds} s" + (
            f"; {reused}" if self.reused else "")


@dataclass
class Decoded:
    """Every file decoded: per spec, the rows of the files that decoded (in input order)."""

    images: list[ImageRows]
    good: list[int]  # positions (in the input list) of the files that decoded
    bad: list[dict]  # {"path", "reason"} for the others
    work: DecodeWork


def decode_files(paths: list[str], specs: list[Preprocessing], cache_dir: Path | None,
                 processes: int = 1) -> Decoded:
    """Decode each file once into every spec's size: through the cache in ``cache_dir``, or
    all in memory when it is None."""
    if cache_dir is None:
        return _decode_in_memory(paths, specs, processes)
    cache_dir = Path(cache_dir)
    started = time.perf_counter()
    unreadable = {}  # position -> why, for failures worth trying again next run
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache_dir / ".lock")):
            shards = [_Shard(cache_dir, spec) for spec in specs]
            keys = [_file_key(p) for p in paths]
            missing = [i for i, key in enumerate(keys) if key and not all(s.knows(key) for s in shards)]
            results = _decode_stream([paths[i] for i in missing], specs, processes, cache_dir)
            next_save = FIRST_INDEX_WRITE
            for done, (i, result) in enumerate(zip(missing, results), start=1):
                if isinstance(result, _Unreadable):
                    unreadable[i] = result.reason
                    continue
                for n, shard in enumerate(shards):
                    if not shard.knows(keys[i]):
                        shard.add(keys[i], result if isinstance(result, str) else result[n])
                if done >= next_save:
                    next_save = 2 * done
                    for shard in shards:
                        shard.save()
            for shard in shards:
                shard.save()
    except PermissionError as exc:
        raise UserError(f"cannot write the decoded-image cache in '{cache_dir}' ({exc.strerror}); "
                        "choose another folder with --cache-dir, or --no-cache") from None
    good, bad = [], []
    for i, (path, key) in enumerate(zip(paths, keys)):
        reason = unreadable.get(i) or next((s.failed[key] for s in shards if key in s.failed), None) \
            if key else "cannot read file (it disappeared)"
        if reason:
            bad.append({"path": path, "reason": reason})
        else:
            good.append(i)
    images = [ImageRows(s.pixels, s.shape, np.array([s.rows[keys[i]] for i in good], np.int64))
              for s in shards]
    seconds = time.perf_counter() - started if missing else 0.0
    return Decoded(images, good, bad, DecodeWork(cache_dir, len(missing), len(paths) - len(missing), seconds))


def _decode_in_memory(paths, specs, processes) -> Decoded:
    started = time.perf_counter()
    arrays, good, bad = [[] for _ in specs], [], []
    for i, result in enumerate(_decode_stream(paths, specs, processes, None)):
        if isinstance(result, (str, _Unreadable)):
            bad.append({"path": paths[i], "reason": str(result)})
            continue
        good.append(i)
        for n, array in enumerate(result):
            arrays[n].append(array)
    images = [ImageRows.of(np.stack(a) if a else np.empty((0, 3, *s.input_size), np.uint8))
              for a, s in zip(arrays, specs)]
    return Decoded(images, good, bad, DecodeWork(None, len(paths), 0, time.perf_counter() - started))


class _Unreadable(str):
    """Why a file could not be read (not: is no image): not remembered, tried again next run."""

    @property
    def reason(self) -> str:
        return str(self)


def _decode_one(job: tuple[str, list[Preprocessing]]) -> list[np.ndarray] | str:
    """One file at every spec's size (3 x H x W uint8 each), or why it cannot be used."""
    path, specs = job
    try:  # numpy only: this runs in forked processes, where torch's thread pools are unsafe
        image = imaging.load_rgb(path)
        return [spec.pixels(image).transpose(2, 0, 1) for spec in specs]
    except imaging.ImageError as exc:
        return str(exc)
    except OSError as exc:  # e.g. permission denied
        return _Unreadable(f"cannot read file ({exc.strerror or exc})")


def _decode_stream(paths: list[str], specs: list[Preprocessing], processes: int,
                   cache_dir: Path | None) -> Iterable:
    """Each file's ``_decode_one`` result, in order, as the pool delivers them, with a progress
    bar (files per second) on a terminal."""
    jobs = [(p, specs) for p in paths]
    with contextlib.ExitStack() as stack:
        if processes > 1 and len(jobs) > 64:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = stack.enter_context(ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method)))
            results = pool.map(_decode_one, jobs, chunksize=16)
        else:
            results = map(_decode_one, jobs)
        yield from tqdm(results, total=len(jobs), desc=f"decoding into {cache_dir}" if cache_dir else "decoding",
                        unit="file", leave=False, disable=None if jobs else True)


def _file_key(path: str) -> str | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


class _Shard:
    """One size's folder of the cache: its pixel file and its index (see the module docstring)."""

    def __init__(self, cache_dir: Path, spec: Preprocessing):
        height, width = spec.input_size
        self.folder = cache_dir / f"{height}x{width}-{spec.interpolation}-pil{PIL.__version__}-v{FORMAT}"
        self.shape = (3, height, width)
        self.row_bytes = int(np.prod(self.shape))
        self.pixels, self.index = self.folder / "pixels.u8", self.folder / "index.json"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count, self.rows, self.failed = 0, {}, {}
        if self.index.exists():
            try:
                self._read()
            except (ValueError, KeyError, TypeError, OSError) as exc:
                print(f"decoded-image cache '{self.folder}' is unreadable ({exc}); rebuilding it",
                      flush=True)
                self.count, self.rows, self.failed = 0, {}, {}
                self.pixels.unlink(missing_ok=True)  # a run still reading the old file keeps it
        with open(self.pixels, "ab") as f:  # drop rows written after the last index (a killed run)
            f.truncate(self.count * self.row_bytes)
        self._out = None

    def _read(self) -> None:
        index = json.loads(self.index.read_text(encoding="utf-8"))
        if index.get("format") != FORMAT or tuple(index["shape"]) != self.shape:
            raise ValueError(f"format {index.get('format')}, shape {index.get('shape')}")
        count, rows = int(index["count"]), {str(k): int(v) for k, v in index["rows"].items()}
        size = self.pixels.stat().st_size if self.pixels.exists() else 0
        if size < count * self.row_bytes or any(not 0 <= r < count for r in rows.values()):
            raise ValueError(f"{size} bytes of pixels for {count} rows")
        self.count, self.rows = count, rows
        self.failed = {str(k): str(v) for k, v in index["failed"].items()}

    def knows(self, key: str) -> bool:
        return key in self.rows or key in self.failed

    def add(self, key: str, result: np.ndarray | str) -> None:
        if isinstance(result, str):
            self.failed[key] = result
            return
        if self._out is None:
            self._out = open(self.pixels, "ab")
        self._out.write(np.ascontiguousarray(result, np.uint8).tobytes())
        self.rows[key], self.count = self.count, self.count + 1

    def save(self) -> None:
        """Make the appended rows durable, then the index that names them."""
        if self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())
        write_json(self.index, {"format": FORMAT, "shape": list(self.shape), "count": self.count,
                                "rows": self.rows, "failed": self.failed})
        if self._out is not None:
            self._out.close()
            self._out = None
