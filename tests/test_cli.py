"""The fastnn command end to end on tiny generated IDX data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_idx_folder, run_history

from fastnn.cli import main

TINY = ["--hidden", "16,8", "--epochs", "2", "--batch-size", "50"]


pytestmark = pytest.mark.usefixtures("forbid_downloads")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTNN_DATA": "/nonexistent-fastnn-cache", "FASTNN_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fastnn", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_train_writes_json_and_summary(idx_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run.json"
    assert (
        main(
            [
                "train",
                "--data",
                str(idx_folder),
                *TINY,
                "--out",
                str(out),
                "--batch-norm",
                "bn",
                "--dropout-hidden",
                "0.8",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "epoch   2" in printed and "numpy/float32" in printed
    record = json.loads(out.read_text())
    assert set(record) == {"config", "history", "summary", "environment"}
    assert len(record["history"]["test_acc"]) == 3 and len(record["history"]["epoch_seconds"]) == 3
    assert record["config"]["dtype"] == "float32" and record["config"]["batch_norm"] == "bn"
    assert (
        record["environment"]["backend"] == "numpy" and "numpy" in record["environment"]["versions"]
    )
    assert record["summary"]["test_acc"] > 0.5
    assert main(["summary", str(out), str(out)]) == 0
    assert capsys.readouterr().out.count("numpy/float32") == 2


def test_every_config_flag_reaches_the_config(idx_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    args = [
        "train",
        "--data",
        str(idx_folder),
        "--hidden",
        "12",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--eta",
        "0.05",
        "--activation",
        "leaky_relu",
        "--alpha",
        "0.2",
        "--init",
        "normal_w",
        "--init-param",
        "std=0.05",
        "--bias-init",
        "uniform_b",
        "--bias-init-param",
        "min=0",
        "--bias-init-param",
        "max=0.01",
        "--output",
        "identity_mse",
        "--normalize",
        "z_score",
        "--normalize-axis",
        "0",
        "--weight-decay",
        "l1:1e-4",
        "--dropout-input",
        "0.9",
        "--dropout-hidden",
        "0.7",
        "--dropout-mode",
        "inverted",
        "--batch-norm",
        "node",
        "--batch-norm-eta",
        "0.2",
        "--bn-eval",
        "running",
        "--bn-momentum",
        "0.8",
        "--seed",
        "4",
        "--no-shuffle",
        "--early-stopping",
        "3",
        "--validation-fraction",
        "0.25",
        "--stop-on-divergence",
        "--backend",
        "numpy",
        "--dtype",
        "float64",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    cfg = json.loads(out.read_text())["config"]
    expected = {
        "hidden": [12],
        "epochs": 1,
        "batch_size": 64,
        "eta": 0.05,
        "activation": "leaky_relu",
        "activation_params": {"alpha": 0.2},
        "init": "normal_w",
        "init_params": {"std": 0.05},
        "bias_init": "uniform_b",
        "bias_init_params": {"min": 0.0, "max": 0.01},
        "output": "identity_mse",
        "normalize": "z_score",
        "normalize_axis": 0,
        "weight_decay": ["l1", 1e-4],
        "dropout_input": 0.9,
        "dropout_hidden": 0.7,
        "dropout_mode": "inverted",
        "batch_norm": "node",
        "batch_norm_eta": 0.2,
        "bn_eval": "running",
        "bn_momentum": 0.8,
        "seed": 4,
        "shuffle": False,
        "dtype": "float64",
        "early_stopping": 3,
        "validation_fraction": 0.25,
        "stop_on_divergence": True,
        "backend": "numpy",
    }
    for key, value in expected.items():
        assert cfg[key] == value, key


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "--epochs", "x"], "argument --epochs: expected an integer >= 0; got 'x'"),
        (["train", "--dropout-input", "1.5"], "(0, 1]"),
        (["train", "--eta", "-1"], "eta must be > 0"),
        (["train", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["train", "--hidden", "100,-5"], "hidden sizes"),
        (["train", "--backend", "tpu"], "numpy, numba, cupy"),
        (["train", "--hidden", "100,,50"], "no empty size"),
        (["train", "--validation-fraction", "0.3"], "set --early-stopping too"),
        (["train", "--alpha", "0.3"], "--alpha needs --activation leaky_relu"),
        (["train", "--init-param", "std=0.1"], "--init-param std=... needs --init normal_w"),
        (["train", "--threads", "0"], "--threads must be an integer >= 1"),
        (["train", "--eta", "abc"], "argument --eta: expected a number > 0; got 'abc'"),
        (["sweep", "--grid", "eta=0.1", "--dask", "local", "--workers", "2"], "--workers"),
        (["train", "--activation", "swish"], "invalid choice"),
        (["train", "--weight-decay", "l3:1"], "l1, l2"),
        (["train", "--data", "/nonexistent/folder"], "/nonexistent/folder"),
        (["train", "--resume", "/nonexistent/ck"], "no checkpoint"),
        (["summary", "/nonexistent/run.json"], "not a fastnn run file"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_config_and_data_errors_are_one_line_exit_2(args, fragment, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fastnn: error: ") and err.count("error:") == 1  # one prefix
    assert "fastnn train:" not in err and "fastnn sweep:" not in err


def test_bad_data_file_is_exit_2_in_a_subprocess(tmp_path: Path) -> None:
    folder = make_idx_folder(tmp_path / "d", n_train=50, n_test=20)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x63")
    result = run_cli("train", "--data", str(folder), *TINY)
    assert result.returncode == 2, result.stderr
    assert "t10k-labels-idx1-ubyte" in result.stderr and "Traceback" not in result.stderr


def test_info_lists_backends_optimizers_and_schedules(capsys) -> None:
    from fastnn.config import LR_SCHEDULES, OPTIMIZERS

    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    named = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert named["numpy"].split()[1] == "available" and "cupy" in named and "numba" in named
    for name in (*OPTIMIZERS, *LR_SCHEDULES):  # each with what it does
        assert len(named[name].split()) > 3, named.get(name)


def test_info_lists_the_compiled_kernel_sets(capsys, monkeypatch, tmp_path: Path) -> None:
    pytest.importorskip("numba")
    from fastnn.backends.numba.kernels import common

    monkeypatch.setattr(common, "cache_folder", lambda: tmp_path)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numba kernels compiled on this machine" in out and "  none yet" in out
    common.record_warm("float32-2-hidden", 41.26)
    assert main(["info"]) == 0
    assert "  float32, 2 hidden layers (compiling took 41 s)" in capsys.readouterr().out


def test_save_model_round_trip(idx_folder: Path, tmp_path: Path) -> None:
    from fastnn import Network

    model = tmp_path / "model.npz"
    assert (
        main(
            [
                "train",
                "--data",
                str(idx_folder),
                *TINY,
                "--quiet",
                "--batch-norm",
                "bn",
                "--save-model",
                str(model),
            ]
        )
        == 0
    )
    net = Network.load(model)
    assert net.config.hidden == (16, 8) and net.params["gamma1"].shape == (1,)
    assert net.predict(np.zeros((2, 784))).shape == (2, 10)


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path: Path) -> None:
    folder = make_idx_folder(tmp_path / "d", n_train=4000, n_test=500)
    common = [
        "--data",
        str(folder),
        "--hidden",
        "256,128",
        "--epochs",
        "5",
        "--batch-size",
        "20",
        "--dropout-hidden",
        "0.8",
        "--batch-norm",
        "bn",
        "--seed",
        "2",
        "--quiet",
    ]
    full = tmp_path / "full.json"
    assert (
        run_cli(
            "train", *common, "--out", str(full), "--save-model", str(tmp_path / "full.npz")
        ).returncode
        == 0
    )

    ck = tmp_path / "ck"
    env = {**os.environ, "FASTNN_DATA": "/nonexistent-fastnn-cache"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastnn", "train", *common, "--checkpoint", str(ck)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (ck / "checkpoint.npz").exists():
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    from fastnn.checkpoint import load_checkpoint

    _, state = load_checkpoint(ck)
    assert 1 <= state.epoch < 5, "the kill should land before the run ends"
    resumed = tmp_path / "resumed.json"
    result = run_cli(
        "train",
        "--resume",
        str(ck),
        "--quiet",
        "--out",
        str(resumed),
        "--save-model",
        str(tmp_path / "resumed.npz"),
    )
    assert result.returncode == 0, result.stderr
    assert run_history(resumed) == run_history(full)
    with np.load(tmp_path / "full.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        for name in a.files:
            if name != "__meta__":
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_ctrl_c_saves_checkpoint_and_partial_results_exit_130(tmp_path: Path) -> None:
    folder = make_idx_folder(tmp_path / "d", n_train=4000, n_test=500)
    out, ck = tmp_path / "partial.json", tmp_path / "ck"
    env = {**os.environ, "FASTNN_DATA": "/nonexistent-fastnn-cache"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastnn",
            "train",
            "--data",
            str(folder),
            "--hidden",
            "256,128",
            "--epochs",
            "50",
            "--batch-size",
            "20",
            "--checkpoint",
            str(ck),
            "--out",
            str(out),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # the first epoch is done
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    record = json.loads(out.read_text())
    done = record["history"]["events"]["interrupted_after_epoch"]
    assert len(record["history"]["test_acc"]) == done + 1 >= 2


def test_resume_rejects_a_different_config(idx_folder: Path, tmp_path: Path, capsys) -> None:
    ck = tmp_path / "ck"
    assert (
        main(["train", "--data", str(idx_folder), *TINY, "--quiet", "--checkpoint", str(ck)]) == 0
    )
    assert main(["train", "--resume", str(ck), "--eta", "0.5"]) == 2
    assert "eta" in capsys.readouterr().err
    assert main(["train", "--resume", str(ck), "--epochs", "3", "--quiet"]) == 0  # extend a run
    (ck / "checkpoint.npz").write_bytes(b"garbage")
    assert main(["train", "--resume", str(ck)]) == 2
    assert "unreadable checkpoint" in capsys.readouterr().err


def test_internal_error_is_exit_1_without_traceback(monkeypatch, capsys) -> None:
    import fastnn.cli as cli

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: boom" in err and "Traceback" not in err


def test_plot_writes_a_png(idx_folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = tmp_path / "run.json"
    assert main(["train", "--data", str(idx_folder), *TINY, "--quiet", "--out", str(run)]) == 0
    chart = tmp_path / "chart.png"
    assert main(["plot", str(run), str(run), "--out", str(chart)]) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_gives_the_install_command(tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run.json"
    run.write_text(
        json.dumps(
            {
                "history": {
                    "test_acc": [0.1],
                    "train_acc": [0.1],
                    "test_loss": [2.0],
                    "train_loss": [2.0],
                }
            }
        )
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(run)]) == 2
    assert "plotting needs matplotlib: pip install matplotlib\n" in capsys.readouterr().err


def test_unwritable_outputs_fail_before_training(idx_folder: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(idx_folder), *TINY, "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = str(blocker / "sub" / "m.npz")
    assert main(["train", "--data", str(idx_folder), *TINY, "--save-model", bad]) == 2
    assert "--save-model" in capsys.readouterr().err
    assert main(["train", "--data", str(idx_folder), *TINY, "--checkpoint-every", "2"]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


def test_sizes_come_from_the_data(tmp_path: Path) -> None:
    folder = make_idx_folder(tmp_path / "small", n_train=300, n_test=100, side=10)
    out = tmp_path / "run.json"
    assert main(["train", "--data", str(folder), *TINY, "--quiet", "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())["config"]
    assert (cfg["n_inputs"], cfg["n_outputs"]) == (100, 10)


def test_diverged_run_json_is_strict(idx_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    args = ["train", "--data", str(idx_folder), *TINY, "--quiet", "--out", str(out)]
    assert main([*args, "--eta", "1e6", "--output", "identity_mse", "--dtype", "float32"]) == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)
    assert None in record["history"]["train_loss"] and "diverged_at" in record["history"]["events"]
    assert main(["summary", str(out)]) == 0


@pytest.mark.parametrize(
    "header, fragment",
    [
        ([1, 2], "not a fastnn checkpoint"),
        ({"format": "fastnn-checkpoint", "version": 99}, "version 99"),
        ({"format": "fastnn-checkpoint", "version": 1, "config": {}}, "damaged"),
        (
            {
                "format": "fastnn-checkpoint",
                "version": 1,
                "config": {},
                "history": {},
                "epoch": "x",
            },
            "damaged",
        ),
        (
            {"format": "fastnn-checkpoint", "version": 1, "config": {}, "epoch": -1, "history": {}},
            "damaged",
        ),
        (
            {
                "format": "fastnn-checkpoint",
                "version": 1,
                "config": {"eta": "fast"},
                "history": {},
                "epoch": 0,
            },
            "damaged",
        ),
        (
            {
                "format": "fastnn-checkpoint",
                "version": 1,
                "config": {},
                "epoch": 1,
                "history": {"test_acc": [0.1]},
            },
            "history test_acc has 1 entries, train_acc 0",
        ),
    ],
)
def test_hostile_checkpoints_are_exit_2(tmp_path: Path, header, fragment, capsys) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    np.savez(ck / "checkpoint.npz", __header__=np.array(json.dumps(header)))
    assert main(["train", "--resume", str(ck)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_resume_to_more_epochs_equals_a_straight_run(idx_folder: Path, tmp_path: Path) -> None:
    ck, straight, extended = tmp_path / "ck", tmp_path / "straight.json", tmp_path / "ext.json"
    base = [
        "train",
        "--data",
        str(idx_folder),
        "--hidden",
        "16,8",
        "--batch-size",
        "50",
        "--quiet",
        "--dropout-input",
        "0.8",
    ]
    assert main([*base, "--epochs", "3", "--out", str(straight)]) == 0
    assert main([*base, "--epochs", "2", "--checkpoint", str(ck)]) == 0
    assert (
        main(["train", "--resume", str(ck), "--epochs", "3", "--quiet", "--out", str(extended)])
        == 0
    )
    assert run_history(extended) == run_history(straight)


def test_sweep_trains_every_grid_point_and_tabulates(
    idx_folder: Path, tmp_path: Path, capsys
) -> None:
    out_dir = tmp_path / "runs"
    args = [
        "sweep",
        "--data",
        str(idx_folder),
        *TINY,
        "--out-dir",
        str(out_dir),
        "--grid",
        "eta=0.05,0.2",
        "--grid",
        "batch_norm=off,node",
        "--quiet",
    ]
    assert main(args) == 0
    files = sorted(p.name for p in out_dir.glob("*.json"))
    assert files == [
        "eta=0.05_batch_norm=node.json",
        "eta=0.05_batch_norm=off.json",
        "eta=0.2_batch_norm=node.json",
        "eta=0.2_batch_norm=off.json",
    ]
    record = json.loads((out_dir / "eta=0.2_batch_norm=node.json").read_text())
    assert record["config"]["eta"] == 0.2 and record["config"]["batch_norm"] == "node"
    assert len(record["history"]["test_acc"]) == 3 and "environment" in record
    table = capsys.readouterr().out.splitlines()[-6:]  # header, rule, four rows
    assert table[0].split()[:3] == ["eta", "batch_norm", "train"]
    assert [line.split()[:2] for line in table[2:]] == [
        ["0.05", "off"],
        ["0.05", "node"],
        ["0.2", "off"],
        ["0.2", "node"],
    ]


def test_sweep_in_parallel_processes_matches_sequential(idx_folder: Path, tmp_path: Path) -> None:
    # one thread per run in both, so BLAS sums in the same order (threads may change bits)
    grids = ["--grid", "seed=0,1", "--grid", "hidden=8/4,6", "--threads", "1"]
    for workers, folder in (("1", "seq"), ("2", "par")):
        assert (
            main(
                [
                    "sweep",
                    "--data",
                    str(idx_folder),
                    "--epochs",
                    "1",
                    "--quiet",
                    "--workers",
                    workers,
                    "--out-dir",
                    str(tmp_path / folder),
                    *grids,
                ]
            )
            == 0
        )
    for path in (tmp_path / "seq").glob("*.json"):
        assert run_history(path) == run_history(tmp_path / "par" / path.name)


@pytest.mark.parametrize(
    "grid, fragment",
    [
        ("eta", "OPTION=V1,V2"),
        ("n_inputs=3,4", "cannot sweep"),
        ("eta=fast", "cannot read"),
        ("batch_norm=on", "off, n, bn, node"),
        ("eta=0.1,0.10", "given twice"),
        ("eta=-1", "grid eta must be > 0"),
        ("bn_eval=running", "grid point bn_eval=running: bn_eval needs batch norm"),
    ],
)
def test_sweep_rejects_bad_grids(idx_folder: Path, grid: str, fragment: str, capsys) -> None:
    assert main(["sweep", "--data", str(idx_folder), "--grid", grid]) == 2
    assert fragment in capsys.readouterr().err


def test_sweep_on_dask_without_dask_gives_the_install_command(
    idx_folder: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    assert (
        main(
            [
                "sweep",
                "--data",
                str(idx_folder),
                "--grid",
                "eta=0.1",
                "--dask",
                "local",
                "--out-dir",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert 'needs dask: pip install "dask[distributed]"\n' in capsys.readouterr().err
