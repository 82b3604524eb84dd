"""The kernel path (`fastnn.backends.cuda.KernelOps`) against the NumPy reference.

The GPU backend's code, launch for launch, runs here on the CPU: NumPy arrays and the CPU
shim's modules (`fastnn.backends.cuda.shim_device`). The same tests run through CuPy on a GPU
(the "cupy" engine: skipped without one, a failure when FASTNN_REQUIRE_BACKENDS names cupy).
Whole runs (3 epochs, a short last batch, evaluations of the training and a test set after
every epoch) are compared with the reference in float64 and float32; the op-by-op checks are
those of `test_backend_parity`, given the shim engine.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_backend_parity as op_checks
from conftest import make_blobs, make_idx_folder
from parity import assert_all_close, assert_close, backend_or_skip, host, required_backends

import fastnn.backends as backends
from fastnn import Config, Network, Trainer, rng
from fastnn.backends import HiddenSpec, get_backend
from fastnn.backends.cuda import (
    KERNEL_FILES,
    ArgumentError,
    KernelDevice,
    KernelOps,
    Launches,
    shim_device,
)
from fastnn.backends.cuda.launches import kernel_layout
from fastnn.backends.optimizers import OptimizerState
from fastnn.cuda import shim
from fastnn.errors import BackendUnavailable
from fastnn.plan import OptimizerSpec, Plan

pytestmark = [
    pytest.mark.cuda_cpu,
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

ROOT = Path(__file__).resolve().parent.parent
REF = get_backend("numpy")
DTYPES = ("float64", "float32")
EPOCHS = 3

#: whole-run configurations: every batch-norm variant, both dropout modes, both decays, both
#: outputs, running statistics
RUNS: dict[str, dict[str, Any]] = {
    "off-article-l2": dict(dropout_input=0.8, dropout_hidden=0.6, weight_decay=("l2", 1e-2)),
    "bn-inverted-l1": dict(batch_norm="bn", dropout_input=0.8, dropout_hidden=0.6,
                           dropout_mode="inverted", weight_decay=("l1", 1e-3)),
    "node-article-running-mse": dict(batch_norm="node", bn_eval="running", dropout_hidden=0.6,
                                     output="identity_mse", activation="leaky_relu",
                                     activation_params={"alpha": 0.2}, batch_norm_eta=0.05),
    "n-inverted-tanh": dict(batch_norm="n", activation="tanh", dropout_input=0.7,
                            dropout_mode="inverted", weight_decay=("l2", 1e-3)),
}


# ---- engines ----


def _shim_or_skip() -> None:
    if shim.find_compiler() is None:
        if "shim" in required_backends():
            pytest.fail("FASTNN_REQUIRE_BACKENDS names shim, but there is no C++ compiler")
        pytest.skip("no C++ compiler for the CPU shim")


def make_engine(kind: str) -> KernelOps:
    """The kernel path on the CPU shim (in a thread order) or the registered cupy backend."""
    if kind == "cupy":
        return backend_or_skip("cupy")
    _shim_or_skip()
    return KernelOps(shim_device("reverse" if kind == "shim-reverse" else "forward"))


@pytest.fixture(scope="module", params=["shim", "cupy"])
def engine(request: pytest.FixtureRequest) -> KernelOps:
    return make_engine(request.param)


@pytest.fixture(scope="module")
def shim_ops() -> KernelOps:
    return make_engine("shim")


class Recorder:
    """Wraps a device: counts every kernel launch by name and every read back to the host."""

    def __init__(self) -> None:
        self.launches: Counter[str] = Counter()
        self.host_reads = 0

    def wrap(self, device: KernelDevice) -> KernelDevice:
        recorder = self

        class Module:
            def __init__(self, module: Any) -> None:
                self.module = module

            def get_function(self, name: str) -> Callable[..., None]:
                function = self.module.get_function(name)

                def launch(grid: Any, block: Any, args: Any) -> None:
                    recorder.launches[name] = recorder.launches[name] + 1
                    function(grid, block, args)

                return launch

        def load(code: str, options: tuple[str, ...], names: tuple[str, ...]) -> Any:
            return Module(device.load_module(code, options, names))

        def to_host(array: Any) -> np.ndarray:
            recorder.host_reads += 1
            return device.to_host(array)

        return KernelDevice(f"recorded-{device.name}", device.xp, load, to_host,
                            device.synchronize)


def recorded(engine: KernelOps) -> tuple[KernelOps, Recorder]:
    recorder = Recorder()
    return KernelOps(recorder.wrap(engine.device)), recorder


# ---- whole runs ----


def run_config(dtype: str, **options: Any) -> Config:
    base = dict(hidden=(7, 5), n_inputs=6, n_outputs=3, seed=4, bias_init="normal_b",
                bias_init_params={"std": 0.1}, batch_size=8, eta=0.1, dtype=dtype)
    base.update(options)
    return Config(**base)


def run_data(dtype: str) -> tuple[np.ndarray, ...]:
    """37 training rows (batch 8: a short last batch of 5) and 13 test rows."""
    gen = np.random.default_rng(9)
    x = (gen.normal(size=(50, 6)) * np.linspace(0.5, 2.0, 6)).astype(dtype)
    t = np.eye(3, dtype=dtype)[gen.integers(0, 3, 50)]
    return x[:37], t[:37], x[37:], t[37:]


def whole_run(ops: Any, config: Config, data: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """EPOCHS epochs through ``ops``'s train_epoch, both sets evaluated before the first and
    after every epoch: the figures, the final parameters and running statistics (host)."""
    plan = Plan.from_config(config)
    initial = Network(config.replace(backend="numpy")).numpy_params()
    params = {name: ops.asarray(value) for name, value in initial.items()}
    dtype = config.dtype
    running = {
        k: (ops.asarray(np.zeros(plan.sizes[k], dtype)), ops.asarray(np.ones(plan.sizes[k], dtype)))
        for k in range(1, plan.n_layers)
    } if plan.batch_norm != "off" else {}
    x, t, x_test, t_test = (ops.asarray(a) for a in data)
    workspace = ops.workspace(threads=1)
    ops.warm_up(plan)
    losses, predicted = [], []
    for epoch in range(EPOCHS + 1):
        if epoch:
            order = np.random.default_rng(rng.fold_key(config.seed, rng.STREAM_SHUFFLE, epoch))
            ops.train_epoch(plan, params, running, x, t, order.permutation(len(data[0])), epoch,
                            workspace)
        for inputs, targets in ((x, t), (x_test, t_test)):
            loss, classes = ops.loss_and_classes(plan, params, running, inputs, targets, workspace)
            losses.append(loss)
            predicted.append(np.asarray(classes))
    return {
        "losses": np.array(losses), "predicted": predicted, "counters": workspace.counters,
        "params": {name: host(value) for name, value in params.items()},
        "running": {k: (host(m), host(v)) for k, (m, v) in running.items()},
    }


def assert_runs_match(ours: dict[str, Any], ref: dict[str, Any], dtype: str) -> None:
    assert np.isfinite(ref["losses"]).all(), "the reference run diverged"
    assert_close("evaluate_loss", ours["losses"], ref["losses"], dtype, "losses")
    for index, (got, want) in enumerate(zip(ours["predicted"], ref["predicted"], strict=True)):
        # float64: the same classes; float32 rounding may flip a near-tie row
        allowed = 0 if dtype == "float64" else 1
        assert int((got != want).sum()) <= allowed, (index, got, want)
    assert_all_close("train_epoch", ours["params"], ref["params"], dtype)
    assert list(ours["running"]) == list(ref["running"])
    for k, (mean, var) in ref["running"].items():
        assert_close("train_epoch", ours["running"][k][0], mean, dtype, f"running mean {k}")
        assert_close("train_epoch", ours["running"][k][1], var, dtype, f"running var {k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", list(RUNS.values()), ids=list(RUNS))
def test_whole_run_matches_numpy(engine: KernelOps, options: dict[str, Any], dtype: str) -> None:
    config = run_config(dtype, **options)
    data = run_data(dtype)
    ours = whole_run(engine, config, data)
    ref = whole_run(REF, config, data)
    assert_runs_match(ours, ref, dtype)
    # the kernel path ran, not the reference it falls back to (+1: warm_up's probe epoch)
    assert ours["counters"]["train_kernels"] == EPOCHS
    assert ours["counters"]["evaluate_kernels"] == 2 * (EPOCHS + 1)
    if options.get("bn_eval") == "running":
        assert not np.array_equal(ref["running"][1][1], np.ones(7))


def test_whole_run_in_reverse_thread_order() -> None:
    """Blocks and threads run last to first: a missing barrier in any step kernel shows."""
    ops = make_engine("shim-reverse")
    config = run_config("float64", **RUNS["bn-inverted-l1"])
    data = run_data("float64")
    assert_runs_match(whole_run(ops, config, data), whole_run(REF, config, data), "float64")


@pytest.mark.parametrize("dtype", DTYPES)
def test_trainer_fit_through_the_registry(
    shim_ops: KernelOps, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """`Trainer.fit` with backend "cupy" served by the shim engine: Network, normalisation,
    evaluation with the penalty, the history, all through the registry as on a GPU."""
    monkeypatch.setitem(backends._INSTANCES, "cupy", shim_ops)
    x, labels = make_blobs(160, 6, 3, seed=2)
    results = {}
    for backend in ("cupy", "numpy"):
        config = run_config(dtype, backend=backend, batch_size=16, epochs=EPOCHS,
                            normalize="z_score", batch_norm="bn", dropout_input=0.8,
                            dropout_hidden=0.6, weight_decay=("l2", 1e-3))
        trainer = Trainer(config, threads=1)
        history = trainer.fit(x[:120], labels[:120], x[120:], labels[120:])
        assert trainer.network is not None
        results[backend] = history, trainer.network.numpy_params(), trainer.counters
    (history, params, counters), (history_ref, params_ref, _) = results["cupy"], results["numpy"]
    assert counters["train_kernels"] == EPOCHS and counters["evaluate_kernels"] > 0
    for key in ("train_loss", "test_loss"):
        assert_close("fit", getattr(history, key), getattr(history_ref, key), dtype, key)
    slack = 0.0 if dtype == "float64" else 1 / 40 + 1e-12
    for key in ("train_acc", "test_acc"):
        assert np.abs(np.subtract(getattr(history, key), getattr(history_ref, key))).max() <= slack
    assert history.bn_params and len(history.bn_params["gamma1"]) == EPOCHS + 1
    assert_all_close("fit", params, params_ref, dtype)


#: optimiser runs of the kernel epoch: (optimizer, schedule, options); batch norm only where
#: Adam does not scale up the rounding noise of the biases it makes inert (see test_backend_parity)
OPTIMISER_RUNS = [
    ("momentum", "constant", dict(batch_norm="bn", weight_decay=("l1", 1e-3))),
    ("nesterov", "cosine", dict(batch_norm="node", dropout_input=0.8, dropout_mode="inverted")),
    ("adam", "constant", dict(weight_decay=("l2", 1e-2), dropout_hidden=0.6)),
    ("adamw", "step", dict(weight_decay=("l2", 1e-2), lr_step_size=1)),
    ("sgd", "exponential", dict(batch_norm="bn", lr_gamma=0.5, warmup=1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("optimizer", "schedule", "options"), OPTIMISER_RUNS,
                         ids=[f"{o}-{s}" for o, s, _ in OPTIMISER_RUNS])
def test_every_optimiser_and_schedule_runs_the_kernel_epoch(
    shim_ops: KernelOps, monkeypatch: pytest.MonkeyPatch, optimizer: str, schedule: str,
    options: dict[str, Any], dtype: str,
) -> None:
    """Optimiser state and scheduled rates: every epoch on the kernels (optimizer_update at
    per-step rates), the same run as numpy's: figures, parameters, slots and update count."""
    monkeypatch.setitem(backends._INSTANCES, "cupy", shim_ops)
    x, labels = make_blobs(80, 6, 3, seed=3)
    results = {}
    for backend in ("cupy", "numpy"):
        config = run_config(dtype, backend=backend, batch_size=16, epochs=3, eta=0.01,
                            optimizer=optimizer, lr_schedule=schedule, **options)
        trainer = Trainer(config, threads=1)
        history = trainer.fit(x[:60], labels[:60], x[60:], labels[60:])
        assert trainer.network is not None
        network = trainer.network
        results[backend] = (history, network.numpy_params(),
                            network.optimizer.arrays(network.plan.optimizer.slots, network.ops),
                            trainer.counters)
    (history, params, slots, counters), (history_ref, params_ref, slots_ref, _) = (
        results["cupy"], results["numpy"])
    assert counters["train_kernels"] == 3
    for key in ("train_loss", "test_loss"):
        assert_close("fit", getattr(history, key), getattr(history_ref, key), dtype, key)
    assert_all_close("fit", params, params_ref, dtype)
    assert slots.keys() == slots_ref.keys()
    if optimizer == "sgd":
        assert not slots
        return
    assert int(slots.pop("optimizer_steps")) == int(slots_ref.pop("optimizer_steps")) == 3 * 4
    assert_all_close("fit", slots, slots_ref, dtype)


def test_row_weights_run_the_reference_epoch(shim_ops: KernelOps,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Weighted rows (sample_weight): the reference epoch, its ops on the kernels where they
    fit, the same run as numpy's."""
    monkeypatch.setitem(backends._INSTANCES, "cupy", shim_ops)
    x, labels = make_blobs(80, 6, 3, seed=3)
    weights = np.linspace(0.5, 2.0, 60)
    results = {}
    for backend in ("cupy", "numpy"):
        config = run_config("float64", backend=backend, batch_size=16, epochs=2, eta=0.01,
                            optimizer="adam")
        trainer = Trainer(config, threads=1)
        trainer.fit(x[:60], labels[:60], x[60:], labels[60:], sample_weight=weights)
        assert trainer.network is not None
        results[backend] = trainer.network.numpy_params(), trainer.counters
    (params, counters), (params_ref, _) = results["cupy"], results["numpy"]
    assert "train_kernels" not in counters
    assert_all_close("fit", params, params_ref, "float64")


# ---- how a step runs: launches only, nothing read back ----


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_epoch_never_reads_the_device_and_evaluate_reads_once(engine: KernelOps,
                                                                  dtype: str) -> None:
    ops, recorder = recorded(engine)
    config = run_config(dtype, **RUNS["bn-inverted-l1"])
    plan = Plan.from_config(config)
    params = {k: ops.asarray(v) for k, v in Network(config).numpy_params().items()}
    x, t, _, _ = (ops.asarray(a) for a in run_data(dtype))
    workspace = ops.workspace(threads=1)
    ops.warm_up(plan)
    recorder.launches.clear()
    recorder.host_reads = 0
    ops.train_epoch(plan, params, {}, x, t, np.arange(37), 1, workspace)
    assert recorder.host_reads == 0
    steps = 5  # 37 rows at batch 8
    suffix = dtype.replace("float", "f")
    assert recorder.launches[f"hidden_forward_{suffix}"] == 2 * steps
    assert recorder.launches[f"hidden_backward_{suffix}"] == 2 * steps
    assert recorder.launches[f"output_loss_grad_{suffix}"] == steps
    assert recorder.launches[f"sum_reduce_{suffix}"] == 4 * steps  # "bn": dgamma, dbeta
    assert recorder.launches[f"dropout_input_{suffix}"] == steps  # inverted: mask from the key
    assert recorder.launches[f"article_mask_{suffix}"] == 0
    ops.loss_and_classes(plan, params, {}, x, t, workspace)
    assert recorder.host_reads == 1


def test_every_kernel_is_wired(shim_ops: KernelOps) -> None:
    """Over the whole-run configurations and an Adam epoch (the warm-up's probe: optimiser
    state and a scheduled rate), the epoch and evaluation launch every kernel but
    bernoulli_mask (the step draws the inverted mask inside the kernels; the per-op
    dropout_multiplier launches it)."""
    ops, recorder = recorded(shim_ops)
    data = run_data("float64")
    for options in RUNS.values():
        whole_run(ops, run_config("float64", **options), data)
    assert not recorder.launches["optimizer_update_f64"]  # plain SGD: the sgd kernels
    ops.run_probe(Plan.from_config(run_config("float64", optimizer="adam")), "float64")
    used = {name.rsplit("_", 1)[0] for name, count in recorder.launches.items() if count}
    assert used == set(KERNEL_FILES) - {"bernoulli_mask"}
    spec = Plan.from_config(run_config("float64", dropout_hidden=0.5)).dropout[1]
    ops.dropout_multiplier(7, spec, 4, "inverted", "float64")
    assert recorder.launches["bernoulli_mask_f64"] == 1


# ---- launches by parameter name ----


def _named_launches() -> tuple[Launches, list[tuple[Any, ...]]]:
    """Launches whose functions record (kernel stem, grid, block, args) instead of running."""
    calls: list[tuple[Any, ...]] = []

    def function(stem: str, dtype: Any) -> Callable[..., None]:
        return lambda grid, block, args: calls.append((stem, grid, block, args))

    return Launches(function), calls


def _hidden_forward_args(dtype: str) -> dict[str, Any]:
    u = np.zeros((4, 3), dtype)
    return dict(u=u, n=4, d=3, act=2, alpha=0.5, bn=0, gamma=None, beta=None, stats=0,
                mean=None, var=None, std_dev=None, drop=1, key=2**64 - 1,
                key_at=np.zeros(1, np.uint64), keep_count=2, keep=0.6, mask_out=None,
                y_out=None, u_hat_out=None, z=np.zeros((4, 3), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_launch_fills_its_arguments_by_name_with_their_c_types(dtype: str) -> None:
    launches, calls = _named_launches()
    arguments = _hidden_forward_args(dtype)
    launch = launches("hidden_forward", dtype, (1, 1, 1), (32, 8, 1), **arguments)
    launch.run()
    launch.run()
    (stem, grid, block, first), (_, _, _, second) = calls
    assert stem == "hidden_forward" and grid == (1, 1, 1) and block == (32, 8, 1)
    names = [p.name for p in kernel_layout("hidden_forward", np.dtype(dtype)).params]
    assert len(first) == len(names) == 21
    by_name = dict(zip(names, first, strict=True))
    assert by_name["u"] is arguments["u"] and by_name["gamma"] is None
    assert by_name["key_at"] is arguments["key_at"]
    for name in ("n", "d", "act", "bn", "stats", "drop", "keep_count"):
        assert type(by_name[name]) is np.int32, name
    assert type(by_name["alpha"]) is np.dtype(dtype).type and by_name["alpha"] == np.dtype(
        dtype).type(0.5)
    assert type(by_name["keep"]) is np.float64
    assert type(by_name["key"]) is np.uint64 and by_name["key"] == np.uint64(2**64 - 1)
    # a built launch runs with the very same arguments every time (what a graph replays)
    assert first is second


@pytest.mark.parametrize(("change", "message"), [
    (dict(keep_count=None), r"kernel hidden_forward_f64 argument keep_count .*needs an integer"),
    (dict(n=2.0), r"hidden_forward_f64 argument n \(int n\): needs an integer; got float"),
    (dict(n=2**31), r"argument n .*out of the range of int32"),
    (dict(alpha=np.zeros(1)), r"argument alpha .*needs a number"),
    (dict(u=1.0), r"argument u .*needs an array or None"),
    (dict(u=np.zeros((4, 3), np.float32)), r"argument u .*needs a float64 array; got float32"),
    (dict(key_at=np.zeros(1, np.int64)), r"argument key_at .*needs a uint64 array; got int64"),
    (dict(key=-1), r"argument key .*out of the range of uint64"),
    (dict(extra=1), r"kernel hidden_forward_f64: no parameter extra in hidden_forward_f64\("),
])
def test_a_launch_names_the_kernel_and_the_argument_it_rejects(change: dict[str, Any],
                                                                message: str) -> None:
    launches, calls = _named_launches()
    arguments = {**_hidden_forward_args("float64"), **change}
    with pytest.raises(ArgumentError, match=message):
        launches("hidden_forward", "float64", (1, 1, 1), (32, 8, 1), **arguments)
    assert not calls


def test_a_launch_names_missing_arguments() -> None:
    launches, calls = _named_launches()
    arguments = _hidden_forward_args("float64")
    del arguments["keep"], arguments["z"]
    with pytest.raises(ArgumentError, match=r"hidden_forward_f64: missing argument keep, z of"):
        launches("hidden_forward", "float64", (1, 1, 1), (32, 8, 1), **arguments)
    with pytest.raises(ArgumentError, match=r"no kernel 'hidden_forwards'"):
        launches("hidden_forwards", "float64", (1, 1, 1), (32, 8, 1))
    assert not calls


def test_kernels_load_lazily() -> None:
    _shim_or_skip()
    ops, recorder = recorded(KernelOps(shim_device()))
    assert not ops._modules and not recorder.launches
    ops.sgd_update(np.ones(3), np.ones(3), 0.5)
    assert set(ops._modules) == {"sgd"}


# ---- op by op: the reference's checks on the shim engine, and the fallbacks ----


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_match_the_reference(shim_ops: KernelOps, dtype: str) -> None:
    """`test_backend_parity`'s op checks (run there for cupy on a GPU) on the shim engine."""
    op_checks.test_masks_are_bit_identical(shim_ops, REF, dtype)
    op_checks.test_affine_and_its_backward(shim_ops, REF, dtype)
    for decay in (None, "l1", "l2"):
        op_checks.test_affine_backward_update(shim_ops, REF, dtype, decay)
        op_checks.test_sgd_update(shim_ops, REF, dtype, decay)
        for kind in ("sgd", "momentum", "nesterov", "adam", "adamw"):
            op_checks.test_optimizer_update(shim_ops, REF, dtype, decay, kind)
    for batch_norm, activation in itertools.product(op_checks.BATCH_NORMS, op_checks.ACTIVATIONS):
        op_checks.test_hidden_forward_and_backward(shim_ops, REF, dtype, batch_norm, activation)
    for output in ("softmax_cross_entropy", "identity_mse"):
        op_checks.test_output_and_loss(shim_ops, REF, dtype, output)
    op_checks.test_update_running(shim_ops, REF, dtype)


class ShimAsCupy(KernelOps):
    """The shim engine under the registered name, so `Network` and `Trainer` take it."""

    name = "cupy"


@pytest.mark.filterwarnings("ignore::fastnn.train.DivergenceWarning")
def test_the_parity_grid_on_the_shim(monkeypatch: pytest.MonkeyPatch) -> None:
    """`test_backend_parity`'s networks over its covering grid (run there for cupy on a GPU):
    losses, gradients and evaluations of every configuration, and every fourth configuration's
    whole `Trainer` run, with the shim engine registered as "cupy"."""
    _shim_or_skip()
    ops = ShimAsCupy(shim_device())
    monkeypatch.setitem(backends._INSTANCES, "cupy", ops)
    for options in op_checks.GRID:
        op_checks.test_loss_grads_and_evaluation_match(ops, options)
    for options in op_checks.GRID[::4]:
        op_checks.test_fit_matches_reference(ops, options)


def _graph_run(options: dict[str, Any], graphs: bool, monkeypatch: pytest.MonkeyPatch
               ) -> tuple[Any, dict[str, np.ndarray], Any]:
    """A 3-epoch `Trainer` run of a grid configuration on the shim registered as "cupy",
    each step replayed from its captured graph or launched kernel by kernel."""
    monkeypatch.setenv("FASTNN_CUDA_GRAPHS", "1" if graphs else "0")
    x, t = make_blobs(200, 6, 3, seed=2)
    # the training figures evaluated: "running" figures tally every step, which the kernel
    # epoch leaves to the reference epoch (no graph to compare)
    config = op_checks.grid_config("cupy", options, batch_size=16, epochs=3, eta=0.05,
                                   normalize="z_score", train_figures="evaluate")
    if options["optimizer"].startswith("adam"):
        config = config.replace(eta=0.01)
    if options["activation"] in ("tanh", "relu", "softsign"):  # per-step rates from a table
        config = config.replace(lr_schedule="cosine", warmup=1)
    trainer = Trainer(config, threads=1)
    history = trainer.fit(x[:70], t[:70], x[150:], t[150:])
    assert trainer.network is not None
    network = trainer.network
    state = {**network.numpy_params(),
             **network.optimizer.arrays(network.plan.optimizer.slots, network.ops),
             **{f"running {k} {i}": host(a) for k, pair in network.running.items()
                for i, a in enumerate(pair)}}
    return history, state, trainer.counters


@pytest.mark.filterwarnings("ignore::fastnn.train.DivergenceWarning")
@pytest.mark.parametrize("options", op_checks.GRID, ids=op_checks.grid_id)
def test_graph_replay_gives_the_bits_of_direct_launches(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step captured once (a graph per batch size: 70 rows at batch 16 end with a
    short batch of 6) and replayed, and each set's evaluation likewise, give the same 3-epoch
    history, parameters, optimiser slots and running statistics, bit for bit, as the same
    launches made one by one; both ran the kernel epoch."""
    _shim_or_skip()
    monkeypatch.setitem(backends._INSTANCES, "cupy", ShimAsCupy(shim_device()))
    replayed, replayed_state, replayed_counters = _graph_run(options, True, monkeypatch)
    direct, direct_state, direct_counters = _graph_run(options, False, monkeypatch)
    assert replayed_counters["train_kernels"] == direct_counters["train_kernels"] == 3
    # captured once each: the two batch sizes' steps, the two sets' evaluations
    assert replayed_counters["graphs"] == 2 + 2 and "graphs" not in direct_counters
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        np.testing.assert_array_equal(getattr(replayed, key), getattr(direct, key), key)
    assert replayed_state.keys() == direct_state.keys()
    for name, value in direct_state.items():
        np.testing.assert_array_equal(replayed_state[name], value, name)


#: what changes between two epochs of one workspace: each must make the step's graph anew
CHANGES = ("nothing", "a parameter", "the data", "an optimiser slot", "running statistics",
           "the plan")


@pytest.mark.parametrize("change", CHANGES)
def test_a_graph_is_captured_again_when_what_it_was_built_on_changes(
        shim_ops: KernelOps, change: str) -> None:
    """Kept in the run's workspace across epochs, a step's graph is replayed while its plan
    and arrays are the same and captured again when one is another object (never replayed
    on the old one): both epochs match the reference making the same change."""
    options = dict(RUNS["node-article-running-mse"], optimizer="momentum")
    config = run_config("float64", **options)
    plan = Plan.from_config(config)
    x, t, _, _ = run_data("float64")
    initial = Network(config.replace(backend="numpy")).numpy_params()
    order = np.random.default_rng(3).permutation(len(x))
    runs = {}
    for name, ops in (("graphs", shim_ops), ("reference", REF)):
        params = {key: value.copy() for key, value in initial.items()}
        running = {k: (np.zeros(plan.sizes[k]), np.ones(plan.sizes[k]))
                   for k in range(1, plan.n_layers)}
        state = OptimizerState.zeros(plan.optimizer.slots, plan.param_shapes(), ops, "float64")
        workspace = ops.workspace(threads=1)
        data = [x, t]
        ops.train_epoch(plan, params, running, *data, order, 1, workspace, state)
        captured = workspace.counters["graphs"]
        second = plan
        if change == "a parameter":
            params["W2"] = params["W2"].copy()
        elif change == "the data":
            data = [x[::-1].copy(), t[::-1].copy()]
        elif change == "an optimiser slot":
            state.slots["W1"] = tuple(slot.copy() for slot in state.slots["W1"])
        elif change == "running statistics":
            running[1] = (running[1][0].copy(), running[1][1].copy())
        elif change == "the plan":  # the same shapes, another rate and decay
            second = Plan.from_config(config.replace(batch_norm_eta=0.02,
                                                     weight_decay=("l2", 0.05)))
        ops.train_epoch(second, params, running, *data, order, 2, workspace, state)
        runs[name] = (params, running, state, captured, workspace.counters["graphs"])
    params, running, state, captured, total = runs["graphs"]
    ref_params, ref_running, ref_state, _, _ = runs["reference"]
    assert captured == 2  # batch 8, and the last batch of 5
    assert total == (2 if change == "nothing" else 4)
    assert_all_close("train_epoch", params, ref_params, "float64")
    assert_all_close("train_epoch", state.arrays(plan.optimizer.slots, shim_ops),
                     ref_state.arrays(plan.optimizer.slots, REF), "float64")
    for k, (mean, var) in ref_running.items():
        assert_close("train_epoch", running[k][0], mean, "float64", f"running mean {k}")
        assert_close("train_epoch", running[k][1], var, "float64", f"running var {k}")


def test_ops_launch_their_kernels(shim_ops: KernelOps) -> None:
    ops, recorder = recorded(shim_ops)
    gen = np.random.default_rng(3)
    x, w, b, du = (gen.normal(size=shape) for shape in ((9, 6), (6, 4), (4,), (9, 4)))
    ops.affine(x, w, b)
    ops.affine_backward_update(x, w, b, du, 0.1, "l2", 0.01)
    spec = HiddenSpec(activation="relu", batch_norm="bn")
    gamma, beta = np.full(1, 1.2), np.full(1, 0.1)
    z, cache = ops.hidden_forward(gen.normal(size=(9, 4)), spec, gamma, beta, 0.5)
    ops.hidden_backward(gen.normal(size=(9, 4)), cache, spec, gamma)
    ops.output_grad(du, np.eye(4)[np.arange(9) % 4], "softmax_cross_entropy")
    adam = OptimizerSpec("adam")
    ops.optimizer_update(w, du[:6], (np.zeros_like(w), np.zeros_like(w)), 0.1, adam, 1, "l2",
                         0.01)
    ops.optimizer_update(w, du[:6], (np.zeros_like(w), np.zeros_like(w)), 0.0, adam, 2)
    assert dict(recorder.launches) == {
        "gemm_nn_f64": 1, "gemm_nt_f64": 1, "gemm_tn_f64": 1, "col_partial_sums_f64": 1,
        "sgd_weight_f64": 1, "sgd_vector_f64": 1, "hidden_forward_f64": 1,
        "hidden_backward_f64": 1, "sum_reduce_f64": 2, "output_loss_grad_f64": 1,
        "optimizer_update_f64": 1,  # rate 0: no launch
    }


def test_what_the_kernels_do_not_take_falls_back_to_the_reference(shim_ops: KernelOps) -> None:
    ops, recorder = recorded(shim_ops)
    gen = np.random.default_rng(4)
    u = gen.normal(size=(8, 10))[:, ::2]  # not C-contiguous
    spec = HiddenSpec(activation="tanh", batch_norm="n")
    z, cache = ops.hidden_forward(u, spec, None, None, None)
    z_ref, _ = REF.hidden_forward(u, spec, None, None, None)
    np.testing.assert_array_equal(z, z_ref)
    mask = np.full(5, 0.5)  # float64 multiplier on float32 nodes: NumPy promotes
    u32 = np.ascontiguousarray(u, np.float32)
    z, _ = ops.hidden_forward(u32, spec, None, None, mask)
    assert z.dtype == REF.hidden_forward(u32, spec, None, None, mask)[0].dtype == np.float64
    assert not recorder.launches
    # a plan whose data does not fit (float32 rows for a float64 plan): the reference epoch
    # (which still runs the per-op overrides where their arrays fit)
    config = run_config("float64")
    plan = Plan.from_config(config)
    params = Network(config).numpy_params()
    expected = {k: v.copy() for k, v in params.items()}
    x, t, _, _ = run_data("float32")
    workspace = ops.workspace(threads=1)
    ops.train_epoch(plan, params, {}, x, t, np.arange(37), 1, workspace)
    REF.train_epoch(plan, expected, {}, x, t, np.arange(37), 1, REF.workspace(threads=1))
    assert_all_close("train_epoch", params, expected, "float64")
    assert "train_kernels" not in workspace.counters
    with pytest.raises(IndexError):  # an order out of range: the reference's error
        ops.train_epoch(plan, params, {}, x.astype(np.float64), t.astype(np.float64),
                        np.array([0, 37]), 1, workspace)


# ---- the registered backend where there is no GPU ----


def test_cupy_says_what_to_install() -> None:
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cupy is importable here")
    with pytest.raises(BackendUnavailable, match=r"pip install cupy-cuda12x"):
        get_backend("cupy")


def test_cupy_without_a_device_says_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """CuPy importable but no usable device (a stand-in module): the registry's error names
    what is missing; nothing is compiled."""
    import types

    def no_device() -> int:
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    runtime = types.SimpleNamespace(getDeviceCount=no_device)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime), ndarray=np.ndarray,
                                 asnumpy=np.asarray, RawModule=None)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    # the backend module is imported afresh against the stand-in, and forgotten afterwards
    monkeypatch.setitem(sys.modules, "fastnn.backends.cuda.cupy_device", None)
    del sys.modules["fastnn.backends.cuda.cupy_device"]
    monkeypatch.setattr(backends.cuda, "cupy_device", None, raising=False)
    monkeypatch.delitem(backends._INSTANCES, "cupy", raising=False)
    with pytest.raises(BackendUnavailable, match=r"no usable CUDA device \(cudaErrorNoDevice.*"
                                                 r"pip install cupy-cuda12x"):
        get_backend("cupy")
    assert "cupy" not in backends._INSTANCES
    assert "no usable CUDA device" in str(backends.available()["cupy"])


# ---- the GPU check in its CPU mode, and its arguments ----


def _env() -> dict[str, str]:
    """This interpreter for the script (PATH may lead to another one)."""
    return {**os.environ, "PYTHON": sys.executable}


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh --dry-run: its three steps on the CPU (the shim's whole-run
    tests, then gpu_bench.py's parity and timing with the shim engine as "cupy" and PyTorch on
    the CPU when installed), the summary with the one table."""
    _shim_or_skip()
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    folder = make_idx_folder(tmp_path / "mnist", n_train=300, n_test=100, compress=True)
    done = subprocess.run([bash, str(ROOT / "benchmarks" / "gpu_check.sh"), str(folder),
                           "--dry-run"], capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "8 passed" in out and "parity: ok" in out and out.rstrip().endswith("all passed")
    products = out[out.index("==== (d) products"):out.index("---- (d) products")].splitlines()
    rows = [line.split() for line in products if line[:3] in ("nn ", "tn ", "nt ")]
    assert [row[0] for row in rows] == ["nn", "tn", "nt"]
    assert all(float(row[-1]) < 1e-5 for row in rows)  # gemm.cu agrees with the BLAS
    lines = out[out.index("==== summary"):].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("BN"))
    columns = lines[header].split()
    assert columns[:5] == ["BN", "cupy", "graph", "cupy", "direct"]
    assert columns[-6:] == ["cupy/best", "torch", "target", "s", "article", "s"]
    rows = [line.split() for line in lines[header + 2 : header + 4]]
    assert [row[0] for row in rows] == ["off", "bn"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)
    assert [row[-2:] for row in rows] == [["0.015", "4.58"], ["0.025", "5.98"]]


def test_gpu_check_script_arguments(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    assert subprocess.run([bash, "-n", script]).returncode == 0
    done = subprocess.run([bash, script], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: bash benchmarks/gpu_check.sh MNIST_DIR" in done.stderr
    done = subprocess.run([bash, script, str(tmp_path / "nowhere")], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "no such folder" in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([bash, script, str(empty)], capture_output=True, text=True)
    assert done.returncode == 2 and "train-images-idx3-ubyte" in done.stderr
