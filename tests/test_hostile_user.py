"""What a careless or hostile user does to the files and streams of the command line: a device
or a link as an output, one path for two outputs, a reader that goes away, crafted run files.
Each test injects the fault."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import make_idx_folder

from fastnn.cli import main
from fastnn.fileio import write_atomically

TINY = ["--hidden", "8", "--epochs", "1", "--batch-size", "50", "--quiet"]
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("forbid_downloads")


# ---- outputs that are not regular files ----


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_output_is_written_in_place_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    write_atomically(fifo, lambda handle: handle.write(b"through the pipe"))
    reader.join(timeout=10)
    assert received == [b"through the pipe"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a FIFO, not a regular file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary left


def test_a_symlink_output_is_written_through_to_its_target(tmp_path: Path) -> None:
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    assert write_atomically(link, lambda handle: handle.write(b"new")) == target
    assert link.is_symlink() and target.read_text() == "new" and link.read_text() == "new"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "made" )
    write_atomically(dangling, lambda handle: handle.write(b"made"))
    assert dangling.is_symlink() and (tmp_path / "made").read_text() == "made"


def test_train_out_dev_null_keeps_the_device(small_data: Path) -> None:
    """The up-front checks and the write leave /dev/null a character device."""
    if not os.path.exists(os.devnull) or not os.access(os.devnull, os.W_OK):
        pytest.skip("no writable null device")
    assert main(["train", "--data", str(small_data), *TINY, "--out", os.devnull]) == 0
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


# ---- one path for two outputs ----


@pytest.mark.parametrize("second", ["--save-model", "--log-jsonl", "--log-csv"])
def test_one_path_for_two_outputs_is_exit_2_before_training(
        small_data: Path, tmp_path: Path, second: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.json"
    via_other_name = tmp_path / "sub" / ".." / "x.json"
    (tmp_path / "sub").mkdir()
    argv = ["train", "--data", str(small_data), *TINY, "--out", str(out), second,
            str(via_other_name)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{second} {via_other_name}: the same file as --out {out}" in err
    assert err.count("\n") == 1 and not out.exists()


def test_an_output_inside_the_checkpoint_is_refused(small_data: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "ck"
    argv = ["train", "--data", str(small_data), *TINY, "--checkpoint", str(ck),
            "--save-model", str(ck / "checkpoint.npz")]
    assert main(argv) == 2
    assert "the same file as --save-model" in capsys.readouterr().err


@pytest.mark.parametrize(("files", "folder"), [
    (["--out", "x.json"], "x.json"),
    (["--log-csv", "a"], "a/ck"),
])
def test_a_checkpoint_folder_over_an_output_file_is_refused(
        small_data: Path, tmp_path: Path, files: list[str], folder: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--data", str(small_data), *TINY, files[0], str(tmp_path / files[1]),
            "--checkpoint", str(tmp_path / folder)]
    assert main(argv) == 2
    assert "is to be written; give them different names" in capsys.readouterr().err
    assert not (tmp_path / files[1]).exists()  # refused before any folder was made


@pytest.mark.parametrize("command", ["train", "predict"])
def test_an_output_ending_in_a_slash_names_a_folder(
        small_data: Path, tmp_path: Path, command: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = f"{tmp_path / 'results'}/"
    argv = (["train", "--data", str(small_data), *TINY] if command == "train"
            else ["predict", str(tmp_path / "m.npz"), str(tmp_path / "x.csv")])
    assert main([*argv, "--out", out]) == 2
    assert f"--out {out}: ends with '/', so names a folder" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_a_replaced_output_keeps_its_permissions(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    target.write_text("old")
    target.chmod(0o600)
    write_atomically(target, lambda handle: handle.write(b"new"))
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    target.chmod(0o640)
    write_atomically(target, lambda handle: handle.write(b"newer"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_outputs_to_the_null_device_may_share_it(small_data: Path) -> None:
    if not os.access(os.devnull, os.W_OK):
        pytest.skip("no writable null device")
    argv = ["train", "--data", str(small_data), *TINY, "--out", os.devnull, "--log-csv",
            os.devnull]
    assert main(argv) == 0


# ---- a reader that goes away ----


def test_a_closed_stdout_stops_the_printing_never_the_run(small_data: Path,
                                                          tmp_path: Path) -> None:
    """``fastnn train ... | head -1``: the run goes on to the end and writes --out, exit 0."""
    out = tmp_path / "run.json"
    command = [sys.executable, "-m", "fastnn", "train", "--data", str(small_data), "--hidden",
               "8", "--epochs", "40", "--batch-size", "200", "--out",
               str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), FASTNN_OFFLINE="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.readline()
    process.stdout.close()  # as head does after its line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert "Error" not in stderr and "Traceback" not in stderr, stderr
    record = json.loads(out.read_text())
    assert len(record["history"]["train_acc"]) == 41


# ---- crafted run files ----


def _run_file(path: Path, history: object) -> Path:
    path.write_text(json.dumps({"config": {}, "history": history}))
    return path


@pytest.mark.parametrize(("history", "fragment"), [
    ({"train_acc": [0.1, 0.2], "train_loss": [1.0]}, "train_loss has 1 entries, train_acc 2"),
    ({"train_acc": [0.1], "train_loss": [1.0], "test_acc": [0.1, 0.2], "test_loss": [1.0]},
     "test_acc has 2 entries, train_acc 1"),
    ({"train_acc": [0.1], "train_loss": [1.0], "test_acc": ["x"], "test_loss": [1.0]},
     "test_acc holds a str, not a number"),
    ({"train_acc": 5, "train_loss": [1.0]}, "train_acc is a int, not a list"),
    ({"train_acc": [0.1], "train_loss": [1.0], "events": []}, "events is a list"),
    ({"train_acc": [0.1], "train_loss": [1.0], "bn_params": {"gamma1": [[1.0], [2.0]]}},
     "bn_params gamma1: expected 1 lists"),
    ([1, 2], "the history is a list"),
])
@pytest.mark.parametrize("command", ["summary", "plot"])
def test_crafted_run_files_are_not_run_files(
        tmp_path: Path, history: object, fragment: str, command: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_file(tmp_path / "run.json", history)
    argv = [command, str(run)] + (["--out", str(tmp_path / "c.png")] if command == "plot" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{run}: not a fastnn run file" in err and fragment in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["summary", "plot"])
def test_a_deeply_nested_run_file_is_not_a_run_file(
        tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "deep.json"
    run.write_text("[" * 100_000 + "]" * 100_000)
    argv = [command, str(run)] + (["--out", str(tmp_path / "c.png")] if command == "plot" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{run}: not a fastnn run file (nested too deeply)" in err and err.count("\n") == 1


# ---- damaged checkpoints and model files ----


def _checkpointed(small_data: Path, tmp_path: Path) -> Path:
    ck = tmp_path / "ck"
    assert main(["train", "--data", str(small_data), *TINY, "--checkpoint", str(ck),
                 "--save-model", str(tmp_path / "model.npz")]) == 0
    return ck


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "cut":
        del data[len(data) // 2:]
    else:  # flip bytes in the middle (inside a stored array)
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["cut", "flipped"])
def test_a_damaged_checkpoint_is_exit_2_naming_it(
        small_data: Path, tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    ck = _checkpointed(small_data, tmp_path)
    _damage(ck / "checkpoint.npz", how)
    capsys.readouterr()
    assert main(["train", "--resume", str(ck)]) == 2
    err = capsys.readouterr().err
    assert f"{ck / 'checkpoint.npz'}: " in err and "internal error" not in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("how", ["cut", "flipped"])
def test_a_damaged_model_file_is_refused(small_data: Path, tmp_path: Path, how: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from fastnn import Model
    from fastnn.errors import DataError

    _checkpointed(small_data, tmp_path)
    model = tmp_path / "model.npz"
    _damage(model, how)
    with pytest.raises(DataError, match="model.npz"):
        Model.load(model)
    capsys.readouterr()
    assert main(["plot", "--kind", "weights", str(model), "--out", str(tmp_path / "w.png")]) == 2
    err = capsys.readouterr().err
    assert "model.npz: not a fastnn model file" in err and err.count("\n") == 1


def _rewrite_checkpoint(ck: Path, change: dict[str, object]) -> None:
    import numpy as np

    path = ck / "checkpoint.npz"
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: np.array(data[name]) for name in data.files}
    for name, value in change.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value  # type: ignore[assignment]
    np.savez(path, **arrays)


@pytest.mark.parametrize(("change", "fragment"), [
    ("nan", "array W1 holds NaN or infinite values"),
    ("complex", "array W1 holds complex128, not real floating-point numbers"),
    ("int8", "array W1 holds int8, not real floating-point numbers"),
    ("extra", "arrays a run of its config does not have: smuggled"),
    ("missing", "array b2 is missing"),
    ("shape", "array W2 has shape (3, 3), expected (8, 10)"),
])
def test_a_checkpoint_with_wrong_arrays_is_refused(
        small_data: Path, tmp_path: Path, change: str, fragment: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    ck = _checkpointed(small_data, tmp_path)
    with np.load(ck / "checkpoint.npz") as data:
        w1 = np.array(data["W1"])
    bad = {
        "nan": {"W1": np.where(np.arange(w1.size).reshape(w1.shape) == 3, np.nan, w1)},
        "complex": {"W1": w1.astype(np.complex128)},
        "int8": {"W1": w1.astype(np.int8)},
        "extra": {"smuggled": np.zeros(3)},
        "missing": {"b2": None},
        "shape": {"W2": np.zeros((3, 3))},
    }[change]
    _rewrite_checkpoint(ck, bad)
    capsys.readouterr()
    assert main(["train", "--resume", str(ck)]) == 2
    err = capsys.readouterr().err
    assert "damaged checkpoint" in err and fragment in err, err


def test_a_sweep_retrains_a_point_whose_checkpoint_is_damaged(small_data: Path,
                                                              tmp_path: Path) -> None:
    from fastnn import Config
    from fastnn.runs import resumable_state

    ck = _checkpointed(small_data, tmp_path)
    _damage(ck / "checkpoint.npz", "cut")
    config = Config(hidden=(8,), epochs=1, batch_size=50)
    assert resumable_state(ck, config, str(small_data)) is None  # trained afresh, no abort


# ---- resuming ----


def test_resume_on_other_data_is_refused_unless_asked_for(
        small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = _checkpointed(small_data, tmp_path)
    other = make_idx_folder(tmp_path / "other", n_train=200, n_test=50, seed=5)
    capsys.readouterr()
    argv = ["train", "--resume", str(ck), "--data", str(other), "--epochs", "2", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--data {other}: not the data the checkpoint was trained on" in err
    assert "--resume-other-data" in err and err.count("\n") == 1
    moved = tmp_path / "moved"
    small_data.rename(moved)  # the same data elsewhere: the checksum agrees
    assert main(["train", "--resume", str(ck), "--data", str(moved), "--epochs", "2",
                 "--quiet"]) == 0
    argv[argv.index("--epochs") + 1] = "3"
    assert main([*argv, "--resume-other-data"]) == 0


def test_a_resume_continues_into_the_outputs_of_the_run(small_data: Path,
                                                        tmp_path: Path) -> None:
    ck, out, log = tmp_path / "ck", tmp_path / "run.json", tmp_path / "log.csv"
    assert main(["train", "--data", str(small_data), *TINY, "--checkpoint", str(ck), "--out",
                 str(out), "--log-csv", str(log)]) == 0
    assert main(["train", "--resume", str(ck), "--epochs", "3", "--quiet"]) == 0
    assert len(json.loads(out.read_text())["history"]["train_acc"]) == 4
    epochs = [line.split(",")[0] for line in log.read_text().splitlines()[1:]]
    assert epochs == ["0", "1", "2", "3"]
    other = tmp_path / "other.json"  # an output given on the resume wins
    assert main(["train", "--resume", str(ck), "--epochs", "4", "--quiet", "--out",
                 str(other)]) == 0
    assert len(json.loads(other.read_text())["history"]["train_acc"]) == 5
    assert len(json.loads(out.read_text())["history"]["train_acc"]) == 4


def test_resume_other_data_needs_resume(small_data: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(small_data), *TINY, "--resume-other-data"]) == 2
    assert "--resume-other-data needs --resume DIR" in capsys.readouterr().err


# ---- two sweeps into one folder ----


def test_a_second_sweep_into_a_locked_folder_is_exit_2(
        small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fcntl")
    from fastnn.runs import SweepFolder

    out = tmp_path / "runs"
    out.mkdir()
    argv = ["sweep", "--data", str(small_data), "--grid", "eta=0.1,0.2", "--hidden", "8",
            "--epochs", "1", "--batch-size", "50", "--quiet", "--out-dir", str(out)]
    with SweepFolder(out, str(small_data), checkpointing=True).locked():
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--out-dir {out}: another sweep (pid {os.getpid()} on" in err
        assert err.count("\n") == 1 and not list(out.glob("*.json"))
    assert main(argv) == 0  # released with its holder
    assert len(list(out.glob("*.json"))) == 2


def test_a_killed_sweeps_lock_is_no_obstacle(small_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("fcntl")
    out = tmp_path / "runs"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from fastnn.runs import SweepFolder; lock = SweepFolder(Path(sys.argv[1]), None, "
         "True).locked(); lock.__enter__(); print('held', flush=True); time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    holder.kill()
    holder.wait(timeout=30)
    argv = ["sweep", "--data", str(small_data), "--grid", "eta=0.1", "--hidden", "8",
            "--epochs", "1", "--batch-size", "50", "--quiet", "--out-dir", str(out)]
    assert main(argv) == 0


# ---- a sweep's workers outlive no parent ----


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat_line.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_the_workers_of_a_killed_sweep_exit(small_data: Path, tmp_path: Path) -> None:
    import time

    command = [sys.executable, "-m", "fastnn", "sweep", "--data", str(small_data), "--grid",
               "eta=0.1,0.2", "--hidden", "8", "--epochs", "100000", "--batch-size", "50",
               "--quiet", "--workers", "2", "--out-dir", str(tmp_path / "runs")]
    sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=dict(os.environ, PYTHONPATH=str(REPO), FASTNN_OFFLINE="1"))
    tracked: list[int] = []
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.2)
            # the workers, not the resource tracker: they run fastnn's code
            workers = [pid for pid in _children(sweep.pid)
                       if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) >= 2, "the sweep did not start its workers"
        tracked = _children(sweep.pid)
        sweep.kill()
        sweep.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(pid) for pid in tracked):
            time.sleep(0.2)
        assert not [pid for pid in tracked if _alive(pid)], "orphaned workers still run"
    finally:  # leave nothing running, whatever happened
        if sweep.poll() is None:
            tracked += _children(sweep.pid)
            sweep.kill()
        for pid in tracked:
            if _alive(pid):
                os.kill(pid, 9)


# ---- small ones ----


def test_an_idx_size_of_2_31_is_read_unsigned(tmp_path: Path) -> None:
    import struct

    from fastnn.datasets import read_idx
    from fastnn.errors import DataError

    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 2**31) + b"\x00")
    with pytest.raises(DataError) as caught:
        read_idx(path)
    assert "2147483648" in str(caught.value) and "-2147483648" not in str(caught.value)


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_symlink_loop_as_data_is_exit_2(tmp_path: Path, command: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    argv = ["train", "--data", str(a), *TINY] if command == "train" else [
        "sweep", "--data", str(a), "--grid", "eta=0.1", "--epochs", "1", "--out-dir",
        str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{a}: " in err and "symbolic links" in err, err  # the loop, not "not found"
    assert "internal error" not in err and err.count("\n") == 1


def test_a_symlink_loop_as_an_output_is_exit_2(small_data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.symlink_to(b)
    b.symlink_to(a)
    assert main(["train", "--data", str(small_data), *TINY, "--out", str(a)]) == 2
    err = capsys.readouterr().err
    assert f"--out {a}: cannot be written" in err and err.count("\n") == 1


def test_more_threads_than_cpus_are_capped_with_a_notice(
        small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastnn.threads import usable_cpus

    out = tmp_path / "run.json"
    assert main(["train", "--data", str(small_data), *TINY, "--threads", "100000", "--out",
                 str(out)]) == 0
    err = capsys.readouterr().err
    usable = usable_cpus()
    assert (f"notice: --threads 100000 is more than the {usable} CPU(s) this process may "
            f"use; using {usable}") in err
    assert json.loads(out.read_text())["environment"]["threads"] == usable


def test_the_api_caps_threads_too() -> None:
    from fastnn.backends import get_backend
    from fastnn.threads import ThreadsCapped, usable_cpus

    with pytest.warns(ThreadsCapped, match="threads 100000 is more than"):
        workspace = get_backend("numpy").workspace(threads=100000)
    assert workspace.threads == usable_cpus()


def test_a_network_too_large_for_memory_is_exit_2_before_work(
        small_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    start = time.monotonic()
    assert main(["train", "--data", str(small_data), *TINY[2:], "--hidden", "100000,100000"]) \
        == 2
    assert time.monotonic() - start < 30  # refused, not attempted
    err = capsys.readouterr().err
    assert "the network (10,079,600,010 parameters in float32) needs about" in err, err
    assert "GiB, more than the" in err and err.count("\n") == 1


# ---- what a new user sees ----


def test_the_table_labels_a_run_by_its_options(small_data: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(small_data), "--hidden", "8", "--epochs", "1",
                 "--batch-size", "50", "--batch-norm", "bn", "--eta", "0.5", "--quiet"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].startswith("numpy/float32 hidden=8 eta=0.5 batch_size=50 epochs=1 "
                              "batch_norm=bn ")


def test_epoch_lines_show_the_validation_loss_that_decides(
        small_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(small_data), "--hidden", "8", "--epochs", "2",
                 "--batch-size", "50", "--early-stopping", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and all(" val acc " in line and " loss " in line for line in lines)


# ---- fastnn predict ----


@pytest.fixture
def saved_model(small_data: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model.npz"
    assert main(["train", "--data", str(small_data), *TINY, "--save-model", str(model)]) == 0
    return model


def test_predict_gives_the_models_labels_for_idx_npy_and_csv(
        saved_model: Path, small_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from fastnn import Model
    from fastnn.datasets import read_idx

    images = next(small_data.glob("t10k-images-idx3-ubyte*"))
    x = read_idx(images)
    expected = [str(v) for v in Model.load(saved_model).predict(x)]
    capsys.readouterr()
    assert main(["predict", str(saved_model), str(images)]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    np.save(tmp_path / "x.npy", x[:7])
    out = tmp_path / "labels.txt"
    assert main(["predict", str(saved_model), str(tmp_path / "x.npy"), "--out", str(out)]) == 0
    assert out.read_text().splitlines() == expected[:7]
    header = ",".join(f"p{i}" for i in range(784))
    np.savetxt(tmp_path / "x.csv", x[:5].reshape(5, -1), delimiter=",", fmt="%d",
               header=header, comments="")
    assert main(["predict", str(saved_model), str(tmp_path / "x.csv"), "--proba"]) == 0
    rows = [list(map(float, line.split(","))) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose(rows, Model.load(saved_model).predict_proba(x[:5]), rtol=1e-6)


@pytest.mark.parametrize(("content", "fragment"), [
    ("1,2\n3\n", "rows of [1, 2] values"),
    ("a,b\n", "no rows of numbers"),
    ("1,2,3\n", "bad.csv: rows of 3 values; the model takes rows of 784"),
])
def test_predict_refuses_bad_inputs_with_exit_2(
        saved_model: Path, tmp_path: Path, content: str, fragment: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    capsys.readouterr()
    assert main(["predict", str(saved_model), str(bad)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err


def test_predict_refuses_a_file_that_is_no_model(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "fake.npz"
    fake.write_bytes(b"not a zip")
    (tmp_path / "x.csv").write_text("1,2\n")
    assert main(["predict", str(fake), str(tmp_path / "x.csv")]) == 2
    assert "fake.npz: not a fastnn network file" in capsys.readouterr().err


def test_predict_names_what_is_wrong_with_each_file(
        saved_model: Path, tmp_path: Path, small_data: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    folder, loop = tmp_path / "folder", tmp_path / "loop"
    folder.mkdir()
    loop.symlink_to(loop)
    labels = next(small_data.glob("t10k-labels*"))
    (tmp_path / "x.csv").write_text("1,2\n")
    cases = [
        ([str(saved_model), str(folder)], f"{folder}: is a folder; give an input file"),
        ([str(saved_model), str(loop)], f"{loop}: cannot be read (Too many levels"),
        ([str(labels), str(tmp_path / "x.csv")],
         f"{labels}: not a fastnn network file (a .npz archive"),
        ([str(folder), str(tmp_path / "x.csv")], f"{folder}: is a folder, not a fastnn network"),
        ([str(saved_model), str(labels)], f"{labels}: rows of 1 value; the model takes rows"),
    ]
    for argv, message in cases:
        assert main(["predict", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "pickle" not in err and err.count("\n") == 1, err


def test_the_command_line_defaults_to_the_fastest_backend(
        small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from fastnn.backends import available
    from fastnn.cli import default_backend

    monkeypatch.delenv("FASTNN_BACKEND", raising=False)
    fastest = "numba" if available()["numba"] is None else "numpy"
    assert default_backend() == fastest
    out = tmp_path / "run.json"
    assert main(["train", "--data", str(small_data), *TINY, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["backend"] == fastest
    monkeypatch.setenv("FASTNN_BACKEND", "numpy")
    assert default_backend() == "numpy"
    monkeypatch.setenv("FASTNN_BACKEND", "fortran")
    capsys.readouterr()
    assert main(["train", "--data", str(small_data), *TINY]) == 2
    assert "FASTNN_BACKEND=fortran: no such backend" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "default numba when it loads here, else numpy" in usage  # not the API's numpy


def test_sparse_and_ragged_inputs_and_huge_labels_are_named() -> None:
    import numpy as np

    from fastnn import Config, Trainer
    from fastnn.errors import DataError

    scipy_sparse = pytest.importorskip("scipy.sparse")
    config = Config(hidden=(4,), n_inputs=3, n_outputs=2, epochs=1)
    cases = [
        (scipy_sparse.csr_matrix(np.ones((4, 3))), [0, 1, 0, 1],
         "x_train: a sparse matrix (csr_matrix); fastnn trains dense arrays: pass "
         "x_train.toarray()"),
        ([[1.0, 2.0, 3.0], [1.0, 2.0]], [0, 1], "x_train: rows of different lengths"),
        (np.ones((4, 3)), np.array([0, 1, 0, 2**63], dtype=np.uint64),
         "t_train: labels must be in 0..1; got 0..9223372036854775808"),
    ]
    for x, t, message in cases:
        with pytest.raises(DataError) as caught:
            Trainer(config).fit(x, t)
        assert message in str(caught.value)
        assert "got ()" not in str(caught.value)


# ---- text that only looks like a value ----


@pytest.mark.parametrize("argv", [
    ["train", "--epochs", "\uff12"],  # full-width two: int() would read it as 2
    ["train", "--eta", "\u0661e-2"],  # Arabic-Indic one
    ["train", "--checkpoint-every", "\uff13"],
    ["sweep", "--grid", "epochs=1,\uff12", "--workers", "1"],
    ["sweep", "--workers", "\uff12"],
    ["tune", "--space", "eta=1e-3..\uff11", "--trials", "1"],
    ["tune", "--timeout", "inf"],
    ["train", "--threads", "\uff12"],
])
def test_numbers_must_be_written_in_ascii(argv: list[str], small_data: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    full = [*argv, "--data", str(small_data)]
    if argv[0] != "train":
        full += ["--out-dir", str(tmp_path / "runs")]
    assert main(full) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "got '" in err, err  # names the text it refused
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--out", ""],
    ["train", "--data", ""],
    ["train", "--save-model", ""],
    ["sweep", "--grid", "epochs=1", "--out-dir", ""],
    ["summary", ""],
    ["predict", "", "x.csv"],
])
def test_an_empty_path_is_refused_not_taken_as_missing(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ": an empty " in err and err.count("\n") == 1, err
