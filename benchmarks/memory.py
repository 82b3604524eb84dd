"""Memory and time around one epoch: peak RSS, RSS after ``fit``, fit time and the epoch.

Each case runs in its own process: synthetic uint8 inputs of 784 columns, 80 % zeros (like
MNIST), 10 classes, ``Trainer(Config(epochs=1, backend=..., dtype=...)).fit`` on them.

    python benchmarks/memory.py [--rows 60000,240000,600000] [--dtypes float32,float64]
        [--backends numba,numpy] [--memmap ROWS] [--memmap-dir DIR] [--markdown]

Peak RSS is the process's high-water mark (``ru_maxrss``) minus nothing: it includes the
interpreter, NumPy, numba and the raw inputs. "raw" is the uint8 inputs' own size;
"estimate" is what `fit` counted before it started (`Trainer.run_memory`: the run's own
arrays as far as they are known before it looks at the data; numba's inputs are checked when
their form is known). "sparse form" is what numba holds of the inputs (`CsrRows.nbytes`).

``--memmap ROWS`` adds a run on a uint8 `numpy.memmap` of ROWS rows written to a file in
``--memmap-dir`` (default: the system's temporary folder; removed afterwards), numba,
float32: its pages are the file's, so its peak is given as anonymous memory (``RssAnon``,
sampled every 20 ms) beside the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = 784
BLOCK = 8192


def _status_mib(field: str) -> float:
    """A field of this process's /proc/self/status (Linux) in MiB, e.g. VmRSS or RssAnon."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class AnonymousPeak:
    """The highest RssAnon seen while it runs (sampled by a thread every 20 ms)."""

    def __init__(self) -> None:
        self.peak = _status_mib("RssAnon")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, _status_mib("RssAnon"))

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _status_mib("RssAnon"))


def fill(x: Any, generator: Any) -> None:
    """Synthetic MNIST-like bytes into x a block at a time (no float copy here)."""
    for start in range(0, len(x), BLOCK):
        block = x[start:start + BLOCK]
        keep = generator.random(block.shape) < 0.2
        block[keep] = generator.integers(1, 256, int(keep.sum()), dtype="uint8")


def worker(rows: int, dtype: str, backend: str, memmap_dir: str | None) -> dict[str, float]:
    """One case in this process (inputs in a memmap file in ``memmap_dir`` when given): the
    figures as a dict."""
    import resource
    import time

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from fastnn import Config, Trainer

    generator = np.random.default_rng(0)
    labels = generator.integers(0, 10, rows)
    small = np.zeros((1000, COLUMNS), np.uint8)
    fill(small, generator)
    trainer = Trainer(Config(epochs=1, backend=backend, dtype=dtype))
    trainer.fit(small, labels[:1000])  # compile (or load) the kernels outside the figures
    del trainer
    if memmap_dir is None:
        x = np.zeros((rows, COLUMNS), np.uint8)
        fill(x, generator)
        path = None
    else:
        path = Path(tempfile.mkstemp(suffix=".u8", dir=memmap_dir)[1])
        written = np.memmap(path, np.uint8, "w+", shape=(rows, COLUMNS))
        fill(written, generator)
        written.flush()
        del written
        x = np.memmap(path, np.uint8, "r", shape=(rows, COLUMNS))
    try:
        start = time.perf_counter()
        trainer = Trainer(Config(epochs=1, backend=backend, dtype=dtype), keep_splits=True)
        with AnonymousPeak() as anonymous:
            history = trainer.fit(x, labels)
        seconds = time.perf_counter() - start
        inputs = trainer.splits[0].x
        sparse = getattr(inputs, "nbytes", 0) if type(inputs) is not np.ndarray else 0
        estimate = trainer.run_memory([x]).total / 2**20
        trainer.splits = None
        del inputs
        return {"raw": x.nbytes / 2**20, "peak": resource.getrusage(
                    resource.RUSAGE_SELF).ru_maxrss / 1024,
                "anon": anonymous.peak, "after": _status_mib("VmRSS"), "fit": seconds,
                "epoch": history.epoch_seconds[-1], "estimate": estimate,
                "sparse": sparse / 2**20}
    finally:
        if path is not None:
            del x
            path.unlink()


HEADER = ("rows", "backend", "dtype", "raw MiB", "peak RSS MiB", "peak RssAnon MiB",
          "RSS after fit MiB", "sparse form MiB", "fit s", "epoch s", "estimate MiB")


def run_case(rows: int, dtype: str, backend: str, memmap_dir: str | None) -> list[str]:
    """One case in its own process: the table's cells."""
    command = [sys.executable, __file__, "--worker", str(rows), dtype, backend]
    if memmap_dir is not None:
        command += ["--memmap-dir", memmap_dir]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    name = f"{rows:,}" + (" (memmap)" if memmap_dir is not None else "")
    if done.returncode != 0:
        lines = (done.stderr.strip() or "no output").splitlines()
        return [name, backend, dtype, f"failed: {lines[-1]}"]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return [name, backend, dtype, f"{found['raw']:,.0f}", f"{found['peak']:,.0f}",
            f"{found['anon']:,.0f}", f"{found['after']:,.0f}", f"{found['sparse']:,.0f}",
            f"{found['fit']:.1f}", f"{found['epoch']:.2f}", f"{found['estimate']:,.0f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="60000,240000,600000")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--backends", default="numba,numpy")
    parser.add_argument("--memmap", type=int, default=0, metavar="ROWS",
                        help="add a numba float32 run on a memmap of ROWS rows (e.g. 8000000)")
    parser.add_argument("--memmap-dir", default=None,
                        help="where the memmap's file is written (default: the temp folder)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("ROWS", "DTYPE", "BACKEND"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rows, dtype, backend = args.worker
        print(json.dumps(worker(int(rows), dtype, backend, args.memmap_dir)))
        return 0
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER) if args.markdown
          else "  ".join(HEADER))
    cases = [(rows, dtype, backend, None) for backend in args.backends.split(",")
             for rows in (int(r) for r in args.rows.split(",") if r)
             for dtype in args.dtypes.split(",")]
    if args.memmap:
        cases.append((args.memmap, "float32", "numba",
                      args.memmap_dir or tempfile.gettempdir()))
    for case in cases:
        cells = run_case(*case)
        print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
