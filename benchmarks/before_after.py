"""The numba backend's article epoch in two checkouts of fastnn, and PyTorch, side by side.

    git worktree add /tmp/fastnn-before <older commit>
    python benchmarks/before_after.py /tmp/fastnn-before [--rounds 3] [--epochs-repeat 3]
        [--data mnist] [--dtypes float32,float64] [--batch-norm off,bn]
        [--hidden 100,50] [--batch-sizes 100] [--threads N]

Each measurement is one `compare.py --worker` process (its own checkout's compare.py, with that
checkout first on PYTHONPATH), and the three kinds are interleaved config by config, round by
round, so that a noisy machine weighs on all of them alike. The table shows medians and the
ratios to PyTorch measured in this run. The older checkout must have `compare.py --worker`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("before", "after", "torch")


def measure(checkout: Path, implementation: str, config: tuple[str, str, str, str],
            arguments: argparse.Namespace) -> list[float] | str:
    """The epoch seconds of one worker process, or why it failed."""
    hidden, batch, dtype, batch_norm = config
    env = dict(os.environ, PYTHONPATH=str(checkout))
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # as compare.py: BLAS's own choice
        env.pop(name, None)
    if arguments.threads:  # fastnn's threads, and PyTorch's (OpenMP) alike
        env.update(FASTNN_THREADS=str(arguments.threads), OMP_NUM_THREADS=str(arguments.threads))
    command = [sys.executable, str(checkout / "benchmarks" / "compare.py"), "--worker",
               implementation, dtype, batch_norm, hidden, batch,
               "--epochs-repeat", str(arguments.epochs_repeat), "--data", arguments.data,
               "--loop", "trainer"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd="/")
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="the older checkout (a git worktree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs-repeat", type=int, default=3)
    parser.add_argument("--data", default="mnist", choices=("mnist", "synthetic"))
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--batch-norm", default="off,bn")
    parser.add_argument("--hidden", default="100,50", help="';'-separated networks")
    parser.add_argument("--batch-sizes", default="100")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of every run (FASTNN_THREADS, OMP_NUM_THREADS); "
                             "default: all usable CPUs")
    arguments = parser.parse_args()
    before = arguments.before.resolve()
    if not (before / "benchmarks" / "compare.py").is_file():
        parser.error(f"{before} has no benchmarks/compare.py: give a checkout of fastnn")
    configs = [(hidden, batch, dtype, bn)
               for hidden in arguments.hidden.split(";") if hidden
               for batch in arguments.batch_sizes.split(",") if batch
               for dtype in arguments.dtypes.split(",") if dtype
               for bn in arguments.batch_norm.split(",") if bn]
    sources = {"before": (before, "numba"), "after": (HERE.parent, "numba"),
               "torch": (HERE.parent, "torch")}
    seconds: dict[tuple[str, tuple[str, ...]], list[float]] = {}
    for round_number in range(1, arguments.rounds + 1):
        for config in configs:
            for kind in KINDS:
                checkout, implementation = sources[kind]
                result = measure(checkout, implementation, config, arguments)
                if isinstance(result, str):
                    sys.exit(f"{kind} {' '.join(config)}: failed: {result}")
                seconds.setdefault((kind, config), []).extend(result)
        print(f"round {round_number} of {arguments.rounds} done", file=sys.stderr, flush=True)

    print(f"article epoch, data {arguments.data}, medians of "
          f"{arguments.rounds * arguments.epochs_repeat} epochs; threads: "
          f"{arguments.threads or 'all'}; before: {before}")
    header = (f"{'hidden':<9} {'batch':>5} {'dtype':<8} {'BN':<4} {'before s':>8} {'after s':>8} "
              f"{'torch s':>8} {'before/torch':>12} {'after/torch':>11} {'after/before':>12}")
    print(header)
    print("-" * len(header))
    for config in configs:
        old, new, torch = (statistics.median(seconds[(kind, config)]) for kind in KINDS)
        hidden, batch, dtype, bn = config
        print(f"{hidden:<9} {batch:>5} {dtype:<8} {bn:<4} {old:>8.3f} {new:>8.3f} {torch:>8.3f} "
              f"{old / torch:>12.2f} {new / torch:>11.2f} {new / old:>12.2f}")


if __name__ == "__main__":
    main()
