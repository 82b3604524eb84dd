"""Runs where people already look: MLflow and TensorBoard, as `Trainer.fit` callbacks.

`MLflowLogger` makes one MLflow run: the configuration as its parameters, every epoch's
figures (epoch 0 included) as metrics at that step, files (the run file, the saved model) as
artifacts, ended when the training ends. It talks to its tracking store through its own
``MlflowClient``, never through MLflow's process-wide active run, so several runs may log
from threads at once. With no URI the store is SQLite in the working folder
(`DEFAULT_MLFLOW_URI`), MLflow's embedded database.

`TensorBoardLogger` writes TensorBoard event files into a folder through tensorboardX, which
needs neither TensorFlow nor PyTorch: every figure as a scalar per epoch, the configuration as
text.

``mlflow`` and ``tensorboardX`` are optional dependencies, imported when a logger first logs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import MissingDependency

#: the tracking store of ``--mlflow`` without a URI: SQLite in the working folder
DEFAULT_MLFLOW_URI = "sqlite:///mlflow.db"
#: the experiment runs go into unless one is named
DEFAULT_EXPERIMENT = "fastnn"
#: the figures of an epoch, as (EpochMetrics field, metric name)
FIGURES = (("train_acc", "train_acc"), ("train_loss", "train_loss"), ("test_acc", "test_acc"),
           ("test_loss", "test_loss"), ("val_acc", "val_acc"), ("val_loss", "val_loss"),
           ("seconds", "epoch_seconds"))


def _figures(metrics: Any) -> dict[str, float]:
    """The finite figures of one epoch by metric name (None and NaN left out)."""
    out = {}
    for field, name in FIGURES:
        value = getattr(metrics, field)
        if value is not None and math.isfinite(value):
            out[name] = float(value)
    return out


def _parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """A configuration as MLflow parameters: every option, its value as text."""
    return {name: value if isinstance(value, str) else json.dumps(value)
            for name, value in config.items()}


def prepare_mlflow(uri: str, experiment: str) -> str:
    """Create the tracking store (a new SQLite file gets its tables) and the experiment, once,
    before runs in several processes log to them at once (they would race to create both);
    returns the experiment's id. `MissingDependency` without mlflow."""
    import logging

    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise MissingDependency("--mlflow needs mlflow: pip install mlflow") from None
    for name in ("mlflow", "alembic"):  # a new store's set-up is not news
        logging.getLogger(name).setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found is not None else client.create_experiment(experiment)


def _live_run(client: Any, run_id: str) -> Any:
    """Run ``run_id`` of the client's store, or None when it has none by that id (or only a
    deleted one)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


class MLflowLogger:
    """One MLflow run of a training (see the module). ``config``: the run's options (a
    `Config` or its dict); ``tags``: extra tags (a sweep names its point)."""

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 run_name: str | None = None, config: Any = None,
                 tags: Mapping[str, str] | None = None) -> None:
        self.uri = uri or DEFAULT_MLFLOW_URI
        self.experiment, self.run_name = experiment, run_name
        self.config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self._client: Any = None

    def start(self, continue_run: str | None = None) -> str | None:
        """Start the MLflow run now (else the first epoch starts it). ``continue_run``: the id
        of the run of an interrupted training that this one resumes; it is reopened (status
        RUNNING again, the parameters it lacks added) when the store still has it. Returns a
        one-line notice when it is gone (deleted, or another store) and a new run was
        started instead; None otherwise."""
        if self._client is not None:
            return None
        experiment_id = prepare_mlflow(self.uri, self.experiment)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        notice = None
        if continue_run:
            found = _live_run(client, continue_run)
            if found is not None:
                client.update_run(continue_run, status="RUNNING")
                self._client, self.run_id = client, continue_run
                self._log_parameters(set(found.data.params))
                return None
            notice = (f"MLflow run {continue_run} of the checkpoint is not in {self.uri} "
                      "(deleted?); logging to a new run")
        run = client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self._client, self.run_id = client, run.info.run_id
        self._log_parameters(set())
        return notice

    def _log_parameters(self, logged: set[str]) -> None:
        """The configuration as parameters, but those ``logged`` already (a parameter of an
        MLflow run cannot change: a resumed run's new ``epochs`` keeps the first value)."""
        if not self.config:
            return
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in _parameters(self.config).items()
                  if k not in logged]
        for start in range(0, len(params), 100):  # MLflow takes 100 per batch
            self._client.log_batch(self.run_id, params=params[start:start + 100])

    def __call__(self, metrics: Any) -> bool:
        from mlflow.entities import Metric

        if self._client is None:
            self.start()
        stamp = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[
            Metric(name, value, stamp, metrics.epoch)
            for name, value in _figures(metrics).items()])
        return False

    def log_file(self, path: str | Path) -> None:
        """Attach a file (a run file, a saved model) to the run as an artifact."""
        if self._client is None:
            self.start()
        self._client.log_artifact(self.run_id, str(path))

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ended (``FINISHED``, ``KILLED`` or ``FAILED``)."""
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status)


class TensorBoardLogger:
    """TensorBoard event files of one training in ``logdir`` (see the module)."""

    def __init__(self, logdir: str | Path, config: Any = None) -> None:
        self.logdir = Path(logdir)
        self.config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        self._writer: Any = None

    def __call__(self, metrics: Any) -> bool:
        if self._writer is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise MissingDependency(
                    "--tensorboard needs tensorboardX: pip install tensorboardX") from None
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(logdir=str(self.logdir))
            if self.config:
                self._writer.add_text("config", json.dumps(self.config, indent=1), 0)
        for name, value in _figures(metrics).items():
            self._writer.add_scalar(name, value, metrics.epoch)
        self._writer.flush()
        return False

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Tracking:
    """Where a command's runs are tracked (plain data: it travels to sweep workers):
    ``mlflow`` a tracking URI (None: no MLflow), ``experiment`` its experiment,
    ``tensorboard`` a folder (None: no TensorBoard; a sweep's points go in subfolders)."""

    def __init__(self, mlflow: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 tensorboard: str | None = None) -> None:
        self.mlflow, self.experiment, self.tensorboard = mlflow, experiment, tensorboard

    def __bool__(self) -> bool:
        return self.mlflow is not None or self.tensorboard is not None

    def __reduce__(self) -> Any:
        return (Tracking, (self.mlflow, self.experiment, self.tensorboard))

    def loggers(self, config: Any, name: str | None = None) -> list[Any]:
        """The callbacks of one run (``name``: a sweep point's, its MLflow run name and its
        TensorBoard subfolder)."""
        out: list[Any] = []
        if self.mlflow is not None:
            out.append(MLflowLogger(self.mlflow, self.experiment, name, config,
                                    {"fastnn.point": name} if name else None))
        if self.tensorboard is not None:
            folder = Path(self.tensorboard) / name if name else Path(self.tensorboard)
            out.append(TensorBoardLogger(folder, config))
        return out


def start_runs(loggers: list[Any], resumed_extra: Mapping[str, Any] | None) -> tuple[
        dict[str, str] | None, list[str]]:
    """Start the MLflow runs among ``loggers`` before a training. ``resumed_extra``: the
    ``extra`` of the checkpoint it resumes (None: a new training); the run its ``tracking``
    names is continued when the store still has it. Returns the ``tracking`` entry for the
    checkpoints to write (None: no MLflow run) and the one-line notices to show."""
    saved = (resumed_extra or {}).get("tracking") or {}
    previous = saved.get("mlflow_run") if isinstance(saved, Mapping) else None
    entry, notices = None, []
    for logger in loggers:
        if isinstance(logger, MLflowLogger):
            notice = logger.start(previous if isinstance(previous, str) else None)
            if notice:
                notices.append(notice)
            entry = {"mlflow_run": logger.run_id}
    return entry, notices


def finish(loggers: list[Any], files: list[Any] = (), status: str = "FINISHED") -> None:
    """End every tracker of a run: attach ``files`` that exist to its MLflow run, end it,
    close the event files."""
    for logger in loggers:
        if isinstance(logger, MLflowLogger):
            for path in files:
                if path and Path(path).is_file():
                    logger.log_file(path)
            logger.end(status)
        elif isinstance(logger, TensorBoardLogger):
            logger.close()


def attach(tracking: Tracking | None, record: Mapping[str, Any], path: str | Path) -> None:
    """Attach a finished sweep point's run file to the MLflow run its record names."""
    run_id = (record.get("tracking") or {}).get("mlflow_run")
    if tracking is None or tracking.mlflow is None or not run_id or not Path(path).is_file():
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking.mlflow).log_artifact(run_id, str(path))
