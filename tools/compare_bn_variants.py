"""Paired comparison of the batch-norm variants over seeds: do learnable gamma and beta (BN,
BN(n)) beat plain normalisation (N)?

Reads the run files that ``fastnn reproduce batch-norm`` (or ``lr-sweep``) wrote into a folder,
pairs the runs of two variants that share eta and seed (same initialisation, batch order and
dropout masks), and prints, per eta and figure, the mean difference, its standard deviation,
the paired t statistic with its two-sided p-value, and how many seeds favour each side.

    python tools/compare_bn_variants.py reproduce/batch-norm [--etas 0.1,0.5,1.0]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from fastnn.history import History

FIGURES = {"best test %": "best_test_acc", "final test %": "test_acc",
           "lowest test loss": "lowest_test_loss"}
PAIRS = (("bn", "n"), ("node", "n"), ("node", "bn"))
NAMES = {"off": "none", "n": "N", "bn": "BN", "node": "BN(n)"}


def load(folder: Path) -> dict[tuple[str, float, int], dict[str, Any]]:
    """(batch_norm, eta, seed) -> summary of every finished 50-epoch run in the folder."""
    runs = {}
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            config = record["config"]
            summary = History.from_dict(record["history"]).summary()
        except (OSError, ValueError, KeyError):
            continue
        runs[(config["batch_norm"], float(config["eta"]), int(config["seed"]))] = summary
    return runs


def t_test(differences: list[float]) -> tuple[float, float, float, float]:
    """(mean, sd, t, two-sided p) of paired differences (p from Student's t, n - 1 d.o.f.)."""
    n = len(differences)
    mean = statistics.fmean(differences)
    sd = statistics.stdev(differences) if n > 1 else float("nan")
    if n < 2 or sd == 0:
        return mean, sd, float("nan"), float("nan")
    t = mean / (sd / math.sqrt(n))
    try:
        from scipy.stats import t as student

        p = float(2 * student.sf(abs(t), n - 1))
    except ImportError:  # scipy comes with the numba extra; without it: no p-value
        p = float("nan")
    return mean, sd, t, p


def table(runs: dict[tuple[str, float, int], dict[str, Any]], etas: list[float]) -> str:
    lines = ["| eta | a - b | figure | seeds | mean diff | sd | t | p "
             "| a higher / b higher / tie |", "|---|---|---|---|---|---|---|---|---|"]
    for eta in etas:
        for a, b in PAIRS:
            seeds = sorted(s for (v, e, s) in runs if v == a and e == eta
                           and (b, eta, s) in runs)
            if not seeds:
                continue
            for label, key in FIGURES.items():
                scale = 100.0 if "%" in label else 1.0
                diffs = [(runs[(a, eta, s)][key] - runs[(b, eta, s)][key]) * scale
                         for s in seeds]
                mean, sd, t, p = t_test(diffs)
                wins = (sum(d > 0 for d in diffs), sum(d < 0 for d in diffs),
                        sum(d == 0 for d in diffs))
                lines.append(
                    f"| {eta:g} | {NAMES[a]} - {NAMES[b]} | {label} | {len(seeds)} | "
                    f"{mean:+.3f} | {sd:.3f} | {t:+.2f} | {p:.3f} | {wins[0]} / {wins[1]} / "
                    f"{wins[2]} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--etas", default="0.1,0.5,1.0")
    args = parser.parse_args(argv)
    runs = load(args.folder)
    if not runs:
        print(f"{args.folder}: no run files", file=sys.stderr)
        return 2
    print(table(runs, [float(e) for e in args.etas.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
