"""The article-compatible `learn`: names, callables, results."""

from __future__ import annotations

import numpy as np
import pytest
from article_reference import article_run
from conftest import make_blobs

from fastnn import Config, ConfigError, Trainer
from fastnn.compat import learn


def _data():
    x, t = make_blobs(400, 20, 3, seed=7)
    return x[:300], np.eye(3)[t[:300]], x[300:], np.eye(3)[t[300:]]


def test_learn_returns_the_article_tuple() -> None:
    y_train, y_test, W, b, train_rate, train_err, test_rate, test_err, total = learn(
        "base", *_data(), md=[10, 6], epoch=3, batch_size=50
    )
    assert y_train.shape == (300, 3) and y_test.shape == (100, 3)
    assert sorted(W) == [1, 2, 3] and W[1].shape == (20, 10) and b[3].shape == (3,)
    assert all(len(h) == 4 for h in (train_rate, train_err, test_rate, test_err))
    assert total >= 0 and W[1].dtype == np.float64
    assert test_rate[-1] == pytest.approx((y_test.argmax(1) == _data()[3].argmax(1)).mean())


def test_callable_initialisers_are_called_in_article_order_and_match_article_loop() -> None:
    calls = []
    rs = np.random.default_rng(9)

    def weight_init(d_prev, d, params):
        calls.append(("W", d_prev, d))
        return rs.normal(0, params["var"], (d_prev, d))

    def bias_init(d, params):
        calls.append(("b", d))
        return np.full(d, params["value"])

    x_train, t_train, x_test, t_test = _data()
    out = learn(
        "callables",
        x_train,
        t_train,
        x_test,
        t_test,
        md=[10, 6],
        weight_init_func=weight_init,
        weight_init_params={"var": 0.3},
        bias_init_func=bias_init,
        bias_init_params={"value": 0.01},
        epoch=2,
        batch_size=40,
        shuffle_flag=False,
        middle_func="tanh",
    )
    assert calls == [("W", 20, 10), ("W", 10, 6), ("W", 6, 3), ("b", 10), ("b", 6), ("b", 3)]
    rs2 = np.random.default_rng(9)
    W = {k: rs2.normal(0, 0.3, s) for k, s in ((1, (20, 10)), (2, (10, 6)), (3, (6, 3)))}
    b = {k: np.full(d, 0.01) for k, d in ((1, 10), (2, 6), (3, 3))}
    low, high = x_train.min(), x_train.max()
    ref = article_run(
        (x_train - low) / (high - low),
        t_train,
        (x_test - low) / (high - low),
        t_test,
        W,
        b,
        batch_size=40,
        epochs=2,
        act="tanh",
    )
    np.testing.assert_allclose(out[4], ref["train_acc"], rtol=1e-12)
    np.testing.assert_allclose(out[5], ref["train_loss"], rtol=1e-12)
    np.testing.assert_allclose(out[7], ref["test_loss"], rtol=1e-12)


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"batch_norm": True, "batch_norm_eta": 0}, {"batch_norm": "n"}),
        ({"batch_norm": True}, {"batch_norm": "bn", "batch_norm_eta": None}),
        ({"batch_norm": True, "batch_norm_eta": 0.5}, {"batch_norm": "bn", "batch_norm_eta": 0.5}),
        ({"batch_norm": True, "batch_norm_node": True}, {"batch_norm": "node"}),
        ({"batch_norm": False, "batch_norm_node": True}, {"batch_norm": "off"}),
        (
            {"weight_decay_func": "L1_norm", "weight_decay_lambda": 1e-4},
            {"weight_decay": ("l1", 1e-4)},
        ),
        (
            {"weight_decay_func": "L2_norm", "weight_decay_lambda": 0.1},
            {"weight_decay": ("l2", 0.1)},
        ),
        (
            {"dropout_input_ratio": 0.8, "dropout_middle_ratio": 0.5},
            {"dropout_input": 0.8, "dropout_hidden": 0.5},
        ),
    ],
)
def test_regularization_params_give_the_same_run_as_the_config(params, expected) -> None:
    data = _data()
    out = learn("run", *data, md=[8], epoch=2, batch_size=50, seed=4, regularization_params=params)
    config = Config(
        hidden=(8,),
        epochs=2,
        batch_size=50,
        seed=4,
        n_inputs=20,
        n_outputs=3,
        dtype="float64",
        **expected,
    )
    history = Trainer(config).fit(*data)
    assert list(out[7]) == history.test_loss and list(out[4]) == history.train_acc
    plain = Trainer(
        Config(
            hidden=(8,), epochs=2, batch_size=50, seed=4, n_inputs=20, n_outputs=3, dtype="float64"
        )
    ).fit(*data)
    if expected != {"batch_norm": "off"}:
        assert history.test_loss != plain.test_loss  # the option really changed the run


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"regularization_params": {"dropout_ratio": 0.5}}, "dropout_input_ratio"),
        ({"regularization_params": {"weight_decay_func": "L3"}}, "L1_norm"),
        (
            {"output_func": "softmax", "error_func": "mean_squared_error"},
            "identity/mean_squared_error",
        ),
        ({"middle_func": "swish"}, "relu"),
        ({"weight_init_func": "xavier"}, "he_normal"),
        ({"data_norm_func": "l2"}, "min_max"),
        ({"data_norm_params": {"axes": 0}}, "valid: axis"),
        ({"output_params": {"t": 1}}, "no output_params"),
        ({"regularization_params": {"weight_decay_lambda": 0.1}}, "needs weight_decay_func"),
    ],
)
def test_learn_rejects_bad_names_with_the_valid_choices(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        learn("bad", *_data(), epoch=1, **kwargs)
