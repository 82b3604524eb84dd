"""The `Config` dataclass: every option of a training run, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

WEIGHT_INITS = (
    "lecun_normal",
    "lecun_uniform",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "normal_w",
    "uniform_w",
    "zeros_w",
    "ones_w",
)
BIAS_INITS = ("zeros_b", "ones_b", "normal_b", "uniform_b")
ACTIVATIONS = (
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "identity",
    "softplus",
    "softsign",
    "step",
)
OUTPUTS = ("softmax_cross_entropy", "identity_mse")
NORMALIZATIONS = ("min_max", "z_score", "none")
BATCH_NORMS = ("off", "n", "bn", "node")
BN_EVALS = ("batch", "running")
DROPOUT_MODES = ("article", "inverted")
DTYPES = ("float32", "float64")
WEIGHT_DECAYS = ("l1", "l2")

#: parameters each initialiser / activation accepts ("var" is the article's alias of "std").
INIT_PARAMS = {
    "normal_w": ("mean", "std", "var"),
    "uniform_w": ("min", "max"),
    "normal_b": ("mean", "std", "var"),
    "uniform_b": ("min", "max"),
}
ACTIVATION_PARAMS = {"leaky_relu": ("alpha",)}


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _number(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
    ):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _params(name: str, value: Any, allowed: tuple[str, ...]) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a dict; got {value!r}")
    out = {}
    for key, item in value.items():
        if key not in allowed:
            valid = ", ".join(allowed) if allowed else "none"
            raise ConfigError(f"{name} has unknown key {key!r}; valid keys: {valid}")
        out[key] = _number(f"{name}[{key!r}]", item)
    for spread in ("std", "var"):
        if out.get(spread, 0.0) < 0:
            raise ConfigError(f"{name}[{spread!r}] is a standard deviation and must be >= 0")
    if out.get("min", 0.0) > out.get("max", 1.0):
        raise ConfigError(
            f"{name}: min must be <= max; got min={out.get('min', 0.0)}, max={out.get('max', 1.0)}"
        )
    return out


def _keep_ratio(name: str, value: Any) -> float:
    ratio = _number(name, value)
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"{name} is a keep ratio and must be in (0, 1]; got {value!r}")
    return ratio


@dataclass
class Config:
    """Every option of a run; see README for what each one means."""

    hidden: tuple[int, ...] = (100, 50)
    activation: str = "relu"
    activation_params: dict[str, float] = field(default_factory=dict)
    init: str = "he_normal"
    init_params: dict[str, float] = field(default_factory=dict)
    bias_init: str = "zeros_b"
    bias_init_params: dict[str, float] = field(default_factory=dict)
    output: str = "softmax_cross_entropy"
    normalize: str = "min_max"
    normalize_axis: int | None = None
    eta: float = 0.1
    batch_size: int = 100
    epochs: int = 50
    shuffle: bool = True
    weight_decay: tuple[str, float] | None = None
    dropout_input: float = 1.0
    dropout_hidden: float = 1.0
    dropout_mode: str = "article"
    batch_norm: str = "off"
    batch_norm_eta: float | None = None
    bn_eval: str = "batch"
    bn_momentum: float = 0.9
    dtype: str = "float64"
    backend: str = "numpy"
    seed: int = 0
    n_inputs: int = 784
    n_outputs: int = 10
    early_stopping: int | None = None
    validation_fraction: float = 0.1
    stop_on_divergence: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the valid choices or range of the first bad option."""
        if isinstance(self.hidden, int) and not isinstance(self.hidden, bool):
            self.hidden = (self.hidden,)
        if not isinstance(self.hidden, (tuple, list)):
            raise ConfigError(f"hidden must be a sequence of layer sizes; got {self.hidden!r}")
        self.hidden = tuple(_integer("hidden sizes", h, 1) for h in self.hidden)
        _choice("activation", self.activation, ACTIVATIONS)
        self.activation_params = _params(
            "activation_params", self.activation_params, ACTIVATION_PARAMS.get(self.activation, ())
        )
        _choice("init", self.init, WEIGHT_INITS)
        self.init_params = _params("init_params", self.init_params, INIT_PARAMS.get(self.init, ()))
        _choice("bias_init", self.bias_init, BIAS_INITS)
        self.bias_init_params = _params(
            "bias_init_params", self.bias_init_params, INIT_PARAMS.get(self.bias_init, ())
        )
        _choice("output", self.output, OUTPUTS)
        _choice("normalize", self.normalize, NORMALIZATIONS)
        if self.normalize_axis not in (None, 0):
            raise ConfigError(f"normalize_axis must be None or 0; got {self.normalize_axis!r}")
        self.eta = _number("eta", self.eta)
        if self.eta <= 0:
            raise ConfigError(f"eta must be > 0; got {self.eta!r}")
        self.batch_size = _integer("batch_size", self.batch_size, 1)
        self.epochs = _integer("epochs", self.epochs, 0)
        if not isinstance(self.shuffle, bool):
            raise ConfigError(f"shuffle must be True or False; got {self.shuffle!r}")
        self._validate_weight_decay()
        self.dropout_input = _keep_ratio("dropout_input", self.dropout_input)
        self.dropout_hidden = _keep_ratio("dropout_hidden", self.dropout_hidden)
        _choice("dropout_mode", self.dropout_mode, DROPOUT_MODES)
        _choice("batch_norm", self.batch_norm, BATCH_NORMS)
        if self.batch_norm_eta is not None:
            self.batch_norm_eta = _number("batch_norm_eta", self.batch_norm_eta)
            if self.batch_norm_eta < 0:
                raise ConfigError(f"batch_norm_eta must be >= 0; got {self.batch_norm_eta!r}")
        _choice("bn_eval", self.bn_eval, BN_EVALS)
        if self.batch_norm == "off" and (
            self.batch_norm_eta is not None or self.bn_eval != "batch"
        ):
            raise ConfigError(
                "batch_norm_eta and bn_eval='running' need batch norm: set batch_norm to "
                "n, bn or node"
            )
        self.bn_momentum = _number("bn_momentum", self.bn_momentum)
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ConfigError(f"bn_momentum must be in [0, 1); got {self.bn_momentum!r}")
        _choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"backend must be a backend name; got {self.backend!r}")
        self.seed = _integer("seed", self.seed, 0)
        self.n_inputs = _integer("n_inputs", self.n_inputs, 1)
        self.n_outputs = _integer("n_outputs", self.n_outputs, 1)
        if self.early_stopping is not None:
            self.early_stopping = _integer(
                "early_stopping (patience in epochs)", self.early_stopping, 1
            )
        self.validation_fraction = _number("validation_fraction", self.validation_fraction)
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(
                f"validation_fraction must be in (0, 1); got {self.validation_fraction!r}"
            )
        if not isinstance(self.stop_on_divergence, bool):
            raise ConfigError("stop_on_divergence must be True or False")

    def _validate_weight_decay(self) -> None:
        wd = self.weight_decay
        if wd is None:
            return
        if not isinstance(wd, (tuple, list)) or len(wd) != 2:
            raise ConfigError(f"weight_decay must be None or ('l1'|'l2', lambda); got {wd!r}")
        kind, lam = wd
        _choice("weight_decay kind", kind, WEIGHT_DECAYS)
        lam = _number("weight_decay lambda", lam)
        if lam < 0:
            raise ConfigError(f"weight_decay lambda must be >= 0; got {lam!r}")
        self.weight_decay = (kind, lam)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """d = [n_inputs] + hidden + [n_outputs]."""
        return (self.n_inputs, *self.hidden, self.n_outputs)

    @property
    def n_layers(self) -> int:
        return len(self.hidden) + 1

    @property
    def bn_rate(self) -> float:
        """The SGD rate of gamma and beta: batch_norm_eta, else eta; 0 for the N variant."""
        if self.batch_norm == "n":
            return 0.0
        return self.eta if self.batch_norm_eta is None else self.batch_norm_eta

    def replace(self, **changes: Any) -> Config:
        """A validated copy with some options changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["hidden"] = list(self.hidden)
        data["weight_decay"] = list(self.weight_decay) if self.weight_decay else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Inverse of `to_dict`; unknown keys are an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown config keys {unknown}; valid keys: {', '.join(sorted(names))}"
            )
        data = dict(data)
        if data.get("weight_decay") is not None:
            data["weight_decay"] = tuple(data["weight_decay"])
        if "hidden" in data and isinstance(data["hidden"], list):
            data["hidden"] = tuple(data["hidden"])
        return cls(**data)
