"""Soak test of exact resume: SIGKILL a training run at random moments, resume, compare.

``python benchmarks/kill_resume.py --runs 10 [--backend numba]`` trains once without
interruption, then N times: start with --checkpoint, SIGKILL after a random delay, resume with
--resume, and compare the final history (without timings) and parameters bit for bit.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_idx_folder, run_history  # noqa: E402


def _train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastnn", "train", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _result(folder: Path, name: str) -> tuple[dict, dict]:
    history = run_history(folder / f"{name}.json")
    with np.load(folder / f"{name}.npz") as data:
        params = {k: data[k] for k in data.files if k != "__meta__"}
    return history, params


def _checkpoint_epoch(directory: Path) -> int | None:
    try:
        with np.load(directory / "checkpoint.npz") as data:
            return int(json.loads(str(data["__header__"]))["epoch"])
    except (OSError, ValueError, KeyError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fastnn-soak-"))
    data = make_idx_folder(work / "data", n_train=4000, n_test=500)
    common = [
        "--data",
        str(data),
        "--hidden",
        "256,128",
        "--epochs",
        "6",
        "--batch-size",
        "20",
        "--dropout-input",
        "0.8",
        "--dropout-hidden",
        "0.7",
        "--batch-norm",
        "bn",
        "--backend",
        args.backend,
        "--seed",
        "3",
        "--quiet",
    ]
    start = time.perf_counter()
    assert (
        _train(
            [*common, "--out", str(work / "full.json"), "--save-model", str(work / "full.npz")]
        ).returncode
        == 0
    )
    full_seconds = time.perf_counter() - start
    reference = _result(work, "full")
    pick = random.Random(args.seed)
    matched = 0
    for run in range(args.runs):
        ck = work / f"ck{run}"
        target = pick.randint(1, 5)  # kill during epoch target + 1, at a random point in it
        fraction = pick.random()
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastnn", "train", *common, "--checkpoint", str(ck)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seen, epoch_seconds = None, full_seconds / 7
        while proc.poll() is None:
            epoch = _checkpoint_epoch(ck)
            if epoch is not None and epoch >= target:
                seen = time.perf_counter() if seen is None else seen
                if time.perf_counter() - seen >= fraction * epoch_seconds:
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        delay = f"about {fraction:.0%} of an epoch after checkpoint {target} appeared"
        state = "no checkpoint yet"
        killed_after = _checkpoint_epoch(ck)
        if killed_after is not None:
            resumed = _train(
                [
                    "--resume",
                    str(ck),
                    "--quiet",
                    "--out",
                    str(work / f"r{run}.json"),
                    "--save-model",
                    str(work / f"r{run}.npz"),
                ]
            )
            history, params = _result(work, f"r{run}") if resumed.returncode == 0 else ({}, {})
            same = history == reference[0] and all(
                np.array_equal(params[k], v) for k, v in reference[1].items()
            )
            matched += same
            done = "run had finished" if killed_after == 6 else f"resumed from epoch {killed_after}"
            state = f"{done}: {'match' if same else 'MISMATCH'}"
        else:
            matched += 1  # nothing to resume: a fresh run is the uninterrupted run
        print(f"run {run}: SIGKILL {delay}, {state}", flush=True)
    print(f"{matched}/{args.runs} kill-and-resume runs matched the uninterrupted run bit for bit")
    return 0 if matched == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
