"""Config validation and the backend registry's messages."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fastnn import BackendUnavailable, Config, ConfigError, DataError, Network, Trainer, backends
from fastnn.config import ACTIVATIONS, BIAS_INITS, WEIGHT_INITS
from fastnn.functions import ACTIVATIONS as ACTIVATION_FUNCTIONS


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"hidden": (100, 0)}, "hidden sizes must be an integer >= 1"),
        ({"hidden": "100"}, "hidden"),
        ({"activation": "swish"}, "sigmoid, tanh, relu"),
        ({"activation_params": {"beta": 1}}, "valid keys for activation relu: none"),
        ({"activation_params": {"alpha": 0.3}}, "key 'alpha' needs activation leaky_relu"),
        ({"activation": "leaky_relu", "activation_params": {"alpha": "x"}}, "finite number"),
        ({"init": "xavier"}, "he_normal"),
        ({"init": "normal_w", "init_params": {"sigma": 1}}, "mean, std, var"),
        ({"bias_init": "random"}, "zeros_b"),
        ({"output": "softmax"}, "softmax_cross_entropy, identity_mse"),
        ({"normalize": "l2"}, "min_max, z_score"),
        ({"normalize_axis": 1}, "one of none, 0"),
        ({"normalize_axis": False}, "one of none, 0"),
        ({"eta": 0}, "eta must be > 0"),
        ({"eta": float("nan")}, "finite"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"epochs": -1}, "epochs"),
        ({"shuffle": "yes"}, "shuffle"),
        ({"weight_decay": ("l3", 0.1)}, "l1, l2"),
        ({"weight_decay": ("l2", -1)}, ">= 0"),
        ({"weight_decay": "l2"}, "weight_decay"),
        ({"dropout_input": 0}, "(0, 1]"),
        ({"dropout_hidden": 1.2}, "(0, 1]"),
        ({"dropout_mode": "gaussian"}, "article, inverted"),
        ({"batch_norm": "yes"}, "off, n, bn, node"),
        ({"batch_norm_eta": -0.1}, ">= 0"),
        ({"bn_eval": "ema"}, "batch, running"),
        ({"bn_momentum": 1.0}, "[0, 1)"),
        ({"dtype": "float16"}, "float32, float64"),
        ({"seed": -3}, "seed"),
        ({"early_stopping": 0}, "early_stopping"),
        ({"validation_fraction": 1.0}, "(0, 1)"),
        ({"init": "normal_w", "init_params": {"std": -1}}, "must be >= 0"),
        (
            {"bias_init": "uniform_b", "bias_init_params": {"min": 2, "max": 1}},
            "min must be <= max",
        ),
        ({"batch_norm_eta": 0.1}, "batch_norm_eta needs batch norm"),
        ({"bn_eval": "running"}, "bn_eval needs batch norm"),
        ({"validation_fraction": 0.3}, "validation_fraction is used only by early stopping"),
        ({"bias_init_params": {"std": 1}}, "bias_init_params key 'std' needs bias_init normal_b"),
    ],
)
def test_bad_values_name_the_valid_choices(changes, fragment) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**changes)
    assert fragment in str(info.value)


def test_names_in_config_match_the_implementations() -> None:
    assert set(ACTIVATIONS) == set(ACTIVATION_FUNCTIONS)
    rng = np.random.default_rng(0)
    from fastnn.functions import init_biases, init_weights

    for name in WEIGHT_INITS:
        assert init_weights(rng, name, 3, 2, {}).shape == (3, 2)
    for name in BIAS_INITS:
        assert init_biases(rng, name, 4, {}, fan_in=3).shape == (4,)


def test_config_round_trips_through_dict() -> None:
    config = Config(hidden=(5,), weight_decay=("l1", 0.1), batch_norm="node")
    assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown config keys"):
        Config.from_dict({"hiden": [5]})


def test_unknown_backend_and_missing_optional_dependency(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="numpy, numba, cupy"):
        backends.get_backend("tpu")
    monkeypatch.setitem(sys.modules, "cupy", None)  # as if not installed
    monkeypatch.delitem(backends._INSTANCES, "cupy", raising=False)
    with pytest.raises(BackendUnavailable, match=r"pip install cupy-cuda12x \(or cupy-cuda13x"):
        backends.get_backend("cupy")
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(backends._INSTANCES, "numba", raising=False)
    monkeypatch.delitem(sys.modules, "fastnn.backends.numba", raising=False)
    with pytest.raises(
        BackendUnavailable, match=r"backend 'numba' needs numba: pip install numba scipy"
    ):
        backends.get_backend("numba")
    assert "numba" in backends.available()["numba"]


def test_params_setter_checks_names_and_shapes() -> None:
    net = Network(Config(hidden=(4,), n_inputs=3, n_outputs=2))
    params = net.numpy_params()
    with pytest.raises(ConfigError, match="missing"):
        net.params = {k: v for k, v in params.items() if k != "b2"}
    with pytest.raises(ConfigError, match=r"W1 must have shape \(3, 4\)"):
        net.params = {**params, "W1": np.zeros((4, 3))}


@pytest.mark.parametrize(
    "x, t, fragment",
    [
        (np.zeros((10, 5)), np.zeros(10, int), "expected shape (N, 20)"),
        (np.zeros((10, 20)), np.zeros(9, int), "10 inputs but 9 targets"),
        (np.zeros((10, 20)), np.full(10, 7), "labels must be in 0..2"),
        (np.full((10, 20), np.nan), np.zeros(10, int), "NaN"),
        (np.zeros((0, 20)), np.zeros(0, int), "empty"),
    ],
)
def test_trainer_rejects_bad_arrays(x, t, fragment) -> None:
    config = Config(hidden=(4,), n_inputs=20, n_outputs=3, epochs=1)
    with pytest.raises(DataError) as info:
        Trainer(config).fit(x, t, np.zeros((3, 20)), np.zeros(3, int))
    assert fragment in str(info.value)


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers() -> None:
    config = Config(
        eta=np.float32(0.5), seed=np.int64(3), hidden=list(np.array([7, 5])), epochs=np.int32(2)
    )
    assert config.hidden == (7, 5) and type(config.seed) is int and type(config.eta) is float
    assert type(config.epochs) is int and Config.from_dict(config.to_dict()) == config


def test_assigning_one_parameter_is_checked_and_copied() -> None:
    net = Network(Config(hidden=(4,), n_inputs=3, n_outputs=2, dtype="float32"))
    mine = np.ones((3, 4))
    net.params["W1"] = mine
    assert net.params["W1"].dtype == np.float32 and net.params["W1"] is not mine
    net.train_step(np.ones((2, 3), np.float32), np.eye(2, dtype=np.float32), 1, 0)
    assert np.all(mine == 1.0)  # the caller's array is never updated in place
    with pytest.raises(ConfigError, match=r"W1 must have shape \(3, 4\)"):
        net.params["W1"] = np.ones((4, 3))
    with pytest.raises(ConfigError, match="unknown parameter"):
        net.params["W9"] = np.ones(3)
