"""The numba backend against the NumPy reference: every overridden op, gradients, whole runs."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

pytest.importorskip("numba")

from fastnn import Config, Network, Trainer, rng  # noqa: E402
from fastnn.backends import HiddenSpec, get_backend  # noqa: E402

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "identity", "softplus", "softsign", "step")
BATCH_NORMS = ("off", "n", "bn", "node")
DTYPES = ("float64", "float32")

#: largest allowed |numba - numpy|, relative to the reference's largest magnitude: (f64, f32)
TOLERANCES: dict[str, tuple[float, float]] = {
    "affine": (1e-12, 1e-5),
    "affine_backward": (1e-12, 1e-5),
    "hidden_forward": (1e-12, 1e-5),
    "hidden_backward": (1e-11, 1e-4),
    "batch_norm_backward": (1e-11, 1e-4),
    "output_forward": (1e-12, 1e-5),
    "loss": (1e-12, 1e-5),
    "output_loss_grad": (1e-12, 1e-5),
    "sgd_update": (1e-14, 1e-6),
    "loss_and_grads": (1e-10, 1e-4),
    "evaluate": (1e-10, 1e-4),
    "evaluate_loss": (1e-10, 1e-4),
    # rows whose reference top-two outputs are closer than this (relative to max|y|) are
    # near-ties: the predicted class may differ there (the test data keeps them rare)
    "evaluate_near_tie": (1e-9, 1e-5),
    "train_epoch": (1e-10, 1e-4),
    "fit": (1e-9, 1e-4),
}


@pytest.fixture(scope="module")
def numba_ops() -> Any:
    return get_backend("numba")


@pytest.fixture(scope="module")
def numpy_ops() -> Any:
    return get_backend("numpy")


def assert_close(
    op: str, actual: Any, expected: Any, dtype: str, what: str = "", scale: float | None = None
) -> None:
    """|actual - expected| <= tolerance * scale (default max|expected|); else name the worst.

    Pass ``scale`` for results of sums that cancel: the magnitude of their terms.
    """
    tolerance = TOLERANCES[op][0 if dtype == "float64" else 1]
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{op} {what}: shape {actual.shape} != {expected.shape}"
    if actual.size == 0:
        return
    same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    diff = np.where(same, 0.0, np.abs(actual - expected))
    if scale is None:
        scale = max(float(np.nanmax(np.abs(expected))), 1e-30)
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    worst_abs = float(diff[worst])
    relative = worst_abs / max(abs(float(expected[worst])), 1e-300)
    assert worst_abs <= tolerance * scale, (
        f"{op} {what} ({dtype}): worst abs diff {worst_abs:.3e} (rel {relative:.3e}, allowed "
        f"{tolerance:.0e} x max|ref| {scale:.3e}) at {tuple(int(i) for i in worst)}: "
        f"numba {actual[worst]!r} vs numpy {expected[worst]!r}"
    )


def assert_all_close(op: str, actual: Any, expected: dict[str, Any], dtype: str) -> None:
    """`assert_close` for every named array, on one scale: the largest of them all.

    (With batch norm a hidden layer's bias gradient, and so the bias, is rounding noise.)
    """
    scale = max(float(np.abs(np.asarray(v, dtype=np.float64)).max()) for v in expected.values())
    for name, value in expected.items():
        assert_close(op, actual[name], value, dtype, name, scale)


def random_arrays(dtype: str, seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    return [gen.normal(size=shape).astype(dtype) for shape in shapes]


# ---- masks: bit-identical ----

@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_are_bit_identical(numba_ops: Any, numpy_ops: Any, dtype: str) -> None:
    for key, d, keep in itertools.product(
        (0, 1, 2**63 + 12345, rng.dropout_key(7, 3, 11, 1)), (1, 5, 50, 784), (0.1, 0.5, 0.8, 1.0)
    ):
        ours = numba_ops.article_mask(key, d, keep, dtype)
        ref = numpy_ops.article_mask(key, d, keep, dtype)
        assert ours.dtype == ref.dtype and np.array_equal(ours, ref), (key, d, keep)
        assert ours.sum() == rng.keep_count(keep, d)
        ours = numba_ops.bernoulli_mask(key, (7, d), keep, dtype)
        ref = numpy_ops.bernoulli_mask(key, (7, d), keep, dtype)
        assert ours.dtype == ref.dtype and np.array_equal(ours, ref), (key, d, keep)


# ---- single ops ----

@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_and_its_backward(numba_ops: Any, numpy_ops: Any, dtype: str) -> None:
    x, w, b, du = random_arrays(dtype, 1, (9, 6), (6, 4), (4,), (9, 4))
    assert_close("affine", numba_ops.affine(x, w, b), numpy_ops.affine(x, w, b), dtype)
    for need_dx in (True, False):
        ours = numba_ops.affine_backward(x, w, du, need_dx)
        ref = numpy_ops.affine_backward(x, w, du, need_dx)
        for name, a, e in zip(("dW", "db", "dx"), ours, ref, strict=True):
            if e is None:
                assert a is None
            else:
                assert_close("affine_backward", a, e, dtype, name)


def _masks(dtype: str, n: int, d: int) -> dict[str, Any]:
    article = (np.arange(d) % 3 != 0).astype(dtype)
    keep = np.random.default_rng(5).random((n, d)) < 0.7
    inverted = keep.astype(dtype) / dtype_type(dtype, 0.7)
    return {"none": None, "eval-scale": 0.8, "article": article, "inverted": inverted}


def dtype_type(dtype: str, value: float) -> Any:
    return np.dtype(dtype).type(value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_norm", BATCH_NORMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_hidden_forward_and_backward(
    numba_ops: Any, numpy_ops: Any, dtype: str, batch_norm: str, activation: str
) -> None:
    n, d = 12, 7
    spec = HiddenSpec(activation=activation, alpha=0.03, batch_norm=batch_norm)
    u, dz, node_gamma, node_beta = random_arrays(dtype, 2, (n, d), (n, d), (d,), (d,))
    u = 2.0 * u + np.linspace(-1, 1, d).astype(dtype)
    params = {"off": (None, None), "n": (None, None), "bn": (node_gamma[:1], node_beta[:1]),
              "node": (node_gamma, node_beta)}[batch_norm]
    running = (np.linspace(-0.5, 0.5, d).astype(dtype), np.linspace(0.5, 2.0, d).astype(dtype))
    stats_options = (None, running) if batch_norm != "off" else (None,)
    for (mask_name, mask), stats in itertools.product(_masks(dtype, n, d).items(), stats_options):
        what = f"mask={mask_name} stats={'running' if stats else 'batch'}"
        z, cache = numba_ops.hidden_forward(u, spec, *params, mask, stats)
        z_ref, cache_ref = numpy_ops.hidden_forward(u, spec, *params, mask, stats)
        assert z.dtype == z_ref.dtype
        assert_close("hidden_forward", z, z_ref, dtype, what + " z")
        for field in ("pre_activation", "u_hat", "std", "mean", "var"):
            expected = getattr(cache_ref, field)
            if expected is None:
                assert getattr(cache, field) is None, field
            else:
                assert_close("hidden_forward", getattr(cache, field), expected, dtype,
                             f"{what} cache.{field}")
        ours = numba_ops.hidden_backward(dz, cache, spec, params[0])
        ref = numpy_ops.hidden_backward(dz, cache_ref, spec, params[0])
        term_scale = float(np.abs(dz).sum())  # dgamma/dbeta are sums that may cancel
        for name, a, e in zip(("du", "dgamma", "dbeta"), ours, ref, strict=True):
            if e is None:
                assert a is None, name
            else:
                assert_close("hidden_backward", a, e, dtype, f"{what} {name}",
                             None if name == "du" else term_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ("n", "bn", "node"))
def test_batch_norm_backward(numba_ops: Any, numpy_ops: Any, dtype: str, variant: str) -> None:
    n, d = 10, 5
    u, dy, gamma = random_arrays(dtype, 3, (n, d), (n, d), (d,))
    gamma = {"n": None, "bn": gamma[:1], "node": gamma}[variant]
    beta = None if gamma is None else np.zeros_like(gamma)
    spec = HiddenSpec(activation="identity", batch_norm=variant)
    _, cache = numpy_ops.hidden_forward(u, spec, gamma, beta, None)
    ours = numba_ops.batch_norm_backward(dy, cache, variant, gamma)
    ref = numpy_ops.batch_norm_backward(dy, cache, variant, gamma)
    for name, a, e in zip(("du", "dgamma", "dbeta"), ours, ref, strict=True):
        if e is None:
            assert a is None
        else:
            scale = None if name == "du" else float(np.abs(dy).sum())
            assert_close("batch_norm_backward", a, e, dtype, name, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output", ("softmax_cross_entropy", "identity_mse"))
def test_output_and_loss(numba_ops: Any, numpy_ops: Any, dtype: str, output: str) -> None:
    (u,) = random_arrays(dtype, 4, (30, 10))
    u[0] = 40.0  # a saturated row: probabilities hit the log floor
    t = np.eye(10, dtype=dtype)[np.arange(30) % 10]
    y = numba_ops.output_forward(u, output)
    assert_close("output_forward", y, numpy_ops.output_forward(u, output), dtype)
    assert_close("loss", numba_ops.loss(y, t, output), numpy_ops.loss(y, t, output), dtype)
    for name, a, e in zip(("y", "loss", "du"), numba_ops.output_loss_grad(u, t, output),
                          numpy_ops.output_loss_grad(u, t, output), strict=True):
        assert np.asarray(a).dtype == np.asarray(e).dtype, name
        assert_close("output_loss_grad", a, e, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_update(numba_ops: Any, numpy_ops: Any, dtype: str) -> None:
    w, b, dw, db = random_arrays(dtype, 5, (6, 4), (4,), (6, 4), (4,))
    ours = {"W1": w.copy(), "b1": b.copy()}
    ref = {"W1": w.copy(), "b1": b.copy()}
    rates = {"W1": 0.1, "b1": 0.0}
    numba_ops.sgd_update(ours, {"W1": dw, "b1": db}, rates)
    numpy_ops.sgd_update(ref, {"W1": dw, "b1": db}, rates)
    for name in ours:
        assert_close("sgd_update", ours[name], ref[name], dtype, name)


# ---- the network: loss and gradients, evaluation, one epoch ----

def _option_grid() -> list[dict[str, Any]]:
    """Every activation x batch norm, the other options rotated so each value appears."""
    outputs = ("softmax_cross_entropy", "identity_mse")
    modes = ("article", "inverted")
    decays = (None, ("l1", 1e-3), ("l2", 1e-2))
    grid = []
    for i, (activation, batch_norm) in enumerate(itertools.product(ACTIVATIONS, BATCH_NORMS)):
        grid.append(dict(
            activation=activation, batch_norm=batch_norm, output=outputs[i % 2],
            dropout_mode=modes[(i // 2) % 2], weight_decay=decays[i % 3],
            bn_eval=("batch", "running")[(i // 4) % 2] if batch_norm != "off" else "batch",
            dropout_input=0.8, dropout_hidden=0.6,
        ))
    return grid


def _grid_id(options: dict[str, Any]) -> str:
    return f"{options['activation']}-{options['batch_norm']}"


def small_config(backend: str, **changes: Any) -> Config:
    base = dict(hidden=(7, 5), n_inputs=6, n_outputs=3, seed=4, backend=backend,
                bias_init="normal_b", bias_init_params={"std": 0.1}, batch_size=8)
    base.update(changes)
    return Config(**base)


def small_data(dtype: str, n: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gen = np.random.default_rng(9)
    labels = gen.integers(0, 3, n)
    return gen.normal(size=(n, 6)).astype(dtype), np.eye(3, dtype=dtype)[labels], labels


def _pair(options: dict[str, Any]) -> tuple[Network, Network]:
    return Network(small_config("numba", **options)), Network(small_config("numpy", **options))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", _option_grid(), ids=_grid_id)
def test_loss_and_grads_and_evaluate(dtype: str, options: dict[str, Any]) -> None:
    ours, ref = _pair({**options, "dtype": dtype})
    x, t, labels = small_data(dtype)
    masks = ref.dropout_masks(epoch=1, step=2, batch=len(x))
    loss, grads = ours.loss_and_grads(x, t, masks)
    loss_ref, grads_ref = ref.loss_and_grads(x, t, masks)
    assert list(grads) == list(grads_ref)
    assert_close("loss_and_grads", loss, loss_ref, dtype, "loss")
    assert_all_close("loss_and_grads", grads, grads_ref, dtype)
    if options["batch_norm"] != "off":  # non-trivial running statistics for bn_eval="running"
        for net in (ours, ref):
            for k in net.running:
                size = net.sizes[k]
                net.running[k] = (np.full(size, 0.1, dtype), np.full(size, 2.0, dtype))
    acc, loss, predicted = ours.evaluate(x, t, labels)
    acc_ref, loss_ref, predicted_ref = ref.evaluate(x, t, labels)
    assert acc == acc_ref and np.array_equal(predicted, predicted_ref)
    assert_close("evaluate", loss, loss_ref, dtype, "loss")


# ---- evaluation of a whole set (NumbaOps.evaluate: blocked, one compiled call) ----

EVAL_OUTPUTS = ("softmax_cross_entropy", "identity_mse")


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
        ours.running[k] = ref.running[k] = stats
    return ours, ref


def _eval_data(dtype: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(17)
    x = (gen.normal(size=(n, 6)) * np.linspace(0.5, 2.0, 6)).astype(dtype)
    return x, np.eye(3, dtype=dtype)[gen.integers(0, 3, n)]


def assert_same_evaluation(ours: Network, ref: Network, x: Any, t: Any, what: str) -> None:
    """Loss to tolerance; predicted classes identical except at the reference's near-ties."""
    dtype = ref.dtype
    loss, predicted = ours.ops.evaluate(ours, x, t)
    loss_ref, predicted_ref = ref.ops.evaluate(ref, x, t)
    assert isinstance(loss, float) and isinstance(loss_ref, float)
    assert predicted.shape == predicted_ref.shape == (len(x),)
    assert predicted.dtype == predicted_ref.dtype
    assert_close("evaluate_loss", loss, loss_ref, dtype, what + " loss")
    y = np.sort(ref.forward_eval(x).astype(np.float64), axis=1)
    tie = TOLERANCES["evaluate_near_tie"][0 if dtype == "float64" else 1]
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
def test_evaluate_matches_reference(
    monkeypatch: pytest.MonkeyPatch, numba_ops: Any, dtype: str, batch_norm: str,
    activation: str
) -> None:
    """Every bn_eval x dropout mode x output, on 53 rows in blocks of 16 (a short last one)."""
    monkeypatch.setattr(numba_ops, "EVAL_BLOCK", 16)
    x, t = _eval_data(dtype, 53)
    bn_evals = ("batch", "running") if batch_norm != "off" else ("batch",)
    for bn_eval, mode, output in itertools.product(bn_evals, ("article", "inverted"),
                                                   EVAL_OUTPUTS):
        ours, ref = _eval_pair(dtype, activation=activation, batch_norm=batch_norm,
                               bn_eval=bn_eval, dropout_mode=mode, output=output)
        assert ours.ops is numba_ops
        assert_same_evaluation(ours, ref, x, t, f"{bn_eval} {mode} {output}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_norm", ("off", "bn"))
def test_evaluate_with_the_default_block(numba_ops: Any, dtype: str, batch_norm: str) -> None:
    """More rows than two default blocks (not a multiple), then a smaller set that reuses the
    whole-set buffers, then single rows (batch norm of one row: std at its floor)."""
    n = 2 * numba_ops.EVAL_BLOCK + 37
    ours, ref = _eval_pair(dtype, activation="tanh", batch_norm=batch_norm)
    x, t = _eval_data(dtype, n)
    assert_same_evaluation(ours, ref, x, t, f"{n} rows")
    assert_same_evaluation(ours, ref, x[:101], t[:101], "101 rows")
    loss, predicted = ours.ops.evaluate(ours, x[:1], t[:1])
    loss_ref, predicted_ref = ref.ops.evaluate(ref, x[:1], t[:1])
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
    loss, predicted = ours.ops.evaluate(ours, x, t)
    loss_ref, predicted_ref = ref.ops.evaluate(ref, x, t)
    assert np.array_equal(predicted, predicted_ref) and (predicted == 1).all()
    assert_close("evaluate_loss", loss, loss_ref, "float64", "loss")


def test_evaluate_falls_back_on_unusual_inputs(numba_ops: Any) -> None:
    """Strided, read-only or mixed-dtype inputs take the reference path (same results)."""
    ours, ref = _eval_pair("float64", batch_norm="node")
    x, t = _eval_data("float64", 40)
    strided = np.repeat(x, 2, axis=0)[::2]
    read_only = x.copy()
    read_only.flags.writeable = False
    for name, (xs, ts) in {"strided": (strided, t), "read-only": (read_only, t),
                           "float32 targets": (x, t.astype("float32"))}.items():
        assert numba_ops._evaluate_arguments(ours, xs, ts) is None, name
        assert_same_evaluation(ours, ref, xs, ts, name)


@pytest.mark.parametrize("options", _option_grid()[::3], ids=_grid_id)
def test_train_epoch_matches_reference(
    numba_ops: Any, numpy_ops: Any, options: dict[str, Any]
) -> None:
    dtype = "float64"
    ours, ref = _pair({**options, "dtype": dtype})
    x, t, _ = small_data(dtype, n=21)  # 21 rows at batch 8: a short last batch
    order = np.random.default_rng(2).permutation(len(x))
    for epoch in (1, 2):
        numba_ops.train_epoch(ours, x, t, order, epoch)
        numpy_ops.train_epoch(ref, x, t, order, epoch)
    assert_all_close("train_epoch", ours.params, ref.numpy_params(), dtype)
    for k, (mean, var) in ref.running.items():
        assert_close("train_epoch", ours.running[k][0], mean, dtype, f"running mean {k}")
        assert_close("train_epoch", ours.running[k][1], var, dtype, f"running var {k}")


# ---- whole runs ----

def _fit(
    backend: str, dtype: str = "float64", data: tuple[np.ndarray, np.ndarray] | None = None,
    **changes: Any,
) -> tuple[Any, dict[str, np.ndarray]]:
    """A 3-epoch run on 800 generated rows (blobs, or ``data``); history and final params."""
    from conftest import make_blobs

    x, t = make_blobs(800, 20, 3, seed=1) if data is None else data
    options = dict(hidden=(16, 8), n_inputs=x.shape[1], n_outputs=3, epochs=3, batch_size=64,
                   backend=backend, dtype=dtype, batch_norm="bn", dropout_input=0.9,
                   dropout_hidden=0.8, seed=11)
    options.update(changes)
    trainer = Trainer(Config(**options))
    history = trainer.fit(x[:600], t[:600], x[600:], t[600:])
    return history, {k: v.copy() for k, v in trainer.network.numpy_params().items()}


@pytest.mark.parametrize("changes", [{}, {"dropout_mode": "inverted", "batch_norm": "node",
                                           "bn_eval": "running", "weight_decay": ("l2", 1e-3)}])
def test_fit_matches_numpy(changes: dict[str, Any]) -> None:
    history, params = _fit("numba", **changes)
    history_ref, params_ref = _fit("numpy", **changes)
    assert history.train_acc == history_ref.train_acc
    assert history.test_acc == history_ref.test_acc
    for key in ("train_loss", "test_loss"):
        assert_close("fit", getattr(history, key), getattr(history_ref, key), "float64", key)
    assert_all_close("fit", params, params_ref, "float64")


def test_fit_float32_close_to_numpy() -> None:
    history, _ = _fit("numba", dtype="float32")
    history_ref, _ = _fit("numpy", dtype="float32")
    assert_close("fit", history.train_loss, history_ref.train_loss, "float32", "train_loss")
    assert np.allclose(history.test_acc, history_ref.test_acc, atol=0.01)


def test_same_seed_gives_bit_identical_params(capsys: pytest.CaptureFixture[str]) -> None:
    first = _fit("numba")[1]
    second = _fit("numba")[1]
    assert all(np.array_equal(first[name], second[name]) for name in first)
    assert "compiling" not in capsys.readouterr().err  # stderr is not a terminal here


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_with_both_blas_interfaces(dtype: str) -> None:
    """The kernels' gemm: NumPy's cblas (when found) and SciPy's Fortran BLAS, every layout."""
    from fastnn.backends import _numba_kernels as kernels

    interfaces = [(kernels.BLAS_FORTRAN32, kernels._scipy_blas()[dtype == "float64"])]
    found = kernels._numpy_openblas()
    if found is not None:
        interfaces.append((kernels.BLAS_CBLAS64, found[dtype == "float64"]))
    a, b, c = random_arrays(dtype, 8, (5, 3), (3, 4), (5, 4))
    cases = {(False, False): (a, b), (True, False): (a.T.copy(), b), (False, True): (a, b.T.copy())}
    alpha, beta = np.dtype(dtype).type(-0.5), np.dtype(dtype).type(1.0)
    for kind, address in interfaces:
        for (trans_a, trans_b), (left, right) in cases.items():
            out = c.copy()
            kernels.gemm(kind, address, trans_a, trans_b, alpha, left, right, beta, out)
            what = f"blas {kind} {trans_a} {trans_b}"
            assert_close("affine", out, c - 0.5 * (a @ b), dtype, what)


# ---- the sparse first layer (CSR inputs) ----

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
    from conftest import make_blobs

    x, labels = make_blobs(n, n_inputs, n_classes, seed=1)
    keep = np.random.default_rng(2).random(x.shape) < np.where(x >= 150, 0.6, 0.1)
    return np.where(keep, x, 0).astype(np.uint8), labels


def _sparse_pair(dtype: str, options: dict[str, Any], d: int = 24) -> tuple[Network, Network]:
    return _pair({"n_inputs": d, "dtype": dtype, **options})


def test_sparse_data_takes_the_sparse_path_and_dense_data_the_dense_one(numba_ops: Any) -> None:
    assert numba_ops.sparse_mode == "auto"
    ours, _ = _sparse_pair("float64", {}, d=6)
    dense, t, _ = small_data("float64", n=21)
    sparse = sparse_x("float64", 21, 6)
    order = np.arange(21)
    for x, path in ((dense, "dense"), (sparse, "sparse")):
        before = numba_ops.first_layer_paths.copy()
        numba_ops.train_epoch(ours, x, t, order, 1)
        assert numba_ops.last_sparse_steps == (3 if path == "sparse" else 0)
        ours.evaluate(x, t, t.argmax(1))
        changes = numba_ops.first_layer_paths - before
        assert changes == {f"train_{path}": 1, f"evaluate_{path}": 1}, changes
    assert numba_ops.sparse_form(dense) is None
    csr = numba_ops.sparse_form(sparse)
    assert csr is not None and csr is numba_ops.sparse_form(sparse)  # built once
    indptr, indices, values = csr
    assert (indptr.dtype, indices.dtype, values.dtype) == (np.int64, np.int32, np.float64)
    rebuilt = np.zeros_like(sparse)
    rebuilt[np.repeat(np.arange(21), np.diff(indptr)), indices] = values
    assert np.array_equal(rebuilt, sparse)
    sparse[0] = 0.0  # a sampled row changes in place: the cached form is rebuilt
    changed = numba_ops.sparse_form(sparse)
    assert changed is not None and changed is not csr
    assert changed[0][1] == 0 and changed[0][-1] == indptr[-1] - indptr[1]
    numba_ops.clear_sparse_cache()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", SPARSE_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_sparse_train_epoch_and_evaluate_match_reference(
    monkeypatch: pytest.MonkeyPatch, numba_ops: Any, numpy_ops: Any, dtype: str,
    options: dict[str, Any]
) -> None:
    monkeypatch.setattr(numba_ops, "EVAL_BLOCK", 16)
    monkeypatch.setattr(numba_ops, "sparse_train_dtypes", DTYPES)
    ours, ref = _sparse_pair(dtype, options)
    x = sparse_x(dtype, 45, 24)
    labels = np.random.default_rng(4).integers(0, 3, 45)
    t = np.eye(3, dtype=dtype)[labels]
    masks = ref.dropout_masks(epoch=1, step=2, batch=len(x))
    loss, grads = ours.loss_and_grads(x, t, masks)
    loss_ref, grads_ref = ref.loss_and_grads(x, t, masks)
    assert_close("loss_and_grads", loss, loss_ref, dtype, "loss")
    assert_all_close("loss_and_grads", grads, grads_ref, dtype)
    for epoch in (1, 2, 3):  # 45 rows at batch 8: a short last batch
        order = np.random.default_rng(epoch).permutation(len(x))
        numba_ops.train_epoch(ours, x, t, order, epoch)
        assert numba_ops.last_sparse_steps == 6
        numpy_ops.train_epoch(ref, x, t, order, epoch)
    assert_all_close("train_epoch", ours.params, ref.numpy_params(), dtype)
    for k, (mean, var) in ref.running.items():
        assert_close("train_epoch", ours.running[k][0], mean, dtype, f"running mean {k}")
        assert_close("train_epoch", ours.running[k][1], var, dtype, f"running var {k}")
    before = numba_ops.first_layer_paths["evaluate_sparse"]
    assert_same_evaluation(ours, ref, x, t, "sparse")
    assert numba_ops.first_layer_paths["evaluate_sparse"] == before + 1


def test_sparse_mode_switch_and_non_finite_weights(
    monkeypatch: pytest.MonkeyPatch, numba_ops: Any, numpy_ops: Any
) -> None:
    """"1" forces CSR on dense data, "0" keeps sparse data dense; an inf in W1 goes dense."""
    dtype = "float64"
    x, t, labels = small_data(dtype, n=21)
    order = np.random.default_rng(2).permutation(len(x))
    options = dict(dropout_input=0.8, dropout_hidden=0.6, weight_decay=("l1", 1e-3))
    for mode, data, steps in (("1", x, 3), ("0", sparse_x(dtype, 21, 6), 0)):
        monkeypatch.setattr(numba_ops, "sparse_mode", mode)
        ours, ref = _pair({**options, "dtype": dtype})
        for epoch in (1, 2):
            numba_ops.train_epoch(ours, data, t, order, epoch)
            assert numba_ops.last_sparse_steps == steps, mode
            numpy_ops.train_epoch(ref, data, t, order, epoch)
        assert_all_close("train_epoch", ours.params, ref.numpy_params(), dtype)
        assert_same_evaluation(ours, ref, data, t, f"mode {mode}")
    monkeypatch.setattr(numba_ops, "sparse_mode", "auto")
    data = sparse_x(dtype, 21, 6)
    ours, ref = _pair({"dtype": dtype})
    for net in (ours, ref):
        weights = net.numpy_params()["W1"].copy()
        weights[data[0].argmax(), 0] = np.inf
        net.params = {**net.numpy_params(), "W1": weights}
    before = numba_ops.first_layer_paths["evaluate_dense"]
    with np.errstate(all="ignore"):
        loss, predicted = ours.ops.evaluate(ours, data, t)
        loss_ref, predicted_ref = ref.ops.evaluate(ref, data, t)
        numba_ops.train_epoch(ours, data, t, order, 1)
        numpy_ops.train_epoch(ref, data, t, order, 1)
    assert numba_ops.first_layer_paths["evaluate_dense"] == before + 1
    assert np.isnan(loss) == np.isnan(loss_ref) and np.array_equal(predicted, predicted_ref)
    assert numba_ops.last_sparse_steps == 0
    for name, value in ref.numpy_params().items():
        assert np.array_equal(np.isnan(ours.params[name]), np.isnan(value)), name


def _sparse_fit(backend: str, dtype: str = "float64", **changes: Any) -> tuple[Any, dict]:
    return _fit(backend, dtype, data=sparse_blobs(800, 30, 3), **changes)


@pytest.mark.parametrize("changes", [
    {}, {"dropout_mode": "inverted", "batch_norm": "node", "bn_eval": "running",
         "weight_decay": ("l2", 1e-3)},
    {"batch_norm": "off", "weight_decay": ("l1", 1e-3)},
])
def test_sparse_fit_matches_numpy(numba_ops: Any, changes: dict[str, Any]) -> None:
    before = numba_ops.first_layer_paths.copy()
    history, params = _sparse_fit("numba", **changes)
    seen = numba_ops.first_layer_paths - before  # (warm_up's probe is dense)
    assert (seen["train_sparse"], seen["evaluate_sparse"]) == (3, 8), seen
    history_ref, params_ref = _sparse_fit("numpy", **changes)
    assert history.train_acc == history_ref.train_acc
    assert history.test_acc == history_ref.test_acc
    for key in ("train_loss", "test_loss"):
        assert_close("fit", getattr(history, key), getattr(history_ref, key), "float64", key)
    assert_all_close("fit", params, params_ref, "float64")


def test_sparse_fit_float32_and_bit_identical(
    monkeypatch: pytest.MonkeyPatch, numba_ops: Any
) -> None:
    assert numba_ops.sparse_train_dtypes == ("float64",)  # float32 trains dense in "auto"
    monkeypatch.setattr(numba_ops, "sparse_train_dtypes", DTYPES)
    history, first = _sparse_fit("numba", dtype="float32")
    history_ref, _ = _sparse_fit("numpy", dtype="float32")
    assert_close("fit", history.train_loss, history_ref.train_loss, "float32", "train_loss")
    assert np.allclose(history.test_acc, history_ref.test_acc, atol=0.01)
    numba_ops.clear_sparse_cache()  # the second run builds its CSR form again
    second = _sparse_fit("numba", dtype="float32")[1]
    assert all(np.array_equal(first[name], second[name]) for name in first)
