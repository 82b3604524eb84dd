"""The CUDA C kernels (kernels/*.cu) against the NumPy reference ops, and the CPU shim itself.

Every kernel test runs on the CPU shim in both thread orders and, when CuPy finds a CUDA
device, through ``cupy.RawModule`` (that parameter skips otherwise; it fails instead when
$FASTNN_REQUIRE_BACKENDS names "cupy"). Floats are compared normwise: the largest difference
over the largest reference magnitude, against a tolerance named per op. Masks and integer
outputs must be identical.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from fastnn import config, rng
from fastnn.backends import codes, get_backend
from fastnn.backends.codes import (
    ACTIVATION_CODES,
    BATCH_NORM_CODES,
    DECAY_CODES,
    DROPOUT_CODES,
    OPTIMIZER_CODES,
    OUTPUT_CODES,
    STATS_CODES,
    TRANSFORM_CODES,
)
from fastnn.cuda import (
    COLUMN_BLOCK,
    kernel_dir,
    kernel_files,
    kernel_signatures,
    module_args,
    read_source,
    shim,
)
from fastnn.functions import ACTIVATIONS
from fastnn.plan import HiddenSpec, OptimizerSpec

pytestmark = [
    pytest.mark.cuda_cpu,
    # the reference sigmoid overflows (harmlessly, to 0) on large negative inputs in float32
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

REF = get_backend("numpy")
DTYPES = ("float64", "float32")
#: normwise relative tolerance per op and dtype
TOLERANCE: dict[str, dict[str, float]] = {
    "dropout_input": {"float64": 0.0, "float32": 0.0},  # one multiply: exact
    "hidden_forward": {"float64": 1e-12, "float32": 1e-5},
    "hidden_backward": {"float64": 1e-12, "float32": 1e-5},
    "output_loss_grad": {"float64": 1e-12, "float32": 1e-5},
    "eval_output": {"float64": 1e-12, "float32": 1e-5},
    "col_stats": {"float64": 1e-12, "float32": 1e-5},
    "sgd": {"float64": 1e-15, "float32": 1e-7},
    # a division and a square root per element, over three updates
    "optimizer_update": {"float64": 1e-14, "float32": 1e-6},
    "update_running": {"float64": 1e-15, "float32": 1e-7},
    "sum_reduce": {"float64": 1e-13, "float32": 1e-6},
    "gemm": {"float64": 1e-13, "float32": 1e-6},
    "training_step": {"float64": 1e-12, "float32": 1e-5},
}
SHAPES = ((7, 13), (100, 50))
KEEP = 0.6
ALPHA = 0.07


# ---- runners: the CPU shim (forward, reverse) and CuPy ----


def _required(name: str) -> bool:
    return name in os.environ.get("FASTNN_REQUIRE_BACKENDS", "")


def _cupy_problem() -> str | None:
    try:
        import cupy
    except ImportError as exc:
        return f"cupy is not importable ({exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - any CUDA failure means "no usable device"
        return f"no usable CUDA device ({exc})"
    return None if count > 0 else "no CUDA device"


class Runner:
    """Launches a kernel of a kernels/*.cu file on one engine, with NumPy arrays in and out."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._modules: dict[str, Any] = {}

    def module(self, file: str) -> Any:
        if file not in self._modules:
            code, options, names = module_args(file)
            if self.kind == "cupy":
                import cupy

                self._modules[file] = cupy.RawModule(
                    code=code, options=options, name_expressions=names
                )
            else:
                order = "reverse" if self.kind == "shim-reverse" else "forward"
                self._modules[file] = shim.Module(code, options, names, thread_order=order)
        return self._modules[file]

    def __call__(
        self, file: str, kernel: str, grid: Sequence[int], block: Sequence[int], args: Sequence
    ) -> None:
        function = self.module(file).get_function(kernel)
        if self.kind != "cupy":
            function(tuple(grid), tuple(block), tuple(args))
            return
        import cupy

        device: dict[tuple[int, int], tuple[np.ndarray, Any]] = {}
        converted = []
        for arg in args:
            if isinstance(arg, np.ndarray):
                key = (arg.ctypes.data, arg.nbytes)
                if key not in device:
                    device[key] = (arg, cupy.asarray(arg))
                converted.append(device[key][1])
            else:
                converted.append(arg)
        function(tuple(grid), tuple(block), tuple(converted))
        cupy.cuda.Device().synchronize()
        for host, array in device.values():
            if host.flags.writeable:
                host[...] = cupy.asnumpy(array)


@pytest.fixture(scope="module", params=["shim", "shim-reverse", "cupy"])
def run(request: pytest.FixtureRequest) -> Runner:
    kind = request.param
    if kind == "cupy":
        problem = _cupy_problem()
        if problem is not None:
            if _required("cupy"):
                pytest.fail(f"FASTNN_REQUIRE_BACKENDS names cupy, but {problem}")
            pytest.skip(f"cupy: {problem}")
    elif shim.find_compiler() is None:
        if _required("shim"):
            pytest.fail("FASTNN_REQUIRE_BACKENDS names shim, but there is no C++ compiler")
        pytest.skip("no C++ compiler for the CPU shim")
    return Runner(kind)


# ---- helpers ----


def assert_close(
    actual: Any, expected: Any, op: str, dtype: str, what: str = "", scale: float | None = None
) -> None:
    """Normwise comparison with the op's tolerance; the message names the worst element.

    ``scale`` replaces the largest reference magnitude, for results that cancel to about 0
    (sums of terms much larger than the sum: pass the sum of their magnitudes).
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{op} {what}: shape {actual.shape} != {expected.shape}"
    nan_mismatch = np.isnan(actual) != np.isnan(expected)
    assert not nan_mismatch.any(), (
        f"{op} {what} ({dtype}): NaN where the reference has none (or the reverse) at "
        f"{np.argwhere(nan_mismatch)[:5].tolist()}"
    )
    if actual.size == 0:
        return
    difference = np.where(np.isnan(expected), 0.0, np.abs(actual - expected))
    if scale is None:
        scale = float(np.nanmax(np.abs(expected)))
    scale = max(scale, np.finfo(np.float64).tiny)
    error = float(difference.max()) / scale
    tolerance = TOLERANCE[op][dtype]
    worst = np.unravel_index(int(difference.argmax()), difference.shape)
    assert error <= tolerance, (
        f"{op} {what} ({dtype}): worst normwise difference {error:.3g} > {tolerance:g} at "
        f"{tuple(int(i) for i in worst)}: kernel {actual[worst]!r}, reference {expected[worst]!r}"
    )


def suffix(dtype: str) -> str:
    return "f64" if dtype == "float64" else "f32"


def scalar(dtype: str) -> Callable[[float], np.generic]:
    return np.dtype(dtype).type


def blank(shape: int | tuple[int, ...], dtype: str | type = np.float64) -> np.ndarray:
    """An output buffer full of NaN (or -1): whatever the kernel does not write shows."""
    array = np.empty(shape, dtype=dtype)
    array.fill(np.nan if np.dtype(dtype).kind == "f" else -1)
    return array


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bn_params(
    rs: np.random.Generator, bn: str, d: int, dtype: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    size = {"bn": 1, "node": d}.get(bn)
    if size is None:
        return None, None
    gamma = (1.0 + 0.3 * rs.standard_normal(size)).astype(dtype)
    beta = (0.2 * rs.standard_normal(size)).astype(dtype)
    return gamma, beta


def reference_multiplier(drop: str, key: int, n: int, d: int, dtype: str) -> Any:
    """What Network passes to Ops.hidden_forward as the mask for each dropout code."""
    if drop == "none":
        return None
    if drop == "article":
        return REF.article_mask(key, d, KEEP, dtype)
    if drop == "article_eval":
        return KEEP
    return REF.bernoulli_mask(key, (n, d), KEEP, dtype) / KEEP


def hidden_forward(
    run: Runner,
    u: np.ndarray,
    act: str,
    bn: str,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    drop: str,
    key: int,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
    row_blocks: int = 1,
) -> dict[str, np.ndarray | None]:
    """Run hidden_forward; returns its outputs by name."""
    n, d = u.shape
    dtype = u.dtype.name
    T = scalar(dtype)
    out: dict[str, np.ndarray | None] = {
        "z": blank((n, d), dtype),
        "y": blank((n, d), dtype),
        "u_hat": blank((n, d), dtype),
        "std": blank(d, dtype),
        "mask": {"article": blank(d, dtype), "inverted": blank((n, d), dtype)}.get(drop),
    }
    if stats is None:
        out["mean"], out["var"] = blank(d, dtype), blank(d, dtype)
    else:
        out["mean"], out["var"] = stats
    run(
        "hidden_forward",
        f"hidden_forward_{suffix(dtype)}",
        (ceil_div(d, 32), row_blocks, 1),
        COLUMN_BLOCK,
        (
            u, np.int32(n), np.int32(d), np.int32(ACTIVATION_CODES[act]), T(ALPHA),
            np.int32(BATCH_NORM_CODES[bn]), gamma, beta,
            np.int32(STATS_CODES["batch" if stats is None else "given"]),
            out["mean"], out["var"], out["std"], np.int32(DROPOUT_CODES[drop]), np.uint64(key),
            None, np.int32(rng.keep_count(KEEP, d)), np.float64(KEEP), out["mask"], out["y"],
            out["u_hat"], out["z"],
        ),
    )  # fmt: skip
    return out


def check_forward(
    out: dict[str, Any], u: np.ndarray, act: str, bn: str, gamma: Any, beta: Any, drop: str,
    key: int, stats: Any = None,
) -> None:  # fmt: skip
    n, d = u.shape
    dtype = u.dtype.name
    multiplier = reference_multiplier(drop, key, n, d, dtype)
    spec = HiddenSpec(activation=act, alpha=ALPHA, batch_norm=bn)
    z, cache = REF.hidden_forward(u, spec, gamma, beta, multiplier, stats)
    assert_close(out["z"], z, "hidden_forward", dtype, "z")
    assert_close(out["y"], cache.pre_activation, "hidden_forward", dtype, "y")
    if bn != "off":
        assert_close(out["u_hat"], cache.u_hat, "hidden_forward", dtype, "u_hat")
        assert_close(out["std"], cache.std, "hidden_forward", dtype, "std")
        assert_close(out["mean"], cache.mean, "hidden_forward", dtype, "mean")
        assert_close(out["var"], cache.var, "hidden_forward", dtype, "var")
    if drop in ("article", "inverted"):
        np.testing.assert_array_equal(out["mask"], multiplier, err_msg="the dropout multiplier")


# ---- masks ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep", [0.0, 0.25, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("d", [1, 13, 50, 784])
def test_article_mask_is_bit_identical(run: Runner, d: int, keep: float, dtype: str) -> None:
    key = rng.dropout_key(11, 3, 7, 1)
    mask = blank(d, dtype)
    run(
        "masks",
        f"article_mask_{suffix(dtype)}",
        (ceil_div(d, 256),),
        (256,),
        (np.uint64(key), None, np.int32(d), np.int32(rng.keep_count(keep, d)), mask),
    )
    expected = REF.article_mask(key, d, keep, dtype)
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() == rng.keep_count(keep, d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaled", [False, True], ids=["mask", "multiplier"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bernoulli_mask_is_bit_identical(
    run: Runner, shape: tuple[int, int], scaled: bool, dtype: str
) -> None:
    key = rng.dropout_key(5, 0, 1, 2)
    T = scalar(dtype)
    out = blank(shape, dtype)
    on_value = T(1) / T(KEEP) if scaled else T(1)
    count = shape[0] * shape[1]
    run(
        "masks",
        f"bernoulli_mask_{suffix(dtype)}",
        (3,),  # fewer threads than elements: the grid-stride loop covers the rest
        (256,),
        (np.uint64(key), np.int64(count), np.float64(KEEP), on_value, out),
    )
    expected = REF.bernoulli_mask(key, shape, KEEP, dtype)
    np.testing.assert_array_equal(out, expected / KEEP if scaled else expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("drop", list(DROPOUT_CODES))
def test_dropout_input(run: Runner, drop: str, dtype: str) -> None:
    n, d = 9, 20
    rs = np.random.default_rng(1)
    x = rs.standard_normal((n, d)).astype(dtype)
    key = rng.dropout_key(2, 1, 0, 0)
    article = REF.article_mask(key, d, KEEP, dtype) if drop == "article" else None
    out = blank((n, d), dtype)
    run(
        "masks",
        f"dropout_input_{suffix(dtype)}",
        (ceil_div(n * d, 256),),
        (256,),
        (x, np.int32(n), np.int32(d), np.int32(DROPOUT_CODES[drop]), np.uint64(key), None,
         np.float64(KEEP), article, out),
    )  # fmt: skip
    expected = REF.apply_mask(x, reference_multiplier(drop, key, n, d, dtype))
    assert_close(out, expected, "dropout_input", dtype)


# ---- hidden layer forward ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(ACTIVATION_CODES))
def test_hidden_forward_activations(run: Runner, act: str, dtype: str) -> None:
    rs = np.random.default_rng(2)
    n, d = SHAPES[0]
    u = (1.5 * rs.standard_normal((n, d)) + 0.3).astype(dtype)
    gamma, beta = bn_params(rs, "node", d, dtype)
    key = rng.dropout_key(1, 0, 3, 1)
    out = hidden_forward(run, u, act, "node", gamma, beta, "article", key)
    check_forward(out, u, act, "node", gamma, beta, "article", key)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("drop", list(DROPOUT_CODES))
@pytest.mark.parametrize("bn", list(BATCH_NORM_CODES))
def test_hidden_forward_variants(
    run: Runner, bn: str, drop: str, shape: tuple[int, int], dtype: str
) -> None:
    rs = np.random.default_rng(3)
    n, d = shape
    u = (2.0 * rs.standard_normal((n, d)) - 0.5).astype(dtype)
    u[:, 0] = 3.0  # a constant node: variance 0, std floored at 1e-7
    gamma, beta = bn_params(rs, bn, d, dtype)
    key = rng.dropout_key(4, 2, 9, 1)
    out = hidden_forward(run, u, "tanh", bn, gamma, beta, drop, key)
    check_forward(out, u, "tanh", bn, gamma, beta, drop, key)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_blocks", [1, 3])
@pytest.mark.parametrize("bn", ["n", "bn", "node"])
def test_hidden_forward_given_statistics(run: Runner, bn: str, row_blocks: int, dtype: str) -> None:
    rs = np.random.default_rng(4)
    n, d = 40, 37
    u = rs.standard_normal((n, d)).astype(dtype)
    mean = (0.3 * rs.standard_normal(d)).astype(dtype)
    var = rs.uniform(0.2, 2.0, d).astype(dtype)
    var[3] = 0.0  # floored
    gamma, beta = bn_params(rs, bn, d, dtype)
    out = hidden_forward(
        run, u, "sigmoid", bn, gamma, beta, "article_eval", 0, (mean, var), row_blocks
    )
    check_forward(out, u, "sigmoid", bn, gamma, beta, "article_eval", 0, (mean, var))


# ---- hidden layer backward ----


def run_hidden_backward(
    run: Runner, act: str, bn: str, drop: str, n: int, d: int, dtype: str, seed: int,
    row_blocks: int = 1,
) -> None:  # fmt: skip
    rs = np.random.default_rng(seed)
    u = (1.5 * rs.standard_normal((n, d)) + 0.2).astype(dtype)
    dz = rs.standard_normal((n, d)).astype(dtype)
    gamma, beta = bn_params(rs, bn, d, dtype)
    key = rng.dropout_key(seed, 1, 4, 1)
    spec = HiddenSpec(activation=act, alpha=ALPHA, batch_norm=bn)
    _, cache = REF.hidden_forward(
        u, spec, gamma, beta, reference_multiplier(drop, key, n, d, dtype)
    )
    du_ref, dgamma_ref, dbeta_ref = REF.hidden_backward(dz, cache, spec, gamma)

    T = scalar(dtype)
    du = blank((n, d), dtype)
    nodes = gamma is not None
    dgamma_nodes = blank(d, dtype) if nodes else None
    dbeta_nodes = blank(d, dtype) if nodes else None
    run(
        "hidden_backward",
        f"hidden_backward_{suffix(dtype)}",
        (ceil_div(d, 32), row_blocks, 1),
        COLUMN_BLOCK,
        (
            dz, np.int32(n), np.int32(d), np.int32(ACTIVATION_CODES[act]), T(ALPHA),
            cache.pre_activation, np.int32(BATCH_NORM_CODES[bn]), gamma, cache.u_hat, cache.std,
            np.int32(DROPOUT_CODES[drop]), np.uint64(key), None, np.int32(rng.keep_count(KEEP, d)),
            np.float64(KEEP), du, dgamma_nodes, dbeta_nodes,
        ),
    )  # fmt: skip
    assert_close(du, du_ref, "hidden_backward", dtype, "du")
    if not nodes:
        assert dgamma_ref is None
        return
    if bn == "bn":  # the article's scalar: node sums averaged over the d nodes
        dgamma, dbeta = blank(1, dtype), blank(1, dtype)
        for nodes_sum, target in ((dgamma_nodes, dgamma), (dbeta_nodes, dbeta)):
            run(
                "reduce",
                f"sum_reduce_{suffix(dtype)}",
                (1,),
                (256,),
                (nodes_sum, np.int64(d), np.int32(0), T(1), T(d), target, np.int32(0)),
            )
    else:
        dgamma, dbeta = dgamma_nodes, dbeta_nodes
    assert_close(dgamma, dgamma_ref, "hidden_backward", dtype, "dgamma")
    assert_close(dbeta, dbeta_ref, "hidden_backward", dtype, "dbeta")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(ACTIVATION_CODES))
def test_hidden_backward_activations(run: Runner, act: str, dtype: str) -> None:
    run_hidden_backward(run, act, "node", "inverted", *SHAPES[0], dtype, seed=5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("drop", list(DROPOUT_CODES))
@pytest.mark.parametrize("bn", list(BATCH_NORM_CODES))
def test_hidden_backward_variants(
    run: Runner, bn: str, drop: str, shape: tuple[int, int], dtype: str
) -> None:
    run_hidden_backward(run, "leaky_relu", bn, drop, *shape, dtype, seed=6)


@pytest.mark.parametrize("bn", ["off", "bn"])
def test_hidden_backward_over_row_blocks(run: Runner, bn: str) -> None:
    run_hidden_backward(run, "softplus", bn, "article", 50, 45, "float64", seed=7, row_blocks=4)


# ---- output layer and loss ----


def one_hot(labels: np.ndarray, c: int, dtype: str) -> np.ndarray:
    return np.eye(c, dtype=dtype)[labels]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("shape", [(7, 3), (100, 10)])
@pytest.mark.parametrize("output", list(OUTPUT_CODES))
def test_output_loss_grad(
    run: Runner, output: str, shape: tuple[int, int], blocks: int, dtype: str
) -> None:
    n, c = shape
    rs = np.random.default_rng(8)
    u = (2.0 * rs.standard_normal((n, c))).astype(dtype)
    u[0] = 40.0  # softmax of equal large inputs: the max subtraction keeps it finite
    t = one_hot(rs.integers(0, c, n), c, dtype)
    y, du, loss = blank((n, c), dtype), blank((n, c), dtype), blank(blocks, dtype)
    run(
        "output_loss",
        f"output_loss_grad_{suffix(dtype)}",
        (blocks,),
        (32,) if blocks > 1 else (128,),
        (u, t, np.int32(n), np.int32(c), np.int32(OUTPUT_CODES[output]), y, du, loss),
    )
    y_ref, loss_ref, du_ref = REF.output_loss_grad(u, t, output)
    assert_close(y, y_ref, "output_loss_grad", dtype, "y")
    assert_close(du, du_ref, "output_loss_grad", dtype, "du")
    assert_close(loss.sum(dtype=np.float64), loss_ref, "output_loss_grad", dtype, "loss")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output", list(OUTPUT_CODES))
def test_eval_output(run: Runner, output: str, dtype: str) -> None:
    n, c = 1000, 10
    rs = np.random.default_rng(9)
    u = (3.0 * rs.standard_normal((n, c))).astype(dtype)
    u[0] = 0.0  # a tie everywhere: the first class
    u[1, 3] = u[1, 7] = 50.0  # a tie of two maxima: the first of them
    labels = rs.integers(0, c, n).astype(np.int32)
    t = one_hot(labels, c, dtype)
    loss_sum = np.zeros(1)
    correct = np.zeros(1, dtype=np.uint64)
    predicted = blank(n, np.int32)
    for start, stop in ((0, 700), (700, n)):  # two launches accumulate into the same counters
        rows = stop - start
        run(
            "eval_output",
            f"eval_output_{suffix(dtype)}",
            (ceil_div(rows, 256),),
            (256,),
            (u[start:stop], t[start:stop], np.int32(rows), np.int32(c),
             np.int32(OUTPUT_CODES[output]), labels[start:stop], predicted[start:stop], loss_sum,
             correct),
        )  # fmt: skip
    y = REF.output_forward(u, output)
    assert_close(loss_sum[0] / n, REF.loss(y, t, output), "eval_output", dtype, "loss")
    np.testing.assert_array_equal(predicted, REF.predicted_classes(y))
    assert predicted[0] == 0 and predicted[1] == 3
    assert int(correct[0]) == int((REF.predicted_classes(y) == labels).sum())


# ---- whole-set statistics in row blocks ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_blocks", [1, 4])
def test_whole_set_statistics_then_forward(run: Runner, row_blocks: int, dtype: str) -> None:
    """Network.forward_eval's article batch norm: statistics of the whole set, in blocks."""
    n, d = 1000, 13
    rs = np.random.default_rng(10)
    u = (rs.standard_normal((n, d)) * rs.uniform(0.5, 3.0, d) + 1.0).astype(dtype)
    partial = blank((row_blocks, d), dtype)
    mean, var, std = blank(d, dtype), blank(d, dtype), blank(d, dtype)
    s = suffix(dtype)
    grid = (ceil_div(d, 32), row_blocks, 1)
    finalize = (ceil_div(d, 256),), (256,)
    run("colstats", f"col_partial_sums_{s}", grid, COLUMN_BLOCK,
        (u, np.int32(n), np.int32(d), None, partial))  # fmt: skip
    run("colstats", f"col_stats_finalize_{s}", *finalize,
        (partial, np.int32(row_blocks), np.int32(n), np.int32(d), mean, None))  # fmt: skip
    run("colstats", f"col_partial_sums_{s}", grid, COLUMN_BLOCK,
        (u, np.int32(n), np.int32(d), mean, partial))  # fmt: skip
    run("colstats", f"col_stats_finalize_{s}", *finalize,
        (partial, np.int32(row_blocks), np.int32(n), np.int32(d), var, std))  # fmt: skip
    spec = HiddenSpec(activation="relu", batch_norm="node")
    gamma, beta = bn_params(rs, "node", d, dtype)
    z_ref, cache = REF.hidden_forward(u, spec, gamma, beta, KEEP)  # the batch's own statistics
    assert_close(mean, cache.mean, "col_stats", dtype, "mean")
    assert_close(var, cache.var, "col_stats", dtype, "var")
    assert_close(std, cache.std, "col_stats", dtype, "std")
    out = hidden_forward(run, u, "relu", "node", gamma, beta, "article_eval", 0, (mean, var), 5)
    assert_close(out["z"], z_ref, "col_stats", dtype, "z")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gradient_is_a_column_sum(run: Runner, dtype: str) -> None:
    n, d = 100, 50
    du = np.random.default_rng(11).standard_normal((n, d)).astype(dtype)
    db = blank(d, dtype)
    run("colstats", f"col_partial_sums_{suffix(dtype)}", (ceil_div(d, 32), 1, 1), COLUMN_BLOCK,
        (du, np.int32(n), np.int32(d), None, db))  # fmt: skip
    _, expected, _ = REF.affine_backward(du, np.zeros((d, d), dtype), du, need_dx=False)
    assert_close(db, expected, "col_stats", dtype, "db")


# ---- update, reductions, products ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", list(DECAY_CODES))
def test_sgd_weight_update(run: Runner, decay: str | None, dtype: str) -> None:
    rs = np.random.default_rng(12)
    w = rs.standard_normal((13, 7)).astype(dtype)
    w[0, :3] = 0.0  # sign(0) = 0
    dw = rs.standard_normal((13, 7)).astype(dtype)
    rate, lam = 0.1, 0.01
    expected = w.copy()
    REF.sgd_update(expected, dw, rate, decay, lam)
    T = scalar(dtype)
    run("sgd", f"sgd_weight_{suffix(dtype)}", (1,), (64,),
        (w, dw, np.int64(w.size), T(rate), np.int32(DECAY_CODES[decay]), T(lam)))  # fmt: skip
    assert_close(w, expected, "sgd", dtype, "W")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_vector_update(run: Runner, dtype: str) -> None:
    rs = np.random.default_rng(13)
    p, g = rs.standard_normal(1000).astype(dtype), rs.standard_normal(1000).astype(dtype)
    expected = p.copy()
    REF.sgd_update(expected, g, 0.05)
    run("sgd", f"sgd_vector_{suffix(dtype)}", (2,), (256,),
        (p, g, np.int64(p.size), scalar(dtype)(0.05)))  # fmt: skip
    assert_close(p, expected, "sgd", dtype, "b")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", list(DECAY_CODES))
@pytest.mark.parametrize("kind", list(OPTIMIZER_CODES))
def test_optimizer_update(run: Runner, kind: str, decay: str | None, dtype: str) -> None:
    """Three updates of a matrix and its slots against Ops.optimizer_update, then a rate-0
    update with an infinite gradient that must change nothing."""
    rs = np.random.default_rng(14)
    spec = OptimizerSpec(kind, momentum=0.8, beta1=0.85, beta2=0.99, eps=1e-6)
    w = rs.standard_normal((13, 7)).astype(dtype)
    w[0, :3] = 0.0  # sign(0) = 0
    slots = [np.zeros_like(w) for _ in spec.slots]
    expected, expected_slots = w.copy(), [s.copy() for s in slots]
    T, lam = scalar(dtype), 0.01
    placeholder = np.zeros(1, dtype)

    def launch(grad: np.ndarray, rate: float, step: int) -> None:
        first = slots[0] if slots else placeholder
        second = slots[-1] if len(slots) > 1 else placeholder
        run("optimizer", f"optimizer_update_{suffix(dtype)}", (1,), (64,),
            (w, grad, first, second, np.int64(w.size), np.int32(OPTIMIZER_CODES[kind]),
             T(rate), np.int32(DECAY_CODES[decay]), T(lam), T(spec.momentum), T(spec.beta1),
             T(1 - spec.beta1), T(spec.beta2), T(1 - spec.beta2), T(spec.eps),
             T(1 - spec.beta1**step), T(1 - spec.beta2**step), None, None))  # fmt: skip

    for step in (1, 2, 3):
        grad = rs.standard_normal(w.shape).astype(dtype)
        rate = 0.1 / step
        REF.optimizer_update(expected, grad, tuple(expected_slots), rate, spec, step, decay, lam)
        launch(grad, rate, step)
        assert_close(w, expected, "optimizer_update", dtype, f"W after update {step}")
        for name, got, want in zip(spec.slots, slots, expected_slots, strict=True):
            assert_close(got, want, "optimizer_update", dtype, f"{name} after update {step}")
    before, before_slots = w.copy(), [s.copy() for s in slots]
    launch(np.full(w.shape, np.inf, dtype), 0.0, 4)
    np.testing.assert_array_equal(w, before)
    for got, want in zip(slots, before_slots, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_running_statistics(run: Runner, dtype: str) -> None:
    rs = np.random.default_rng(18)
    d, momentum = 37, 0.9
    mean, var = rs.standard_normal(d).astype(dtype), rs.uniform(0.1, 2, d).astype(dtype)
    u = rs.standard_normal((20, d)).astype(dtype)
    _, cache = REF.hidden_forward(u, HiddenSpec(batch_norm="n"), None, None, None)
    expected = (mean.copy(), var.copy())
    REF.update_running(expected, cache, momentum)
    run("running_stats", f"update_running_{suffix(dtype)}", (1,), (32,),
        (mean, var, cache.mean, cache.var, np.int32(d), np.float64(momentum)))  # fmt: skip
    assert_close(mean, expected[0], "update_running", dtype, "mean")
    assert_close(var, expected[1], "update_running", dtype, "var")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", list(TRANSFORM_CODES))
def test_sum_reduce_and_penalties(run: Runner, transform: str, dtype: str) -> None:
    rs = np.random.default_rng(14)
    w = rs.standard_normal((37, 29)).astype(dtype)
    lam = 0.003
    T = scalar(dtype)
    scale, expected = {
        "identity": (T(1), w.sum() / T(3)),
        "abs": (T(lam), REF.weight_decay(w, "l1", lam)[0] / T(3)),
        "square": (T(0.5 * lam), REF.weight_decay(w, "l2", lam)[0] / T(3)),
    }[transform]
    out = np.array([2.5], dtype=dtype)
    run("reduce", f"sum_reduce_{suffix(dtype)}", (1,), (256,),
        (w, np.int64(w.size), np.int32(TRANSFORM_CODES[transform]), scale, T(3), out,
         np.int32(1)))  # fmt: skip
    assert_close(out[0], T(2.5) + expected, "sum_reduce", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ab", [(1.0, 0.0, False), (0.5, 2.0, True)], ids=["plain", "axpby+bias"])
@pytest.mark.parametrize("mnk", [(7, 13, 5), (100, 50, 30), (1, 17, 33)])
@pytest.mark.parametrize("op", ["nn", "nt", "tn"])
def test_gemm(run: Runner, op: str, mnk: tuple[int, int, int], ab: tuple, dtype: str) -> None:
    m, n, k = mnk
    alpha, beta, with_bias = ab
    rs = np.random.default_rng(15)
    a = rs.standard_normal((k, m) if op == "tn" else (m, k)).astype(dtype)
    b = rs.standard_normal((n, k) if op == "nt" else (k, n)).astype(dtype)
    bias = rs.standard_normal(n).astype(dtype) if with_bias else None
    c = rs.standard_normal((m, n)).astype(dtype) if beta else blank((m, n), dtype)
    op_a = a.T if op == "tn" else a
    op_b = b.T if op == "nt" else b
    expected = alpha * (op_a @ op_b) + (beta * c if beta else 0.0) + (bias if with_bias else 0.0)
    T = scalar(dtype)
    run("gemm", f"gemm_{op}_{suffix(dtype)}", (ceil_div(n, 16), ceil_div(m, 16), 1), (16, 16, 1),
        (np.int32(m), np.int32(n), np.int32(k), T(alpha), a, np.int32(a.shape[1]), b,
         np.int32(b.shape[1]), T(beta), c, np.int32(n), bias))  # fmt: skip
    assert_close(c, expected, "gemm", dtype)


# ---- the kernels composed into one training step ----


@pytest.mark.parametrize(
    ("bn", "drop", "output", "dtype"),
    [
        ("bn", "article", "softmax_cross_entropy", "float64"),
        ("node", "inverted", "identity_mse", "float32"),
        ("off", "article", "softmax_cross_entropy", "float32"),
    ],
)
def test_training_step_composes(run: Runner, bn: str, drop: str, output: str, dtype: str) -> None:
    """x -> W1 -> hidden -> W2 -> loss, back, and the update: kernels against the Ops chain."""
    n, n_in, h, c = 9, 13, 11, 4
    rs = np.random.default_rng(16)
    x = rs.standard_normal((n, n_in)).astype(dtype)
    t = one_hot(rs.integers(0, c, n), c, dtype)
    w1, b1 = (0.4 * rs.standard_normal((n_in, h))).astype(dtype), rs.normal(0, 0.1, h).astype(dtype)
    w2, b2 = (0.4 * rs.standard_normal((h, c))).astype(dtype), rs.normal(0, 0.1, c).astype(dtype)
    gamma, beta = bn_params(rs, bn, h, dtype)
    key = rng.dropout_key(3, 0, 2, 1)
    rate, lam = 0.05, 0.001
    spec = HiddenSpec(activation="relu", batch_norm=bn)

    # the reference chain (what Network._grads and sgd_update do)
    u1 = REF.affine(x, w1, b1)
    z1, cache = REF.hidden_forward(
        u1, spec, gamma, beta, reference_multiplier(drop, key, n, h, dtype)
    )
    u2 = REF.affine(z1, w2, b2)
    _, loss_ref, du2 = REF.output_loss_grad(u2, t, output)
    dw2, db2, dz1 = REF.affine_backward(z1, w2, du2)
    du1, dgamma_ref, dbeta_ref = REF.hidden_backward(dz1, cache, spec, gamma)
    dw1, db1, _ = REF.affine_backward(x, w1, du1, need_dx=False)
    reference = {"W1": w1.copy(), "W2": w2.copy()}
    REF.sgd_update(reference["W1"], dw1, rate, "l2", lam)
    REF.sgd_update(reference["W2"], dw2, rate, "l2", lam)

    # the kernels
    T, s = scalar(dtype), suffix(dtype)
    i32 = np.int32
    gemm = (16, 16, 1)

    def product(op: str, m: int, cols: int, k: int, a: Any, b: Any, out: Any, bias: Any) -> None:
        run("gemm", f"gemm_{op}_{s}", (ceil_div(cols, 16), ceil_div(m, 16), 1), gemm,
            (i32(m), i32(cols), i32(k), T(1), a, i32(a.shape[1]), b, i32(b.shape[1]), T(0), out,
             i32(cols), bias))  # fmt: skip

    k_u1, k_z1, k_y1, k_uhat = (blank((n, h), dtype) for _ in range(4))
    k_mean, k_var, k_std = (blank(h, dtype) for _ in range(3))
    product("nn", n, h, n_in, x, w1, k_u1, b1)
    run("hidden_forward", f"hidden_forward_{s}", (ceil_div(h, 32), 1, 1), COLUMN_BLOCK,
        (k_u1, i32(n), i32(h), i32(ACTIVATION_CODES["relu"]), T(0.01), i32(BATCH_NORM_CODES[bn]),
         gamma, beta, i32(0), k_mean, k_var, k_std, i32(DROPOUT_CODES[drop]), np.uint64(key),
         None, i32(rng.keep_count(KEEP, h)), np.float64(KEEP), None, k_y1, k_uhat,
         k_z1))  # fmt: skip
    k_u2, k_du2, k_loss = blank((n, c), dtype), blank((n, c), dtype), blank(1, dtype)
    product("nn", n, c, h, k_z1, w2, k_u2, b2)
    run("output_loss", f"output_loss_grad_{s}", (1,), (128,),
        (k_u2, t, i32(n), i32(c), i32(OUTPUT_CODES[output]), None, k_du2, k_loss))  # fmt: skip
    k_dw2, k_db2, k_dz1 = blank((h, c), dtype), blank(c, dtype), blank((n, h), dtype)
    product("tn", h, c, n, k_z1, k_du2, k_dw2, None)
    run("colstats", f"col_partial_sums_{s}", (1, 1, 1), COLUMN_BLOCK,
        (k_du2, i32(n), i32(c), None, k_db2))  # fmt: skip
    product("nt", n, h, c, k_du2, w2, k_dz1, None)
    k_du1 = blank((n, h), dtype)
    nodes = gamma is not None
    k_dg, k_db = (blank(h, dtype) if nodes else None for _ in range(2))
    run("hidden_backward", f"hidden_backward_{s}", (ceil_div(h, 32), 1, 1), COLUMN_BLOCK,
        (k_dz1, i32(n), i32(h), i32(ACTIVATION_CODES["relu"]), T(0.01), k_y1,
         i32(BATCH_NORM_CODES[bn]), gamma, k_uhat, k_std, i32(DROPOUT_CODES[drop]),
         np.uint64(key), None, i32(rng.keep_count(KEEP, h)), np.float64(KEEP), k_du1, k_dg,
         k_db))  # fmt: skip
    k_dw1, k_db1 = blank((n_in, h), dtype), blank(h, dtype)
    product("tn", n_in, h, n, x, k_du1, k_dw1, None)
    run("colstats", f"col_partial_sums_{s}", (1, 1, 1), COLUMN_BLOCK,
        (k_du1, i32(n), i32(h), None, k_db1))  # fmt: skip
    for k_w, k_dw in ((w1, k_dw1), (w2, k_dw2)):
        run("sgd", f"sgd_weight_{s}", (1,), (256,),
            (k_w, k_dw, np.int64(k_w.size), T(rate), i32(DECAY_CODES["l2"]), T(lam)))  # fmt: skip

    op = "training_step"
    assert_close(k_loss[0], loss_ref, op, dtype, "loss")
    for name, got, want in (("dW2", k_dw2, dw2), ("db2", k_db2, db2), ("dW1", k_dw1, dw1),
                            ("W1", w1, reference["W1"]), ("W2", w2, reference["W2"])):  # fmt: skip
        assert_close(got, want, op, dtype, name)
    # with batch norm the column sums of du1 cancel to about 0: compare on their terms' scale
    assert_close(k_db1, db1, op, dtype, "db1", scale=float(np.abs(du1).sum(axis=0).max()))
    if bn == "node":
        assert_close(k_dg, dgamma_ref, op, dtype, "dgamma")
        assert_close(k_db, dbeta_ref, op, dtype, "dbeta")


# ---- what changes per training step, read from device memory (step.cu) ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_values", [0, 4])
def test_step_begin_makes_each_steps_keys_and_values(run: Runner, n_values: int,
                                                     dtype: str) -> None:
    """Three steps from a counter set to (epoch key, 5): the keys are rng.dropout_key's, the
    values the table's row of the step, the counter counts."""
    seed, epoch, layers, steps = 2**64 - 3, 7, 3, 9
    counter = np.array([rng.fold_key(seed, rng.STREAM_DROPOUT, epoch), 5], np.uint64)
    table = np.arange(steps * n_values, dtype=np.float64) / 3 if n_values else None
    current, keys = blank(1, np.int64), np.zeros(layers, np.uint64)
    values = np.full(4, np.nan)
    for step in (5, 6, 7):
        run("step", f"step_begin_{suffix(dtype)}", (1,), (1,),
            (counter, table, np.int32(n_values), current, keys, np.int32(layers),
             values))  # fmt: skip
        assert int(current[0]) == step and int(counter[1]) == step + 1
        assert [int(k) for k in keys] == [rng.dropout_key(seed, epoch, step, layer)
                                          for layer in range(layers)]
        if n_values:
            np.testing.assert_array_equal(values, table[step * 4 : step * 4 + 4])
        else:
            assert np.isnan(values).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_batch_takes_the_steps_rows_of_the_order(run: Runner, dtype: str) -> None:
    rs = np.random.default_rng(21)
    x, t = rs.standard_normal((23, 5)).astype(dtype), rs.standard_normal((23, 3)).astype(dtype)
    order = rs.permutation(23).astype(np.int64)
    for step, n in ((0, 8), (2, 7)):  # a full batch, then the short last one
        x_out, t_out = blank((n, 5), dtype), blank((n, 3), dtype)
        run("step", f"gather_batch_{suffix(dtype)}", (2,), (256,),
            (x, t, order, np.array([step], np.int64), np.int32(8), np.int32(n), np.int32(5),
             np.int32(3), x_out, t_out))  # fmt: skip
        rows = order[step * 8 : step * 8 + n]
        np.testing.assert_array_equal(x_out, x[rows])
        np.testing.assert_array_equal(t_out, t[rows])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("drop", ["article", "inverted"])
def test_a_key_in_device_memory_replaces_the_key_argument(run: Runner, drop: str,
                                                          dtype: str) -> None:
    """article_mask, dropout_input, hidden_forward and hidden_backward given key 0 and the
    key in device memory (key_at) write the bits they write given the key itself."""
    rs = np.random.default_rng(22)
    n, d, s, T = 11, 19, suffix(dtype), scalar(dtype)
    key = rng.dropout_key(5, 1, 3, 1)
    u = rs.standard_normal((n, d)).astype(dtype)
    dz = rs.standard_normal((n, d)).astype(dtype)
    code, count = np.int32(DROPOUT_CODES[drop]), np.int32(rng.keep_count(KEEP, d))
    results = []
    for given, key_at in ((key, None), (0, np.array([key], np.uint64))):
        mask, dropped = blank(d, dtype), blank((n, d), dtype)
        z, y, du = blank((n, d), dtype), blank((n, d), dtype), blank((n, d), dtype)
        run("masks", f"article_mask_{s}", (1,), (256,),
            (np.uint64(given), key_at, np.int32(d), count, mask))  # fmt: skip
        run("masks", f"dropout_input_{s}", (1,), (256,),
            (u, np.int32(n), np.int32(d), code, np.uint64(given), key_at, np.float64(KEEP),
             mask, dropped))  # fmt: skip
        relu, off = np.int32(ACTIVATION_CODES["relu"]), np.int32(BATCH_NORM_CODES["off"])
        run("hidden_forward", f"hidden_forward_{s}", (1, 1, 1), COLUMN_BLOCK,
            (u, np.int32(n), np.int32(d), relu, T(ALPHA), off, None, None, np.int32(0), None,
             None, None, code, np.uint64(given), key_at, count, np.float64(KEEP), None, y,
             None, z))  # fmt: skip
        run("hidden_backward", f"hidden_backward_{s}", (1, 1, 1), COLUMN_BLOCK,
            (dz, np.int32(n), np.int32(d), relu, T(ALPHA), y, off, None, None, None, code,
             np.uint64(given), key_at, count, np.float64(KEEP), du, None, None))  # fmt: skip
        results.append((mask, dropped, z, du))
    for name, by_argument, by_memory in zip(("mask", "dropout_input", "z", "du"), *results,
                                            strict=True):
        np.testing.assert_array_equal(by_memory, by_argument, err_msg=name)
    assert 0 < results[0][0].sum() < d  # the mask drops some nodes and keeps some


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_rates_in_device_memory_replace_the_arguments(run: Runner, kind: str,
                                                                dtype: str) -> None:
    """optimizer_update given rate 0, corrections 1 and the step's values in device memory
    (rate_at, corrections_at) updates as it does given those values as arguments."""
    rs = np.random.default_rng(23)
    spec = OptimizerSpec(kind, beta1=0.85, beta2=0.99, eps=1e-6)
    T, rate, step = scalar(dtype), 0.07, 3
    corrections = (1 - spec.beta1**step, 1 - spec.beta2**step)
    start = rs.standard_normal(40).astype(dtype)
    grad = rs.standard_normal(40).astype(dtype)
    results = []
    for rate_given, corr_given, rate_at, corrections_at in (
            (rate, corrections, None, None),
            (0.0, (1.0, 1.0), np.array([rate]), np.array(corrections))):
        w = start.copy()
        first, second = np.full_like(w, 0.1), np.full_like(w, 0.2)
        run("optimizer", f"optimizer_update_{suffix(dtype)}", (1,), (64,),
            (w, grad, first, second, np.int64(w.size), np.int32(OPTIMIZER_CODES[kind]),
             T(rate_given), np.int32(DECAY_CODES["l2"]), T(0.01), T(0.9), T(spec.beta1),
             T(1 - spec.beta1), T(spec.beta2), T(1 - spec.beta2), T(spec.eps), T(corr_given[0]),
             T(corr_given[1]), rate_at, corrections_at))  # fmt: skip
        results.append((w, first, second))
    for by_argument, by_memory in zip(*results, strict=True):
        np.testing.assert_array_equal(by_memory, by_argument)
    assert not np.array_equal(results[0][0], start)
    # a step's rate of 0 in device memory (given rate 1): nothing changes, even for an
    # infinite gradient
    w, first, second = start.copy(), np.full_like(start, 0.1), np.full_like(start, 0.2)
    run("optimizer", f"optimizer_update_{suffix(dtype)}", (1,), (64,),
        (w, np.full_like(w, np.inf), first, second, np.int64(w.size),
         np.int32(OPTIMIZER_CODES[kind]), T(1.0), np.int32(DECAY_CODES["l2"]), T(0.01), T(0.9),
         T(spec.beta1), T(1 - spec.beta1), T(spec.beta2), T(1 - spec.beta2), T(spec.eps),
         T(corrections[0]), T(corrections[1]), np.array([0.0]), None))  # fmt: skip
    np.testing.assert_array_equal(w, start)
    assert (first == T(0.1)).all() and (second == T(0.2)).all()


# ---- the sources and their codes ----


#: the header's name of a code whose name is not PREFIX_<its key in upper case>
C_NAMES: dict[tuple[str, str | None], str] = {
    ("BN", "bn"): "BN_SCALAR",
    ("OUT", "softmax_cross_entropy"): "OUT_SOFTMAX_CE",
}


def _header_enums() -> dict[str, int]:
    """Every constant of every ``enum { ... }`` in fastnn_common.cuh."""
    text = re.sub(r"//[^\n]*", " ", (kernel_dir() / "fastnn_common.cuh").read_text())
    enums: dict[str, int] = {}
    for body in re.findall(r"\benum\b[^{;]*\{([^}]*)\}", text):
        for item in body.split(","):
            name, value = (part.strip() for part in item.split("="))
            assert name not in enums, name
            enums[name] = int(value)
    return enums


def test_codes_match_the_kernel_header() -> None:
    """Every enum of the header is a code of fastnn.backends.codes, and every code of its
    tables an enum of the header: the same names, the same values."""
    enums = _header_enums()
    assert set(codes.TABLES) == {name.split("_")[0] for name in enums}, sorted(enums)
    for prefix, table in codes.TABLES.items():
        in_header = {k: v for k, v in enums.items() if k.split("_")[0] == prefix}
        expected = {C_NAMES.get((prefix, key), f"{prefix}_{str(key).upper()}"): code
                    for key, code in table.items()}
        assert in_header == expected, prefix
    tables = {
        "ACT_": ACTIVATION_CODES, "BN_": BATCH_NORM_CODES, "DROP_": DROPOUT_CODES,
        "STATS_": STATS_CODES, "OUT_": OUTPUT_CODES, "DECAY_": DECAY_CODES,
    }  # fmt: skip
    for prefix, table in tables.items():
        in_header = sorted(v for k, v in enums.items() if k.startswith(prefix))
        assert in_header == sorted(table.values()), prefix
    assert enums["ACT_LEAKY_RELU"] == ACTIVATION_CODES["leaky_relu"]
    assert enums["BN_SCALAR"] == BATCH_NORM_CODES["bn"]
    assert enums["DROP_INVERTED"] == DROPOUT_CODES["inverted"]
    assert set(ACTIVATION_CODES) == set(ACTIVATIONS) == set(config.ACTIVATIONS)
    assert set(BATCH_NORM_CODES) == set(config.BATCH_NORMS)
    assert set(OUTPUT_CODES) == set(config.OUTPUTS)
    assert {k for k in DECAY_CODES if k} == set(config.WEIGHT_DECAYS)


def test_every_kernel_has_float_and_double_twins_documented() -> None:
    import fastnn.cuda

    for file in kernel_files():
        code = read_source(file)
        raw = (kernel_dir() / f"{file}.cu").read_text()
        assert raw.startswith(f"// {file}.cu - "), f"{file}.cu must open with its description"
        signatures = kernel_signatures(code)
        assert signatures, file
        for name, signature in signatures.items():
            stem, _, precision = name.rpartition("_")
            assert precision in ("f32", "f64"), name
            twin = signatures[f"{stem}_{'f64' if precision == 'f32' else 'f32'}"]
            to_double = [p.ctype.replace("float", "double") for p in signature.params]
            assert to_double == [p.ctype.replace("float", "double") for p in twin.params], name
            assert [p.pointer for p in signature.params] == [p.pointer for p in twin.params]
            assert stem in raw.split("#include")[0], f"{name} not in {file}.cu's comment"
            assert stem in (fastnn.cuda.__doc__ or ""), f"{name} not in fastnn.cuda's doc"


def test_sources_compile_without_warnings_in_the_shim() -> None:
    if shim.find_compiler() is None:
        pytest.skip("no C++ compiler")
    for file in kernel_files():
        code, options, names = module_args(file)
        log = shim.Module(code, options, names).compile_log
        assert "warning" not in log, f"{file}.cu:\n{log}"


# ---- the CPU shim itself ----

UPSWEEP = r"""
// the sum of 256 values reduced into the LAST element; BARRIER is the one after the loads
extern "C" __global__ void upsweep_sum(const double* x, double* out) {
    __shared__ double s[256];
    const int t = threadIdx.x;
    s[t] = x[t];
    BARRIER
    for (int stride = 1; stride < 256; stride <<= 1) {
        if ((t + 1) % (2 * stride) == 0) s[t] += s[t - stride];
        __syncthreads();
    }
    if (t == 255) out[0] = s[255];
}
"""

PROBES = r"""
extern "C" __global__ void write_past_end(double* out, int n) {
    out[n + threadIdx.x] = 1.0;  // one element past the end for thread 0
}
extern "C" __global__ void write_before_start(float* out) { out[-1] = 1.0f; }
extern "C" __global__ void read_past_end(const double* x, int n, double* out) { out[0] = x[n]; }
extern "C" __global__ void scalars(int i, unsigned long long key, float f, double g,
                                   long long count, double* out) {
    out[0] = i; out[1] = (double)key; out[2] = f; out[3] = g; out[4] = (double)count;
}
extern "C" __global__ void divergent_barrier(double* out) {
    if (threadIdx.x % 7 == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.0;
}
extern "C" __global__ void two_barriers(double* out) {
    if (threadIdx.x < 16) {
        out[0] = 1.0;
        __syncthreads();
    } else {
        __syncthreads();
    }
}
extern "C" __global__ void mixed_barriers(double* out) {
    if (threadIdx.x < 16) __syncthreads(); else __syncwarp();
    out[0] = 1.0;
}
extern "C" __global__ void shuffles(const int* x, int* out) {
    const int t = threadIdx.x, v = x[t];
    out[t] = __shfl_sync(0xffffffffu, v, 5);
    out[64 + t] = __shfl_up_sync(0xffffffffu, v, 3, 8);
    out[128 + t] = __shfl_down_sync(0xffffffffu, v, 2, 16);
    out[192 + t] = __shfl_xor_sync(0xffffffffu, v, 9);
}
extern "C" __global__ void atomics(int* i, unsigned long long* u, float* f, double* d, int* m) {
    atomicAdd(i, 1);
    atomicAdd(u, 2ULL);
    atomicAdd(f, 0.5f);
    atomicAdd(d, 0.25);
    atomicMax(m, (int)(threadIdx.x * 7 % 50));
}
"""


def _module(code: str, **options: Any) -> shim.Module:
    if shim.find_compiler() is None:
        pytest.skip("no C++ compiler")
    return shim.Module(code, **options)


def test_missing_barrier_is_caught_by_the_reverse_order() -> None:
    x = np.random.default_rng(17).standard_normal(256)
    results = {}
    for barrier in ("__syncthreads();", ""):
        for order in ("forward", "reverse"):
            out = np.zeros(1)
            module = _module(UPSWEEP.replace("BARRIER", barrier), thread_order=order)
            module.get_function("upsweep_sum")(1, 256, (x, out))
            results[barrier or "missing", order] = out[0]
    assert results["__syncthreads();", "forward"] == pytest.approx(x.sum(), rel=1e-12)
    assert results["__syncthreads();", "reverse"] == pytest.approx(x.sum(), rel=1e-12)
    # forward order happens to read every value after it was written ...
    assert results["missing", "forward"] == pytest.approx(x.sum(), rel=1e-12)
    # ... the reverse order does not: the unwritten (poisoned) shared memory shows up
    assert not results["missing", "reverse"] == pytest.approx(x.sum(), rel=1e-6)


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_out_of_bounds_writes_are_caught_by_the_guard_bytes(order: str) -> None:
    module = _module(PROBES, thread_order=order)
    out = np.zeros(8)
    with pytest.raises(shim.GuardError, match=r"write_past_end wrote outside argument 0 \(out\)"):
        module.get_function("write_past_end")(1, 1, (out, np.int32(8)))
    module.get_function("write_past_end")(1, 1, (out, np.int32(7)))  # the last element: fine
    assert out[7] == 1.0
    with pytest.raises(shim.GuardError, match="before its start"):
        module.get_function("write_before_start")(1, 1, (np.zeros(4, np.float32),))


def test_out_of_bounds_reads_see_nan() -> None:
    out = np.zeros(1)
    _module(PROBES).get_function("read_past_end")(1, 1, (np.ones(3), np.int32(3), out))
    assert np.isnan(out[0])


def test_scalars_must_have_the_exact_c_type() -> None:
    function = _module(PROBES).get_function("scalars")
    out = np.zeros(5)
    good = [np.int32(-3), np.uint64(2**63 + 5), np.float32(1.5), np.float64(2.25), np.int64(-9)]
    function(1, 1, (*good, out))
    np.testing.assert_array_equal(out, [-3, float(2**63 + 5), 1.5, 2.25, -9])
    wrong = {
        0: (7, r"needs a numpy.int32 scalar \(4 bytes\); got a Python int"),
        1: (np.int64(5), r"needs a numpy.uint64 scalar .*got numpy.int64"),
        2: (np.float64(1.5), r"needs a numpy.float32 scalar \(4 bytes\); got numpy.float64 \(8"),
        3: (2.25, r"needs a numpy.float64 scalar .*Python float"),
        4: (np.int32(3), r"needs a numpy.int64 scalar \(8 bytes\); got numpy.int32 \(4 bytes\)"),
    }
    for position, (value, message) in wrong.items():
        args = [*good, out]
        args[position] = value
        with pytest.raises(TypeError, match=message):
            function(1, 1, tuple(args))


def test_pointer_arguments_are_checked() -> None:
    function = _module(PROBES).get_function("read_past_end")
    x, out = np.ones(4), np.zeros(1)
    with pytest.raises(TypeError, match="float64 array; got float32"):
        function(1, 1, (x.astype(np.float32), np.int32(0), out))
    with pytest.raises(TypeError, match="C-contiguous"):
        function(1, 1, (np.ones(8)[::2], np.int32(0), out))
    readonly = np.zeros(1)
    readonly.flags.writeable = False
    with pytest.raises(TypeError, match="read-only"):
        function(1, 1, (x, np.int32(0), readonly))
    with pytest.raises(TypeError, match="takes 3 arguments, got 2"):
        function(1, 1, (x, np.int32(0)))
    with pytest.raises(TypeError, match="needs a NumPy array or None; got list"):
        function(1, 1, ([1.0], np.int32(0), out))


def test_barrier_divergence_and_deadlock_are_reported() -> None:
    module = _module(PROBES)
    with pytest.raises(shim.KernelLaunchError, match="divergent code"):
        module.get_function("divergent_barrier")(1, 64, (np.zeros(64),))
    with pytest.raises(shim.KernelLaunchError, match=r"__syncthreads\(\) at .*:\d+ while other"):
        module.get_function("two_barriers")(1, 32, (np.zeros(1),))
    with pytest.raises(shim.KernelLaunchError, match="deadlock"):
        module.get_function("mixed_barriers")(1, 32, (np.zeros(1),))


def test_trap_is_reported() -> None:
    code = read_source("gemm")
    gemm = _module(code).get_function("gemm_nn_f64")
    a, c = np.ones((4, 4)), np.zeros((4, 4))
    i = np.int32(4)
    args = (i, i, i, np.float64(1), a, i, a, i, np.float64(0), c, i, None)
    with pytest.raises(shim.KernelLaunchError, match=r"__trap\(\)"):
        gemm(1, (16, 8, 1), args)  # gemm insists on 16 x 16 blocks
    gemm(1, (16, 16, 1), args)
    np.testing.assert_array_equal(c, np.full((4, 4), 4.0))


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_warp_shuffles(order: str) -> None:
    x = np.arange(100, 164, dtype=np.int32)
    out = blank(256, np.int32)
    _module(PROBES, thread_order=order).get_function("shuffles")(1, 64, (x, out))
    lane = np.arange(64) % 32
    base = np.arange(64) - lane
    np.testing.assert_array_equal(out[:64], x[base + 5])
    up = np.where(lane % 8 >= 3, np.arange(64) - 3, np.arange(64))
    np.testing.assert_array_equal(out[64:128], x[up])
    down = np.where(lane % 16 + 2 < 16, np.arange(64) + 2, np.arange(64))
    np.testing.assert_array_equal(out[128:192], x[down])
    np.testing.assert_array_equal(out[192:], x[base + (lane ^ 9)])


def test_atomics() -> None:
    i, u = np.zeros(1, np.int32), np.zeros(1, np.uint64)
    f, d, m = np.zeros(1, np.float32), np.zeros(1), np.zeros(1, np.int32)
    _module(PROBES).get_function("atomics")((3, 2), 96, (i, u, f, d, m))
    threads = 3 * 2 * 96
    assert (i[0], u[0], f[0], d[0], m[0]) == (threads, 2 * threads, threads / 2, threads / 4, 49)


def test_builds_are_cached_and_errors_carry_the_log() -> None:
    first = _module(PROBES)
    first.get_function("atomics")
    second = shim.Module(PROBES)
    second.get_function("atomics")
    assert first.library_path == second.library_path
    assert first.library_path is not None and first.library_path.exists()
    broken = shim.Module('extern "C" __global__ void broken(int* x) { x[0] = undeclared; }')
    with pytest.raises(shim.ShimCompileError, match="undeclared"):
        broken.get_function("broken")


def test_names_and_signatures_are_validated() -> None:
    with pytest.raises(ValueError, match="no extern"):
        shim.Module(PROBES, name_expressions=["scalars", "nope"])
    with pytest.raises(KeyError, match="no kernel 'nope'"):
        _module(PROBES).get_function("nope")
    with pytest.raises(ValueError, match="unsupported parameter"):
        shim.Module('extern "C" __global__ void k(int& r) {}')
    signature = kernel_signatures(read_source("hidden_forward"))["hidden_forward_f32"]
    assert str(signature).startswith("hidden_forward_f32(const float* u, int n, int d, int act")
    assert math.prod(COLUMN_BLOCK) == 256


def test_a_capture_records_launches_and_its_graph_replays_them() -> None:
    """Between begin_capture and end_capture nothing runs; the graph runs the recorded
    launches in order, each time on the arrays' contents as they are then; a bad launch is
    refused while capturing, as CUDA refuses it."""
    function = _module(PROBES).get_function("atomics")
    i, u = np.zeros(1, np.int32), np.zeros(1, np.uint64)
    f, d, m = np.zeros(1, np.float32), np.zeros(1), np.zeros(1, np.int32)
    shim.begin_capture()
    try:
        with pytest.raises(RuntimeError, match="capturing already"):
            shim.begin_capture()
        function(1, 32, (i, u, f, d, m))
        function(2, 32, (i, u, f, d, m))
        with pytest.raises(TypeError, match="takes 5 arguments"):
            function(1, 32, (i, u))
        assert i[0] == 0  # recorded, not run
    finally:
        graph = shim.end_capture()
    assert len(graph) == 2
    with pytest.raises(RuntimeError, match="not capturing"):
        shim.end_capture()
    graph.launch()
    assert i[0] == 3 * 32
    i[0] = 100
    graph.launch()
    assert i[0] == 100 + 3 * 32
    function(1, 32, (i, u, f, d, m))  # no longer capturing: runs at once
    assert i[0] == 100 + 4 * 32
