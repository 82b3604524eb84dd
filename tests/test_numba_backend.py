"""What only the numba backend has: blocked evaluation, BLAS by address, the sparse first layer,
the kernel cache. (Its parity with the reference op by op and run by run is in
`test_backend_parity`.)"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_blobs
from parity import assert_all_close, assert_close, random_arrays, tolerance

pytest.importorskip("numba")

from fastnn import Config, Network, Trainer  # noqa: E402
from fastnn.backends import HiddenSpec, get_backend  # noqa: E402
from fastnn.backends.numba import ops as backend_module  # noqa: E402
from fastnn.backends.numba import training  # noqa: E402
from fastnn.backends.numba.kernels import common  # noqa: E402

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "identity", "softplus", "softsign", "step")
BATCH_NORMS = ("off", "n", "bn", "node")
DTYPES = ("float64", "float32")
EVAL_OUTPUTS = ("softmax_cross_entropy", "identity_mse")


@pytest.fixture(scope="module")
def numba_ops() -> Any:
    return get_backend("numba")


def small_config(backend: str, **changes: Any) -> Config:
    base = dict(hidden=(7, 5), n_inputs=6, n_outputs=3, seed=4, backend=backend,
                bias_init="normal_b", bias_init_params={"std": 0.1}, batch_size=8)
    base.update(changes)
    return Config(**base)


def _pair(options: dict[str, Any]) -> tuple[Network, Network]:
    return Network(small_config("numba", **options)), Network(small_config("numpy", **options))


def small_data(dtype: str, n: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gen = np.random.default_rng(9)
    labels = gen.integers(0, 3, n)
    return gen.normal(size=(n, 6)).astype(dtype), np.eye(3, dtype=dtype)[labels], labels


def workspace(ops: Any, *inputs: np.ndarray, **options: Any) -> Any:
    """A run's workspace with these options, its inputs prepared."""
    space = ops.workspace(threads=2)
    space.options.update(options)
    for x in inputs:
        ops.prepare_inputs(x, space)
    return space


# ---- evaluation of a whole set (blocked, one compiled call per block) ----

def _eval_pair(dtype: str, **options: Any) -> tuple[Network, Network]:
    """A numba/numpy network pair with trained-looking parameters and running statistics."""
    ours, ref = _pair({**options, "dtype": dtype, "dropout_input": 0.8, "dropout_hidden": 0.6})
    gen = np.random.default_rng(21)
    params = {name: value + gen.normal(scale=0.3, size=value.shape)
              for name, value in ref.numpy_params().items()}
    ours.params, ref.params = params, params
    for k in ref.running:  # non-trivial running statistics for bn_eval="running"
        size = ref.sizes[k]
        stats = (gen.normal(scale=0.2, size=size).astype(dtype),
                 gen.uniform(0.5, 2.0, size=size).astype(dtype))
        ours.running[k] = (stats[0].copy(), stats[1].copy())
        ref.running[k] = stats
    return ours, ref


def _eval_data(dtype: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(17)
    x = (gen.normal(size=(n, 6)) * np.linspace(0.5, 2.0, 6)).astype(dtype)
    return x, np.eye(3, dtype=dtype)[gen.integers(0, 3, n)]


def evaluation(net: Network, x: Any, t: Any, space: Any = None) -> tuple[float, np.ndarray]:
    space = space if space is not None else net.ops.workspace(threads=2)
    return net.ops.loss_and_classes(net.plan, net.params, net.running, x, t, space)


def assert_same_evaluation(ours: Network, ref: Network, x: Any, t: Any, what: str,
                           space: Any = None) -> None:
    """Loss to tolerance; predicted classes identical except at the reference's near-ties."""
    dtype = ref.dtype
    loss, predicted = evaluation(ours, x, t, space)
    loss_ref, predicted_ref = evaluation(ref, x, t)
    assert isinstance(loss, float) and isinstance(loss_ref, float)
    assert predicted.shape == predicted_ref.shape == (len(x),)
    assert predicted.dtype == predicted_ref.dtype
    assert_close("evaluate_loss", loss, loss_ref, dtype, what + " loss")
    y = np.sort(ref.forward_eval(x).astype(np.float64), axis=1)
    tie = tolerance("evaluate_near_tie", dtype)
    near_tie = y[:, -1] - y[:, -2] <= tie * max(float(np.abs(y).max()), 1e-30)
    assert near_tie.sum() <= max(1, len(x) // 50), f"{what}: data has {near_tie.sum()} near-ties"
    differ = (predicted != predicted_ref) & ~near_tie
    assert not differ.any(), (
        f"{what}: predicted classes differ at rows {np.flatnonzero(differ)[:10]}: "
        f"numba {predicted[differ][:10]} vs numpy {predicted_ref[differ][:10]}"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_norm", BATCH_NORMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_evaluate_in_blocks_matches_reference(
    numba_ops: Any, dtype: str, batch_norm: str, activation: str
) -> None:
    """Every bn_eval x dropout mode x output, on 53 rows in blocks of 16 (a short last one)."""
    x, t = _eval_data(dtype, 53)
    bn_evals = ("batch", "running") if batch_norm != "off" else ("batch",)
    for bn_eval, mode, output in itertools.product(bn_evals, ("article", "inverted"),
                                                   EVAL_OUTPUTS):
        ours, ref = _eval_pair(dtype, activation=activation, batch_norm=batch_norm,
                               bn_eval=bn_eval, dropout_mode=mode, output=output)
        assert ours.ops is numba_ops
        space = workspace(numba_ops, eval_block=16)
        assert_same_evaluation(ours, ref, x, t, f"{bn_eval} {mode} {output}", space)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_norm", ("off", "bn"))
def test_evaluate_with_the_default_block(numba_ops: Any, dtype: str, batch_norm: str) -> None:
    """More rows than two default blocks (not a multiple), then a smaller set that reuses the
    workspace's whole-set buffers, then single rows (batch norm of one row: std at its floor)."""
    n = 2 * backend_module.WORKSPACE_DEFAULTS["eval_block"] + 37
    ours, ref = _eval_pair(dtype, activation="tanh", batch_norm=batch_norm)
    x, t = _eval_data(dtype, n)
    space = workspace(numba_ops)
    assert_same_evaluation(ours, ref, x, t, f"{n} rows", space)
    assert_same_evaluation(ours, ref, x[:101], t[:101], "101 rows", space)
    loss, predicted = evaluation(ours, x[:1], t[:1], space)
    loss_ref, predicted_ref = evaluation(ref, x[:1], t[:1])
    assert_close("evaluate_loss", loss, loss_ref, dtype, "1 row")
    assert np.array_equal(predicted, predicted_ref)


@pytest.mark.parametrize("output", EVAL_OUTPUTS)
def test_evaluate_breaks_exact_ties_like_numpy(output: str) -> None:
    """Every row's outputs tie between classes 1 and 2: the first maximum wins (np.argmax)."""
    ours, ref = _eval_pair("float64", output=output)
    for net in (ours, ref):
        net.params["W3"] = np.zeros_like(net.params["W3"])
        net.params["b3"] = np.array([0.2, 0.7, 0.7])
    x, t = _eval_data("float64", 30)
    loss, predicted = evaluation(ours, x, t)
    loss_ref, predicted_ref = evaluation(ref, x, t)
    assert np.array_equal(predicted, predicted_ref) and (predicted == 1).all()
    assert_close("evaluate_loss", loss, loss_ref, "float64", "loss")


def test_evaluate_falls_back_on_unusual_inputs(numba_ops: Any, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """Strided, read-only or mixed-dtype inputs take the reference path (same results)."""
    ours, ref = _eval_pair("float64", batch_norm="node")
    x, t = _eval_data("float64", 40)
    strided = np.repeat(x, 2, axis=0)[::2]
    read_only = x.copy()
    read_only.flags.writeable = False
    calls: list[int] = []
    reference = backend_module.NumpyOps.loss_and_classes
    monkeypatch.setattr(backend_module.NumpyOps, "loss_and_classes",
                        lambda self, *args: calls.append(1) or reference(self, *args))
    for name, (xs, ts) in {"strided": (strided, t), "read-only": (read_only, t),
                           "float32 targets": (x, t.astype("float32"))}.items():
        before = len(calls)
        assert_same_evaluation(ours, ref, xs, ts, name)
        assert len(calls) == before + 2, name  # ours fell back, and the reference itself


def test_same_seed_gives_bit_identical_params(capsys: pytest.CaptureFixture[str]) -> None:
    first = _fit("numba")[1]
    second = _fit("numba")[1]
    assert all(np.array_equal(first[name], second[name]) for name in first)
    assert "compiling" not in capsys.readouterr().err  # stderr is not a terminal here


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_with_both_blas_interfaces(dtype: str) -> None:
    """The kernels' gemm: NumPy's cblas (when found) and SciPy's Fortran BLAS, every layout."""
    from fastnn.backends.numba.kernels import blas
    from fastnn.backends.numba.kernels.common import Blas

    interfaces = [Blas(blas.BLAS_FORTRAN32, blas._scipy_blas()[dtype == "float64"])]
    found = blas._numpy_openblas()
    if found is not None:
        interfaces.append(Blas(blas.BLAS_CBLAS64, found[dtype == "float64"]))
    a, b, c = random_arrays(dtype, 8, (5, 3), (3, 4), (5, 4))
    cases = {(False, False): (a, b), (True, False): (a.T.copy(), b), (False, True): (a, b.T.copy())}
    alpha, beta = np.dtype(dtype).type(-0.5), np.dtype(dtype).type(1.0)
    for interface in interfaces:
        for (trans_a, trans_b), (left, right) in cases.items():
            out = c.copy()
            blas.gemm(interface, trans_a, trans_b, alpha, left, right, beta, out)
            what = f"blas {interface.kind} {trans_a} {trans_b}"
            assert_close("affine", out, c - 0.5 * (a @ b), dtype, what)


# ---- the sparse first layer (CSR inputs, built per run in its workspace) ----

SPARSE_OPTIONS = [  # dropout mode x batch norm x weight decay, each value at least once
    dict(batch_norm="off"),
    dict(batch_norm="off", dropout_input=0.8, dropout_hidden=0.6, weight_decay=("l2", 1e-2)),
    dict(batch_norm="bn", dropout_input=0.7, dropout_mode="inverted", weight_decay=("l1", 1e-3)),
    dict(batch_norm="node", dropout_input=0.8, dropout_hidden=0.6, bn_eval="running",
         output="identity_mse"),
    dict(batch_norm="bn", dropout_input=0.8, dropout_mode="inverted", bn_eval="running",
         weight_decay=("l2", 1e-2), activation="tanh"),
]


def sparse_x(dtype: str, n: int, d: int, seed: int = 3) -> np.ndarray:
    """Min-max scaled inputs, about 80% of them exact zeros."""
    gen = np.random.default_rng(seed)
    x = gen.integers(1, 256, (n, d)) * (gen.random((n, d)) < 0.2)
    return ((x - x.min()) / (x.max() - x.min())).astype(dtype)


def sparse_blobs(n: int, n_inputs: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """`make_blobs` with most pixels set to 0: about 25% stay nonzero."""
    x, labels = make_blobs(n, n_inputs, n_classes, seed=1)
    keep = np.random.default_rng(2).random(x.shape) < np.where(x >= 150, 0.6, 0.1)
    return np.where(keep, x, 0).astype(np.uint8), labels


def test_sparse_data_takes_the_sparse_path_and_dense_data_the_dense_one(numba_ops: Any) -> None:
    ours, _ = _pair({"n_inputs": 6, "dtype": "float64"})
    dense, t, _ = small_data("float64", n=21)
    sparse = sparse_x("float64", 21, 6)
    order = np.arange(21)
    for x, path in ((dense, "dense"), (sparse, "sparse")):
        space = workspace(numba_ops, x)
        assert space.options["sparse_mode"] == "auto"
        ours.train_epoch(x, t, order, 1, space)
        assert space.counters["sparse_steps"] == (3 if path == "sparse" else 0)
        ours.scores(x, t, t.argmax(1), space)
        expected = {f"train_{path}": 1, f"evaluate_{path}": 1}
        paths = {k: v for k, v in space.counters.items()
                 if k != "sparse_steps" and not k.startswith("train_threads")}
        assert paths == expected
    space = workspace(numba_ops, dense, sparse)
    assert space.prepared(dense)[1] is None
    density, csr = space.prepared(sparse)
    assert density == np.count_nonzero(sparse) / sparse.size
    assert (csr.indptr.dtype, csr.indices.dtype, csr.values.dtype) == (
        np.int64, np.int32, np.float64)
    rebuilt = np.zeros_like(sparse)
    rebuilt[np.repeat(np.arange(21), np.diff(csr.indptr)), csr.indices] = csr.values
    assert np.array_equal(rebuilt, sparse)
    assert space.prepared(sparse.copy()) is None  # only that very array object
    numba_ops.prepare_inputs(sparse, space)
    assert space.prepared(sparse)[1] is csr  # built once per run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", SPARSE_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_sparse_train_epoch_and_evaluate_match_reference(
    numba_ops: Any, dtype: str, options: dict[str, Any]
) -> None:
    ours, ref = _pair({"n_inputs": 24, "dtype": dtype, **options})
    x = sparse_x(dtype, 45, 24)
    labels = np.random.default_rng(4).integers(0, 3, 45)
    t = np.eye(3, dtype=dtype)[labels]
    space = workspace(numba_ops, x, eval_block=16, sparse_train_dtypes=DTYPES)
    for epoch in (1, 2, 3):  # 45 rows at batch 8: a short last batch
        order = np.random.default_rng(epoch).permutation(len(x))
        before = space.counters["sparse_steps"]
        ours.train_epoch(x, t, order, epoch, space)
        assert space.counters["sparse_steps"] == before + 6
        ref.train_epoch(x, t, order, epoch)
    assert_all_close("train_epoch", ours.params, ref.numpy_params(), dtype)
    for k, (mean, var) in ref.running.items():
        assert_close("train_epoch", ours.running[k][0], mean, dtype, f"running mean {k}")
        assert_close("train_epoch", ours.running[k][1], var, dtype, f"running var {k}")
    before = space.counters["evaluate_sparse"]
    assert_same_evaluation(ours, ref, x, t, "sparse", space)
    assert space.counters["evaluate_sparse"] == before + 1


def test_sparse_mode_switch_and_non_finite_weights(numba_ops: Any) -> None:
    """"1" forces CSR on dense data, "0" keeps sparse data dense; an inf in W1 goes dense."""
    dtype = "float64"
    x, t, labels = small_data(dtype, n=21)
    order = np.random.default_rng(2).permutation(len(x))
    options = dict(dropout_input=0.8, dropout_hidden=0.6, weight_decay=("l1", 1e-3))
    for mode, data, steps in (("1", x, 3), ("0", sparse_x(dtype, 21, 6), 0)):
        ours, ref = _pair({**options, "dtype": dtype})
        space = workspace(numba_ops, sparse_mode=mode)
        numba_ops.prepare_inputs(data, space)
        for epoch in (1, 2):
            before = space.counters["sparse_steps"]
            ours.train_epoch(data, t, order, epoch, space)
            assert space.counters["sparse_steps"] == before + steps, mode
            ref.train_epoch(data, t, order, epoch)
        assert_all_close("train_epoch", ours.params, ref.numpy_params(), dtype)
        assert_same_evaluation(ours, ref, data, t, f"mode {mode}", space)
    data = sparse_x(dtype, 21, 6)
    ours, ref = _pair({"dtype": dtype})
    for net in (ours, ref):
        weights = net.numpy_params()["W1"].copy()
        weights[data[0].argmax(), 0] = np.inf
        net.params = {**net.numpy_params(), "W1": weights}
    space = workspace(numba_ops, data)
    with np.errstate(all="ignore"):
        loss, predicted = evaluation(ours, data, t, space)
        loss_ref, predicted_ref = evaluation(ref, data, t)
        ours.train_epoch(data, t, order, 1, space)
        ref.train_epoch(data, t, order, 1)
    assert space.counters["evaluate_dense"] == 1 and space.counters["train_dense"] == 1
    assert np.isnan(loss) == np.isnan(loss_ref) and np.array_equal(predicted, predicted_ref)
    assert space.counters["sparse_steps"] == 0
    for name, value in ref.numpy_params().items():
        assert np.array_equal(np.isnan(ours.params[name]), np.isnan(value)), name


# ---- sparse inputs kept only in CSR form (`inputs.CsrRows`: no dense copy of the set) ----

def _numba_twins(options: dict[str, Any]) -> tuple[Network, Network]:
    """Two numba networks of one config (the same initial parameters)."""
    return Network(small_config("numba", **options)), Network(small_config("numba", **options))


def _csr_only(ops: Any, raw: np.ndarray, dtype: str, method: str = "min_max",
              axis: int | None = None, **options: Any) -> tuple[Any, Any, Any]:
    """(the dense normalised array, its CsrRows, the run's workspace with both prepared)."""
    from fastnn.preprocessing import Normalizer

    space = workspace(ops, **options)
    normalizer = Normalizer(method, axis).fit(raw)
    dense = normalizer.transform_to(raw, dtype)
    ops.prepare_inputs(dense, space)
    rows = ops.inputs(raw, normalizer, dtype, "x_train", space)
    return dense, rows, space


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("raw_dtype", ["uint8", "float64"])
@pytest.mark.parametrize("options", SPARSE_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_csr_only_inputs_train_and_evaluate_bit_identical_to_the_dense_array(
    numba_ops: Any, dtype: str, raw_dtype: str, options: dict[str, Any]
) -> None:
    """A run that keeps only the CSR form (uint8 inputs: the compact form, a byte per value)
    gives the same bits as one with the dense array beside it, epochs and evaluation alike
    (the same values, summed in the same order)."""
    from fastnn.backends.numba.inputs import CsrRows, csr_values

    raw = (sparse_x("float64", 45, 24) * 255).astype(np.uint8).astype(raw_dtype)
    dense, rows, space = _csr_only(numba_ops, raw, dtype, eval_block=16,
                                   sparse_train_dtypes=DTYPES)
    assert isinstance(rows, CsrRows) and len(rows) == 45 and rows.shape == dense.shape
    assert np.array_equal(rows.dense(), dense) and np.array_equal(np.asarray(rows), dense)
    csr, reference = space.prepared(rows)[1], space.prepared(dense)[1]
    assert np.array_equal(csr.indices, reference.indices)
    assert np.array_equal(csr_values(csr), reference.values)
    compact = raw_dtype == "uint8"
    assert (csr.codes.size, csr.values.size) == ((csr.indices.size, 0) if compact
                                                 else (0, csr.indices.size))
    assert rows.nbytes == sum(a.nbytes for a in csr[1:]) == (
        46 * 8 + csr.indices.size * (4 + (1 if compact else np.dtype(dtype).itemsize))
        + csr.table.nbytes)
    t = np.eye(3, dtype=dtype)[np.random.default_rng(4).integers(0, 3, 45)]
    with_dense, csr_only = _numba_twins({"n_inputs": 24, "dtype": dtype, **options})
    for epoch in (1, 2, 3):
        order = np.random.default_rng(epoch).permutation(45)
        with_dense.train_epoch(dense, t, order, epoch, space)
        csr_only.train_epoch(rows, t, order, epoch, space)
    for name, value in with_dense.params.items():
        assert np.array_equal(csr_only.params[name], value), name
    assert evaluation(csr_only, rows, t, space)[0] == evaluation(with_dense, dense, t, space)[0]
    assert np.array_equal(evaluation(csr_only, rows, t, space)[1],
                          evaluation(with_dense, dense, t, space)[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("method", "axis"), [("min_max", 0), ("z_score", 0), ("z_score", None),
                                              ("standard", None), ("none", None)])
def test_the_compact_form_holds_the_normalised_values_of_every_column(
    numba_ops: Any, dtype: str, method: str, axis: int | None
) -> None:
    """Per column or over all inputs, the table of a byte's normalised values gives the
    dense array's very values (sparse_mode "1": entries that normalise to nonzero kept)."""
    raw = (sparse_x("float64", 40, 9) * 255).astype(np.uint8)
    raw[:, 4] = raw[:, 4] // 2 + 100  # columns of different ranges
    dense, rows, space = _csr_only(numba_ops, raw, dtype, method, axis, sparse_mode="1")
    csr = space.prepared(rows)[1]
    per_column = axis == 0 or method == "standard"  # "standard" is per column always
    assert csr.table.shape == ((9 if per_column else 1), 256) and csr.codes.size > 0
    assert np.array_equal(rows.dense(), dense)
    t = np.eye(3, dtype=dtype)[np.arange(40) % 3]
    with_dense, csr_only = _numba_twins({"dtype": dtype, "n_inputs": 9})
    order = np.random.default_rng(5).permutation(40)
    with_dense.train_epoch(dense, t, order, 1, space)
    csr_only.train_epoch(rows, t, order, 1, space)
    for name, value in with_dense.params.items():
        assert np.array_equal(csr_only.params[name], value), name


@pytest.mark.parametrize("threads", [1, 2])
def test_csr_only_inputs_train_densely_where_the_dtype_is_left_out_of_sparse_training(
    numba_ops: Any, threads: int
) -> None:
    """sparse_train_dtypes without the run's dtype: every step gathers dense rows from the
    CSR form (on one thread or split over two), the bits of the dense array's run."""
    raw = (sparse_x("float64", 45, 24) * 255).astype(np.uint8)
    dense, rows, space = _csr_only(numba_ops, raw, "float32", sparse_train_dtypes=())
    space.threads = threads
    t = np.eye(3, dtype="float32")[np.arange(45) % 3]
    with_dense, csr_only = _numba_twins({"n_inputs": 24, "dtype": "float32",
                                         "dropout_input": 0.8, "batch_norm": "bn"})
    for epoch in (1, 2):
        order = np.random.default_rng(epoch).permutation(45)
        with_dense.train_epoch(dense, t, order, epoch, space)
        csr_only.train_epoch(rows, t, order, epoch, space)
    assert space.counters["train_dense"] == 4 and space.counters.get("sparse_steps", 0) == 0
    for name, value in with_dense.params.items():
        assert np.array_equal(csr_only.params[name], value), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_only_inputs_with_non_finite_weights_gather_dense_rows_from_the_csr_form(
    numba_ops: Any, dtype: str
) -> None:
    """An inf in W1 sends the run's steps and evaluation the dense way: their rows come from
    the CSR form, the same values as the dense array's (NaN where it gives NaN)."""
    raw = (sparse_x("float64", 21, 6) * 255).astype(np.uint8)
    dense, rows, space = _csr_only(numba_ops, raw, dtype)
    t = np.eye(3, dtype=dtype)[np.arange(21) % 3]
    order = np.random.default_rng(2).permutation(21)
    with_dense, csr_only = _numba_twins({"dtype": dtype, "dropout_input": 0.8})
    weights = with_dense.numpy_params()["W1"].copy()
    weights[dense[0].argmax(), 0] = np.inf
    for net in (with_dense, csr_only):
        net.params = {**with_dense.numpy_params(), "W1": weights}
    with np.errstate(all="ignore"):
        loss, predicted = evaluation(csr_only, rows, t, space)
        loss_dense, predicted_dense = evaluation(with_dense, dense, t, space)
        csr_only.train_epoch(rows, t, order, 1, space)
        with_dense.train_epoch(dense, t, order, 1, space)
    assert space.counters["sparse_steps"] == 0 and space.counters["evaluate_dense"] == 2
    assert np.isnan(loss) == np.isnan(loss_dense) and np.array_equal(predicted, predicted_dense)
    for name, value in with_dense.params.items():
        assert np.array_equal(csr_only.params[name], value, equal_nan=True), name


def test_dense_inputs_stay_one_array_and_the_reference_gets_one(
    numba_ops: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dense inputs (or sparse_mode "0") are one array; where the kernels do not take a
    CsrRows' run, the reference gets the dense array and gives its figures."""
    from fastnn.backends.numba import evaluation as evaluation_module
    from fastnn.preprocessing import Normalizer

    dense_raw, _, _ = small_data("float64", n=21)
    normalizer = Normalizer("min_max").fit(dense_raw)
    space = workspace(numba_ops)
    assert isinstance(numba_ops.inputs(dense_raw, normalizer, "float64", "x", space), np.ndarray)
    raw = (sparse_x("float64", 21, 6) * 255).astype(np.uint8)
    off = workspace(numba_ops, sparse_mode="0")
    assert isinstance(numba_ops.inputs(raw, Normalizer().fit(raw), "float64", "x", off),
                      np.ndarray)
    dense, rows, space = _csr_only(numba_ops, raw, "float64")
    t = np.eye(3)[np.arange(21) % 3]
    ours, ref = _pair({"dtype": "float64"})
    monkeypatch.setattr(evaluation_module, "loss_and_classes", lambda *args: None)
    loss, predicted = evaluation(ours, rows, t, space)
    loss_ref, predicted_ref = evaluation(ref, dense, t)
    assert_close("evaluate_loss", loss, loss_ref, "float64", "reference on a CsrRows")
    assert np.array_equal(predicted, predicted_ref)
    np.testing.assert_array_equal(ours.forward_eval(rows), ours.forward_eval(dense))


def test_a_numba_fit_on_sparse_inputs_keeps_their_csr_form_only() -> None:
    """A fit's splits hold the CSR form only; batch norm's population statistics (summed
    over the whole set at the end) come out as from the dense array."""
    from fastnn.backends.numba.inputs import CsrRows

    x, labels = sparse_blobs(400, 30, 3)
    config = small_config("numba", n_inputs=30, dtype="float32", batch_norm="n", epochs=2)
    trainer = Trainer(config, keep_splits=True)
    trainer.fit(x[:300], labels[:300], x[300:], labels[300:])
    train, test, _ = trainer.splits
    assert isinstance(train.x, CsrRows) and isinstance(test.x, CsrRows)
    nonzeros = np.count_nonzero(train.x.dense())
    table = 256 * 4  # one row: min-max over all inputs normalises every column alike
    assert train.x.nbytes == nonzeros * (4 + 1) + 8 * 301 + table < train.x.dense().nbytes / 2
    np.testing.assert_array_equal(train.x.dense(),
                                  trainer.normalizer.transform_to(x[:300], "float32"))
    from fastnn.backends import steps

    net = trainer.network
    expected = steps.population_statistics(net.ops, net.plan, net.params, train.x.dense())
    for k, (mean, var) in expected.items():
        assert np.array_equal(net.population[k][0], mean)
        assert np.array_equal(net.population[k][1], var)


def _fit(
    backend: str, dtype: str = "float64", data: tuple[np.ndarray, np.ndarray] | None = None,
    **changes: Any,
) -> tuple[Any, dict[str, np.ndarray], dict[str, int]]:
    """A 3-epoch run on 800 generated rows (blobs, or ``data``): history, params, counters."""
    x, t = make_blobs(800, 20, 3, seed=1) if data is None else data
    options = dict(hidden=(16, 8), n_inputs=x.shape[1], n_outputs=3, epochs=3, batch_size=64,
                   backend=backend, dtype=dtype, batch_norm="bn", dropout_input=0.9,
                   dropout_hidden=0.8, seed=11)
    options.update(changes)
    trainer = Trainer(Config(**options))
    history = trainer.fit(x[:600], t[:600], x[600:], t[600:])
    params = {k: v.copy() for k, v in trainer.network.numpy_params().items()}
    return history, params, trainer.counters


def _sparse_fit(backend: str, dtype: str = "float64", **changes: Any) -> tuple[Any, ...]:
    return _fit(backend, dtype, data=sparse_blobs(800, 30, 3), **changes)


@pytest.mark.parametrize("changes", [
    {}, {"dropout_mode": "inverted", "batch_norm": "node", "bn_eval": "running",
         "weight_decay": ("l2", 1e-3)},
    {"batch_norm": "off", "weight_decay": ("l1", 1e-3)},
])
def test_sparse_fit_matches_numpy(changes: dict[str, Any]) -> None:
    history, params, counters = _sparse_fit("numba", **changes)
    assert (counters["train_sparse"], counters["evaluate_sparse"]) == (3, 8), counters
    history_ref, params_ref, _ = _sparse_fit("numpy", **changes)
    assert history.train_acc == history_ref.train_acc
    assert history.test_acc == history_ref.test_acc
    for key in ("train_loss", "test_loss"):
        assert_close("fit", getattr(history, key), getattr(history_ref, key), "float64", key)
    assert_all_close("fit", params, params_ref, "float64")


def test_sparse_fit_float32_and_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 trains sparse in "auto" (dense when the option leaves float32 out); it matches
    the reference and repeats bit for bit."""
    history, first, counters = _sparse_fit("numba", dtype="float32")
    assert counters["train_sparse"] == 3 and counters["evaluate_sparse"] == 8
    history_ref, _, _ = _sparse_fit("numpy", dtype="float32")
    assert_close("fit", history.train_loss, history_ref.train_loss, "float32", "train_loss")
    assert np.abs(np.subtract(history.test_acc, history_ref.test_acc)).max() <= 1 / 200
    second = _sparse_fit("numba", dtype="float32")[1]
    assert all(np.array_equal(first[name], second[name]) for name in first)
    monkeypatch.setitem(backend_module.WORKSPACE_DEFAULTS, "sparse_train_dtypes", ("float64",))
    _, _, dense_counters = _sparse_fit("numba", dtype="float32")
    assert dense_counters["train_dense"] == 3


def _optimiser_fit(backend: str, dtype: str, data: tuple[np.ndarray, np.ndarray],
                   weighted: bool, **changes: Any) -> tuple[Any, dict[str, np.ndarray], dict]:
    """3 epochs (batch 64 of 600 rows: a short last batch) with the options, rows weighted or
    not: history, parameters with the optimiser's state, counters."""
    x, t = data
    options = dict(hidden=(16, 8), n_inputs=x.shape[1], n_outputs=3, epochs=3, batch_size=64,
                   backend=backend, dtype=dtype, dropout_input=0.9, dropout_hidden=0.8, seed=11)
    options.update(changes)
    trainer = Trainer(Config(**options))
    weights = np.random.default_rng(3).random(600) if weighted else None
    history = trainer.fit(x[:600], t[:600], x[600:], t[600:], sample_weight=weights)
    net = trainer.network
    state = {**net.numpy_params(), **net.optimizer.arrays(net.plan.optimizer.slots, net.ops)}
    return history, state, trainer.counters


@pytest.mark.parametrize(("optimizer", "batch_norm", "decay", "schedule", "weighted", "sparse"), [
    ("momentum", "off", ("l2", 1e-3), "constant", False, True),
    ("nesterov", "bn", None, "cosine", True, False),
    ("adam", "off", ("l1", 1e-3), "step", True, True),
    ("adamw", "off", ("l2", 1e-2), "cosine", False, False),
    ("adam", "node", None, "constant", False, True),
    ("sgd", "bn", ("l1", 1e-3), "cosine", True, True),
    ("sgd", "off", None, "constant", True, False),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_optimiser_schedule_and_weighting_runs_compiled(
        optimizer: str, batch_norm: str, decay: Any, schedule: str, weighted: bool, sparse: bool,
        dtype: str) -> None:
    """The compiled epoch (not the reference) trains every optimiser, at a schedule's rates
    per step, with rows weighted, dense or sparse, and matches the reference: the figures of
    every epoch, the parameters and the optimiser's slots and update count."""
    data = sparse_blobs(800, 30, 3) if sparse else make_blobs(800, 20, 3, seed=1)
    changes: dict[str, Any] = dict(optimizer=optimizer, batch_norm=batch_norm,
                                   weight_decay=decay, lr_schedule=schedule,
                                   eta=0.005 if optimizer.startswith("adam") else 0.05)
    if schedule == "cosine":
        changes["warmup"] = 1
    if schedule == "step":
        changes.update(lr_step_size=1, lr_gamma=0.5)
    history, state, counters = _optimiser_fit("numba", dtype, data, weighted, **changes)
    history_ref, state_ref, _ = _optimiser_fit("numpy", dtype, data, weighted, **changes)
    assert counters.get("train_threads_1", 0) + counters.get("train_threads_2", 0) == 3, counters
    assert counters.get("train_sparse", 0) == (3 if sparse else 0), counters
    assert list(state) == list(state_ref)
    if optimizer != "sgd":
        assert int(state["optimizer_steps"]) == int(state_ref["optimizer_steps"]) == 3 * 10
    if batch_norm != "off" and optimizer.startswith("adam"):
        # the bias under batch norm has no effect and a gradient of rounding noise, which
        # Adam scales to full steps (each backend its own noise): left out, moments too
        state = {k: v for k, v in state.items() if not k.endswith(("b1", "b2"))}
        state_ref = {k: v for k, v in state_ref.items() if not k.endswith(("b1", "b2"))}
    for key in ("train_loss", "test_loss"):
        assert_close("fit", getattr(history, key), getattr(history_ref, key), dtype, key)
    assert_all_close("fit", state, state_ref, dtype)


def test_kernel_cache_is_keyed_by_every_kernel_source(tmp_path: Any) -> None:
    """A cached kernel of other sources is dropped (numba checks only the kernel's own file)."""
    from fastnn.backends.numba.kernels import common

    (tmp_path / "layers.affine-1.py311.nbi").write_text("stale")
    (tmp_path / "epoch.train_epoch-1.py311.nbc").write_text("stale")
    common._drop_stale_entries(tmp_path, "old-digest")
    assert sorted(p.name for p in tmp_path.iterdir()) == [common._STAMP]
    (tmp_path / "layers.affine-1.py311.nbi").write_text("fresh")
    common._drop_stale_entries(tmp_path, "old-digest")  # same digest: kept
    assert (tmp_path / "layers.affine-1.py311.nbi").exists()
    common._drop_stale_entries(tmp_path, common._sources_digest())
    assert not (tmp_path / "layers.affine-1.py311.nbi").exists()


def test_kernels_take_the_codes_of_the_one_table(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Any) -> None:
    """The numba kernels and ops use the very objects of `fastnn.backends.codes` (no copies
    of a table), and the kernel cache's digest changes with codes.py (numba compiles a
    code's value in)."""
    from fastnn.backends import codes
    from fastnn.backends.numba import evaluation, fit, ops, training
    from fastnn.backends.numba.kernels import common, epoch, evaluate, layers, sparse

    shared = [name for name in vars(codes) if name.isupper()]
    for module in (layers, epoch, evaluate, sparse, ops, training, evaluation, fit):
        for name in shared:
            if hasattr(module, name):
                assert getattr(module, name) is getattr(codes, name), (module.__name__, name)
    assert ops.ACTIVATION_CODES is codes.ACTIVATION_CODES
    assert fit.OUTPUT_CODES is codes.OUTPUT_CODES
    assert not [name for name in shared if hasattr(common, name)]
    assert layers.ACT_LEAKY_RELU is codes.ACT_LEAKY_RELU and not hasattr(layers, "RELU")
    copy = tmp_path / "codes.py"
    copy.write_bytes(Path(codes.__file__).read_bytes())
    monkeypatch.setattr(common, "_CONSTANT_SOURCES", (copy,))
    digest = common._sources_digest()
    copy.write_text(copy.read_text().replace('"relu": 2', '"relu": 9'))
    assert common._sources_digest() != digest


def test_a_kernel_compiles_once_per_argument_type_not_per_constant(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A constant argument of a kernel-to-kernel call (``0``, ``True``) reuses the callee's
    compile for its type: the epoch loops of runs through the sparse and dense first layers,
    batch norm and dropout link in no kernel compiled for a literal type (numba would compile,
    and link into the caller, a second copy of the callee for each constant)."""
    code = _epoch_loop_code(monkeypatch, batch_norm="bn", dropout_input=0.8, dropout_hidden=0.6,
                            dense_too=True)
    functions = [line for line in code.splitlines() if line.startswith(("define", "declare"))]
    assert all(any(name in line for line in functions)
               for name in ("std_columns", "sparse_rows_product", "gemm"))
    assert not [line for line in functions if "Literal" in line]


def _halve(values, into):
    for i in range(values.shape[0]):
        into[i] = values[i] * 0.5


def _halve_twice(values, into):
    for _ in range(2):
        _halve_kernel(values, into)  # noqa: F821 (a kernel the test puts in the globals)
        values = into.copy()


def test_a_kernel_that_kernels_call_compiles_apart_without_the_python_wrapper(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel called from another kernel compiles only its `from_kernels` sibling, whose
    code has no CPython wrapper and whose name (so its cache files) is its own; called from
    Python it compiles, with the wrapper, once more; both compute what they say."""
    monkeypatch.setattr(common, "CACHE_ENABLED", False)  # nothing written beside the tests
    halve = common.jit(_halve)
    monkeypatch.setitem(globals(), "_halve_kernel", halve)
    twice = common.jit(_halve_twice)
    values, into = np.arange(6.0), np.empty(6)
    twice(values, into)
    assert into.tolist() == (np.arange(6.0) / 4).tolist()
    assert not halve.signatures and len(halve.from_kernels.signatures) == 1
    assert halve.from_kernels.py_func.__qualname__ == "_halve" + common.CALLEE_SUFFIX
    halve(values, into)
    assert into.tolist() == (np.arange(6.0) / 2).tolist()

    def has_wrapper(kernel: Any) -> bool:
        (result,) = kernel.overloads.values()
        return result.fndesc.llvm_cpython_wrapper_name in result.library.get_llvm_str()

    assert has_wrapper(halve) and has_wrapper(twice) and not has_wrapper(halve.from_kernels)


def test_a_driver_kernel_goes_through_the_light_pipeline_and_others_do_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A `jit_driver` kernel's own code (its wrappers too) and its linked module take
    `light_pipeline`'s passes; the kernel it calls takes numba's own; both compute what they
    say."""
    from fastnn.backends.numba.kernels import light_pipeline

    seen: list[tuple[str, str]] = []
    functions, module = light_pipeline._light_functions, light_pipeline._light_module
    machine_code = light_pipeline._light_machine_code
    monkeypatch.setattr(light_pipeline, "_light_functions", lambda library, ll_module: (
        seen.append(("functions", library.name)), functions(library, ll_module))[1])
    monkeypatch.setattr(light_pipeline, "_light_module", lambda library: (
        seen.append(("module", library.name)), module(library))[1])
    monkeypatch.setattr(light_pipeline, "_light_machine_code", lambda library: (
        seen.append(("machine code", library.name)), machine_code(library))[1])
    monkeypatch.setattr(common, "CACHE_ENABLED", False)  # nothing written beside the tests
    halve = common.jit(_halve)
    monkeypatch.setitem(globals(), "_halve_kernel", halve)
    driver = common.jit_driver(_halve_twice)
    values, into = np.arange(6.0), np.empty(6)
    driver(values, into)
    assert into.tolist() == (np.arange(6.0) / 4).tolist()
    assert {name for _, name in seen} == {"_halve_twice"}
    assert {kind for kind, _ in seen} == {"functions", "module", "machine code"}
    # the driver calls the callee's own compiled code: its module declares it, defines none
    (callee,) = halve.from_kernels.overloads.values()
    (compiled,) = driver.overloads.values()
    lines = compiled.library.get_llvm_str().splitlines()
    name = callee.fndesc.mangled_name
    assert [line for line in lines if line.startswith("declare") and name in line]
    assert not [line for line in lines if line.startswith("define") and "_halve" in line
                and "_halve_twice" not in line]


_CACHED_DRIVER = """
import sys
import numpy as np
from fastnn.backends.numba.kernels import common

@common.jit
def halve(values, into):
    for i in range(values.shape[0]):
        into[i] = values[i] * 0.5

@common.jit_driver
def halve_twice(values, into):
    for _ in range(2):
        halve(values, into)
        values = into.copy()

into = np.empty(4)
halve_twice(np.arange(4.0), into)
hits = sum(halve_twice.stats.cache_hits.values())
print(into.tolist(), hits, len(halve.from_kernels.overloads))
"""


def test_a_driver_loaded_from_the_cache_first_loads_the_kernels_it_calls(
        tmp_path: Path) -> None:
    """A driver's cache entry lists the kernels it calls by symbol: in a new process, the
    cached driver loads them (from the cache) before itself, and computes what it says
    (without them in the JIT, loading it would abort the process)."""
    (tmp_path / "toy_driver.py").write_text(_CACHED_DRIVER)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])}
    runs = [subprocess.run([sys.executable, "-c", "import toy_driver"], env=env, text=True,
                           capture_output=True, timeout=300) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], [(run.returncode, run.stderr[-2000:])
                                                        for run in runs]
    assert [run.stdout.split() for run in runs] == [
        ["[0.0,", "0.25,", "0.5,", "0.75]", hits, "1"] for hits in ("0", "1")]


def _epoch_loop_code(monkeypatch: pytest.MonkeyPatch, dense_too: bool = False,
                     **changes: Any) -> str:
    """The LLVM code of the epoch loops fresh (uncached) compiles give small runs of
    ``changes`` on sparse inputs (and on dense ones: ``dense_too``), with the code of every
    kernel they call, directly or not (the callees load from the cache, or compile and are
    cached)."""
    from fastnn.backends.numba.kernels import blas, epoch, evaluate, layers, masks, sparse

    kernels = [kernel for module in (blas, epoch, evaluate, layers, masks, sparse)
               for kernel in vars(module).values() if hasattr(kernel, "signatures")]
    assert all(kernel.from_kernels for kernel in kernels)  # made (cached) now, not later
    monkeypatch.setattr(common, "CACHE_ENABLED", False)  # the loops alone compile afresh
    monkeypatch.setattr(epoch, "_LOOPS", {})
    sets = (sparse_blobs(60, 30, 3), make_blobs(60, 20, 3, seed=1))
    for x, t in sets[:2 if dense_too else 1]:
        Trainer(small_config("numba", n_inputs=x.shape[1], epochs=1, dtype="float32",
                             **changes)).fit(x, t)
    libraries = [result.library for loop in epoch.epoch_loops().values()
                 for result in loop.overloads.values()]
    code = [library.get_llvm_str() for library in libraries]
    seen = set(map(id, libraries))
    while libraries:  # the kernels they call by symbol, and those these link in
        for library in libraries.pop()._linking_libraries:
            if id(library) not in seen:
                seen.add(id(library))
                libraries.append(library)
                code.append(str(library._get_module_for_linking()))
    return "".join(code)


def test_an_epoch_loop_compiles_only_the_kernels_its_plan_calls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop of plain SGD without batch norm or dropout has none of the kernels of batch
    norm, optimisers with state, dropout masks or row weights in it; the loop of a plan with
    all of them calls each."""
    others = ("batch_norm_backward_sums", "normalise_activate", "optimizer_update",
              "fill_article_mask", "weighted_output_grad_rows")
    plain = _epoch_loop_code(monkeypatch)
    assert "activate_rows" in plain and not [name for name in others if name in plain]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "fit", _weighted_fit(Trainer.fit))
        rich = _epoch_loop_code(patch, batch_norm="bn", optimizer="adam", eta=0.001,
                                dropout_hidden=0.6)
    assert [name for name in others if name not in rich] == []


def _weighted_fit(fit: Any) -> Any:
    """`Trainer.fit` with every training row weighted 1."""
    def weighted(self: Trainer, x: Any, t: Any, *args: Any, **kwargs: Any) -> Any:
        return fit(self, x, t, *args, sample_weight=np.ones(len(x)), **kwargs)
    return weighted


def test_the_epoch_and_evaluation_drivers_stay_cacheable() -> None:
    """The light pipeline leaves no constant address in the drivers' code (numba refuses to
    cache a kernel that keeps one: every first run would compile again)."""
    from fastnn.backends.numba.kernels import epoch, evaluate

    data = sparse_blobs(200, 30, 3)
    config = small_config("numba", n_inputs=data[0].shape[1], epochs=1, dtype="float32")
    Trainer(config).fit(*data)
    drivers = (*epoch.epoch_loops().values(), evaluate.evaluate_block)
    assert all(driver.overloads for driver in drivers)
    assert not [driver.__name__ for driver in drivers for result in driver.overloads.values()
                if result.library.has_dynamic_globals]


def _two_spec_pair(batch_norm: str, specs: tuple[tuple[str, float, str], ...]
                   ) -> tuple[Network, Network]:
    """A numba/numpy pair whose plan gives each hidden layer its own (activation, alpha,
    batch norm)."""
    ours, ref = _pair(dict(hidden=(7, 5), batch_norm=batch_norm, dropout_input=0.8,
                           dropout_hidden=0.6, dtype="float64"))
    hidden = tuple(HiddenSpec(*spec) for spec in specs)
    for net in (ours, ref):
        net.plan = dataclasses.replace(net.plan, hidden=hidden)
        net.specs = list(hidden)
    return ours, ref


@pytest.mark.parametrize("batch_norm", ("off", "bn", "node"))
def test_each_hidden_layer_keeps_its_own_activation(numba_ops: Any, batch_norm: str) -> None:
    """A plan whose two hidden layers differ (tanh, then leaky ReLU with alpha 0.2): the
    compiled epoch and evaluation (not a fallback) equal the reference on it."""
    ours, ref = _two_spec_pair(batch_norm, (("tanh", 0.01, batch_norm),
                                            ("leaky_relu", 0.2, batch_norm)))
    x, t, _ = small_data("float64", 37)
    order = np.random.default_rng(3).permutation(len(x))
    space = workspace(numba_ops, x)
    for epoch in (1, 2):
        ours.train_epoch(x, t, order, epoch, space)
        ref.train_epoch(x, t, order, epoch)
    assert space.counters["train_threads_2"] + space.counters["train_threads_1"] == 2
    assert_all_close("train_epoch", ours.params, ref.numpy_params(), "float64")
    before = space.counters["evaluate_dense"] + space.counters["evaluate_sparse"]
    loss, predicted = evaluation(ours, x, t, space)
    assert space.counters["evaluate_dense"] + space.counters["evaluate_sparse"] == before + 1
    ref.params = ours.params
    loss_ref, predicted_ref = evaluation(ref, x, t)
    assert_close("evaluate_loss", loss, loss_ref, "float64", "loss")
    assert np.array_equal(predicted, predicted_ref)


def test_hidden_layers_with_other_batch_norms_run_the_reference(numba_ops: Any) -> None:
    """The compiled epoch and evaluation apply the plan's one batch-norm variant: a plan whose
    layers differ from it is refused (the reference executor runs, with the same results)."""
    ours, ref = _two_spec_pair("bn", (("tanh", 0.01, "bn"), ("relu", 0.01, "off")))
    x, t, _ = small_data("float64", 37)
    order = np.arange(len(x))
    space = workspace(numba_ops, x)
    ours.train_epoch(x, t, order, 1, space)
    ref.train_epoch(x, t, order, 1)
    assert not any(name.startswith("train_") for name in space.counters), space.counters
    assert_all_close("train_epoch", ours.params, ref.numpy_params(), "float64")
    loss, predicted = evaluation(ours, x, t, space)
    assert "evaluate_dense" not in space.counters and "evaluate_sparse" not in space.counters
    ref.params = ours.params
    loss_ref, predicted_ref = evaluation(ref, x, t)
    assert_close("evaluate_loss", loss, loss_ref, "float64", "loss")
    assert np.array_equal(predicted, predicted_ref)


class _Terminal:
    """A stand-in for stderr at a terminal that records what is written."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_compile_notice_only_while_compiling(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """The notice comes only when warm-up takes long (compiling), on a line of its own; a
    warm-up that finds everything compiled says nothing."""
    terminal = _Terminal()
    monkeypatch.setattr(backend_module.sys, "stderr", terminal)
    ops = backend_module.NumbaOps()
    plan = Network(small_config("numpy", batch_norm="node")).plan
    monkeypatch.setattr(common, "cache_folder", lambda: tmp_path)  # no earlier records
    monkeypatch.setattr(backend_module, "COMPILE_NOTICE_AFTER", 0.0)
    monkeypatch.setattr(ops, "run_probe", lambda plan, dtype, **_: __import__("time").sleep(0.3))
    ops.warm_up(plan)
    depth = f"{plan.n_layers - 1} hidden layers"
    assert terminal.text == (f"\ncompiling kernels for {plan.dtype}, {depth}, batch norm "
                             "(first run only; "
                             f"{backend_module.FIRST_COMPILE})\n")
    ops.warm_up(plan)  # already warm: no second notice
    assert terminal.text.count("compiling") == 1
    monkeypatch.setattr(backend_module, "COMPILE_NOTICE_AFTER", 5.0)
    fresh = backend_module.NumbaOps()
    monkeypatch.setattr(fresh, "run_probe", lambda plan, dtype, **_: None)
    fresh.warm_up(plan)  # a fast (cached) warm-up
    assert terminal.text.count("compiling") == 1


def test_a_kernel_set_is_named_by_dtype_depth_and_the_epoch_loops_choices() -> None:
    """The warm record's name and `fastnn info`'s description of a kernel set: the dtype, the
    depth and each choice of the epoch loop that differs from plain SGD; a plan with weighted
    rows is another set than the same plan without."""
    ops = backend_module.NumbaOps()
    plain = Network(small_config("numpy", hidden=(8,))).plan
    variant = ops.epoch_variant(plain, np.float32, False)
    assert backend_module.warm_variant("float32", 1, variant) == "float32-1-hidden"
    assert backend_module.describe_variant("float32-1-hidden") == "float32, 1 hidden layer"
    rich = Network(small_config("numpy", batch_norm="bn", bn_eval="running", optimizer="adam",
                                eta=0.001, dropout_hidden=0.5)).plan
    name = backend_module.warm_variant(
        "float64", 2, ops.epoch_variant(rich, np.float64, True))
    assert name == "float64-2-hidden-bn+optimizer+dropout+weighted"
    assert backend_module.describe_variant(name) == (
        "float64, 2 hidden layers, batch norm, an optimiser with state, dropout, row weights")
    assert backend_module.warm_variant(
        "float64", 2, ops.epoch_variant(rich, np.float64, False)) != name


def test_compiled_kernels_are_recorded_beside_the_cache(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A warm-up records which kernel set it compiled and how long it took; `fastnn info`'s
    list reads the records back; a record of other kernel sources (an upgrade) is not
    listed; the next compile notice quotes the time compiling took here."""
    monkeypatch.setattr(common, "cache_folder", lambda: tmp_path)
    terminal = _Terminal()
    monkeypatch.setattr(backend_module.sys, "stderr", terminal)
    plan = Network(small_config("numpy")).plan
    assert backend_module.compiled_kernels() == {}
    ops = backend_module.NumbaOps()
    monkeypatch.setattr(backend_module, "COMPILE_NOTICE_AFTER", 0.1)
    monkeypatch.setattr(ops, "run_probe", lambda plan, dtype, **_: __import__("time").sleep(0.4))
    ops.warm_up(plan)
    name = f"{plan.dtype}, {plan.n_layers - 1} hidden layers"
    compiled = backend_module.compiled_kernels()
    assert list(compiled) == [name] and 0.3 <= compiled[name] < 5
    deeper = Network(small_config("numpy", hidden=(8, 8, 8))).plan
    ops.warm_up(deeper)
    assert terminal.text.endswith("(first run only; about 0 s, as before on this machine)\n")
    assert len(backend_module.compiled_kernels()) == 2
    monkeypatch.setattr(common, "_sources_digest", lambda: "other sources")
    assert backend_module.compiled_kernels() == {}


# ---- the kernels' exp (no libm call) ----

@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorised_exp_is_within_an_ulp_or_two(dtype: str) -> None:
    """The kernels' exp (no libm call, so that loops of it vectorise): float32 within 1 ulp of
    the correctly rounded value (float64's exp rounded), float64 within 2 ulp of NumPy's,
    wherever that is a positive finite number, subnormals included; the same 0, inf and NaN at
    the edges."""
    from numba import njit

    from fastnn.backends.numba.kernels.elementary import exp

    @njit
    def apply(x, out):  # type: ignore[no-untyped-def]
        for i in range(x.shape[0]):
            out[i] = exp(x[i])

    gen = np.random.default_rng(5)
    info = np.finfo(dtype)
    edge = float(np.log(info.max))
    x = np.concatenate([
        gen.uniform(-1.05 * edge - 40, 1.05 * edge, 400_000), gen.uniform(-3, 3, 100_000),
        np.linspace(-edge - 20, -edge + 2, 20_001), np.linspace(edge - 1, edge + 1, 2_001),
        [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0],
    ]).astype(dtype)
    ours = np.empty_like(x)
    apply(x, ours)
    with np.errstate(over="ignore", under="ignore"):
        expected = np.exp(x.astype(np.float64)).astype(dtype)
    positive = np.isfinite(expected) & (expected > 0)
    ulps = (np.abs(ours[positive].astype(np.float64) - expected[positive])
            / np.spacing(expected[positive]).astype(np.float64))
    allowed = 1.0 if dtype == "float32" else 2.0
    assert ulps.max() <= allowed, (x[positive][ulps.argmax()], ulps.max())
    edges = ~positive
    np.testing.assert_array_equal(ours[edges], expected[edges])  # 0, inf, NaN (NaN == NaN)
    assert positive.sum() > 0.8 * len(x) and edges.sum() > 1000  # both regions exercised


# ---- the sparse products, kernel by kernel, against sums written out one by one ----

#: widths around the vector sizes (16 float32, 8 float64 lanes): narrower, exact, one over,
#: an overlapping last chunk, more than one group of 8 chunks
PRODUCT_WIDTHS = (1, 7, 8, 9, 15, 16, 17, 40, 100, 129, 200)


def _csr(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nonzero = x != 0
    indptr = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))]).astype(np.int64)
    rows, cols = np.nonzero(nonzero)
    return indptr, cols.astype(np.int32), x[rows, cols]


def _summed_in_order(pairs: Any, w: np.ndarray) -> np.ndarray:
    """The sum of value * w[index] over (index, value) pairs, from +0, one rounding at a time."""
    total = np.zeros(w.shape[1], w.dtype)
    for index, value in pairs:
        total = total + value * w[index]
    return total


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", PRODUCT_WIDTHS)
def test_sparse_products_sum_each_element_in_order(dtype: str, width: int) -> None:
    """The forward product (training and evaluation, scaled) and x^T du of the weight update
    give the bits of a plain in-order sum, whatever the width: SIMD chunks, the overlapping
    last chunk and the narrow path all round like it."""
    from fastnn.backends.numba.kernels import sparse

    gen = np.random.default_rng(width)
    x = sparse_x(dtype, 11, 30, seed=width)
    w = gen.normal(size=(30, width)).astype(dtype)
    b = gen.normal(size=width).astype(dtype)
    indptr, indices, values = _csr(x)
    rows = [list(zip(indices[indptr[i]:indptr[i + 1]], values[indptr[i]:indptr[i + 1]],
                     strict=True)) for i in range(len(x))]
    u = np.empty((len(x), width), dtype)
    sparse.sparse_affine_rows(indptr, indices, values, w, b, u)
    expected = np.array([_summed_in_order(row, w) + b for row in rows])
    np.testing.assert_array_equal(u, expected)
    scale = np.dtype(dtype).type(0.8)
    block = np.empty((6, width), dtype)
    from fastnn.backends.numba.inputs import NO_CODES, no_table
    from fastnn.backends.numba.kernels.common import Csr

    csr = Csr(True, indptr, indices, values, NO_CODES, no_table(dtype))
    sparse.sparse_block(csr, 3, scale, w, b, block)
    scaled = [[(j, v * scale) for j, v in row] for row in rows[3:9]]
    np.testing.assert_array_equal(block, [_summed_in_order(row, w) + b for row in scaled])

    du = gen.normal(size=(len(x), width)).astype(dtype)
    eta = np.dtype(dtype).type(0.1)
    columns = [[(i, x[i, j]) for i in range(len(x)) if x[i, j] != 0] for j in range(30)]
    gradient = np.array([_summed_in_order(column, du) for column in columns])
    for split in (0, 4):  # every row in one part; rows 0-3 in part 0, the rest in part 1
        _, parts = training.step_buffers((30, width, 3), len(x), 3, np.dtype(dtype),
                                      np.ones(2), False, True)
        bounds = ((0, len(x)), (len(x), len(x))) if split == 0 else ((0, split),
                                                                      (split, len(x)))
        for part, (first, last) in zip(parts, bounds, strict=True):
            part.span[:] = first, last - first
            part.ptr[: last - first + 1] = indptr[first:last + 1] - indptr[first]
            count = indptr[last] - indptr[first]
            part.idx[:count] = indices[indptr[first]:indptr[last]]
            part.val[:count] = values[indptr[first]:indptr[last]]
            sparse.transpose_part(part)
        updated, dw = w.copy(), np.empty_like(w)
        assert sparse.sparse_weight_update(parts, 1, 0, 30, du, updated, eta, 0,
                                           np.dtype(dtype).type(0.0), dw)
        np.testing.assert_array_equal(updated, w - eta * gradient)
        updated = w.copy()  # a Python float eta: taken in W's dtype, vector lanes and tail alike
        sparse.sparse_weight_update(parts, 1, 0, 30, du, updated, 0.1, 0,
                                    np.dtype(dtype).type(0.0), dw)
        np.testing.assert_array_equal(updated, w - eta * gradient)
        sparse.sparse_weight_update(parts, 0, 0, 30, du, w.copy(), eta, 2,
                                    np.dtype(dtype).type(1e-3), dw)  # L2: x^T du into dw
        np.testing.assert_array_equal(dw, gradient)
    broken = w.copy()
    broken[indices[0], 0] = np.inf  # an update that leaves W non-finite says so
    assert not sparse.sparse_weight_update(parts, 0, 0, 30, du, broken, eta, 0,
                                           np.dtype(dtype).type(0.0), dw)


def test_vector_loads_and_stores_refuse_strided_arrays() -> None:
    """A vector moves consecutive elements: a strided row is a compile error, never a wrong
    read or write."""
    from numba import njit
    from numba.core.errors import TypingError

    from fastnn.backends.numba.kernels import simd

    @njit
    def copy_chunk(source, target):  # type: ignore[no-untyped-def]
        simd.store(target, 0, simd.load(source, 0))

    source, target = np.arange(32, dtype=np.float32), np.zeros(16, np.float32)
    copy_chunk(source, target)
    np.testing.assert_array_equal(target, source[:16])
    with pytest.raises(TypingError):
        copy_chunk(source[::2], target)
    with pytest.raises(TypingError):
        copy_chunk(source, np.zeros((16, 2), np.float32)[:, 0])


# ---- two threads: a step shared between them, or evaluation beside training ----

SPLIT_CASES = {
    "plain": {},
    "bn-article-dropout": dict(batch_norm="bn", dropout_input=0.8, dropout_hidden=0.5),
    "node-inverted-l2": dict(batch_norm="node", dropout_mode="inverted", dropout_input=0.8,
                             dropout_hidden=0.6, weight_decay=("l2", 1e-3)),
    "n-l1-tanh": dict(batch_norm="n", weight_decay=("l1", 1e-3), activation="tanh"),
    "batch-1": dict(batch_size=1, batch_norm="off"),
    "odd-batch-narrow": dict(batch_size=7, hidden=(1, 3), batch_norm="bn"),
    "one-hidden-mse": dict(hidden=(4,), output="identity_mse", dropout_input=0.7),
    # a first layer of many vector chunks (the sparse products' register groups, the last
    # chunk overlapping): 150 = 9 x 16 + 6 float32, 18 x 8 + 6 float64
    "wide-first-l1": dict(hidden=(150, 5), weight_decay=("l1", 1e-3), dropout_input=0.8),
    "wide-first-plain": dict(hidden=(150, 5)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparse", (False, True), ids=("dense", "sparse"))
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_a_step_shared_by_two_threads_gives_the_same_bits(
    numba_ops: Any, case: str, sparse: bool, dtype: str
) -> None:
    """Each step's parts on two threads (a spin barrier between phases) give exactly what the
    same parts give one after another on one thread, and match the reference."""
    options = {**SPLIT_CASES[case], "dtype": dtype}
    x, t, _ = small_data(dtype, n=23)
    if sparse:
        x = sparse_x(dtype, 23, 6)
    order = np.random.default_rng(4).permutation(len(x))
    runs = _two_epochs_on_one_and_two_threads(numba_ops, options, x, t, order, sparse)
    for threads, (ours, _, space) in zip((1, 2), runs, strict=True):
        assert space.counters[f"train_threads_{threads}"] == 2
        assert space.counters["sparse_steps"] == (2 * len(range(0, 23, ours.plan.batch_size))
                                                  if sparse else 0)
    _assert_same_bits(runs)
    ours, ref, _ = runs[-1]
    assert_all_close("train_epoch", ours.params, ref.numpy_params(), dtype)


def _two_epochs_on_one_and_two_threads(
    ops: Any, options: dict[str, Any], x: np.ndarray, t: np.ndarray, order: np.ndarray,
    sparse: bool,
) -> list[tuple[Network, Network, Any]]:
    """(numba network, reference network, workspace) after two epochs, for threads 1 and 2."""
    runs = []
    for threads in (1, 2):
        ours, ref = _pair(options)
        space = ops.workspace(threads=threads)
        space.options["sparse_mode"] = "1" if sparse else "0"
        space.options["split_min_work"] = 0  # share even these small steps
        ops.prepare_inputs(x, space)
        for epoch in (1, 2):
            ours.train_epoch(x, t, order, epoch, space)
            ref.train_epoch(x, t, order, epoch)
        runs.append((ours, ref, space))
    return runs


def _assert_same_bits(runs: list[tuple[Network, Network, Any]]) -> None:
    first, second = (ours.state_arrays() for ours, _, _ in runs)
    for name, value in first.items():
        assert np.array_equal(value, second[name]), name


@pytest.mark.parametrize("batch_size", (3, 4))
@pytest.mark.parametrize("sparse", (False, True), ids=("dense", "sparse"))
def test_a_one_input_network_with_per_row_masks(numba_ops: Any, sparse: bool,
                                                batch_size: int) -> None:
    """One input: a part's slice of an inverted mask is (1, 1) or (n, 1) and must still mask
    (not read as "no dropout", nor as one value for every row); 1 and 2 threads agree with the
    reference, short last batch included."""
    options = dict(n_inputs=1, dropout_mode="inverted", dropout_input=0.6, dropout_hidden=0.7,
                   batch_size=batch_size, dtype="float64")
    gen = np.random.default_rng(8)
    x = np.where(gen.random((23, 1)) < 0.5, 0.0, gen.random((23, 1)))
    t = np.eye(3)[gen.integers(0, 3, 23)]
    order = gen.permutation(23)
    runs = _two_epochs_on_one_and_two_threads(numba_ops, options, x, t, order, sparse)
    for ours, ref, _ in runs:
        assert_all_close("train_epoch", ours.params, ref.numpy_params(), "float64")
    _assert_same_bits(runs)


def test_overlap_mode_trains_on_one_thread(numba_ops: Any, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """FASTNN_NUMBA_PARALLEL=overlap: a two-thread run's steps stay on one thread (the other
    evaluates); an unknown value keeps the default, "split"; an epoch below split_min_work
    stays on one thread."""
    x, t, _ = small_data("float64")
    for value, threads in (("overlap", 1), ("bogus", 2), ("split", 2)):
        monkeypatch.setenv("FASTNN_NUMBA_PARALLEL", value)
        space = numba_ops.workspace(threads=2)
        space.options["split_min_work"] = 0  # share even these small steps
        assert numba_ops.overlaps_evaluation(space) == (value == "overlap")
        Network(small_config("numba")).train_epoch(x, t, np.arange(len(x)), 1, space)
        assert space.counters[f"train_threads_{threads}"] == 1, value
    monkeypatch.delenv("FASTNN_NUMBA_PARALLEL")
    space = numba_ops.workspace(threads=2)  # the default threshold: these rows are too few
    Network(small_config("numba")).train_epoch(x, t, np.arange(len(x)), 1, space)
    assert space.counters["train_threads_1"] == 1 and "train_threads_2" not in space.counters


def test_a_failing_thread_releases_the_other(numba_ops: Any) -> None:
    """When one part's thread raises, the barrier is abandoned: the other returns and the
    error reaches the caller (no hang), whichever thread failed."""
    import numba

    sync = numba_ops.kernels.sync

    @numba.njit(nogil=True)
    def meet(threads: int, barrier: Any) -> int:
        for _ in range(1000):
            if not sync.wait_for_all(barrier, threads):
                return -1
        return 0

    for failing in (0, 1):
        def kernel(me: int, threads: int, barrier: Any, failing: int = failing) -> int:
            if me == failing:
                raise ValueError(f"part {me} failed")
            return meet(threads, barrier)

        with pytest.raises(ValueError, match=f"part {failing} failed"):
            training.run_parts(kernel, sync, 2, ())
    assert training.run_parts(lambda me, threads, barrier: meet(threads, barrier),
                              sync, 2, ()) == 0


def test_spin_barrier_orders_memory(numba_ops: Any) -> None:
    """Two threads take 20000 rounds: what one wrote before a round is seen by the other after
    it, and no thread leaves a round early."""
    import threading

    import numba

    sync = numba_ops.kernels.sync
    rounds = 20_000

    @numba.njit(nogil=True)
    def take_turns(me: int, barrier: Any, log: Any) -> int:
        for r in range(log.shape[1]):
            log[me, r] = r
            if not sync.wait_for_all(barrier, 2):
                return -2
            if log[1 - me, r] != r:
                return r
        return -1

    log = np.full((2, rounds), -5, np.int64)
    barrier = sync.new_barrier()
    outcome = [0, 0]

    def run(me: int) -> None:
        outcome[me] = take_turns(me, barrier, log)

    assert take_turns(0, sync.new_barrier(), np.zeros((2, 0), np.int64)) == -1  # compiled
    workers = [threading.Thread(target=run, args=(me,)) for me in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert outcome == [-1, -1]


@pytest.mark.parametrize("changes", [
    dict(batch_norm="bn", dropout_hidden=0.5, dtype="float32"),
    dict(batch_norm="node", bn_eval="running", early_stopping=1, validation_fraction=0.2,
         eta=0.5),
    dict(eta=50.0, stop_on_divergence=True, batch_norm="off"),
])
def test_two_threads_give_the_figures_of_one(
    changes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """threads=1 works in turn; threads=2 shares each step ("split") or evaluates epoch e while
    e + 1 trains ("overlap"). Histories, decisions (early stopping, divergence), snapshots and
    final parameters are identical."""
    x, t = make_blobs(900, 20, 3, seed=5)
    noisy = np.random.default_rng(0).random(900) < 0.5  # half the labels random: it overfits
    t = np.where(noisy, np.random.default_rng(1).integers(0, 3, 900), t)
    results = []
    for threads, mode in ((1, "split"), (2, "split"), (2, "overlap")):
        monkeypatch.setenv("FASTNN_NUMBA_PARALLEL", mode)
        config = Config(hidden=(16, 8), n_inputs=20, n_outputs=3, epochs=6, batch_size=64,
                        backend="numba", seed=3, **changes)
        epochs_seen: list[int] = []

        def seen(trainer: Trainer, epoch: int, epochs_seen: list[int] = epochs_seen) -> None:
            assert trainer.state.epoch == epoch
            epochs_seen.append(epoch)

        trainer = Trainer(config, threads=threads, on_epoch=seen)
        with pytest.warns() if "stop_on_divergence" in changes else _no_warning():
            history = trainer.fit(x[:700], t[:700], x[700:], t[700:])
        record = {k: v for k, v in history.to_dict().items() if k != "epoch_seconds"}
        results.append((record, trainer.network.state_arrays(), epochs_seen,
                        trainer.state.arrays))
    first, params, seen, state = results[0]
    for second, params2, seen2, state2 in results[1:]:
        assert first == second
        assert seen == seen2 == list(range(1, len(seen) + 1))
        assert params.keys() == params2.keys() and state.keys() == state2.keys()
        for name in params:  # the final network's (population statistics included)
            assert np.array_equal(params[name], params2[name]), name
        for name in state:  # the last snapshot's
            assert np.array_equal(state[name], state2[name]), name
    events = first["events"]
    if "early_stopping" in changes:
        assert events["stopped_early_at"] < 6 and events["restored_best_epoch"] >= 1
    if "stop_on_divergence" in changes:
        assert events["stopped_on_divergence_at"] < 6


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None
