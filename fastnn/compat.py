"""The article-compatible entry point `learn`: its keyword names, function names and results."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .config import OPTIONS, Config
from .errors import ConfigError
from .network import Network
from .train import Trainer

_OUTPUT_PAIRS = {
    ("softmax", "cross_entropy_error"): "softmax_cross_entropy",
    ("identity", "mean_squared_error"): "identity_mse",
}
_WEIGHT_DECAYS = {"L1_norm": "l1", "L2_norm": "l2"}
_REGULARIZATION = "regularization_params."


def learn_names() -> dict[str, str]:
    """``learn`` argument -> Config option, for the arguments that map one to one (from the
    options' ``learn`` names; the others are combined below)."""
    return {
        option.learn: name
        for name, option in OPTIONS.items()
        if option.learn and "." not in option.learn and "/" not in option.learn
    }


def regularization_keys() -> tuple[str, ...]:
    """The keys ``regularization_params`` accepts (from the options' ``learn`` names)."""
    keys: list[str] = []
    for option in OPTIONS.values():
        if option.learn and option.learn.startswith(_REGULARIZATION):
            keys.extend(option.learn.removeprefix(_REGULARIZATION).split("/"))
    return tuple(keys)


def _regularization(params: Mapping[str, Any]) -> dict[str, Any]:
    valid = regularization_keys()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown regularization_params keys {unknown}; valid: {', '.join(valid)}"
        )
    out: dict[str, Any] = {
        "dropout_input": params.get("dropout_input_ratio", 1.0),
        "dropout_hidden": params.get("dropout_middle_ratio", 1.0),
    }
    if "weight_decay_lambda" in params and "weight_decay_func" not in params:
        raise ConfigError("weight_decay_lambda needs weight_decay_func (L1_norm or L2_norm)")
    if "weight_decay_func" in params:
        func = params["weight_decay_func"]
        if func not in _WEIGHT_DECAYS:
            raise ConfigError(f"weight_decay_func must be one of L1_norm, L2_norm; got {func!r}")
        out["weight_decay"] = (_WEIGHT_DECAYS[func], params.get("weight_decay_lambda", 0.0))
    if params.get("batch_norm", False):
        bn_eta = params.get("batch_norm_eta")
        if bn_eta == 0:
            out["batch_norm"] = "n"
        else:
            out["batch_norm"] = "node" if params.get("batch_norm_node", False) else "bn"
            out["batch_norm_eta"] = bn_eta
    return out


def _initial_params(
    config: Config,
    weight_init: Callable,
    weight_params: dict,
    bias_init: Callable,
    bias_params: dict,
) -> dict[str, np.ndarray]:
    """Call the article-style initialisers for layers 1..L, all weights first, then biases."""
    net = Network(config)  # default draws for whichever of the two is given by name
    params = net.numpy_params()
    d = config.layer_sizes
    if callable(weight_init):
        for k in range(1, len(d)):
            params[f"W{k}"] = np.asarray(weight_init(d[k - 1], d[k], weight_params), np.float64)
    if callable(bias_init):
        for k in range(1, len(d)):
            params[f"b{k}"] = np.asarray(bias_init(d[k], bias_params), np.float64).reshape(d[k])
    return params


def learn(
    name: str,
    x_train: Any,
    t_train: Any,
    x_test: Any,
    t_test: Any,
    md: list[int] = (100, 50),
    weight_init_func: str | Callable = "he_normal",
    weight_init_params: dict | None = None,
    bias_init_func: str | Callable = "zeros_b",
    bias_init_params: dict | None = None,
    eta: float = 0.1,
    batch_size: int = 100,
    epoch: int = 50,
    data_norm_func: str = "min_max",
    data_norm_params: dict | None = None,
    middle_func: str = "relu",
    middle_params: dict | None = None,
    output_func: str = "softmax",
    output_params: dict | None = None,
    error_func: str = "cross_entropy_error",
    regularization_params: dict | None = None,
    shuffle_flag: bool = True,
    backend: str = "numpy",
    seed: int = 0,
    verbose: bool = False,
) -> tuple:
    """Train as the article's function does, in float64.

    Returns ``(y_train, y_test, W, b, train_rate, train_err, test_rate, test_err, total_time)``
    with W and b dicts keyed by layer 1..L and four history arrays of length epoch + 1.
    """
    arguments = dict(locals())  # the article's names, as given
    unknown_norm = sorted(set(data_norm_params or {}) - {"axis"})
    if unknown_norm:
        raise ConfigError(f"unknown data_norm_params keys {unknown_norm}; valid: axis")
    if output_params:
        raise ConfigError(
            f"output_func {output_func!r} takes no output_params; got {output_params}"
        )
    if (output_func, error_func) not in _OUTPUT_PAIRS:
        raise ConfigError(
            "output_func/error_func must be softmax/cross_entropy_error or "
            f"identity/mean_squared_error; got {output_func}/{error_func}"
        )
    options = {name: arguments[argument] for argument, name in learn_names().items()}
    for name in ("activation_params", "init_params", "bias_init_params"):
        options[name] = dict(options[name] or {})  # the article passes None for none
    options["shuffle"] = bool(options["shuffle"])
    for init, params in (("init", "init_params"), ("bias_init", "bias_init_params")):
        if callable(options[init]):  # it draws the arrays below; the config keeps the default
            del options[init]
            options[params] = {}
    weight_init_params = dict(weight_init_params or {})
    bias_init_params = dict(bias_init_params or {})
    t_train, t_test = np.asarray(t_train), np.asarray(t_test)
    n_outputs = t_train.shape[1] if t_train.ndim == 2 else int(max(t_train.max(), t_test.max())) + 1
    config = Config(
        **options,
        output=_OUTPUT_PAIRS[(output_func, error_func)],
        normalize_axis=(data_norm_params or {}).get("axis"),
        dtype="float64",
        n_inputs=int(np.prod(np.asarray(x_train).shape[1:])),
        n_outputs=n_outputs,
        **_regularization(regularization_params or {}),
    )
    network = None
    if callable(weight_init_func) or callable(bias_init_func):
        params = _initial_params(
            config, weight_init_func, weight_init_params, bias_init_func, bias_init_params
        )
        network = Network(config, params)

    def report(trainer: Trainer, ep: int) -> None:
        h = trainer.history
        print(
            f"{name} epoch {ep}: train {h.train_acc[-1]:.4f} test {h.test_acc[-1]:.4f} "
            f"loss {h.test_loss[-1]:.5f}"
        )

    trainer = Trainer(config, on_epoch=report if verbose else None, keep_splits=True)
    history = trainer.fit(x_train, t_train, x_test, t_test, network=network)
    net = trainer.network
    train_split, test_split, _ = trainer.splits  # the data as fit normalised it
    y_train = net.ops.to_numpy(net.forward_eval(train_split.x))
    y_test = net.ops.to_numpy(net.forward_eval(test_split.x))
    params = net.numpy_params()
    layers = range(1, config.n_layers + 1)
    weights = {k: params[f"W{k}"] for k in layers}
    biases = {k: params[f"b{k}"] for k in layers}
    return (
        y_train,
        y_test,
        weights,
        biases,
        np.array(history.train_acc),
        np.array(history.train_loss),
        np.array(history.test_acc),
        np.array(history.test_loss),
        history.total_seconds,
    )
