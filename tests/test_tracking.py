"""MLflow and TensorBoard tracking, read back with each library's own reader: MLflow's client
on a real local SQLite store, TensorBoard's event accumulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastnn.cli import main

pytestmark = pytest.mark.usefixtures("forbid_downloads")
TINY = ["--hidden", "8", "--epochs", "3", "--batch-size", "50", "--quiet"]


def test_train_logs_an_mlflow_run(small_data: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # the default store: sqlite:///mlflow.db here
    out, model = tmp_path / "run.json", tmp_path / "model.npz"
    assert main(["train", "--data", str(small_data), *TINY, "--out", str(out), "--save-model",
                 str(model), "--mlflow", "--mlflow-experiment", "tests"]) == 0
    client = mlflow.tracking.MlflowClient(tracking_uri="sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["hidden"] == "[8]" and run.data.params["epochs"] == "3"
    history = json.loads(out.read_text())["history"]
    for name in ("train_loss", "test_acc"):
        logged = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in logged] == [0, 1, 2, 3]  # epoch 0 included
        assert [m.value for m in logged] == pytest.approx(history[name])
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"run.json", "model.npz"}


def test_train_writes_tensorboard_events(small_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out, logdir = tmp_path / "run.json", tmp_path / "tb"
    assert main(["train", "--data", str(small_data), *TINY, "--out", str(out),
                 "--tensorboard", str(logdir)]) == 0
    events = accumulator.EventAccumulator(str(logdir))
    events.Reload()
    history = json.loads(out.read_text())["history"]
    for name in ("train_acc", "train_loss", "test_acc", "test_loss"):
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [0, 1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx(history[name], rel=1e-6)


def test_missing_tracking_packages_are_named(small_data: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import builtins

    real_import = builtins.__import__

    def without(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.split(".")[0] in ("mlflow", "tensorboardX"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    for flags, message in ((["--mlflow"], "--mlflow needs mlflow: pip install mlflow"),
                           (["--tensorboard", "tb"],
                            "--tensorboard needs tensorboardX: pip install tensorboardX")):
        assert main(["train", "--data", str(small_data), *TINY, *flags]) == 2
        assert message in capsys.readouterr().err


def test_sweep_points_are_runs_of_one_experiment(small_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("tensorboardX")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    assert main(["sweep", "--data", str(small_data), "--grid", "eta=0.1,0.2", *TINY,
                 "--out-dir", str(out), "--mlflow", "--tensorboard", str(tmp_path / "tb")]) == 0
    client = mlflow.tracking.MlflowClient(tracking_uri="sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("fastnn")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"eta=0.1", "eta=0.2"}
    for name, run in runs.items():
        assert run.data.params["eta"] == name.split("=")[1]
        assert [f.path for f in client.list_artifacts(run.info.run_id)] == [f"{name}.json"]
        record = json.loads((out / f"{name}.json").read_text())
        assert record["tracking"]["mlflow_run"] == run.info.run_id
        events = accumulator.EventAccumulator(str(tmp_path / "tb" / name))
        events.Reload()
        assert [s.step for s in events.Scalars("test_acc")] == [0, 1, 2, 3]


def test_tune_trials_are_runs_of_its_experiment(small_data: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("optuna")
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--data", str(small_data), *TINY[:-1], "--space", "eta=0.05,0.5",
                 "--trials", "2", "--pruner", "none", "--out-dir", str(tmp_path / "t"),
                 "--mlflow", "--mlflow-experiment", "search"]) == 0
    client = mlflow.tracking.MlflowClient(tracking_uri="sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("search")
    names = {run.info.run_name for run in client.search_runs([experiment.experiment_id])}
    assert names == {"trial-0000", "trial-0001"}


def test_sweep_points_on_dask_log_to_mlflow(small_data: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("dask.distributed")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"  # the workers' working folder may differ
    assert main(["sweep", "--data", str(small_data), "--grid", "eta=0.1,0.2", *TINY,
                 "--out-dir", str(tmp_path / "runs"), "--dask", "local", "--threads", "1",
                 "--mlflow", uri]) == 0
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fastnn")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["eta=0.1", "eta=0.2"]
    assert all(run.info.status == "FINISHED" for run in runs)


def _interrupt_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Ctrl-C right after the checkpoint of ``epoch`` is written."""
    import fastnn.checkpoint as ckpt

    save = ckpt.CheckpointWriter.save

    def save_then_interrupted(self, state):  # type: ignore[no-untyped-def]
        saved = save(self, state)
        if state.epoch == epoch:
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(ckpt.CheckpointWriter, "save", save_then_interrupted)


@pytest.mark.parametrize("run_deleted", [False, True])
def test_a_resumed_training_continues_its_mlflow_run(
        small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], run_deleted: bool) -> None:
    mlflow = pytest.importorskip("mlflow")
    from fastnn.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)  # the artifacts go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    ck, out = tmp_path / "ck", tmp_path / "run.json"
    with monkeypatch.context() as patch:
        _interrupt_after_epoch(patch, 2)
        assert main(["train", "--data", str(small_data), *TINY, "--epochs", "5", "--checkpoint",
                     str(ck), "--out", str(out), "--mlflow", uri]) == 130
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fastnn")
    (first,) = client.search_runs([experiment.experiment_id])
    assert first.info.status == "KILLED"
    assert load_checkpoint(ck)[1].extra["tracking"] == {"mlflow_run": first.info.run_id}
    if run_deleted:
        client.delete_run(first.info.run_id)
    capsys.readouterr()

    assert main(["train", "--resume", str(ck), "--quiet", "--mlflow", uri]) == 0
    err = capsys.readouterr().err
    (run,) = client.search_runs([experiment.experiment_id])  # deleted runs are not listed
    assert run.info.status == "FINISHED"
    history = json.loads(out.read_text())["history"]  # the resume wrote the run's --out
    steps = [3, 4, 5] if run_deleted else [0, 1, 2, 3, 4, 5]
    for name in ("train_loss", "test_acc"):
        logged = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in logged] == steps
        assert [m.value for m in logged] == pytest.approx(history[name][steps[0]:])
    assert load_checkpoint(ck)[1].extra["tracking"] == {"mlflow_run": run.info.run_id}
    if run_deleted:
        assert run.info.run_id != first.info.run_id
        assert err == (f"notice: MLflow run {first.info.run_id} of the checkpoint is not in "
                       f"{uri} (deleted?); logging to a new run\n")
    else:
        assert run.info.run_id == first.info.run_id and err == ""
        assert run.data.params["epochs"] == "5" and run.data.params["hidden"] == "[8]"
        assert {f.path for f in client.list_artifacts(run.info.run_id)} == {"run.json"}


def test_a_resumed_sweep_point_continues_its_mlflow_run(
        small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    sweep = ["sweep", "--data", str(small_data), "--grid", "eta=0.1,0.2", *TINY,
             "--out-dir", str(tmp_path / "runs"), "--mlflow", uri]
    with monkeypatch.context() as patch:
        _interrupt_after_epoch(patch, 2)  # in the first point
        assert main(sweep) == 130
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fastnn")
    (first,) = client.search_runs([experiment.experiment_id])
    assert first.info.run_name == "eta=0.1" and first.info.status == "KILLED"

    assert main(sweep) == 0
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"eta=0.1", "eta=0.2"}
    resumed = runs["eta=0.1"]
    assert resumed.info.run_id == first.info.run_id and resumed.info.status == "FINISHED"
    history = json.loads((tmp_path / "runs" / "eta=0.1.json").read_text())
    assert history["tracking"]["mlflow_run"] == first.info.run_id
    logged = client.get_metric_history(first.info.run_id, "test_acc")
    assert [m.step for m in logged] == [0, 1, 2, 3]
    assert [m.value for m in logged] == pytest.approx(history["history"]["test_acc"])
