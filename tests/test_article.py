"""Article semantics (ARTICLE.md 1-3): masks, evaluation, batch norm, histories, the whole loop."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from article_reference import article_run
from conftest import make_blobs
from gradcheck import small_batch, small_config

from fastnn import Config, DataError, History, Network, Trainer, rng
from fastnn.backends import steps
from fastnn.history import format_table
from fastnn.preprocessing import Normalizer
from fastnn.train import DivergenceWarning


def _data(n_train: int = 300, n_test: int = 100, n_inputs: int = 20, classes: int = 3):
    x, t = make_blobs(n_train + n_test, n_inputs, classes, seed=4)
    return x[:n_train], t[:n_train], x[n_train:], t[n_train:]


def _normalised(config: Config, x_train, t_train, x_test, t_test):
    norm = Normalizer(config.normalize, config.normalize_axis).fit(x_train)
    eye = np.eye(config.n_outputs)
    return norm.transform(x_train), eye[t_train], norm.transform(x_test), eye[t_test]


CASES = {
    "baseline": {},
    "no-shuffle": {"shuffle": False},
    "l1": {"weight_decay": ("l1", 1e-3)},
    "l2": {"weight_decay": ("l2", 1e-2)},
    "dropout": {"dropout_input": 0.8, "dropout_hidden": 0.5},
    "bn-N": {"batch_norm": "n"},
    "bn-BN": {"batch_norm": "bn", "batch_norm_eta": 0.3},
    "bn-BN(n)": {"batch_norm": "node"},
    "identity-mse": {"output": "identity_mse", "eta": 0.05},
    "leaky_relu": {"activation": "leaky_relu", "activation_params": {"alpha": 0.1}},
    "softplus": {"activation": "softplus"},
    "softsign": {"activation": "softsign"},
    "identity": {"activation": "identity", "eta": 0.02},
    "step": {"activation": "step"},
    "sigmoid-bn": {"activation": "sigmoid", "batch_norm": "node"},
    "everything": {
        "batch_norm": "bn",
        "dropout_input": 0.9,
        "dropout_hidden": 0.8,
        "weight_decay": ("l2", 1e-3),
        "activation": "tanh",
    },
}


@pytest.mark.parametrize("case", CASES)
def test_trainer_matches_independent_article_loop(case: str) -> None:
    changes = CASES[case]
    config = Config(
        hidden=(12, 8),
        n_inputs=20,
        n_outputs=3,
        epochs=3,
        batch_size=32,
        dtype="float64",
        seed=11,
        **changes,
    )
    data = _data()
    history = Trainer(config).fit(*data)
    net0 = Network(config)
    params = net0.numpy_params()
    trainer = Trainer(config)

    def mask(epoch: int, step: int, layer: int) -> np.ndarray:
        return net0.ops.to_numpy(net0.dropout_masks(epoch, step, 1)[layer])

    reference = article_run(
        *_normalised(config, *data),
        {k: params[f"W{k}"] for k in (1, 2, 3)},
        {k: params[f"b{k}"] for k in (1, 2, 3)},
        eta=config.eta,
        batch_size=32,
        epochs=3,
        act=config.activation,
        wd=config.weight_decay,
        keep_in=config.dropout_input,
        keep_mid=config.dropout_hidden,
        bn=config.batch_norm,
        bn_eta=config.batch_norm_eta,
        order=trainer.epoch_order,
        mask=mask,
        mse=config.output == "identity_mse",
    )
    for key, values in reference.items():
        np.testing.assert_allclose(getattr(history, key), values, rtol=1e-10, err_msg=key)


@pytest.mark.parametrize("keep", [0.5, 0.6, 0.7, 0.8, 0.9, 0.25, 1 / 3])
@pytest.mark.parametrize("d", [784, 100, 50, 7])
def test_article_mask_has_exactly_round_keep_d_ones(keep: float, d: int) -> None:
    net = Network(Config(n_inputs=d, hidden=(d,), dropout_input=keep, dropout_hidden=keep))
    for step in range(5):
        masks = net.dropout_masks(epoch=1, step=step, batch=100)
        for layer in (0, 1):
            mask = masks[layer]
            assert mask.shape == (d,)  # one mask per batch, shared by every sample
            assert set(np.unique(mask)) <= {0.0, 1.0}
            assert int(mask.sum()) == round(keep * d)


def test_masks_differ_by_step_layer_epoch_and_seed() -> None:
    net = Network(Config(dropout_input=0.5, dropout_hidden=0.5, hidden=(784,)))
    base = net.dropout_masks(1, 0, 100)
    assert not np.array_equal(base[0], net.dropout_masks(1, 1, 100)[0])
    assert not np.array_equal(base[0], base[1])
    assert not np.array_equal(base[0], net.dropout_masks(2, 0, 100)[0])
    other = Network(Config(dropout_input=0.5, dropout_hidden=0.5, hidden=(784,), seed=1))
    assert not np.array_equal(base[0], other.dropout_masks(1, 0, 100)[0])
    np.testing.assert_array_equal(base[0], net.dropout_masks(1, 0, 100)[0])


def test_mask_is_shared_by_every_row_of_the_batch() -> None:
    net = Network(small_config(dropout_hidden=0.5))
    x, t = small_batch(n=9)
    masks = net.dropout_masks(1, 0, 9)
    multipliers = steps.step_multipliers(net.ops, net.plan, 1, 0, 9)
    np.testing.assert_array_equal(multipliers[1], masks[1])
    u, inputs, _ = steps.forward(
        net.ops, net.plan, net.params, {}, net.ops.asarray(x), multipliers, True
    )
    dropped = masks[1] == 0
    assert dropped.sum() == 3
    assert not np.any(inputs[1][:, dropped])


def test_inverted_dropout_is_per_element_and_scaled() -> None:
    net = Network(Config(dropout_input=0.8, dropout_mode="inverted"))
    mask = net.dropout_masks(1, 0, 1000)[0]
    assert mask.shape == (1000, 784)
    assert mask.mean() == pytest.approx(0.8, abs=0.005)
    assert len({tuple(row) for row in mask[:50]}) == 50
    scaled = steps.step_multipliers(net.ops, net.plan, 1, 0, 1000)[0]
    np.testing.assert_array_equal(scaled, mask / 0.8)
    assert set(np.unique(scaled)) == {0.0, np.float64(1 / 0.8)}
    assert steps.eval_multipliers(net.plan) == {}


def _manual_eval(net: Network, x: np.ndarray, keep_in: float, keep_mid: float) -> np.ndarray:
    p = net.numpy_params()
    z = x * keep_in
    for k in (1, 2):
        z = np.maximum(z @ p[f"W{k}"] + p[f"b{k}"], 0) * keep_mid
    u = z @ p["W3"] + p["b3"]
    e = np.exp(u - u.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_evaluation_scales_by_keep_ratio_without_masks() -> None:
    net = Network(small_config(dropout_input=0.7, dropout_hidden=0.6))
    x, _ = small_batch()
    np.testing.assert_allclose(net.predict(x), _manual_eval(net, x, 0.7, 0.6), rtol=1e-13)


def test_batch_norm_evaluation_uses_the_evaluated_batch_statistics() -> None:
    net = Network(small_config(batch_norm="n", activation="identity", hidden=(6,)))
    x, _ = small_batch(n=20)
    p = net.numpy_params()
    u = x @ p["W1"] + p["b1"]
    s = np.maximum(np.sqrt(((u - u.mean(0)) ** 2).mean(0)), 1e-7)
    out = ((u - u.mean(0)) / s) @ p["W2"] + p["b2"]
    e = np.exp(out - out.max(1, keepdims=True))
    np.testing.assert_allclose(net.predict(x), e / e.sum(1, keepdims=True), rtol=1e-12)
    assert not np.allclose(net.predict(x)[:5], net.predict(x[:5]))  # depends on the batch


def test_batch_norm_std_floor_for_constant_nodes() -> None:
    net = Network(small_config(batch_norm="n", hidden=(6,)))
    x = np.ones((4, 5))  # every node constant over the batch: s is floored, u_hat is 0
    loss, grads = net.loss_and_grads(x, np.eye(3)[[0, 1, 2, 0]])
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads.values())


def test_running_statistics_mode_updates_and_uses_them() -> None:
    config = small_config(batch_norm="bn", bn_eval="running", bn_momentum=0.5, hidden=(6,))
    net = Network(config)
    x, t = small_batch(n=10)
    xb, tb = net.ops.asarray(x), net.ops.asarray(t)
    p = net.numpy_params()
    u = x @ p["W1"] + p["b1"]
    net.train_step(xb, tb, epoch=1, step=0)
    mean, var = net.running[1]
    np.testing.assert_allclose(mean, 0.5 * 0 + 0.5 * u.mean(0), rtol=1e-13)
    np.testing.assert_allclose(var, 0.5 * 1 + 0.5 * u.var(0), rtol=1e-13)
    # evaluation normalises with the running statistics: one row gives the same answer alone
    np.testing.assert_allclose(net.predict(x[:1]), net.predict(x)[:1], rtol=1e-12)


def test_sgd_step_is_p_minus_eta_grad_with_own_bn_rate() -> None:
    net = Network(small_config(batch_norm="node", eta=0.1, batch_norm_eta=0.7))
    x, t = small_batch()
    before = net.numpy_params()
    _, grads = net.loss_and_grads(x, t)
    net.train_step(net.ops.asarray(x), net.ops.asarray(t), 1, 0)
    after = net.numpy_params()
    for name, grad in grads.items():
        rate = 0.7 if name.startswith(("gamma", "beta")) else 0.1
        np.testing.assert_allclose(after[name], before[name] - rate * grad, rtol=1e-13)


def test_n_variant_has_no_trainable_gamma_beta() -> None:
    assert not [k for k in Network(small_config(batch_norm="n")).params if "gamma" in k]
    bn = Network(small_config(batch_norm="bn")).params
    node = Network(small_config(batch_norm="node")).params
    assert bn["gamma1"].shape == (1,) and node["gamma1"].shape == (6,)
    assert np.all(node["gamma2"] == 1) and np.all(node["beta2"] == 0)


def test_history_has_epochs_plus_one_entries_and_losses_include_penalty() -> None:
    config = Config(hidden=(8,), n_inputs=20, n_outputs=3, epochs=4, weight_decay=("l2", 0.1))
    history = Trainer(config).fit(*_data())
    for key in ("train_acc", "train_loss", "test_acc", "test_loss", "epoch_seconds"):
        assert len(getattr(history, key)) == 5
    plain = Trainer(config.replace(weight_decay=None)).fit(*_data())
    assert history.test_loss[0] > plain.test_loss[0]  # same start, penalty added
    assert history.total_seconds == pytest.approx(sum(history.epoch_seconds[1:]))


def test_summary_columns() -> None:
    history = History(
        test_acc=[0.1, 0.96, 0.975, 0.975, 0.97],
        train_acc=[0.1, 0.9, 1, 1, 1.0],
        test_loss=[2, 0.5, 0.3, 0.4, 0.35],
        train_loss=[2, 1, 1, 1, 1],
        epoch_seconds=[0.1, 1, 1, 1, 1],
    )
    s = history.summary()
    assert (s["epoch_95"], s["epoch_97"], s["epoch_98"]) == (1, 2, None)
    assert (s["best_test_acc"], s["best_epoch"]) == (0.975, 2)  # first on ties
    assert (s["test_acc"], s["train_acc"], s["lowest_loss_epoch"]) == (0.97, 1.0, 2)
    table = format_table([("run", s)])
    assert "97.00" in table and "  -" in table


def test_same_seed_gives_identical_bits_and_other_seed_differs() -> None:
    config = Config(
        hidden=(10, 6),
        n_inputs=20,
        n_outputs=3,
        epochs=2,
        batch_norm="bn",
        dropout_input=0.8,
        dropout_hidden=0.6,
        dtype="float32",
    )
    runs = []
    for seed in (5, 5, 6):
        trainer = Trainer(config.replace(seed=seed))
        history = trainer.fit(*_data())
        runs.append((history.test_loss, trainer.network.numpy_params()))
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, runs[1][1][name])
    assert runs[0][0] != runs[2][0]


@pytest.mark.parametrize("method", ["min_max", "z_score"])
@pytest.mark.parametrize("axis", [None, 0])
def test_normalisation_is_fitted_on_training_data(method: str, axis: int | None) -> None:
    rs = np.random.default_rng(0)
    train, test = (
        rs.integers(0, 256, (50, 6)).astype(float),
        rs.integers(0, 256, (20, 6)).astype(float),
    )
    train[:, 2] = 7.0  # a constant pixel: statistic floored at 1e-7
    norm = Normalizer(method, axis).fit(train)
    if method == "min_max":
        low, high = train.min(axis=axis), train.max(axis=axis)
        expected = (test - low) / np.maximum(high - low, 1e-7)
    else:
        expected = (test - train.mean(axis=axis)) / np.maximum(train.std(axis=axis), 1e-7)
    np.testing.assert_allclose(norm.transform(test), expected)


def test_initialisers_spread_and_var_alias() -> None:
    gen = np.random.default_rng
    from fastnn.functions import init_biases, init_weights

    for name, std in (
        ("he_normal", np.sqrt(2 / 400)),
        ("lecun_normal", np.sqrt(1 / 400)),
        ("glorot_normal", np.sqrt(2 / 700)),
        ("he_uniform", np.sqrt(6 / 400) / np.sqrt(3)),
        ("lecun_uniform", 1 / np.sqrt(400)),
        ("glorot_uniform", np.sqrt(6 / 700) / np.sqrt(3)),
    ):
        w = init_weights(gen(0), name, 400, 300, {})
        assert w.shape == (400, 300)
        assert w.std() == pytest.approx(std, rel=0.02), name
    np.testing.assert_array_equal(
        init_weights(gen(1), "normal_w", 3, 4, {"var": 0.3}),
        init_weights(gen(1), "normal_w", 3, 4, {"std": 0.3}),
    )
    w = init_weights(gen(1), "uniform_w", 100, 100, {"min": -2, "max": -1})
    assert w.min() >= -2 and w.max() < -1
    assert np.all(init_weights(gen(0), "ones_w", 2, 2, {}) == 1)
    assert np.all(init_biases(gen(0), "zeros_b", 5, {}, fan_in=3) == 0)
    assert init_biases(
        gen(0), "normal_b", 10000, {"mean": 3, "var": 0.5}, fan_in=3
    ).std() == pytest.approx(0.5, rel=0.03)
    # scikit-learn's MLP bias: uniform within the bound of the layer's glorot_uniform weights
    b = init_biases(gen(0), "glorot_uniform_b", 10000, {}, fan_in=2000)
    limit = np.sqrt(6 / 12000)
    assert -limit <= b.min() < -0.99 * limit and 0.99 * limit < b.max() < limit
    assert b.std() == pytest.approx(limit / np.sqrt(3), rel=0.03)


def test_softmax_is_stable_and_cross_entropy_floored() -> None:
    net = Network(small_config())
    y = net.ops.output_forward(np.array([[1000.0, 0.0, -1000.0]]), "softmax_cross_entropy")
    np.testing.assert_allclose(y, [[1.0, 0.0, 0.0]])
    loss = net.ops.loss(y, np.array([[0.0, 0.0, 1.0]]), "softmax_cross_entropy")
    assert float(loss) == pytest.approx(-np.log(1e-7))
    mse = net.ops.loss(np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]]), "identity_mse")
    assert float(mse) == pytest.approx(2.5)


def test_early_stopping_uses_a_validation_split_and_restores_the_best() -> None:
    x, t = make_blobs(300, 20, 3, seed=8)
    t = np.where(np.random.default_rng(0).random(300) < 0.3, (t + 1) % 3, t)  # noisy labels
    data = (x[:200], t[:200], x[200:], t[200:])
    config = Config(
        hidden=(64, 64),
        n_inputs=20,
        n_outputs=3,
        epochs=200,
        eta=0.5,
        batch_size=10,
        early_stopping=3,
        validation_fraction=0.25,
    )
    trainer = Trainer(config)
    history = trainer.fit(*data)
    events = history.events
    best, stopped = events["best_val_epoch"], events["stopped_early_at"]
    assert stopped - best == 3 and history.epochs == stopped < 200
    assert len(history.val_loss) == len(history.test_loss) == stopped + 1
    assert history.val_loss[best] == min(history.val_loss[1:])
    assert events["restored_best_epoch"] == best
    train, _, val = trainer.prepare(*data)
    assert train.size == 150 and val.size == 50  # carved out of the training set
    assert trainer.network.scores(val.x, val.t, val.labels)[1] == history.val_loss[best]
    # every "final" figure is the kept (restored) model's, and says which epoch that is
    summary = history.summary()
    assert summary["final_epoch"] == best != history.epochs
    assert (summary["test_acc"], summary["train_acc"]) == (
        history.test_acc[best], history.train_acc[best])
    _, test, _ = trainer.prepare(*data)
    kept_acc, kept_loss, _ = trainer.network.scores(test.x, test.t, test.labels)
    assert (kept_acc, kept_loss) == (summary["test_acc"], summary["test_loss"])
    table = format_table([("run", summary)]).splitlines()
    assert table[0].split()[-1] == "kept" and table[2].split()[-1] == str(best)


def test_divergence_completes_the_run_warns_once_and_can_stop() -> None:
    x_train, t_train, x_test, t_test = _data()
    config = Config(hidden=(30, 20), n_inputs=20, n_outputs=3, epochs=4, eta=100.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = Trainer(config).fit(x_train, t_train, x_test, t_test)
    diverged = [w for w in caught if issubclass(w.category, DivergenceWarning)]
    assert len(diverged) == 1 and len(caught) == 1  # no floating-point warnings either
    assert len(history.test_acc) == 5 and "diverged_at" in history.events
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopped = Trainer(config.replace(stop_on_divergence=True)).fit(
            x_train, t_train, x_test, t_test
        )
    assert stopped.events["stopped_on_divergence_at"] == stopped.epochs < 4


def test_rng_values_are_distinct_and_reproducible() -> None:
    values = rng.uint64_stream(np, rng.dropout_key(0, 1, 2, 3), 100000)
    assert len(np.unique(values)) == 100000
    np.testing.assert_array_equal(
        values, rng.uint64_stream(np, rng.dropout_key(0, 1, 2, 3), 100000)
    )
    u = rng.uniform01(np, 123, 100000)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_fit_without_a_test_set_then_predict_and_evaluate_raw_inputs() -> None:
    x_train, t_train, x_test, t_test = _data()
    config = Config(hidden=(16,), n_inputs=20, n_outputs=3, epochs=3)
    with_test = Trainer(config)
    full = with_test.fit(x_train, t_train, x_test, t_test)
    trainer = Trainer(config)
    history = trainer.fit(x_train, t_train)
    assert history.train_loss == full.train_loss and history.test_acc == []
    assert history.epochs == 3 and history.summary()["test_acc"] is None
    assert format_table([("run", history.summary())]).splitlines()[2].split()[2] == "-"
    accuracy, loss = trainer.accuracy_and_loss(x_test, t_test)  # raw inputs, integer labels
    assert (accuracy, loss) == (full.test_acc[-1], full.test_loss[-1])
    outputs = trainer.predict_proba(x_test)
    np.testing.assert_array_equal(trainer.predict(x_test), outputs.argmax(1))
    assert outputs.shape == (len(x_test), 3)
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, rtol=1e-12)
    assert ((outputs.argmax(1) == t_test).mean()) == accuracy
    with pytest.raises(DataError, match="both"):
        trainer.fit(x_train, t_train, x_test)
    with pytest.raises(DataError, match="fitted"):
        Trainer(config).predict(x_test)
