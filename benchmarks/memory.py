"""Memory and time around one epoch: peak RSS, RSS after ``fit``, fit time and the epoch.

Each case runs in its own process: synthetic uint8 inputs of 784 columns, 80 % zeros (like
MNIST), 10 classes, ``Trainer(Config(epochs=1, backend=..., dtype=...)).fit`` on them.

    python benchmarks/memory.py [--rows 60000,240000,600000] [--dtypes float32,float64]
        [--backends numba,numpy] [--markdown]

Peak RSS is the process's high-water mark (``ru_maxrss``) minus nothing: it includes the
interpreter, NumPy, numba and the raw inputs. "raw" is the uint8 inputs' own size;
"estimate" is what `fit` counted before it started (`Trainer.run_memory`: the run's own
arrays, not the raw inputs, the interpreter or numba's sparse form, checked when it is built).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = 784


def _rss_mib() -> float:
    """This process's resident set now (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(rows: int, dtype: str, backend: str) -> dict[str, float]:
    """One case in this process: the figures as a dict."""
    import resource
    import time

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from fastnn import Config, Trainer

    generator = np.random.default_rng(0)
    x = np.zeros((rows, COLUMNS), np.uint8)
    for start in range(0, rows, 8192):  # built a block at a time: no float copy here
        block = x[start:start + 8192]
        keep = generator.random(block.shape) < 0.2
        block[keep] = generator.integers(1, 256, int(keep.sum()), dtype=np.uint8)
    labels = generator.integers(0, 10, rows)
    trainer = Trainer(Config(epochs=1, backend=backend, dtype=dtype))
    trainer.fit(x[:1000], labels[:1000])  # compile (or load) the kernels outside the figures
    del trainer
    start = time.perf_counter()
    trainer = Trainer(Config(epochs=1, backend=backend, dtype=dtype))
    history = trainer.fit(x, labels)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    estimate = trainer.run_memory([x]).total / 2**20
    return {"raw": x.nbytes / 2**20, "peak": peak, "after": _rss_mib(), "fit": seconds,
            "epoch": history.epoch_seconds[-1], "estimate": estimate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="60000,240000,600000")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--backends", default="numba,numpy")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("ROWS", "DTYPE", "BACKEND"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rows, dtype, backend = args.worker
        print(json.dumps(worker(int(rows), dtype, backend)))
        return 0
    header = ("rows", "backend", "dtype", "raw MiB", "peak RSS MiB", "RSS after fit MiB",
              "fit s", "epoch s", "estimate MiB")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header) if args.markdown
          else "  ".join(header))
    for backend in args.backends.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            for dtype in args.dtypes.split(","):
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", str(rows), dtype, backend],
                    capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    lines = (done.stderr.strip() or "no output").splitlines()
                    cells = [f"{rows:,}", backend, dtype, f"failed: {lines[-1]}"]
                else:
                    found = json.loads(done.stdout.strip().splitlines()[-1])
                    cells = [f"{rows:,}", backend, dtype, f"{found['raw']:,.0f}",
                             f"{found['peak']:,.0f}", f"{found['after']:,.0f}",
                             f"{found['fit']:.1f}", f"{found['epoch']:.2f}",
                             f"{found['estimate']:,.0f}"]
                print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells),
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
