"""Faults a long run meets (issue 12): a full disk, SIGTERM/SIGHUP from a batch scheduler, a
damaged MNIST cache, several runs sharing one machine."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_idx_folder, run_history

import fastnn.cli as cli
import fastnn.datasets as datasets
import fastnn.fileio as fileio
import fastnn.runs as runs
import fastnn.threads as threads
from fastnn.checkpoint import FILENAME, load_checkpoint
from fastnn.cli import main
from fastnn.fileio import write_atomically

TINY = ["--hidden", "16", "--batch-size", "50", "--threads", "1", "--quiet"]
#: a run slow enough to be stopped mid-way (about 15 ms an epoch here) and quick to finish
SLOW = ["--hidden", "64", "--batch-size", "10", "--threads", "1", "--quiet"]
ENV = {**os.environ, "FASTNN_DATA": "/nonexistent-fastnn-cache", "FASTNN_OFFLINE": "1"}
posix_signals = pytest.mark.skipif(os.name != "posix", reason="SIGTERM/SIGHUP semantics of POSIX")


pytestmark = pytest.mark.usefixtures("forbid_downloads")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_idx_folder(tmp_path / "data", n_train=300, n_test=100)


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_idx_folder(tmp_path_factory.mktemp("slow") / "data", n_train=2000, n_test=200)


# ---- a full disk ----


class _Filling:
    """A file handle on a disk with ``room`` bytes left: writes past it fail with ENOSPC."""

    def __init__(self, handle: Any, room: int) -> None:
        self._handle = handle
        self._room = room

    def write(self, data: Any) -> int:
        data = bytes(data)
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _Filling:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.close()


class FullDisk:
    """Stands in for ``os`` in `fastnn.fileio`: files written atomically into ``folder`` whose
    names start with one of ``names`` fail with ENOSPC after ``room`` bytes, once each time
    `fail` allows (the first ``skip`` such writes succeed)."""

    def __init__(
        self, folder: Path, names: tuple[str, ...], failures: int, skip: int = 0, room: int = 100
    ) -> None:
        self.folder, self.names = folder, names
        self.failures, self.skip, self.room = failures, skip, room
        self.failed: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _target(self, fd: int) -> str | None:
        """The name of the file that the temporary file open as ``fd`` is written for."""
        inode = os.fstat(fd).st_ino
        for entry in os.scandir(self.folder):
            if entry.inode() == inode:
                for name in self.names:
                    if entry.name.startswith(f".{name}."):
                        return name
        return None

    def fdopen(self, fd: int, *args: Any, **kwargs: Any) -> Any:
        target = self._target(fd)
        handle = os.fdopen(fd, *args, **kwargs)
        if target is None:
            return handle
        if self.skip:
            self.skip -= 1
            return handle
        if len(self.failed) >= self.failures:
            return handle
        self.failed.append(target)
        return _Filling(handle, self.room)


def _fill(monkeypatch: pytest.MonkeyPatch, folder: Path, *names: str, **kwargs: Any) -> FullDisk:
    folder.mkdir(parents=True, exist_ok=True)
    disk = FullDisk(folder, names, **kwargs)
    monkeypatch.setattr(fileio, "os", disk)
    return disk


def _no_partial_files(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.endswith(".part")] == []


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "result.json"
    path.write_text("good")

    def fill_the_disk(handle: Any) -> None:
        handle.write(b"half a")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, fill_the_disk)
    assert path.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_failed_checkpoint_is_one_warning_and_the_next_one_is_written(
    data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    ck, out = tmp_path / "ck", tmp_path / "results" / "run.json"
    disk = _fill(monkeypatch, ck, FILENAME, failures=1)
    args = ["train", "--data", str(data), *TINY, "--epochs", "3", "--checkpoint", str(ck)]
    assert main([*args, "--out", str(out)]) == 0
    assert disk.failed == [FILENAME]
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning:")]
    assert warnings == [
        f"warning: could not write checkpoint {ck / FILENAME} after epoch 1 (No space left on "
        "device); training goes on and retries at the next checkpoint"
    ]
    assert f"checkpoint {ck / FILENAME} written again after epoch 2" in err
    _no_partial_files(ck)
    _, state = load_checkpoint(ck)
    assert state.epoch == 3
    assert len(json.loads(out.read_text())["history"]["test_acc"]) == 4


def test_while_the_disk_stays_full_the_last_good_checkpoint_stays(
    data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    ck, out, straight = tmp_path / "ck", tmp_path / "run.json", tmp_path / "straight.json"
    base = ["train", "--data", str(data), *TINY, "--dropout-hidden", "0.8"]
    assert main([*base, "--epochs", "4", "--out", str(straight)]) == 0
    disk = _fill(monkeypatch, ck, FILENAME, failures=10, skip=1)  # epoch 1 fits, then full
    assert main([*base, "--epochs", "4", "--checkpoint", str(ck), "--out", str(out)]) == 0
    assert disk.failed == [FILENAME] * 3
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "after epoch 2 (No space left on device)" in err
    _no_partial_files(ck)
    _, state = load_checkpoint(ck)
    assert state.epoch == 1  # the good one, untouched by three failed writes
    assert run_history(out) == run_history(straight)
    monkeypatch.setattr(fileio, "os", os)  # space again: resuming from it repeats the run
    resumed = tmp_path / "resumed.json"
    assert main(["train", "--resume", str(ck), "--quiet", "--threads", "1", "--out",
                 str(resumed)]) == 0
    assert run_history(resumed) == run_history(straight)


def _last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_when_out_cannot_be_written_the_results_go_to_stdout_exit_3(
    data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    folder = tmp_path / "results"
    straight = tmp_path / "straight.json"
    args = ["train", "--data", str(data), *TINY, "--epochs", "2"]
    assert main([*args, "--out", str(straight)]) == 0
    capsys.readouterr()
    _fill(monkeypatch, folder, "run.json", failures=1)
    assert main([*args, "--out", str(folder / "run.json")]) == cli.EXIT_UNSAVED == 3
    captured = capsys.readouterr()
    assert "numpy/float32" in captured.out  # the summary table
    record = _last_json_line(captured.out)
    expected = json.loads(straight.read_text())
    assert record["config"] == expected["config"]
    timing = ("total_seconds",)
    assert {k: v for k, v in record["summary"].items() if k not in timing} == {
        k: v for k, v in expected["summary"].items() if k not in timing
    }
    for key in ("train_acc", "train_loss", "test_acc", "test_loss"):
        assert record["history"][key] == expected["history"][key]
    assert captured.err == (
        f"fastnn: error: could not write {folder / 'run.json'} (No space left on device); "
        "the results are on stdout, as JSON\n"
    )
    assert list(folder.iterdir()) == []


def test_when_save_model_fails_the_checkpoint_writes_it_later(
    data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from fastnn import Network

    ck, models = tmp_path / "ck", tmp_path / "models"
    args = ["train", "--data", str(data), *TINY, "--epochs", "2", "--batch-norm", "bn"]
    assert main([*args, "--save-model", str(tmp_path / "straight.npz")]) == 0
    _fill(monkeypatch, models, "model.npz", failures=1)
    model = models / "model.npz"
    assert main([*args, "--checkpoint", str(ck), "--save-model", str(model)]) == 3
    err = capsys.readouterr().err
    command = f"fastnn train --resume {ck} --save-model {model}"
    assert err.count("\n") == 1 and f"could not write {model} (No space left" in err
    assert f"`{command}`" in err
    assert list(models.iterdir()) == []
    monkeypatch.setattr(fileio, "os", os)
    assert main(command.split()[1:] + ["--quiet"]) == 0
    with np.load(tmp_path / "straight.npz") as a, np.load(model) as b:
        for name in a.files:
            if name != "__meta__":
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert Network.load(model).config.batch_norm == "bn"


def test_save_model_failing_without_checkpoint_saves_one_in_the_working_folder(
    data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    _fill(monkeypatch, tmp_path / "models", "m.npz", failures=1)
    model = tmp_path / "models" / "m.npz"
    assert main(["train", "--data", str(data), *TINY, "--epochs", "1", "--save-model",
                 str(model)]) == 3
    assert f"checkpoint saved to {runs.INTERRUPT_DIR}" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / runs.INTERRUPT_DIR)[1].epoch == 1


def test_a_sweep_run_file_that_cannot_be_written_is_on_stdout_and_redone_later(
    data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out_dir = tmp_path / "runs"
    args = ["sweep", "--data", str(data), *TINY, "--epochs", "2", "--out-dir", str(out_dir),
            "--grid", "seed=0,1,2"]
    _fill(monkeypatch, out_dir, "seed=1.json", failures=1)
    assert main(args) == 3
    captured = capsys.readouterr()
    assert f"warning: could not write {out_dir / 'seed=1.json'} (No space left" in captured.err
    record = json.loads(next(line for line in captured.out.splitlines() if line.startswith("{")))
    assert record["config"]["seed"] == 1 and len(record["history"]["test_acc"]) == 3
    assert sorted(p.name for p in out_dir.glob("*.json")) == ["seed=0.json", "seed=2.json"]
    _no_partial_files(out_dir)
    monkeypatch.setattr(fileio, "os", os)
    assert main(args) == 0  # seed=1 comes from its final checkpoint; the others are kept
    assert "(2 already there, kept" in capsys.readouterr().out
    assert json.loads((out_dir / "seed=1.json").read_text())["history"] == record["history"]
    assert not (out_dir / runs.SWEEP_CHECKPOINTS).exists()


# ---- SIGTERM and SIGHUP ----


def _default_stop_signals() -> None:
    """In the child: SIGTERM and SIGHUP act as at a terminal, even when this test runs under
    nohup (which makes the child inherit an ignored SIGHUP that fastnn rightly keeps)."""
    for name in ("SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@posix_signals
@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_saves_the_last_epoch_and_the_run_resumes_bit_identical(
    slow_data: Path, tmp_path: Path, name: str, code: int
) -> None:
    ck, out = tmp_path / "ck", tmp_path / "out.json"
    common = ["--data", str(slow_data), *SLOW]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastnn", "train", *common, "--epochs", "200",
         "--checkpoint", str(ck), "--out", str(out)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_stop_signals,
    )
    _wait_for(ck / FILENAME, proc)
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    _, state = load_checkpoint(ck)
    assert 1 <= state.epoch < 30
    assert err == (
        f"terminated by {name} after epoch {state.epoch}; checkpoint saved to {ck}; partial "
        f"results in {out}; continue with: fastnn train --resume {ck}\n"
    )
    record = json.loads(out.read_text())
    assert record["history"]["events"]["interrupted_after_epoch"] == state.epoch
    assert len(record["history"]["test_acc"]) == state.epoch + 1
    assert record["history"]["test_acc"] == state.history.test_acc
    _no_partial_files(ck)
    # resume (to 30 epochs, to keep the test short) = 30 epochs without a stop
    resumed, straight = tmp_path / "resumed.json", tmp_path / "straight.json"
    result = subprocess.run(
        [sys.executable, "-m", "fastnn", "train", "--resume", str(ck), "--epochs", "30",
         "--threads", "1", "--quiet", "--out", str(resumed)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert main(["train", *common, "--epochs", "30", "--out", str(straight)]) == 0
    assert run_history(resumed) == run_history(straight)


@posix_signals
def test_sigterm_in_process_with_out_unwritable_prints_the_partial_results(
    data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import fastnn.checkpoint as ckpt

    ck, folder = tmp_path / "ck", tmp_path / "results"
    save = ckpt.CheckpointWriter.save

    def save_then_terminated(self: Any, state: Any) -> bool:
        saved = save(self, state)
        if state.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, between two epochs
        return saved

    monkeypatch.setattr(ckpt.CheckpointWriter, "save", save_then_terminated)
    _fill(monkeypatch, folder, "run.json", failures=1)
    before = signal.getsignal(signal.SIGTERM)
    args = ["train", "--data", str(data), *TINY, "--epochs", "50", "--checkpoint", str(ck),
            "--out", str(folder / "run.json")]
    assert main(args) == 143
    assert signal.getsignal(signal.SIGTERM) is before
    captured = capsys.readouterr()
    record = _last_json_line(captured.out)
    assert record["history"]["events"]["interrupted_after_epoch"] == 2
    assert captured.err == (
        f"terminated by SIGTERM after epoch 2; checkpoint saved to {ck}; could not write "
        f"{folder / 'run.json'} (No space left on device); the partial results are on stdout, "
        f"as JSON; continue with: fastnn train --resume {ck}\n"
    )
    assert load_checkpoint(ck)[1].epoch == 2


@posix_signals
def test_stop_signal_handlers_are_restored_and_an_ignored_sighup_stays_ignored(
    monkeypatch,
) -> None:
    seen = {}

    def look(args: Any) -> int:
        seen["term"] = signal.getsignal(signal.SIGTERM)
        seen["hup"] = signal.getsignal(signal.SIGHUP)
        return 0

    def mine(signum: int, frame: Any) -> None:
        raise AssertionError("not to be called")

    monkeypatch.setitem(cli.COMMANDS, "info", look)
    old_term = signal.signal(signal.SIGTERM, mine)
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        assert main(["info"]) == 0
        assert seen["term"] is not mine and callable(seen["term"])
        assert seen["hup"] is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)


@pytest.fixture(scope="module")
def reference_sweep(slow_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three 30-epoch points, swept without a stop."""
    out_dir = tmp_path_factory.mktemp("reference")
    assert main(["sweep", "--data", str(slow_data), *SLOW, "--epochs", "30",
                 "--grid", "seed=0,1,2", "--out-dir", str(out_dir)]) == 0
    return out_dir


def _sweep(slow_data: Path, out_dir: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastnn", "sweep", "--data", str(slow_data), *SLOW,
            "--epochs", str(epochs), "--grid", "seed=0,1,2", "--out-dir", str(out_dir), *extra]


@posix_signals
def test_sigterm_keeps_finished_sweep_points_and_resumes_the_running_one(
    slow_data: Path, reference_sweep: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "runs"
    checkpoints = out_dir / runs.SWEEP_CHECKPOINTS
    proc = subprocess.Popen(_sweep(slow_data, out_dir, 30), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(checkpoints / "seed=1" / FILENAME, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err == (
        f"fastnn: terminated by SIGTERM: 1 of 3 runs done, their files are in {out_dir}; the "
        "running ones continue from their checkpoints when the same command runs again\n"
    )
    finished = out_dir / "seed=0.json"
    assert run_history(finished) == run_history(reference_sweep / "seed=0.json")
    stamp = finished.stat().st_mtime_ns
    assert 1 <= load_checkpoint(checkpoints / "seed=1")[1].epoch < 30
    assert not (out_dir / "seed=1.json").exists() and not (checkpoints / "seed=2").exists()
    result = subprocess.run(_sweep(slow_data, out_dir, 30), env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "sweeping 3 runs into" in result.stdout and "(1 already there, kept" in result.stdout
    assert "done seed=0" not in result.stdout and finished.stat().st_mtime_ns == stamp
    for seed in (0, 1, 2):
        name = f"seed={seed}.json"
        assert run_history(out_dir / name) == run_history(reference_sweep / name), name
    assert not checkpoints.exists()


@posix_signals
def test_sigterm_to_a_parallel_sweeps_process_group_stops_every_worker(
    slow_data: Path, reference_sweep: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "runs"
    checkpoints = out_dir / runs.SWEEP_CHECKPOINTS
    proc = subprocess.Popen(
        _sweep(slow_data, out_dir, 2000, "--workers", "2"), env=ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    _wait_for(checkpoints / "seed=0" / FILENAME, proc)
    _wait_for(checkpoints / "seed=1" / FILENAME, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: to every process of the job
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.count("\n") == 1 and "0 of 3 runs done" in err
    for seed in (0, 1):  # the workers are gone: their checkpoints no longer change
        path = checkpoints / f"seed={seed}" / FILENAME
        stamp = path.stat().st_mtime_ns
        time.sleep(0.3)
        assert path.stat().st_mtime_ns == stamp
        _no_partial_files(path.parent)
    result = subprocess.run(_sweep(slow_data, out_dir, 30, "--workers", "2"), env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for seed in (0, 1, 2):
        name = f"seed={seed}.json"
        assert run_history(out_dir / name) == run_history(reference_sweep / name), name


def test_a_sweep_keeps_finished_points_unless_redo_or_changed(
    data: Path, tmp_path: Path, capsys
) -> None:
    out_dir = tmp_path / "runs"
    args = ["sweep", "--data", str(data), "--hidden", "16", "--batch-size", "50", "--threads",
            "1", "--out-dir", str(out_dir), "--grid", "eta=0.1,0.2"]
    assert main([*args, "--epochs", "1"]) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.json")}
    table = capsys.readouterr().out.splitlines()[-4:]
    assert main([*args, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "(2 already there, kept; --redo trains them again)" in out and "done" not in out
    assert out.splitlines()[-4:] == table
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.json")} == stamps
    assert main([*args, "--epochs", "1", "--redo"]) == 0
    assert capsys.readouterr().out.count("done eta=") == 2
    assert main([*args, "--epochs", "2"]) == 0  # another config: trained again
    assert "already there" not in capsys.readouterr().out
    assert len(json.loads((out_dir / "eta=0.1.json").read_text())["history"]["test_acc"]) == 3
    other = make_idx_folder(tmp_path / "other", n_train=300, n_test=100, seed=5)
    assert main([*args, "--epochs", "2", "--data", str(other)]) == 0  # other data: again
    assert "already there" not in capsys.readouterr().out


# ---- a damaged cache ----


def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, bytes]]:
    """A cache folder of generated MNIST-named files, whose checksums count as published."""
    folder = make_idx_folder(tmp_path / "cache", n_train=60, n_test=20)
    files = {name: (folder / name).read_bytes() for name in datasets.MNIST_FILES}
    monkeypatch.setattr(
        datasets,
        "MNIST_SHA256",
        {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    )
    return folder, files


def _statuses(out: str) -> dict[str, tuple[str, str]]:
    rows = [line.split() for line in out.splitlines()]
    return {Path(path).name: (status, path) for status, path in rows}


def _flip_a_byte(path: Path) -> None:
    """Change one byte in place, keeping the size and the modification time."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns


def test_data_verify_reports_each_file(tmp_path: Path, monkeypatch, capsys) -> None:
    folder, _ = _cache(tmp_path, monkeypatch)
    assert main(["data", "verify", "--data-dir", str(folder)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert _statuses(captured.out) == {
        name: ("ok", str(folder / name)) for name in datasets.MNIST_FILES
    }
    _flip_a_byte(folder / "train-images-idx3-ubyte")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    assert main(["data", "verify", "--data-dir", str(folder)]) == 2
    captured = capsys.readouterr()
    statuses = _statuses(captured.out)
    assert statuses["train-images-idx3-ubyte"] == (
        "damaged", str(folder / "train-images-idx3-ubyte")
    )
    assert statuses["t10k-labels-idx1-ubyte"] == (
        "missing", str(folder / "t10k-labels-idx1-ubyte")
    )
    assert statuses["train-labels-idx1-ubyte"][0] == "ok"
    assert captured.err == (
        f"fastnn: error: 2 of 4 MNIST files in {folder} are missing or damaged; run "
        f"`fastnn data fetch --data-dir {folder}`\n"
    )


def test_data_fetch_repairs_the_cache_and_is_refused_offline(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    folder, files = _cache(tmp_path, monkeypatch)
    monkeypatch.setenv("FASTNN_DATA", str(folder))  # no --data-dir: $FASTNN_DATA
    asked: list[list[str]] = []

    class Mirror:
        name = "test mirror"

        def fetch(self, names: list[str]) -> dict[str, bytes]:
            asked.append(list(names))
            return {name: files[name] for name in names}

    monkeypatch.setattr(datasets, "DEFAULT_SOURCES", (Mirror(),))
    damaged = folder / "t10k-images-idx3-ubyte"
    _flip_a_byte(damaged)
    monkeypatch.setenv("FASTNN_OFFLINE", "1")
    assert main(["data", "fetch"]) == 2
    captured = capsys.readouterr()
    assert _statuses(captured.out)["t10k-images-idx3-ubyte"][0] == "damaged"
    assert captured.err.startswith("fastnn: error: FASTNN_OFFLINE=1: not fetching 1 MNIST file")
    assert asked == [] and damaged.read_bytes() != files["t10k-images-idx3-ubyte"]
    monkeypatch.delenv("FASTNN_OFFLINE")
    assert main(["data", "fetch"]) == 0
    assert asked == [["t10k-images-idx3-ubyte"]]
    assert damaged.read_bytes() == files["t10k-images-idx3-ubyte"]
    assert {s for s, _ in _statuses(capsys.readouterr().out).values()} == {"ok"}
    assert main(["data", "fetch"]) == 0 and len(asked) == 1  # all ok: nothing fetched
    assert main(["data", "verify"]) == 0


# ---- several runs on one machine ----


@pytest.mark.parametrize("quota, expected", [(1.0, 1), (2.5, 3), (None, 4), (16.0, 4)])
def test_usable_cpus_honours_the_cgroup_quota(
    monkeypatch, quota: float | None, expected: int
) -> None:
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: quota)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert threads.usable_cpus() == expected


# ---- seeds beyond 64 bits (they wrapped onto smaller seeds) ----


@pytest.mark.parametrize("seed", [2**64, 2**70, 2**64 + 5, -1])
def test_a_seed_outside_64_bits_is_refused_not_wrapped(seed: int) -> None:
    import fastnn
    from fastnn import rng
    from fastnn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*64 - 1\]"):
        fastnn.Config(seed=seed)
    with pytest.raises(ValueError, match="outside 0..2"):
        rng.fold_key(seed, rng.STREAM_INIT)
    assert fastnn.Config(seed=2**64 - 1).seed == 2**64 - 1  # the largest seed still works


def test_a_seed_outside_64_bits_is_exit_2_before_any_data_is_read(capsys) -> None:
    assert main(["train", "--seed", str(2**70), "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fastnn: error: --seed must be an integer in [0, 2**64 - 1]")


def test_an_estimators_seed_outside_64_bits_is_refused() -> None:
    pytest.importorskip("sklearn")
    from fastnn import MLPClassifier
    from fastnn.errors import ConfigError

    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*64 - 1\]"):
        estimator = MLPClassifier(hidden=(4,), max_iter=1, seed=2**70, backend="numpy")
        estimator.fit(x, np.arange(20) % 2)


# ---- targets and inputs a Trainer used to train on (the estimators refuse them) ----


def _small_data(rows: int = 40) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(0)
    return gen.normal(size=(rows, 4)), np.arange(rows) % 3


def _trainer(**options: Any) -> Any:
    import fastnn
    from fastnn.train import Trainer

    options = {"hidden": (8,), "n_inputs": 4, "n_outputs": 3, "epochs": 1, **options}
    return Trainer(fastnn.Config(backend="numpy", **options), threads=1)


def _damaged(kind: str) -> tuple[dict[str, np.ndarray], str]:
    """Arguments of Trainer.fit with one fault, and the message it must raise."""
    x, labels = _small_data()
    one_hot = np.eye(3)[labels]
    args = {"x_train": x, "t_train": one_hot, "x_test": x[:10], "t_test": labels[:10]}
    if kind == "minus five":
        args["t_train"][3] = [-5, 0, 0]
        return args, "t_train: one-hot rows must hold one 1 and zeros otherwise; row 3 holds -5"
    if kind == "two":
        args["t_train"][5] = [0, 2, 0]
        return args, "t_train: one-hot rows must hold one 1 and zeros otherwise; row 5 holds 2"
    if kind == "zero row":
        args["t_train"][2] = 0
        return args, "t_train: one-hot rows must hold one 1 and zeros otherwise; row 2 holds no 1"
    if kind == "two ones":
        args["t_train"][4] = [1, 1, 0]
        return args, "t_train: one-hot rows must hold one 1 and zeros otherwise; row 4 holds 2 ones"
    if kind == "nan x":
        args["x_train"] = x.copy()
        args["x_train"][7, 1] = args["x_train"][9, 0] = np.nan
        return args, r"x_train: 2 values are NaN or infinite \(first at row 7\)"
    if kind == "inf x_test":
        args["x_test"] = x[:10].copy()
        args["x_test"][4, 2] = -np.inf
        return args, r"x_test: 1 value is NaN or infinite \(first at row 4\)"
    if kind == "nan one-hot":
        args["t_train"][6, 0] = np.nan
        return args, r"t_train: 1 value is NaN or infinite \(first at row 6\)"
    if kind == "nan labels":
        args["t_test"] = labels[:10].astype(np.float64)
        args["t_test"][8] = np.nan
        return args, r"t_test: 1 value is NaN or infinite \(first at row 8\)"
    if kind == "complex x":
        args["x_train"] = x + 1j
        return args, "x_train: complex values; give real numbers"
    assert kind == "complex t"
    args["t_test"] = labels[:10] + 0j
    return args, "t_test: complex values; give real numbers"


@pytest.mark.parametrize("kind", [
    "minus five", "two", "zero row", "two ones", "nan x", "inf x_test", "nan one-hot",
    "nan labels", "complex x", "complex t",
])
def test_trainer_fit_refuses_bad_targets_and_inputs_naming_them(kind: str) -> None:
    import warnings

    from fastnn.errors import DataError

    args, message = _damaged(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning, no RuntimeWarning: one DataError
        with pytest.raises(DataError, match=message):
            _trainer().fit(**args)


def test_accuracy_and_loss_checks_targets_as_fit_does() -> None:
    from fastnn.errors import DataError

    x, labels = _small_data()
    trainer = _trainer()
    trainer.fit(x, labels)  # integer labels: the normal case
    assert trainer.fit(x, np.eye(3)[labels]).train_loss[-1] > 0  # proper one-hot rows too
    one_hot = np.eye(3)[labels]
    one_hot[3] = [-5, 0, 0]
    with pytest.raises(DataError, match="t: one-hot rows must hold one 1 .* row 3 holds -5"):
        trainer.accuracy_and_loss(x, one_hot)
    bad_x = x.copy()
    bad_x[1, 1] = np.nan
    with pytest.raises(DataError, match=r"x: 1 value is NaN or infinite \(first at row 1\)"):
        trainer.accuracy_and_loss(bad_x, labels)


def test_a_regression_takes_real_targets_but_only_finite_ones() -> None:
    from fastnn.errors import DataError

    x, _ = _small_data()
    targets = np.column_stack([x.sum(axis=1), -2.5 * x[:, 0]])
    trainer = _trainer(n_outputs=2, output="identity_mse", eta=0.01)
    assert np.isfinite(trainer.fit(x, targets).train_loss[-1])
    targets[11, 1] = np.inf
    with pytest.raises(DataError, match=r"t_train: 1 value is NaN or infinite \(first at row 11\)"):
        trainer.fit(x, targets)


# ---- inputs whose range or spread overflows float64 ----


@pytest.mark.parametrize("method, axis, scale, message", [
    ("min_max", None, 1e308, r"x_train: cannot normalise \(min_max\): the scale is inf"),
    ("min_max", 0, 1e308, r"x_train: cannot normalise \(min_max\): column 2's scale is inf"),
    ("z_score", None, 1e300, r"x_train: cannot normalise \(z_score\): the scale is inf"),
    ("z_score", 0, 1e300, r"x_train: cannot normalise \(z_score\): column 2's scale is inf"),
    ("standard", None, 1e300, r"x_train: cannot normalise \(standard\): column 2's scale is inf"),
])
def test_inputs_whose_statistics_overflow_are_refused_naming_the_column(
    method: str, axis: int | None, scale: float, message: str
) -> None:
    import warnings

    from fastnn.errors import DataError

    x, labels = _small_data()
    x[:, 2] = np.sign(x[:, 2]) * scale  # +-scale: the range (or spread) is beyond float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning and no NaN training: one DataError
        with pytest.raises(DataError, match=message):
            _trainer(normalize=method, normalize_axis=axis).fit(x, labels)


def test_test_rows_that_overflow_when_normalised_are_refused() -> None:
    from fastnn.errors import DataError

    x, labels = _small_data()
    x[:, 0] = -np.abs(x[:, 0]) * 1e307  # training range of column 0: about [-2e307, 0]
    x[0, 0] = -1e308
    x_test = x[:10].copy()
    x_test[3, 0] = 1.7e308  # 1.7e308 - (-1e308) overflows
    with pytest.raises(DataError, match=r"x_test: inputs too large to normalise .* row 3"):
        _trainer(normalize_axis=0).fit(x, labels, x_test, labels[:10])


@pytest.mark.parametrize("scale, message", [
    (0.0, "column 1's scale is 0 "), (np.inf, "column 1's scale is inf"),
    (np.nan, "column 1's scale is nan"), (-1.0, "column 1's scale is -1 "),
])
def test_a_model_file_whose_normaliser_scale_is_unusable_is_refused(
    tmp_path: Path, scale: float, message: str
) -> None:
    import fastnn
    from fastnn.errors import DataError

    x, labels = _small_data()
    trainer = _trainer(normalize="z_score", normalize_axis=0)
    trainer.fit(x, labels)
    path = tmp_path / "model.npz"
    trainer.save(path)
    assert np.array_equal(fastnn.Model.load(path).predict(x), trainer.predict(x))
    with np.load(path, allow_pickle=False) as saved:
        arrays = {name: saved[name] for name in saved.files}
    arrays["normalizer_scale"] = arrays["normalizer_scale"].copy()
    arrays["normalizer_scale"][1] = scale
    damaged = tmp_path / "damaged.npz"
    np.savez(damaged, **arrays)
    with pytest.raises(DataError, match=f"damaged.npz: damaged normaliser in the model file: "
                                        f"{message}"):
        fastnn.Model.load(damaged)
