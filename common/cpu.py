"""What this CPU can do, torch-free: its instruction-set flags (Linux; empty elsewhere)."""
from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of /proc/cpuinfo (avx2, avx512_bf16, amx_bf16, ...); empty where it is absent."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
