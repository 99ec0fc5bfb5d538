"""What this CPU can do, torch-free: how many logical CPUs this process may use, and its
instruction-set flags (Linux; empty elsewhere)."""
from __future__ import annotations

import functools
import os
from pathlib import Path


def usable_logical_cpus() -> int:
    """Logical CPUs (hardware threads) this process may run on: its affinity mask where the OS
    has one (a container's or ``taskset``'s limit), else every CPU of the machine; at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


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
