"""`fastnn tune` on Optuna, with the real library on small data: the search space, trials and
their run files, pruning, a study that a second command continues, and workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_idx_folder

optuna = pytest.importorskip("optuna")

from fastnn import Config  # noqa: E402
from fastnn.cli import main  # noqa: E402
from fastnn.errors import ConfigError  # noqa: E402
from fastnn.tune import Dimension, command_line, parse_space  # noqa: E402

pytestmark = pytest.mark.usefixtures("forbid_downloads")
SMALL = ["--hidden", "8", "--epochs", "3", "--batch-size", "50"]


@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    return make_idx_folder(tmp_path / "data", n_train=300, n_test=60)


def test_the_space_reads_ranges_and_choices() -> None:
    eta, batch, norm, hidden = parse_space(["eta=1e-3..1:log", "batch-size=16..256",
                                            "batch_norm=off,n,bn", "hidden=8/4,16"])
    assert eta == Dimension("eta", 1e-3, 1.0, log=True)
    assert batch == Dimension("batch_size", 16, 256, integer=True)
    assert norm.choices == ("off", "n", "bn") and hidden.choices == ("8/4", "16")
    for bad, fragment in [("eta=1..0.1", "LOW < HIGH"), ("lr_min=0..1:log", "LOW > 0"),
                          ("eta=0.1..1:exp", "only be log"), ("batch_norm=a..b", "numeric"),
                          ("nonsense=1,2", "cannot sweep"), ("eta", "must look like")]:
        with pytest.raises(ConfigError, match=fragment):
            parse_space([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_space(["eta=0.1,0.2", "eta=0.3,0.4"])


def test_the_best_trials_command_line_trains_its_config() -> None:
    from fastnn.cli import build_parser, config_from_args

    config = Config(hidden=(8,), eta=0.05, batch_norm="bn", shuffle=False,
                    activation_params={"alpha": 0.2}, activation="leaky_relu",
                    weight_decay=("l2", 1e-3), optimizer="adam", dtype="float64")
    line = command_line(config, "/data")
    assert line.startswith("fastnn train --data /data ")
    args = build_parser().parse_args(line.split()[1:])
    assert config_from_args(args).replace(backend=config.backend) == config


def test_tune_runs_trials_writes_run_files_and_a_rerun_adds_to_the_study(
        small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tune"
    argv = ["tune", "--data", str(small_data), *SMALL, "--space", "eta=1e-3..1:log",
            "--space", "batch_norm=off,bn", "--trials", "4", "--out-dir", str(out),
            "--pruner", "none"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 trial(s) in the study, 4 new" in printed and "train it with: fastnn train" in printed
    files = sorted(out.glob("trial-*.json"))
    assert len(files) == 4 and (out / "study.db").is_file()
    record = json.loads(files[0].read_text())
    assert set(record["trial"]["params"]) == {"eta", "batch_norm"}
    assert len(record["history"]["val_loss"]) == 4  # a validation split, scored each epoch
    study = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}")
    best = study.best_trial
    assert best.value == min(loss for loss in json.loads(
        (out / f"trial-{best.number:04d}.json").read_text())["history"]["val_loss"][1:])
    assert main([*argv[:-2], "--trials", "2"]) == 0  # the same study, two more
    assert "6 trial(s) in the study, 2 new" in capsys.readouterr().out
    assert len(list(out.glob("trial-*.json"))) == 6


def test_the_median_pruner_stops_lagging_trials(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    argv = ["tune", "--data", str(small_data), "--hidden", "8", "--epochs", "6",
            "--batch-size", "50", "--space", "eta=1e-4..10:log", "--trials", "12",
            "--sampler", "random", "--out-dir", str(out)]
    assert main(argv) == 0
    study = optuna.load_study(study_name="fastnn", storage=f"sqlite:///{out / 'study.db'}")
    states = [trial.state for trial in study.trials]
    assert optuna.trial.TrialState.PRUNED in states
    pruned = [json.loads(p.read_text()) for p in out.glob("trial-*.json")]
    assert any(r["trial"]["pruned"] and len(r["history"]["val_loss"]) < 7 for r in pruned)


def test_workers_share_one_study(small_data: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tune"
    assert main(["tune", "--data", str(small_data), *SMALL, "--space", "eta=1e-2..1:log",
                 "--trials", "4", "--workers", "2", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    files = len(list(out.glob("trial-*.json")))
    # each worker stops once 4 have ended; one already running may finish after
    assert 4 <= files <= 5 and f"{files} trial(s) in the study, {files} new" in printed


def test_tune_mistakes_are_exit_2(small_data: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    base = ["tune", "--data", str(small_data), *SMALL, "--out-dir", str(tmp_path / "t")]
    for extra, fragment in [(["--space", "eta=2..1"], "LOW < HIGH"),
                            (["--space", "eta=0.1,1", "--trials", "0"], "--trials must be"),
                            (["--space", "eta=0.1,1", "--workers", "0"], "--workers must be")]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err


def test_without_optuna_tune_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import builtins

    real_import = builtins.__import__

    def no_optuna(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    assert main(["tune", "--space", "eta=0.1,1"]) == 2
    assert "fastnn tune needs optuna: pip install optuna" in capsys.readouterr().err


def test_importing_fastnn_never_imports_optuna() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import sys, fastnn, fastnn.cli; "
                           "print('optuna' in sys.modules)"], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_an_interrupted_tune_resumes_its_study(small_data: Path, tmp_path: Path) -> None:
    """SIGKILL mid-trial leaves a "running" trial; the same command marks it failed and adds
    its trials to the study (the finished ones kept)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "tune"
    argv = ["tune", "--data", str(small_data), "--hidden", "8", "--epochs", "2000",
            "--batch-size", "50", "--space", "eta=0.01,0.1", "--trials", "3", "--pruner",
            "none", "--out-dir", str(out)]
    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "-m", "fastnn", *argv],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONPATH=str(repo), FASTNN_OFFLINE="1"))
    storage = f"sqlite:///{out / 'study.db'}"
    deadline = time.monotonic() + 60
    running = []
    while time.monotonic() < deadline and not running:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name="fastnn", storage=storage)
        except Exception:  # noqa: BLE001 - not created yet
            continue
        running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert running, "the tune never started a trial"
    short = [arg if arg != "2000" else "2" for arg in argv]
    assert main(short) == 0
    study = optuna.load_study(study_name="fastnn", storage=storage)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3


def test_a_second_tune_into_a_busy_folder_is_exit_2(small_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fcntl")
    from fastnn.runs import SweepFolder

    out = tmp_path / "tune"
    out.mkdir()
    with SweepFolder(out, None, checkpointing=False).locked():
        assert main(["tune", "--data", str(small_data), *SMALL, "--space", "eta=0.1,1",
                     "--out-dir", str(out)]) == 2
    assert f"--out-dir {out}: another tune (pid" in capsys.readouterr().err


def test_plot_kind_tune_draws_the_history_and_importances(
        small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "tune"
    assert main(["tune", "--data", str(small_data), *SMALL, "--space", "eta=1e-3..1:log",
                 "--space", "batch_norm=off,bn", "--trials", "4", "--pruner", "none",
                 "--out-dir", str(out)]) == 0
    chart = tmp_path / "tune.png"
    assert main(["plot", "--kind", "tune", str(out), "--out", str(chart)]) == 0
    assert chart.stat().st_size > 0
    from fastnn import plots

    fig = plots.tune_figure(plots.read_study(out))
    history, importance = fig.axes
    assert len(history.get_lines()[0].get_xdata()) == 4  # the completed trials
    assert sorted(t.get_text() for t in importance.get_yticklabels()) == ["batch_norm", "eta"]
    capsys.readouterr()
    assert main(["plot", "--kind", "tune", str(tmp_path), "--out", str(chart)]) == 2
    assert "no tune study" in capsys.readouterr().err


def test_tune_runs_its_trials_on_dask(small_data: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("dask.distributed")
    out = tmp_path / "tune"
    assert main(["tune", "--data", str(small_data), *SMALL, "--space", "eta=1e-2..1:log",
                 "--trials", "3", "--dask", "local", "--threads", "1",
                 "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    files = len(list(out.glob("trial-*.json")))
    assert files >= 3 and f"{files} trial(s) in the study, {files} new" in printed
