"""Every fast backend against the NumPy reference: each op, gradients, whole runs.

Parametrised over `parity.FAST_BACKENDS` (skipped where one cannot load, failed where
FASTNN_REQUIRE_BACKENDS names it); runs cover a grid in which every pair of option values
occurs (`parity.pairwise_grid`), float32 included; tolerances are looked up by op name.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import pytest
from conftest import make_blobs
from gradcheck import assert_grads_close, numerical_grads
from parity import (
    FAST_BACKENDS,
    GRID_OPTIONS,
    all_pairs,
    assert_all_close,
    assert_close,
    backend_or_skip,
    covered_pairs,
    grid_id,
    host,
    pairwise_grid,
    random_arrays,
    tolerance,
)

from fastnn import Config, Network, Trainer, rng
from fastnn.backends import HiddenCache, HiddenSpec, get_backend
from fastnn.plan import DropoutSpec, OptimizerSpec

DTYPES = ("float64", "float32")
ACTIVATIONS = GRID_OPTIONS["activation"]
BATCH_NORMS = GRID_OPTIONS["batch_norm"]
GRID = pairwise_grid()


@pytest.fixture(params=FAST_BACKENDS)
def fast(request: pytest.FixtureRequest) -> Any:
    return backend_or_skip(request.param)


@pytest.fixture(scope="module")
def ref() -> Any:
    return get_backend("numpy")


def test_the_grid_covers_every_pair_of_option_values() -> None:
    assert covered_pairs(GRID) >= all_pairs()
    assert all(not (o["batch_norm"] == "off" and o["bn_eval"] == "running") for o in GRID)
    assert len(GRID) <= 48  # 8 activations x 5 optimisers is the floor


def test_required_backends_fail_instead_of_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    import parity

    monkeypatch.setattr(parity.backends, "available", lambda: {"gpu": "no device here"})
    monkeypatch.delenv("FASTNN_REQUIRE_BACKENDS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no device here"):
        backend_or_skip("gpu")
    monkeypatch.setenv("FASTNN_REQUIRE_BACKENDS", "numba, gpu")
    with pytest.raises(pytest.fail.Exception, match="required"):
        backend_or_skip("gpu")


# ---- masks: bit-identical ----

@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_are_bit_identical(fast: Any, ref: Any, dtype: str) -> None:
    for key, d, keep in itertools.product(
        (0, 1, 2**63 + 12345, rng.dropout_key(7, 3, 11, 1)), (1, 5, 50, 784), (0.1, 0.5, 0.8, 1.0)
    ):
        ours = host(fast.article_mask(key, d, keep, dtype))
        expected = ref.article_mask(key, d, keep, dtype)
        assert np.array_equal(ours, expected), (key, d, keep)
        assert ours.sum() == rng.keep_count(keep, d)
        ours = host(fast.bernoulli_mask(key, (7, d), keep, dtype))
        assert np.array_equal(ours, ref.bernoulli_mask(key, (7, d), keep, dtype)), (key, d, keep)
        spec = DropoutSpec(layer=1, size=d, keep=keep, keep_count=rng.keep_count(keep, d))
        for mode in ("article", "inverted"):
            ours = fast.dropout_multiplier(key, spec, 7, mode, dtype)
            expected = ref.dropout_multiplier(key, spec, 7, mode, dtype)
            assert ours.dtype == expected.dtype and ours.shape == expected.shape
            assert np.array_equal(host(ours), expected), (key, d, keep, mode)


# ---- single ops ----

@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_and_its_backward(fast: Any, ref: Any, dtype: str) -> None:
    x, w, b, du = random_arrays(dtype, 1, (9, 6), (6, 4), (4,), (9, 4))
    on = fast.asarray
    assert_close("affine", fast.affine(on(x), on(w), on(b)), ref.affine(x, w, b), dtype)
    for need_dx in (True, False):
        ours = fast.affine_backward(on(x), on(w), on(du), need_dx)
        expected = ref.affine_backward(x, w, du, need_dx)
        for name, a, e in zip(("dW", "db", "dx"), ours, expected, strict=True):
            if e is None:
                assert a is None
            else:
                assert_close("affine_backward", a, e, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [None, "l1", "l2"])
def test_affine_backward_update(fast: Any, ref: Any, dtype: str, decay: str | None) -> None:
    x, w, b, du = random_arrays(dtype, 6, (9, 6), (6, 4), (4,), (9, 4))
    w[0, 0] = 0.0  # L1's sign(0) is 0
    for need_dx in (True, False):
        ours_w, ours_b = fast.asarray(w), fast.asarray(b)
        ref_w, ref_b = w.copy(), b.copy()
        dx = fast.affine_backward_update(fast.asarray(x), ours_w, ours_b, fast.asarray(du), 0.3,
                                         decay, 0.05, need_dx)
        dx_ref = ref.affine_backward_update(x, ref_w, ref_b, du, 0.3, decay, 0.05, need_dx)
        assert (dx is None) == (dx_ref is None) == (not need_dx)
        if need_dx:  # computed with the old W
            assert_close("affine_backward_update", dx, dx_ref, dtype, "dx")
            assert_close("affine_backward_update", dx, du @ w.T, dtype, "dx from the old W")
        assert_close("affine_backward_update", ours_w, ref_w, dtype, "W")
        assert_close("affine_backward_update", ours_b, ref_b, dtype, "b")
        assert not np.array_equal(ref_w, w)


def _masks(dtype: str, n: int, d: int) -> dict[str, Any]:
    article = (np.arange(d) % 3 != 0).astype(dtype)
    keep = np.random.default_rng(5).random((n, d)) < 0.7
    inverted = keep.astype(dtype) / np.dtype(dtype).type(0.7)
    return {"none": None, "eval-scale": 0.8, "article": article, "inverted": inverted}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_norm", BATCH_NORMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_hidden_forward_and_backward(
    fast: Any, ref: Any, dtype: str, batch_norm: str, activation: str
) -> None:
    n, d = 12, 7
    on = fast.asarray
    spec = HiddenSpec(activation=activation, alpha=0.03, batch_norm=batch_norm)
    u, dz, node_gamma, node_beta = random_arrays(dtype, 2, (n, d), (n, d), (d,), (d,))
    u = 2.0 * u + np.linspace(-1, 1, d).astype(dtype)
    params = {"off": (None, None), "n": (None, None), "bn": (node_gamma[:1], node_beta[:1]),
              "node": (node_gamma, node_beta)}[batch_norm]
    fast_params = tuple(None if p is None else on(p) for p in params)
    running = (np.linspace(-0.5, 0.5, d).astype(dtype), np.linspace(0.5, 2.0, d).astype(dtype))
    stats_options = (None, running) if batch_norm != "off" else (None,)
    for (mask_name, mask), stats in itertools.product(_masks(dtype, n, d).items(), stats_options):
        what = f"mask={mask_name} stats={'running' if stats else 'batch'}"
        fast_mask = on(mask) if isinstance(mask, np.ndarray) else mask
        fast_stats = None if stats is None else (on(stats[0]), on(stats[1]))
        z, cache = fast.hidden_forward(on(u), spec, *fast_params, fast_mask, fast_stats)
        z_ref, cache_ref = ref.hidden_forward(u, spec, *params, mask, stats)
        assert z.dtype == z_ref.dtype
        assert_close("hidden_forward", z, z_ref, dtype, what + " z")
        for field in ("pre_activation", "u_hat", "std", "mean", "var"):
            expected = getattr(cache_ref, field)
            if expected is None:
                assert getattr(cache, field) is None, field
            else:
                assert_close("hidden_forward", getattr(cache, field), expected, dtype,
                             f"{what} cache.{field}")
        ours = fast.hidden_backward(on(dz), cache, spec, fast_params[0])
        expected = ref.hidden_backward(dz, cache_ref, spec, params[0])
        term_scale = float(np.abs(dz).sum())  # dgamma/dbeta are sums that may cancel
        for name, a, e in zip(("du", "dgamma", "dbeta"), ours, expected, strict=True):
            if e is None:
                assert a is None, name
            else:
                assert_close("hidden_backward", a, e, dtype, f"{what} {name}",
                             None if name == "du" else term_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ("n", "bn", "node"))
def test_batch_norm_backward(fast: Any, ref: Any, dtype: str, variant: str) -> None:
    n, d = 10, 5
    u, dy, gamma = random_arrays(dtype, 3, (n, d), (n, d), (d,))
    gamma = {"n": None, "bn": gamma[:1], "node": gamma}[variant]
    beta = None if gamma is None else np.zeros_like(gamma)
    spec = HiddenSpec(activation="identity", batch_norm=variant)
    on = fast.asarray
    _, cache = ref.hidden_forward(u, spec, gamma, beta, None)
    fast_cache = HiddenCache(*(None if v is None else on(v) for v in (
        cache.pre_activation, cache.mask, cache.u_hat, cache.std, cache.mean, cache.var)))
    ours = fast.batch_norm_backward(on(dy), fast_cache, variant,
                                    None if gamma is None else on(gamma))
    expected = ref.batch_norm_backward(dy, cache, variant, gamma)
    for name, a, e in zip(("du", "dgamma", "dbeta"), ours, expected, strict=True):
        if e is None:
            assert a is None
        else:
            scale = None if name == "du" else float(np.abs(dy).sum())
            assert_close("batch_norm_backward", a, e, dtype, name, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output", ("softmax_cross_entropy", "identity_mse"))
def test_output_and_loss(fast: Any, ref: Any, dtype: str, output: str) -> None:
    (u,) = random_arrays(dtype, 4, (30, 10))
    u[0] = 40.0  # a saturated row: probabilities hit the log floor
    t = np.eye(10, dtype=dtype)[np.arange(30) % 10]
    on = fast.asarray
    y = fast.output_forward(on(u), output)
    assert_close("output_forward", y, ref.output_forward(u, output), dtype)
    y_ref = ref.output_forward(u, output)
    assert_close("loss", fast.loss(on(y_ref), on(t), output), ref.loss(y_ref, t, output), dtype)
    for name, a, e in zip(("y", "loss", "du"), fast.output_loss_grad(on(u), on(t), output),
                          ref.output_loss_grad(u, t, output), strict=True):
        assert a.dtype == np.asarray(e).dtype, name
        assert_close("output_loss_grad", a, e, dtype, name)
    assert_close("output_grad", fast.output_grad(on(u), on(t), output),
                 ref.output_grad(u, t, output), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [None, "l1", "l2"])
def test_sgd_update(fast: Any, ref: Any, dtype: str, decay: str | None) -> None:
    w, b, dw, db = random_arrays(dtype, 5, (6, 4), (4,), (6, 4), (4,))
    w[1, 2] = 0.0
    for param, grad, rate in ((w, dw, 0.1), (b, db, 0.3), (w, dw, 0.0)):
        ours, expected = fast.asarray(param), param.copy()
        fast.sgd_update(ours, fast.asarray(grad), rate, decay, 0.02)
        ref.sgd_update(expected, grad, rate, decay, 0.02)
        assert_close("sgd_update", ours, expected, dtype, f"{param.shape} rate {rate}")
        assert np.array_equal(expected, param) == (rate == 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [None, "l1", "l2"])
@pytest.mark.parametrize("kind", GRID_OPTIONS["optimizer"])
def test_optimizer_update(fast: Any, ref: Any, dtype: str, decay: str | None, kind: str) -> None:
    """Three consecutive updates of a matrix and a vector, slots included; rate 0 changes
    nothing (not even the slots)."""
    spec = OptimizerSpec(kind, momentum=0.8, beta1=0.85, beta2=0.99, eps=1e-6)
    w, b, *grads = random_arrays(dtype, 6, (6, 4), (4,), (6, 4), (4,), (6, 4), (4,))
    w[1, 2] = 0.0
    for param, grad in ((w, grads[0]), (b, grads[1])):
        ours, expected = fast.asarray(param), param.copy()
        ours_slots = tuple(fast.asarray(np.zeros_like(param)) for _ in spec.slots)
        slots = tuple(np.zeros_like(param) for _ in spec.slots)
        for step, rate in enumerate((0.1, 0.0, 0.05), start=1):
            step_grad = grad * step if rate else grad + np.inf  # rate 0: not even read
            before = (expected.copy(), *(s.copy() for s in slots))
            fast.optimizer_update(ours, fast.asarray(step_grad), ours_slots, rate, spec, step,
                                  decay, 0.02)
            ref.optimizer_update(expected, step_grad, slots, rate, spec, step, decay, 0.02)
            where = f"{kind} {param.shape} step {step}"
            assert_close("optimizer_update", ours, expected, dtype, where)
            for a, e in zip(ours_slots, slots, strict=True):
                assert_close("optimizer_update", a, e, dtype, f"{where} slot")
            unchanged = all(np.array_equal(x, y) for x, y in zip(before, (expected, *slots),
                                                                  strict=True))
            assert unchanged == (rate == 0.0), where


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_running(fast: Any, ref: Any, dtype: str) -> None:
    u, mean, var = random_arrays(dtype, 8, (9, 5), (5,), (5,))
    var = np.abs(var)
    spec = HiddenSpec(batch_norm="n")
    _, cache = ref.hidden_forward(u, spec, None, None, None)
    ours = (fast.asarray(mean), fast.asarray(var))
    fast_cache = HiddenCache(None, None, mean=fast.asarray(cache.mean),
                             var=fast.asarray(cache.var))
    fast.update_running(ours, fast_cache, 0.9)
    expected = (mean.copy(), var.copy())
    ref.update_running(expected, cache, 0.9)
    for a, e in zip(ours, expected, strict=True):
        assert_close("update_running", a, e, dtype)
    np.testing.assert_allclose(expected[0], 0.9 * mean + 0.1 * u.mean(0), rtol=1e-5)


# ---- networks over the covering grid ----

def grid_config(backend: str, options: dict[str, Any], **changes: Any) -> Config:
    base = dict(hidden=(7, 5), n_inputs=6, n_outputs=3, seed=4, backend=backend,
                bias_init="normal_b", bias_init_params={"std": 0.1}, batch_size=8,
                dropout_input=0.8, dropout_hidden=0.6,
                activation_params={"alpha": 0.2} if options["activation"] == "leaky_relu" else {})
    base.update(options)
    base.update(changes)
    return Config(**base)


def small_data(dtype: str, n: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gen = np.random.default_rng(9)
    labels = gen.integers(0, 3, n)
    return gen.normal(size=(n, 6)).astype(dtype), np.eye(3, dtype=dtype)[labels], labels


@pytest.mark.parametrize("options", GRID, ids=grid_id)
def test_loss_grads_and_evaluation_match(fast: Any, options: dict[str, Any]) -> None:
    dtype = options["dtype"]
    ours = Network(grid_config(fast.name, options))
    expected = Network(grid_config("numpy", options))
    x, t, labels = small_data(dtype)
    masks = {k: host(m) for k, m in expected.dropout_masks(epoch=1, step=2, batch=len(x)).items()}
    loss, grads = ours.loss_and_grads(x, t, masks)
    loss_ref, grads_ref = expected.loss_and_grads(x, t, masks)
    assert_close("loss_and_grads", loss, loss_ref, dtype, "loss")
    assert_all_close("loss_and_grads", grads, grads_ref, dtype)
    for net in (ours, expected):  # non-trivial running statistics for bn_eval="running"
        for k in net.running:
            size = net.sizes[k]
            net.running[k] = (net.ops.asarray(np.full(size, 0.1), dtype),
                              net.ops.asarray(np.full(size, 2.0), dtype))
    x_dev, t_dev = ours.ops.asarray(x), ours.ops.asarray(t)
    acc, loss, predicted = ours.scores(x_dev, t_dev, labels)
    acc_ref, loss_ref, predicted_ref = expected.scores(x, t, labels)
    assert acc == acc_ref and np.array_equal(predicted, predicted_ref)
    assert_close("loss_and_classes", loss, loss_ref, dtype, "loss")


@pytest.mark.parametrize("batch_norm", ["n", "bn", "node"])
def test_evaluation_with_hidden_layers_of_one_width(fast: Any, batch_norm: str) -> None:
    """Whole-set batch statistics of layers of equal width are each layer's own (a buffer
    shared by width once gave every layer the last one's pre-activations)."""
    options = {"dtype": "float64", "batch_norm": batch_norm, "activation": "relu"}
    ours, expected = (Network(grid_config(name, options, hidden=(5, 5, 5)))
                      for name in (fast.name, "numpy"))
    x, t, labels = small_data("float64", n=40)
    acc, loss, predicted = ours.scores(ours.ops.asarray(x), ours.ops.asarray(t), labels)
    acc_ref, loss_ref, predicted_ref = expected.scores(x, t, labels)
    assert np.array_equal(predicted, predicted_ref)
    assert_close("loss_and_classes", loss, loss_ref, "float64", "loss")


@pytest.mark.parametrize("options", [o for o in GRID if o["dtype"] == "float64"], ids=grid_id)
def test_gradient_check_on_the_backend(fast: Any, options: dict[str, Any]) -> None:
    """The fast backend's gradients against finite differences of its own loss (float64)."""
    net = Network(grid_config(fast.name, options, hidden=(4, 3), n_inputs=5))
    gen = np.random.default_rng(5)
    if net.plan.learnable_bn:  # move gamma/beta off 1/0 so their gradients are exercised
        net.params = {k: v + gen.normal(0, 0.3, v.shape) if k.startswith(("gamma", "beta"))
                      else v for k, v in net.numpy_params().items()}
    x = 0.5 * gen.normal(size=(7, 5))
    t = np.eye(3)[gen.integers(0, 3, 7)]
    masks = {k: host(m) for k, m in net.dropout_masks(epoch=1, step=0, batch=7).items()}
    _, grads = net.loss_and_grads(x, t, masks)
    scale = {f"{p}{k}": 1 / net.sizes[k] for p in ("gamma", "beta") for k in (1, 2)}
    allowed = tolerance("gradient_check", "float64")
    assert_grads_close({k: host(v) for k, v in grads.items()}, numerical_grads(net, x, t, masks),
                       scale if options["batch_norm"] == "bn" else None, rtol=allowed)


def _fit(backend: str, options: dict[str, Any]) -> tuple[Any, dict[str, np.ndarray], dict]:
    """A 2-epoch run on 150 learnable rows (batch 16: a short last batch)."""
    x, t = make_blobs(200, 6, 3, seed=2)
    config = grid_config(backend, options, batch_size=16, epochs=2, eta=0.05,
                         normalize="z_score")
    if options.get("optimizer", "sgd").startswith("adam"):
        config = dataclasses.replace(config, eta=0.01)
    trainer = Trainer(config, threads=1)
    history = trainer.fit(x[:150], t[:150], x[150:], t[150:])
    net = trainer.network
    running = {k: (host(m), host(v)) for k, (m, v) in net.running.items()}
    state = {**net.numpy_params(), **net.optimizer.arrays(net.plan.optimizer.slots, net.ops)}
    if options["batch_norm"] != "off" and options.get("optimizer", "sgd").startswith("adam"):
        # a bias under batch norm has no effect and a gradient of rounding noise only, which
        # Adam scales to full steps: each backend's own noise. Its moments likewise.
        state = {k: v for k, v in state.items()
                 if not any(k.endswith(f"b{j}") for j in range(1, len(net.sizes) - 1))}
    return history, state, running


@pytest.mark.parametrize("options", GRID, ids=grid_id)
def test_fit_matches_reference(fast: Any, options: dict[str, Any]) -> None:
    """Whole runs: every epoch's figures, the final parameters and running statistics."""
    dtype = options["dtype"]
    history, params, running = _fit(fast.name, options)
    history_ref, params_ref, running_ref = _fit("numpy", options)
    assert np.isfinite(history_ref.train_loss).all(), "the reference run diverged"
    for key in ("train_loss", "test_loss"):
        assert_close("fit", getattr(history, key), getattr(history_ref, key), dtype, key)
    # accuracies: equal in float64; float32 rounding may flip a near-tie row (1 of 150 or 50)
    slack = 0.0 if dtype == "float64" else 1 / 50 + 1e-12
    for key in ("train_acc", "test_acc"):
        diff = np.abs(np.subtract(getattr(history, key), getattr(history_ref, key)))
        assert diff.max() <= slack, (key, getattr(history, key), getattr(history_ref, key))
    assert list(params) == list(params_ref)
    assert_all_close("fit", params, params_ref, dtype)
    assert list(running) == list(running_ref)
    for k, (mean, var) in running_ref.items():
        assert_close("fit", running[k][0], mean, dtype, f"running mean {k}")
        assert_close("fit", running[k][1], var, dtype, f"running var {k}")
    if options["bn_eval"] == "running":
        assert not np.array_equal(running_ref[1][1], np.ones_like(running_ref[1][1]))
