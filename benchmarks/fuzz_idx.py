"""Bulk fuzzing of the IDX reader beyond the suite's hypothesis tests.

``python benchmarks/fuzz_idx.py --inputs 20000`` feeds random bytes and mutated/truncated valid
headers (raw and gzip, some gzip streams cut short) to `read_idx` and counts the outcomes:
every input must give an array or a `DataError`; anything else is a crash.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import random
import struct
import sys
import tempfile
from pathlib import Path

from fastnn.datasets import read_idx
from fastnn.errors import DataError

VALID_IMAGES = struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 5, 4, 4) + bytes(80)
VALID_LABELS = struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 5) + bytes(range(5))


def hostile_bytes(pick: random.Random) -> bytes:
    """Random bytes, or a valid file with bytes changed, cut off or appended."""
    kind = pick.randrange(3)
    if kind == 0:
        return bytes(pick.randrange(256) for _ in range(pick.randrange(120)))
    data = bytearray(VALID_IMAGES if kind == 1 else VALID_LABELS)
    for _ in range(pick.randrange(1, 6)):
        operation = pick.randrange(3)
        if operation == 0 and data:
            data[pick.randrange(len(data))] = pick.randrange(256)
        elif operation == 1:
            data = data[: pick.randrange(len(data) + 1)]
        else:
            data += bytes(pick.randrange(256) for _ in range(pick.randrange(1, 20)))
    return bytes(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pick = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="fastnn-fuzz-"))
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(args.inputs):
        data, compressed = hostile_bytes(pick), pick.random() < 0.5
        if compressed:
            data = gzip.compress(data)
            if pick.random() < 0.3:
                data = data[: pick.randrange(len(data) + 1)]
        path = folder / ("input.gz" if compressed else "input")
        path.write_bytes(data)
        try:
            read_idx(path)
            outcomes["array"] += 1
        except DataError:
            outcomes["DataError"] += 1
        except Exception as exc:  # noqa: BLE001 - a crash is what we count
            outcomes[f"crash {type(exc).__name__}"] += 1
    crashes = sum(n for name, n in outcomes.items() if name.startswith("crash"))
    print(f"{args.inputs} inputs: {dict(outcomes)}; {crashes} crashed")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
