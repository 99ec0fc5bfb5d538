"""The torch-free helpers every part shares: CPU counting and atomic writes."""
import os
import re
from pathlib import Path

import pytest

from common import cpu, files

ROOT = Path(__file__).resolve().parents[1]


def test_usable_logical_cpus_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cpu.usable_logical_cpus() == 3  # a container's or taskset's limit, not the machine's
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert cpu.usable_logical_cpus() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cpu.usable_logical_cpus() == 1


def test_atomic_write_renames_into_place_or_leaves_nothing(tmp_path):
    target = tmp_path / "report.json"
    assert files.temporary_path(target) == tmp_path / f".report.json.tmp{os.getpid()}"
    with pytest.raises(RuntimeError):
        with files.atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    files.write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n' and list(tmp_path.iterdir()) == [target]


def test_atomic_folder_replaces_the_old_one_whole_or_keeps_it(tmp_path):
    target = tmp_path / "data"
    (target / "old").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with files.atomic_folder(target) as tmp:
            (tmp / "new").mkdir()
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and [p.name for p in target.iterdir()] == ["old"]
    with files.atomic_folder(target) as tmp:
        assert not (tmp / "old").exists()  # starts empty, whatever an earlier try left
        (tmp / "new").mkdir()
    assert [p.name for p in target.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["data"]


def test_the_temporary_name_rule_and_the_cpu_count_are_written_once():
    sources = [p for folder in ("common", "imaging", "training", "export", "serve", "benchmarks")
               for p in (ROOT / folder).rglob("*.py")]
    rules = {p.relative_to(ROOT).as_posix() for p in sources if re.search(r"\.tmp\{", p.read_text())}
    counts = {p.relative_to(ROOT).as_posix() for p in sources
              if re.search(r"sched_getaffinity|os\.cpu_count", p.read_text())}
    assert rules == {"common/files.py"} and counts == {"common/cpu.py"}
