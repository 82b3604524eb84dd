"""User-facing problems of the command line (issue 10), one test or more each."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

import fastnn.datasets as datasets
import fastnn.sweep as sweep
from fastnn import Config
from fastnn.cli import main
from fastnn.fileio import write_atomically
from fastnn.history import format_table

TINY = ["--hidden", "8", "--epochs", "1", "--batch-size", "50", "--quiet"]
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("forbid_downloads")


def _summary(test_acc: list[float]) -> dict:
    return {
        "train_acc": test_acc[-1],
        "test_acc": test_acc[-1],
        "epoch_95": None,
        "epoch_97": None,
        "epoch_98": None,
        "best_test_acc": max(test_acc),
        "best_epoch": test_acc.index(max(test_acc)),
    }


# (2) local workers and Dask runs split the CPUs


def test_threads_per_run_splits_the_usable_cpus(monkeypatch) -> None:
    monkeypatch.delenv("FASTNN_THREADS", raising=False)
    monkeypatch.setattr(sweep, "usable_cpus", lambda: 8)
    assert sweep.threads_per_run(None, 1) == 8
    assert sweep.threads_per_run(None, 3) == 2
    assert sweep.threads_per_run(None, 16) == 1
    assert sweep.threads_per_run(5, 3) == 5  # --threads wins
    monkeypatch.setenv("FASTNN_THREADS", "3")
    assert sweep.threads_per_run(None, 2) == 3  # then FASTNN_THREADS
    assert sweep.worker_environment(2) == {
        "FASTNN_THREADS": "2",
        "OPENBLAS_NUM_THREADS": "2",
        "NUMBA_NUM_THREADS": "2",
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
    }


def test_local_workers_start_with_their_share_of_the_cpus(small_data: Path, monkeypatch) -> None:
    monkeypatch.delenv("FASTNN_THREADS", raising=False)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep, "usable_cpus", lambda: 6)  # the parent's view: 6 // 2 workers
    points = sweep.parse_grid(["seed=0,1"], Config(hidden=(8,), epochs=1, batch_size=50))
    records = dict(sweep.run_sweep(points, str(small_data), workers=2))
    # each worker read the count from the FASTNN_THREADS it started with
    assert [records[p.name]["environment"]["threads"] for p in points] == [3, 3]
    assert "FASTNN_THREADS" not in os.environ and "OPENBLAS_NUM_THREADS" not in os.environ


def test_dask_runs_get_their_workers_share_of_the_host() -> None:
    workers = {
        "tcp://a:1": ("host-a", 2, 8),  # two workers share host-a's 8 CPUs: 4 each, 2 threads
        "tcp://a:2": ("host-a", 1, 8),
        "tcp://b:1": ("host-b", 4, 2),  # more threads than CPUs: one each
    }
    assert sweep.threads_for_workers(workers) == {"tcp://a:1": 2, "tcp://a:2": 4, "tcp://b:1": 1}


def test_dask_sweep_passes_the_thread_count_to_each_run(small_data: Path) -> None:
    distributed = pytest.importorskip("dask.distributed")
    points = sweep.parse_grid(["seed=0,1"], Config(hidden=(8,), epochs=1, batch_size=50))
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    )
    try:
        records = dict(sweep.run_sweep(points, str(small_data), dask=cluster.scheduler_address))
    finally:
        cluster.close()
    expected = max(1, sweep.usable_cpus() // 2)
    assert [records[p.name]["environment"]["threads"] for p in points] == [expected] * 2


# (3) tables show the grid values as columns, never cut


def test_table_columns_are_as_wide_as_their_values() -> None:
    rows = [
        ({"eta": "0.01", "batch_norm": "off", "seed": "0"}, _summary([0.1, 0.5])),
        ({"eta": "0.01", "batch_norm": "off", "seed": "12345"}, _summary([0.1, 0.6])),
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:4] == ["eta", "batch_norm", "seed", "train"]
    assert [line.split()[:3] for line in lines[2:]] == [
        ["0.01", "off", "0"],
        ["0.01", "off", "12345"],
    ]
    long_name = "eta=0.01_batch_norm=off_seed=0_and_more_words"
    assert long_name in format_table([(long_name, _summary([0.5]))])


def test_summary_shows_what_differs_between_runs(tmp_path: Path, capsys) -> None:
    paths = []
    for seed, acc in ((0, 0.5), (1, 0.6)):
        path = tmp_path / f"eta=0.01_batch_norm=off_seed={seed}.json"
        history = {"train_acc": [0.1, acc], "train_loss": [2.0, 1.0]}
        history.update(test_acc=[0.1, acc], test_loss=[2.0, 1.0], epoch_seconds=[0, 1])
        config = Config(eta=0.01, seed=seed, dtype="float32").to_dict()
        path.write_text(json.dumps({"config": config, "history": history}))
        paths.append(str(path))
    assert main(["summary", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "seed", "backend/dtype", "train"]
    assert lines[2].split()[:5] == [Path(paths[0]).stem, "0", "numpy/float32", "50.00", "50.00"]
    assert lines[3].split()[:5] == [Path(paths[1]).stem, "1", "numpy/float32", "60.00", "60.00"]


# (5) every option is checked before any data is read


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "--backend", "foo"], "unknown backend 'foo'; valid backends: numpy, numba"),
        (["train", "--out", "/proc/fastnn-x.json"], "--out /proc/fastnn-x.json: cannot write"),
        (["train", "--save-model", "/proc/m.npz"], "--save-model /proc/m.npz: cannot write"),
        (["train", "--checkpoint", "/proc/ck"], "--checkpoint /proc/ck: cannot create"),
        (["sweep", "--grid", "backend=numpy,foo"], "unknown backend 'foo'"),
        (["sweep", "--grid", "eta=1", "--out-dir", "/proc/runs"], "--out-dir /proc/runs"),
    ],
)
def test_bad_options_fail_before_the_data_is_read(args, fragment, monkeypatch, capsys) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")

    def touched(*args, **kwargs):
        raise AssertionError("the data was read before every option was checked")

    monkeypatch.setattr(datasets, "load_mnist", touched)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_unavailable_backend_fails_before_the_data_is_read(monkeypatch, capsys) -> None:
    from fastnn import backends

    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(backends._INSTANCES, "numba", raising=False)
    monkeypatch.delitem(sys.modules, "fastnn.backends.numba", raising=False)
    monkeypatch.setattr(datasets, "load_mnist", lambda *a, **k: pytest.fail("data read"))
    assert main(["train", "--backend", "numba"]) == 2
    assert "pip install numba scipy" in capsys.readouterr().err


def test_bad_thread_variable_fails_before_the_data_is_read(monkeypatch, capsys) -> None:
    monkeypatch.setenv("FASTNN_THREADS", "many")
    monkeypatch.setattr(datasets, "load_mnist", lambda *a, **k: pytest.fail("data read"))
    assert main(["train"]) == 2
    assert "FASTNN_THREADS must be an integer >= 1; got 'many'" in capsys.readouterr().err


def test_offline_with_an_empty_cache_downloads_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FASTNN_OFFLINE", "1")
    assert main(["train", "--epochs", "1"]) == 2  # the fixture fails on any fetch
    err = capsys.readouterr().err
    assert str(tmp_path / "empty-cache") in err and "FASTNN_OFFLINE=1: not downloaded" in err


# (6) outputs that cannot be written are found before training


def test_checkpoint_path_that_is_a_file(small_data: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run.json"
    run.write_text("{}")
    argv = ["train", "--data", str(small_data), *TINY, "--checkpoint", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {run}: is a file, not a directory" in err and err.count("\n") == 1
    assert run.read_text() == "{}"
    argv = ["train", "--data", str(small_data), *TINY, "--checkpoint", str(tmp_path / "c")]
    assert main(argv) == 0
    assert (tmp_path / "c" / "checkpoint.npz").is_file()


def test_out_in_an_unwritable_place_fails_before_training(small_data: Path, capsys) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    assert main(["train", "--data", str(small_data), *TINY, "--out", "/proc/x.json"]) == 2
    captured = capsys.readouterr()
    assert "--out /proc/x.json: cannot write in /proc" in captured.err
    assert "epoch" not in captured.out  # nothing was trained


# (7) and (11) plot: missing folders, the real path, known image extensions only


def _run_file(folder: Path) -> Path:
    history = {"test_acc": [0.1, 0.5], "train_acc": [0.1, 0.4]}
    history.update(test_loss=[2.0, 1.5], train_loss=[2.0, 1.6], epoch_seconds=[0.0, 1.0])
    path = folder / "run.json"
    path.write_text(json.dumps({"config": Config().to_dict(), "history": history}))
    return path


def test_plot_creates_missing_folders(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "no" / "dir" / "x.png"
    assert main(["plot", str(_run_file(tmp_path)), "--out", str(chart)]) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"wrote {chart}\n"


def test_plot_writes_the_format_its_extension_names(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "x.svg"
    assert main(["plot", str(_run_file(tmp_path)), "--out", str(chart)]) == 0
    assert b"<svg" in chart.read_bytes()[:1000]
    assert capsys.readouterr().out == f"wrote {chart}\n"


def test_plot_refuses_a_name_without_an_image_extension(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "noext"
    assert main(["plot", str(_run_file(tmp_path)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: give a chart file name ending in an image extension" in err
    assert ".png" in err and not out.exists() and not out.with_suffix(".png").exists()


# (8) an unreachable Dask scheduler is a usage error


def test_unreachable_dask_scheduler_is_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("dask.distributed")
    monkeypatch.setattr(sweep, "DASK_CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(datasets, "load_mnist", lambda *a, **k: pytest.fail("data read"))
    out = tmp_path / "runs"
    assert main(["sweep", "--grid", "eta=0.1", "--dask", "tcp://127.0.0.1:1",
                 "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--dask tcp://127.0.0.1:1: no Dask scheduler answered within 1 s" in err
    assert err.count("\n") == 1 and "internal error" not in err
    assert not out.exists()  # neither the lock file nor the folder made for it is left


@pytest.mark.parametrize("command", [["sweep", "--grid", "eta=0.1"],
                                     ["tune", "--space", "eta=0.1,1"]])
def test_unreachable_dask_scheduler_leaves_no_lock_in_an_existing_folder(
        command: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("dask.distributed")
    if command[0] == "tune":
        pytest.importorskip("optuna")
        monkeypatch.setattr(datasets, "read_data_once", lambda *a, **k: None)  # read first
    monkeypatch.setattr(sweep, "DASK_CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(datasets, "load_mnist", lambda *a, **k: pytest.fail("data read"))
    (tmp_path / "kept.txt").write_text("mine")
    assert main([*command, "--dask", "tcp://127.0.0.1:1", "--out-dir", str(tmp_path)]) == 2
    assert "no Dask scheduler answered" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]


# (10) files get the mode the umask gives new files


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        path = write_atomically(tmp_path / "f.bin", lambda handle: handle.write(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert write_atomically(tmp_path / "g", lambda h: h.write(b"y"), mode=0o640).stat().st_mode & (
        0o777
    ) == 0o640


def test_every_output_file_follows_the_umask(small_data: Path, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        argv = ["train", "--data", str(small_data), *TINY, "--out", str(tmp_path / "run.json")]
        argv += ["--save-model", str(tmp_path / "m.npz"), "--checkpoint", str(tmp_path / "ck")]
        assert main(argv) == 0
        argv = ["sweep", "--data", str(small_data), *TINY, "--grid", "seed=0,1"]
        assert main([*argv, "--out-dir", str(tmp_path / "runs")]) == 0
    finally:
        os.umask(previous)
    files = ["run.json", "m.npz", "ck/checkpoint.npz", "runs/seed=0.json", "runs/seed=1.json"]
    for name in files:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


# (13) messages


def test_one_epoch_is_singular(small_data: Path, capsys) -> None:
    assert main(["train", "--data", str(small_data), *TINY]) == 0
    out = capsys.readouterr().out
    assert " for 1 epoch (" in out and "1 epochs" not in out


def test_train_records_its_thread_count(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    argv = ["train", "--data", str(small_data), *TINY, "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["environment"]["threads"] == 1


# (14) install hints name real packages


def test_no_install_hint_names_the_pypi_fastnn() -> None:
    offenders = []
    for path in [*REPO.glob("fastnn/**/*.py"), REPO / "README.md", REPO / "CONTRIBUTING.md"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "pip install" in line and "fastnn[" in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_sweep_rows_and_files_for_a_long_grid(small_data: Path, tmp_path: Path, capsys) -> None:
    argv = ["sweep", "--data", str(small_data), *TINY, "--out-dir", str(tmp_path / "r")]
    argv += ["--grid", "eta=0.01", "--grid", "batch_norm=off", "--grid", "seed=0,1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"sweeping 2 runs into {tmp_path / 'r'}"
    assert [line.split()[:3] for line in lines[-2:]] == [["0.01", "off", "0"], ["0.01", "off", "1"]]
    record = json.loads((tmp_path / "r" / "eta=0.01_batch_norm=off_seed=1.json").read_text())
    assert record["config"]["seed"] == 1 and np.isfinite(record["summary"]["test_acc"])
