"""Library objects used from several threads at once, and nothing of a run left behind.

Backends are shared by every network of a process (and by the threads of a Dask worker): the
runs here train at the same time on the same backend objects and must give, bit for bit, what
the same runs give one after another.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_blobs, make_idx_folder

from fastnn import Config, Network, Trainer, backends

REPO = Path(__file__).resolve().parents[1]

#: four different runs: every batch-norm variant, both dropout modes, L1 and L2, both dtypes
CONFIGS = [
    dict(batch_norm="bn", dropout_input=0.8, dropout_hidden=0.5, dtype="float64"),
    dict(batch_norm="node", bn_eval="running", dropout_mode="inverted", dropout_hidden=0.6,
         weight_decay=("l2", 1e-3), dtype="float32"),
    dict(batch_norm="n", weight_decay=("l1", 1e-4), activation="tanh", dtype="float64"),
    dict(batch_norm="off", dropout_hidden=0.7, dtype="float32", shuffle=False),
]


def sparse_data(seed: int = 1) -> tuple[np.ndarray, ...]:
    """Blobs with most pixels 0 (the numba backend takes its sparse first layer on them)."""
    x, labels = make_blobs(700, 64, 4, seed=seed)
    keep = np.random.default_rng(seed).random(x.shape) < np.where(x >= 150, 0.6, 0.1)
    x = np.where(keep, x, 0).astype(np.uint8)
    return x[:500], labels[:500], x[500:], labels[500:]


def available(name: str) -> str:
    reason = backends.available()[name]
    if reason is not None:
        pytest.skip(f"backend {name!r}: {reason}")
    return name


def fit(backend: str, options: dict[str, Any], data: tuple, barrier: Any = None) -> dict:
    config = Config(hidden=(32, 16), n_inputs=64, n_outputs=4, epochs=3, batch_size=32,
                    backend=backend, seed=5, **options)
    trainer = Trainer(config)
    if barrier is not None:
        barrier.wait()  # every thread starts its run at the same moment
    history = trainer.fit(*data)
    net = trainer.network
    result = {f"history.{key}": value for key, value in history.to_dict().items()
              if key not in ("epoch_seconds", "events")}
    result.update(net.numpy_params())
    for k, (mean, var) in net.running.items():
        result[f"running_mean{k}"] = np.array(mean)
        result[f"running_var{k}"] = np.array(var)
    result["counters"] = trainer.counters
    return result


def assert_identical(first: dict, second: dict, what: str) -> None:
    assert list(first) == list(second), what
    for key, value in first.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, second[key]), f"{what}: {key} differs"
        else:
            assert value == second[key], f"{what}: {key} differs"


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_four_runs_in_four_threads_equal_the_same_runs_in_turn(backend: str) -> None:
    available(backend)
    data = sparse_data()
    sequential = [fit(backend, options, data) for options in CONFIGS]
    barrier = threading.Barrier(len(CONFIGS))
    with ThreadPoolExecutor(max_workers=len(CONFIGS)) as pool:
        futures = [pool.submit(fit, backend, options, data, barrier) for options in CONFIGS]
        concurrent = [future.result() for future in futures]
    for options, first, second in zip(CONFIGS, sequential, concurrent, strict=True):
        assert_identical(first, second, f"{backend} {options}")
    if backend == "numba":  # the sparse path ran in the threads too (float64 trains sparse)
        assert concurrent[0]["counters"]["train_sparse"] == 3


def test_evaluating_two_batch_norm_networks_in_threads(numba_ready: None) -> None:
    """Two networks of different sizes evaluated over and over in two threads at once."""
    x, labels = make_blobs(3000, 30, 3, seed=4)
    x = x.astype(np.float64) / 255
    t = np.eye(3)[labels]
    nets = [Network(Config(hidden=hidden, n_inputs=30, n_outputs=3, backend="numba",
                           batch_norm="bn", seed=seed))
            for hidden, seed in (((40, 20), 1), ((25,), 2))]
    expected = [net.scores(x, t, labels)[1] for net in nets]

    def losses(net: Network) -> list[float]:
        return [net.scores(x, t, labels)[1] for _ in range(15)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(losses, nets))
    for got, want in zip(results, expected, strict=True):
        assert got == [want] * 15


@pytest.fixture
def numba_ready() -> None:
    available("numba")


def test_dask_threads_give_what_a_sequential_sweep_gives(tmp_path: Path) -> None:
    """A Dask worker with four threads trains four batch-norm points at once on numba."""
    available("numba")
    distributed = pytest.importorskip("dask.distributed")
    from fastnn.sweep import run_sweep

    folder = make_idx_folder(tmp_path / "data", n_train=400, n_test=100)
    base = Config(hidden=(20, 10), epochs=2, batch_size=50, backend="numba", batch_norm="bn")
    points = [(f"p{i}", base.replace(seed=i, batch_norm=variant, dropout_hidden=keep))
              for i, (variant, keep) in enumerate((("bn", 1.0), ("node", 0.5), ("n", 0.8),
                                                    ("bn", 0.6)))]
    sequential = dict(run_sweep(points, str(folder)))
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=4, processes=False,
                                       dashboard_address=None)
    try:
        on_dask = dict(run_sweep(points, str(folder), dask=cluster.scheduler_address))
    finally:
        cluster.close()
    assert sorted(on_dask) == sorted(sequential)
    for name, record in sequential.items():
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert on_dask[name]["history"][key] == record["history"][key], (name, key)
        assert record["history"]["train_loss"][-1] < record["history"]["train_loss"][0]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_editing_the_data_between_two_fits(backend: str, tmp_path: Path) -> None:
    """The second fit sees the edited array exactly as a fresh process does; no run keeps the
    caller's arrays alive after fit returns."""
    available(backend)
    x_train, t_train, x_test, t_test = sparse_data(seed=3)
    x_train = x_train.astype(np.float64)
    config = Config(hidden=(16,), n_inputs=64, n_outputs=4, epochs=2, batch_size=50,
                    backend=backend, batch_norm="bn", seed=2)
    trainer = Trainer(config)
    trainer.fit(x_train, t_train, x_test, t_test)
    x_train[::7] = 255.0 - x_train[::7]  # in place, many rows
    second = trainer.fit(x_train, t_train, x_test, t_test).to_dict()
    np.save(tmp_path / "x.npy", x_train)
    for name, array in (("t", t_train), ("xt", x_test), ("tt", t_test)):
        np.save(tmp_path / f"{name}.npy", array)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    script = (
        "import json, pathlib, sys, numpy as np\n"
        "from fastnn import Config, Trainer\n"
        "folder = pathlib.Path(sys.argv[1])\n"
        "config = Config.from_dict(json.loads((folder / 'config.json').read_text()))\n"
        "x, t, xt, tt = (np.load(folder / f'{name}.npy') for name in ('x', 't', 'xt', 'tt'))\n"
        "print(json.dumps(Trainer(config).fit(x, t, xt, tt).to_dict()))\n"
    )
    fresh = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                           text=True, cwd=REPO, check=True)
    expected = json.loads(fresh.stdout.strip().splitlines()[-1])
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert second[key] == expected[key], key
    reference = weakref.ref(x_train)
    del x_train
    gc.collect()
    assert reference() is None, "a run keeps the caller's training array alive"


def test_evaluation_after_an_in_place_edit_is_not_stale() -> None:
    """Evaluating, editing one row in place, evaluating again: numba gives what numpy gives."""
    available("numba")
    x, labels = make_blobs(500, 30, 3, seed=6)
    x = np.where(x > 100, x, 0).astype(np.float64) / 255  # sparse: the CSR path is possible
    t = np.eye(3)[labels]
    nets = {name: Network(Config(hidden=(12,), n_inputs=30, n_outputs=3, backend=name,
                                 batch_norm="bn", seed=1)) for name in ("numba", "numpy")}
    nets["numba"].scores(x, t, labels)
    x[123] = 1.0 - x[123]
    after = {name: net.scores(x, t, labels)[1] for name, net in nets.items()}
    assert after["numba"] == pytest.approx(after["numpy"], rel=1e-12)


def test_backends_touch_no_private_member_of_a_network() -> None:
    pattern = re.compile(r"network\._|net\._")
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "fastnn" / "backends").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []
    for path in (REPO / "fastnn" / "backends").rglob("*.py"):
        assert "import Network" not in path.read_text() and "from ..network" not in (
            path.read_text()), path
