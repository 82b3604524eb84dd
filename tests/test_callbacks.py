"""Callbacks of Trainer.fit: every epoch's figures, stopping a run, CSV and JSON-lines logs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_blobs

from fastnn import Config, Trainer, backends
from fastnn.callbacks import CsvLogger, EpochMetrics, JsonLinesLogger


def _data() -> tuple[np.ndarray, ...]:
    x, t = make_blobs(500, 20, 3, seed=7)
    return x[:400], t[:400], x[400:], t[400:]


def _config(backend: str = "numpy", **changes: Any) -> Config:
    options = dict(hidden=(16, 8), n_inputs=20, n_outputs=3, epochs=4, batch_size=50,
                   backend=backend, dropout_hidden=0.8)
    return Config(**{**options, **changes})


def test_a_callback_sees_every_epoch_as_the_history_records_it() -> None:
    seen: list[EpochMetrics] = []
    history = Trainer(_config(early_stopping=10)).fit(*_data(), callbacks=[seen.append])
    assert [m.epoch for m in seen] == list(range(5))
    for m in seen:
        assert (m.train_acc, m.train_loss, m.test_acc, m.test_loss, m.val_loss, m.seconds) == (
            history.train_acc[m.epoch], history.train_loss[m.epoch], history.test_acc[m.epoch],
            history.test_loss[m.epoch], history.val_loss[m.epoch],
            history.epoch_seconds[m.epoch])


@pytest.mark.parametrize("backend,threads", [("numpy", 1), ("numba", 1), ("numba", 2)])
def test_a_callback_stops_the_run_after_its_epoch(backend: str, threads: int) -> None:
    if backends.available()[backend] is not None:
        pytest.skip(f"backend {backend!r} is not available here")
    data = _data()
    stopped = Trainer(_config(backend), threads=threads)
    history = stopped.fit(*data, callbacks=[lambda metrics: metrics.epoch == 2])
    assert history.epochs == 2 and history.events["stopped_by_callback_at"] == 2
    short = Trainer(_config(backend, epochs=2), threads=threads)
    expected = short.fit(*data)
    assert history.test_loss == expected.test_loss
    for name, value in short.network.numpy_params().items():
        assert np.array_equal(stopped.network.numpy_params()[name], value), name
    assert stopped.state.epoch == 2


def test_csv_and_json_lines_logs(tmp_path: Path) -> None:
    log_csv, log_jsonl = tmp_path / "logs" / "run.csv", tmp_path / "run.jsonl"
    loggers = [CsvLogger(log_csv), JsonLinesLogger(log_jsonl)]
    x_train, t_train, _, _ = _data()
    history = Trainer(_config(epochs=3)).fit(x_train, t_train, callbacks=loggers)  # no test set
    with open(log_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]
    assert [float(row["train_loss"]) for row in rows] == history.train_loss
    assert all(row["test_acc"] == "" for row in rows)
    records = [json.loads(line) for line in log_jsonl.read_text().splitlines()]
    assert [r["train_acc"] for r in records] == history.train_acc
    assert all(r["test_acc"] is None and r["val_loss"] is None for r in records)
    # a resumed run appends to the logs instead of replacing them
    trainer = Trainer(_config(epochs=2))
    trainer.fit(x_train, t_train, callbacks=[JsonLinesLogger(log_jsonl)])
    state = trainer.state
    Trainer(_config(epochs=4)).fit(x_train, t_train, resume=state,
                                   callbacks=[JsonLinesLogger(log_jsonl)])
    epochs = [json.loads(line)["epoch"] for line in log_jsonl.read_text().splitlines()]
    assert epochs == [0, 1, 2, 3, 4]


def test_cli_logs_and_saved_model(idx_folder: Path, tmp_path: Path) -> None:
    from fastnn import Model, load_mnist
    from fastnn.cli import main

    out, model_path = tmp_path / "run.json", tmp_path / "model.npz"
    code = main(["train", "--data", str(idx_folder), "--epochs", "2", "--hidden", "16",
                 "--quiet", "--out", str(out), "--save-model", str(model_path),
                 "--log-csv", str(tmp_path / "log.csv"), "--log-jsonl", str(tmp_path / "l.jsonl")])
    assert code == 0
    record = json.loads(out.read_text())
    rows = list(csv.DictReader(open(tmp_path / "log.csv", newline="")))
    assert [float(row["test_acc"]) for row in rows] == record["history"]["test_acc"]
    lines = (tmp_path / "l.jsonl").read_text().splitlines()
    assert [json.loads(line)["test_loss"] for line in lines] == record["history"]["test_loss"]
    _, _, x_test, t_test = load_mnist(idx_folder)
    model = Model.load(model_path)  # raw uint8 images in, as the run saw them
    accuracy = (model.predict(x_test) == t_test).mean()
    assert accuracy == record["history"]["test_acc"][-1]


@pytest.mark.parametrize("backend,threads", [("numpy", 1), ("numba", 2)])
def test_history_records_gamma_and_beta_per_epoch(backend: str, threads: int) -> None:
    if backends.available()[backend] is not None:
        pytest.skip(f"backend {backend!r} is not available here")
    from fastnn import History

    x_train, t_train, x_test, t_test = _data()
    trainer = Trainer(_config(backend, batch_norm="node", epochs=3), threads=threads)
    history = trainer.fit(x_train, t_train, x_test, t_test)
    assert sorted(history.bn_params) == ["beta1", "beta2", "gamma1", "gamma2"]
    assert [len(rows) for rows in history.bn_params.values()] == [4] * 4
    assert history.bn_params["gamma1"][0] == [1.0] * 16  # before training
    final = trainer.network.numpy_params()
    assert history.bn_params["beta2"][-1] == final["beta2"].tolist()
    assert History.from_dict(history.to_dict()).bn_params == history.bn_params
    plain = Trainer(_config(backend, epochs=1)).fit(x_train, t_train)
    assert plain.bn_params == {} and "bn_params" not in plain.to_dict()
