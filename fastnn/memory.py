"""How much memory the machine can give a run, and a refusal before work when a run needs more."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

GIB = 1024**3


def available_memory() -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable, capped by a cgroup
    memory limit (v2 ``memory.max`` less ``memory.current``, or v1); None when unknown."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text())
            if limit != "max" and int(limit) < 2**60:
                found.append(max(0, int(limit) - usage))
        except (OSError, ValueError):
            continue
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return min(found) if found else None


def check_memory(needed: int, what: str) -> None:
    """A `ConfigError` when ``needed`` bytes are more than the machine can give (said in GiB,
    with ``what`` needs them); nothing when that is unknown."""
    available = available_memory()
    if available is not None and needed > available:
        raise ConfigError(f"{what} needs about {needed / GIB:.1f} GiB, more than the "
                          f"{available / GIB:.1f} GiB this machine has free; make it smaller")
