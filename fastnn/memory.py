"""How much memory the machine can give a run, and a refusal before work when a run needs more."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, FastnnError

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


def gib(size: int) -> str:
    """``size`` bytes as the refusals say it: in GiB, or MiB below one GiB, KiB below one
    MiB."""
    if size >= GIB:
        return f"{size / GIB:.1f} GiB"
    return f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size / 1024:.0f} KiB"


def memory_advice(dtype: str) -> str:
    """What a refusal of memory suggests to a run in ``dtype`` ("float32" or "float64")."""
    if dtype == "float64":
        return "train in float32 (dtype), or on fewer rows, or free memory"
    return "train on fewer rows, or free memory"


def check_memory(needed: int, what: str, error: type[FastnnError] = ConfigError,
                 advice: str = "make it smaller") -> None:
    """An ``error`` when ``needed`` bytes are more than the machine can give (said in GiB,
    with what ``what`` needs them and ``advice``); nothing when that is unknown."""
    available = available_memory()
    if available is not None and needed > available:
        raise error(f"{what} needs about {gib(needed)}, more than the {gib(available)} this "
                    f"machine has free; {advice}")


@dataclass
class RunMemory:
    """What a run holds beside the caller's arrays and the network, part by part, in bytes."""

    parts: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """The parts worth naming (a tenth of the total or more, largest first), e.g.
        "inputs normalised to float64 8.1 GiB, evaluation 1.2 GiB"."""
        named = sorted(((size, name) for name, size in self.parts.items()
                        if size and size >= self.total / 10), reverse=True)
        return ", ".join(f"{name} {gib(size)}" for size, name in named) or "small parts"
