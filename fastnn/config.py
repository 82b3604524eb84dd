"""The `Config` dataclass: every option of a training run, each declared once with its metadata.

Each field carries an `Option` (in ``dataclasses.field(metadata=...)``): its rule (type, choices
or range; how it reads from text and is written back), help text, its one command-line flag,
whether a sweep grid may vary it and its name in the article-compatible ``learn``. Validation,
the JSON form, the ``fastnn train`` / ``fastnn sweep`` flags and ``--help``, grid parsing,
``compat.learn``'s mapping and the README's option table are all derived from `OPTIONS`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import numbers
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .rng import SEED_MAX

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
BIAS_INITS = ("zeros_b", "ones_b", "normal_b", "uniform_b", "glorot_uniform_b")
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
NORMALIZATIONS = ("min_max", "z_score", "standard", "none")
BATCH_NORMS = ("off", "n", "bn", "node")
BN_EVALS = ("batch", "running")
DROPOUT_MODES = ("article", "inverted")
DTYPES = ("float32", "float64")
WEIGHT_DECAYS = ("l1", "l2")
#: each optimiser and what it does (`fastnn info` prints these; the plan's `OptimizerSpec`
#: gives the formulas)
OPTIMIZER_RULES: dict[str, str] = {
    "sgd": "p -= eta * g: the article's plain stochastic gradient descent",
    "momentum": "heavy ball: v = momentum * v + g; p -= eta * v",
    "nesterov": "look-ahead momentum: v = momentum * v + g; p -= eta * (g + momentum * v)",
    "adam": "per-parameter steps from bias-corrected moving averages of g (beta1) and g^2 "
            "(beta2), eps added to the root; weight decay is added to g",
    "adamw": "adam with decoupled weight decay: p -= eta * decay gradient beside the step",
}
#: each learning-rate schedule and what it does (the factor of eta; `fastnn.schedules`)
LR_SCHEDULE_RULES: dict[str, str] = {
    "constant": "eta throughout (after any warm-up)",
    "step": "eta x lr_gamma every lr_step_size epochs",
    "exponential": "eta x lr_gamma each epoch",
    "cosine": "half a cosine from eta down to lr_min at the last epoch",
    "plateau": "eta x lr_gamma after lr_patience epochs without a lower loss (plateau_loss: "
               "train or validation), never below lr_min",
}
OPTIMIZERS = tuple(OPTIMIZER_RULES)
LR_SCHEDULES = tuple(LR_SCHEDULE_RULES)
PLATEAU_LOSSES = ("train", "validation")
#: where each epoch's training loss and accuracy come from
TRAIN_FIGURE_RULES: dict[str, str] = {
    "evaluate": "the whole training set evaluated after the epoch, in evaluation mode (the "
                "article's)",
    "running": "the mean over the epoch's batches as they were trained, each before its "
               "update, plus the penalty at the epoch's end (scikit-learn's loss_curve_); "
               "no extra pass over the training set",
}
TRAIN_FIGURES = tuple(TRAIN_FIGURE_RULES)
#: which optimiser uses which of its hyper-parameters
OPTIMIZER_OPTIONS = {
    "momentum": ("momentum", "nesterov"),
    "beta1": ("adam", "adamw"),
    "beta2": ("adam", "adamw"),
    "eps": ("adam", "adamw"),
}
#: which learning-rate schedule uses which of its options
SCHEDULE_OPTIONS = {
    "lr_step_size": ("step",),
    "lr_gamma": ("step", "exponential", "plateau"),
    "lr_min": ("cosine", "plateau"),
    "lr_patience": ("plateau",),
    "plateau_loss": ("plateau",),
}

#: parameters each initialiser / activation accepts ("var" is the article's alias of "std").
INIT_PARAMS = {
    "normal_w": ("mean", "std", "var"),
    "uniform_w": ("min", "max"),
    "normal_b": ("mean", "std", "var"),
    "uniform_b": ("min", "max"),
}
ACTIVATION_PARAMS = {"leaky_relu": ("alpha",)}
WEIGHT_INIT_PARAMS = {name: keys for name, keys in INIT_PARAMS.items() if name in WEIGHT_INITS}
BIAS_INIT_PARAMS = {name: keys for name, keys in INIT_PARAMS.items() if name in BIAS_INITS}

#: the values a yes/no option reads from text
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


# ---- how options are named in messages ----

_FLAG_NAMES: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fastnn_flag_names", default=False
)


@contextmanager
def flag_names() -> Iterator[None]:
    """Within the block, `ConfigError` messages name options by their command-line flags."""
    token = _FLAG_NAMES.set(True)
    try:
        yield
    finally:
        _FLAG_NAMES.reset(token)


def label(name: str) -> str:
    """How messages name option ``name``: its field name, or its flag inside `flag_names`."""
    option = OPTIONS.get(name)
    if _FLAG_NAMES.get() and option is not None and option.flag:
        return option.flag
    return name


# ---- rules: the type, choices or range of one option ----


def _number(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
    ):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer; got {value!r}")
    return int(value)


def _is_none_word(text: str) -> bool:
    return text.strip().lower() in ("none", "off")


class Rule:
    """The values one option takes: checked, read from text and written back as text.

    ``format`` writes text that ``parse`` reads back (without commas, so it fits in a sweep
    grid); ``to_json`` gives the value's JSON form, which ``check`` accepts back.
    """

    optional = False

    def describe(self) -> str:
        """The valid values in words, for ``--help``, the README and messages."""
        raise NotImplementedError

    def check(self, name: str, value: Any) -> Any:
        """The value, normalised; `ConfigError` naming the valid values if it is not one."""
        raise NotImplementedError

    def parse(self, text: str) -> Any:
        """Read a value from command-line or grid text; ValueError saying what was expected."""
        raise NotImplementedError

    def read(self, text: str) -> Any:
        """`parse` for text typed by a user: ASCII only (Python would read full-width or other
        scripts' digits, ``２０``, as numbers, so a value that looks like text would be taken)."""
        if not text.isascii():
            raise ValueError(f"expected {self.describe()} in ASCII characters; got {text!r}")
        return self.parse(text)

    def format(self, value: Any) -> str:
        """Text that `parse` reads back as ``value``."""
        return "none" if value is None else str(value)

    def to_json(self, value: Any) -> Any:
        """The JSON form of ``value``."""
        return value


@dataclass(frozen=True)
class Choice(Rule):
    """One of a fixed set of values (words, or ``None``/numbers written as words)."""

    choices: tuple[Any, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(self.format(c) for c in self.choices)

    def check(self, name: str, value: Any) -> Any:
        for choice in self.choices:
            if value is choice or (
                not isinstance(value, bool) and type(value) is not float and value == choice
            ):
                return choice
        raise ConfigError(f"{name} must be {self.describe()}; got {value!r}")

    def parse(self, text: str) -> Any:
        for choice in self.choices:
            if self.format(choice) == text.strip().lower():
                return choice
        raise ValueError(f"expected {self.describe()}; got {text!r}")

    @property
    def words(self) -> tuple[str, ...] | None:
        """The choices when all are words (the command line then lists them in --help)."""
        return self.choices if all(isinstance(c, str) for c in self.choices) else None


@dataclass(frozen=True)
class Integer(Rule):
    """An integer >= ``minimum`` and, when ``maximum`` is given, <= it (or None when
    ``optional``). ``maximum_text`` is how messages write the maximum (e.g. ``2**64 - 1``)."""

    minimum: int
    optional: bool = False
    maximum: int | None = None
    maximum_text: str = ""

    def describe(self) -> str:
        if self.maximum is not None:
            top = self.maximum_text or str(self.maximum)
            text = f"an integer in [{self.minimum}, {top}]"
        else:
            text = f"an integer >= {self.minimum}"
        return text + (", or none" if self.optional else "")

    def check(self, name: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        number = _integer(name, value)
        if self.maximum is not None and not self.minimum <= number <= self.maximum:
            top = self.maximum_text or str(self.maximum)
            raise ConfigError(
                f"{name} must be an integer in [{self.minimum}, {top}] "
                f"({self.minimum}..{self.maximum}); got {value!r}"
            )
        if number < self.minimum:
            raise ConfigError(f"{name} must be an integer >= {self.minimum}; got {value!r}")
        return number

    def parse(self, text: str) -> int | None:
        if self.optional and _is_none_word(text):
            return None
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"expected {self.describe()}; got {text!r}") from None


@dataclass(frozen=True)
class Number(Rule):
    """A finite number in an interval (or None when ``optional``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    meaning: str = ""  # e.g. "a keep ratio", said in the message of a value out of range

    def interval(self) -> str:
        """``> 0``, ``>= 0`` or ``in (0, 1]``."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"

    def describe(self) -> str:
        return f"a number {self.interval()}" + (", or none" if self.optional else "")

    def check(self, name: str, value: Any) -> float | None:
        if value is None and self.optional:
            return None
        number = _number(name, value)
        below = number <= self.low if self.low_open else number < self.low
        above = self.high is not None and (
            number >= self.high if self.high_open else number > self.high
        )
        if below or above:
            what = f" is {self.meaning} and" if self.meaning else ""
            raise ConfigError(f"{name}{what} must be {self.interval()}; got {value!r}")
        return number

    def parse(self, text: str) -> float | None:
        if self.optional and _is_none_word(text):
            return None
        try:
            return float(text.strip())
        except ValueError:
            raise ValueError(f"expected {self.describe()}; got {text!r}") from None

    def format(self, value: Any) -> str:
        return "none" if value is None else repr(float(value))


@dataclass(frozen=True)
class YesNo(Rule):
    """True or False."""

    def describe(self) -> str:
        return "true or false"

    def check(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False; got {value!r}")
        return value

    def parse(self, text: str) -> bool:
        word = text.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError(f"expected true or false; got {text!r}")

    def format(self, value: Any) -> str:
        return str(bool(value)).lower()


@dataclass(frozen=True)
class Sizes(Rule):
    """Hidden layer sizes: one or more integers >= 1, written ``100,50`` or ``100/50``."""

    def describe(self) -> str:
        return "layer sizes >= 1, like 100,50 (100/50 in a grid)"

    def check(self, name: str, value: Any) -> tuple[int, ...]:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, (tuple, list)) or not value:
            raise ConfigError(f"{name} must be a sequence of layer sizes; got {value!r}")
        sizes = []
        for size in value:
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
                raise ConfigError(f"{name} sizes must be an integer >= 1; got {tuple(value)!r}")
            sizes.append(int(size))
        return tuple(sizes)

    def parse(self, text: str) -> tuple[int, ...]:
        parts = re.split(r"[,/]", text)
        if any(not part.strip() for part in parts):
            raise ValueError(f"expected layer sizes like 100,50 with no empty size; got {text!r}")
        try:
            return tuple(int(part) for part in parts)
        except ValueError:
            raise ValueError(f"expected layer sizes like 100,50; got {text!r}") from None

    def format(self, value: Any) -> str:
        return "/".join(str(size) for size in value)

    def to_json(self, value: Any) -> list[int]:
        return list(value)


@dataclass(frozen=True)
class Decay(Rule):
    """None, or (kind, lambda) with kind l1 or l2 and lambda >= 0; written ``l2:1e-4``."""

    optional = True

    def describe(self) -> str:
        return "none, or l1:LAMBDA or l2:LAMBDA with LAMBDA >= 0"

    def check(self, name: str, value: Any) -> tuple[str, float] | None:
        if value is None:
            return None
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ConfigError(f"{name} must be none or ('l1'|'l2', lambda); got {value!r}")
        kind = Choice(WEIGHT_DECAYS).check(f"{name} kind", value[0])
        lam = Number(low=0.0).check(f"{name} lambda", value[1])
        return kind, lam

    def parse(self, text: str) -> tuple[str, float] | None:
        if _is_none_word(text):
            return None
        kind, sep, lam = text.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            return kind.lower(), float(lam)
        except ValueError:
            raise ValueError(
                f"expected l1:LAMBDA or l2:LAMBDA (e.g. l2:1e-4) or none; got {text!r}"
            ) from None

    def format(self, value: Any) -> str:
        return "none" if value is None else f"{value[0]}:{float(value[1])!r}"

    def to_json(self, value: Any) -> list | None:
        return None if value is None else list(value)


@dataclass(frozen=True)
class Params(Rule):
    """Named numeric parameters of the option ``parent`` (an initialiser or activation).

    Written ``NAME=X`` (several joined by ``/``), or just ``X`` when the flag sets the one
    parameter ``single_key``; ``none`` is no parameters. Which names are valid depends on the
    parent's value: `Config.validate` checks that.
    """

    parent: str
    allowed: dict[str, tuple[str, ...]]
    single_key: str | None = None

    def describe(self) -> str:
        groups = "; ".join(f"{', '.join(keys)} for {owner}" for owner, keys in self.allowed.items())
        return f"a number ({groups})" if self.single_key else f"NAME=X: {groups}"

    def check(self, name: str, value: Any) -> dict[str, float]:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a dict; got {value!r}")
        out = {str(key): _number(f"{name}[{key!r}]", item) for key, item in value.items()}
        for spread in ("std", "var"):
            if out.get(spread, 0.0) < 0:
                raise ConfigError(f"{name}[{spread!r}] is a standard deviation and must be >= 0")
        if out.get("min", 0.0) > out.get("max", 1.0):
            raise ConfigError(
                f"{name}: min must be <= max; got min={out.get('min', 0.0)}, "
                f"max={out.get('max', 1.0)}"
            )
        return out

    def parse(self, text: str) -> dict[str, float]:
        if _is_none_word(text):
            return {}
        if self.single_key is not None and "=" not in text:
            try:
                return {self.single_key: float(text)}
            except ValueError:
                raise ValueError(f"expected a number; got {text!r}") from None
        out = {}
        for part in text.split("/"):
            key, sep, value = part.partition("=")
            try:
                if not sep or not key.strip():
                    raise ValueError
                out[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"expected NAME=NUMBER (e.g. std=0.1); got {text!r}") from None
        return out

    def format(self, value: Any) -> str:
        if not value:
            return "none"
        if self.single_key is not None and set(value) == {self.single_key}:
            return repr(float(value[self.single_key]))
        return "/".join(f"{key}={float(item)!r}" for key, item in value.items())

    def key_label(self, name: str, key: str) -> str:
        """How a message names parameter ``key`` of option ``name``."""
        option = OPTIONS[name]
        if not _FLAG_NAMES.get() or not option.flag:
            return f"{name} key {key!r}"
        return option.flag if key == self.single_key else f"{option.flag} {key}=..."


@dataclass(frozen=True)
class BackendName(Rule):
    """A backend name; whether it exists and loads is checked by `fastnn.backends`."""

    def describe(self) -> str:
        return "numpy, numba or cupy (`fastnn info` says which load)"

    def check(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be a backend name; got {value!r}")
        return value

    def parse(self, text: str) -> str:
        return text.strip()


# ---- options ----

_UNSET: Any = object()


@dataclass(frozen=True)
class Option:
    """Everything about one `Config` field, declared once beside it."""

    rule: Rule
    help: str
    #: the one command-line flag; None: the value comes from the data, not the command line
    flag: str | None
    metavar: str | None = None
    #: the flag takes no value and sets the opposite of the default (``--no-shuffle``)
    switch: bool = False
    #: the flag may be repeated; the parameters given are merged
    repeat: bool = False
    #: a sweep grid may vary it (``fastnn sweep --grid NAME=V1,V2``)
    sweep: bool = True
    #: its name in the article-compatible ``compat.learn`` (``a/b``: two arguments make it;
    #: ``regularization_params.key``: a key of that dict)
    learn: str | None = None
    #: the command line's default where it differs from the Python default
    cli_default: Any = _UNSET


def _option(default: Any, rule: Rule, help: str, flag: str | None, **details: Any) -> Any:
    metadata = {"option": Option(rule, help, flag, **details)}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


_KEEP = "a keep ratio"


@dataclass
class Config:
    """Every option of a run; README.md, "Configuration", describes each one (`OPTIONS`)."""

    hidden: tuple[int, ...] = _option(
        (100, 50), Sizes(), "hidden layer sizes", "--hidden", metavar="SIZES", learn="md"
    )
    activation: str = _option(
        "relu", Choice(ACTIVATIONS), "hidden-layer activation", "--activation", learn="middle_func"
    )
    activation_params: dict[str, float] = _option(
        {},
        Params("activation", ACTIVATION_PARAMS, single_key="alpha"),
        "slope of leaky_relu below 0 (0.01 when not given)",
        "--alpha",
        metavar="ALPHA",
        learn="middle_params",
    )
    init: str = _option(
        "he_normal", Choice(WEIGHT_INITS), "weight initialiser", "--init", learn="weight_init_func"
    )
    init_params: dict[str, float] = _option(
        {},
        Params("init", WEIGHT_INIT_PARAMS),
        "parameters of the weight initialiser (var is the article's name of std)",
        "--init-param",
        metavar="NAME=X",
        repeat=True,
        learn="weight_init_params",
    )
    bias_init: str = _option(
        "zeros_b", Choice(BIAS_INITS), "bias initialiser", "--bias-init", learn="bias_init_func"
    )
    bias_init_params: dict[str, float] = _option(
        {},
        Params("bias_init", BIAS_INIT_PARAMS),
        "parameters of the bias initialiser (var is the article's name of std)",
        "--bias-init-param",
        metavar="NAME=X",
        repeat=True,
        learn="bias_init_params",
    )
    output: str = _option(
        "softmax_cross_entropy",
        Choice(OUTPUTS),
        "output layer and loss: softmax + cross entropy, or identity + mean squared error",
        "--output",
        learn="output_func/error_func",
    )
    normalize: str = _option(
        "min_max",
        Choice(NORMALIZATIONS),
        "input normalisation, with statistics of the training set (standard: per column, "
        "constant columns scale 1, standardised columns left as they are)",
        "--normalize",
        learn="data_norm_func",
    )
    normalize_axis: int | None = _option(
        None,
        Choice((None, 0)),
        "normalise over all inputs (none) or per input column (0)",
        "--normalize-axis",
        metavar="none|0",
        learn="data_norm_params.axis",
    )
    eta: float = _option(
        0.1, Number(0.0, low_open=True), "learning rate (the schedule's peak)", "--eta", learn="eta"
    )
    optimizer: str = _option(
        "sgd",
        Choice(OPTIMIZERS),
        "update rule: sgd (the article's), momentum, nesterov, adam, adamw (decoupled decay)",
        "--optimizer",
    )
    momentum: float = _option(
        0.9,
        Number(0.0, 1.0, high_open=True),
        "velocity coefficient of the momentum and nesterov optimisers",
        "--momentum",
    )
    beta1: float = _option(
        0.9, Number(0.0, 1.0, high_open=True), "adam/adamw: decay of the first moment", "--beta1"
    )
    beta2: float = _option(
        0.999,
        Number(0.0, 1.0, high_open=True),
        "adam/adamw: decay of the second moment",
        "--beta2",
    )
    eps: float = _option(
        1e-8, Number(0.0, low_open=True), "adam/adamw: added to the root of the second moment",
        "--eps",
    )
    lr_schedule: str = _option(
        "constant",
        Choice(LR_SCHEDULES),
        "learning rate over the run: constant, step (x lr_gamma every lr_step_size epochs), "
        "exponential (x lr_gamma each epoch), cosine (to lr_min at the last epoch), plateau "
        "(x lr_gamma after lr_patience epochs without a lower loss)",
        "--lr-schedule",
    )
    warmup: int = _option(
        0, Integer(0), "epochs of linear warm-up (step by step) before the schedule", "--warmup",
        metavar="EPOCHS",
    )
    lr_step_size: int = _option(
        10, Integer(1), "step schedule: epochs between two decays", "--lr-step-size",
        metavar="EPOCHS",
    )
    lr_gamma: float = _option(
        0.1,
        Number(0.0, 1.0, low_open=True, high_open=True),
        "step, exponential and plateau schedules: the factor of each decay",
        "--lr-gamma",
    )
    lr_min: float = _option(
        0.0, Number(0.0), "cosine and plateau schedules: the lowest learning rate", "--lr-min"
    )
    lr_patience: int = _option(
        5, Integer(1), "plateau schedule: epochs without a lower loss before a decay",
        "--lr-patience", metavar="EPOCHS",
    )
    plateau_loss: str = _option(
        "train",
        Choice(PLATEAU_LOSSES),
        "plateau schedule: the loss it watches (validation needs early_stopping's split)",
        "--plateau-loss",
    )
    batch_size: int = _option(
        100, Integer(1), "mini-batch size", "--batch-size", learn="batch_size"
    )
    epochs: int = _option(50, Integer(0), "epochs to train", "--epochs", learn="epoch")
    shuffle: bool = _option(
        True,
        YesNo(),
        "shuffle the training set each epoch (--no-shuffle: visit it in order)",
        "--no-shuffle",
        switch=True,
        learn="shuffle_flag",
    )
    weight_decay: tuple[str, float] | None = _option(
        None,
        Decay(),
        "weight decay on the weights (not biases), L1 or L2, added to the reported loss",
        "--weight-decay",
        metavar="l1:LAM|l2:LAM",
        learn="regularization_params.weight_decay_func/weight_decay_lambda",
    )
    dropout_input: float = _option(
        1.0,
        Number(0.0, 1.0, low_open=True, meaning=_KEEP),
        "keep ratio of the inputs (1: no dropout)",
        "--dropout-input",
        metavar="KEEP",
        learn="regularization_params.dropout_input_ratio",
    )
    dropout_hidden: float = _option(
        1.0,
        Number(0.0, 1.0, low_open=True, meaning=_KEEP),
        "keep ratio of the hidden layers' outputs (1: no dropout)",
        "--dropout-hidden",
        metavar="KEEP",
        learn="regularization_params.dropout_middle_ratio",
    )
    dropout_mode: str = _option(
        "article",
        Choice(DROPOUT_MODES),
        "article: exactly round(keep*d) kept, scaled at evaluation; inverted: scaled in training",
        "--dropout-mode",
    )
    batch_norm: str = _option(
        "off",
        Choice(BATCH_NORMS),
        "batch norm: off, n (normalise only), bn (learned gamma/beta), node (per-node gamma/beta)",
        "--batch-norm",
        learn="regularization_params.batch_norm/batch_norm_node",
    )
    batch_norm_eta: float | None = _option(
        None,
        Number(0.0, optional=True),
        "learning rate of gamma and beta (none: eta); needs batch_norm",
        "--batch-norm-eta",
        learn="regularization_params.batch_norm_eta",
    )
    bn_eval: str = _option(
        "batch",
        Choice(BN_EVALS),
        "batch norm at evaluation: statistics of the evaluated set (article) or running ones",
        "--bn-eval",
    )
    bn_momentum: float = _option(
        0.9,
        Number(0.0, 1.0, high_open=True),
        "momentum of the running batch-norm statistics",
        "--bn-momentum",
    )
    dtype: str = _option(
        "float64",
        Choice(DTYPES),
        "floating-point precision of the computation",
        "--dtype",
        cli_default="float32",
    )
    backend: str = _option(
        "numpy", BackendName(), "array backend", "--backend", metavar="NAME", learn="backend"
    )
    seed: int = _option(
        0,
        # the random streams fold the seed into 64 bits: a larger one would repeat a smaller's
        Integer(0, maximum=SEED_MAX, maximum_text="2**64 - 1"),
        "seed of initialisation, shuffling and dropout",
        "--seed",
        learn="seed",
    )
    n_inputs: int = _option(
        784, Integer(1), "inputs per example", None, sweep=False
    )
    n_outputs: int = _option(
        10, Integer(1), "number of classes", None, sweep=False
    )
    early_stopping: int | None = _option(
        None,
        Integer(1, optional=True),
        "stop after this many epochs without a lower validation loss, keep the best epoch",
        "--early-stopping",
        metavar="PATIENCE",
    )
    validation_fraction: float = _option(
        0.1,
        Number(0.0, 1.0, low_open=True, high_open=True),
        "share of the training data held out for early stopping's validation loss",
        "--validation-fraction",
    )
    tol: float = _option(
        0.0,
        Number(0.0),
        "a loss counts as lower only when it drops by more than this (early stopping, "
        "n_iter_no_change, plateau)",
        "--tol",
    )
    n_iter_no_change: int | None = _option(
        None,
        Integer(1, optional=True),
        "stop after this many epochs in a row whose training loss is not below the best so "
        "far minus tol (converged; scikit-learn's rule)",
        "--n-iter-no-change",
        metavar="EPOCHS",
    )
    train_figures: str = _option(
        "evaluate",
        Choice(TRAIN_FIGURES),
        "where each epoch's training loss and accuracy come from: evaluate (the whole set "
        "after the epoch) or running (the mean over its batches as trained)",
        "--train-figures",
    )
    stop_on_divergence: bool = _option(
        False,
        YesNo(),
        "end the run at the first epoch it diverges (non-finite loss or one predicted class)",
        "--stop-on-divergence",
        switch=True,
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the valid choices or range of the first bad option."""
        for name, option in OPTIONS.items():
            setattr(self, name, option.rule.check(label(name), getattr(self, name)))
        for name in ("activation_params", "init_params", "bias_init_params"):
            self._check_param_names(name)
        if self.batch_norm == "off":
            for name, given in (
                ("batch_norm_eta", self.batch_norm_eta is not None),
                ("bn_eval", self.bn_eval != "batch"),
            ):
                if given:
                    raise ConfigError(
                        f"{label(name)} needs batch norm: set {label('batch_norm')} "
                        "to n, bn or node"
                    )
        if self.normalize == "standard" and self.normalize_axis is not None:
            raise ConfigError(
                f"{label('normalize')} standard is per column already: leave "
                f"{label('normalize_axis')} at none"
            )
        self._check_used_by("optimizer", OPTIMIZER_OPTIONS)
        self._check_used_by("lr_schedule", SCHEDULE_OPTIONS)
        if self.lr_schedule == "plateau" and self.plateau_loss == "validation" and (
            self.early_stopping is None
        ):
            raise ConfigError(
                f"{label('plateau_loss')} validation needs a validation split: set "
                f"{label('early_stopping')} too"
            )
        if self.lr_schedule in ("cosine", "plateau") and self.lr_min > self.eta:
            raise ConfigError(
                f"{label('lr_min')} must be <= {label('eta')}; got {self.lr_min!r} > {self.eta!r}"
            )
        if self.early_stopping is None and self.validation_fraction != _DEFAULTS[
            "validation_fraction"
        ]:
            raise ConfigError(
                f"{label('validation_fraction')} is used only by early stopping: set "
                f"{label('early_stopping')} too, or leave {label('validation_fraction')} at "
                f"{_DEFAULTS['validation_fraction']}; got {self.validation_fraction!r}"
            )

    def _check_used_by(self, owner: str, users: dict[str, tuple[str, ...]]) -> None:
        """An option set away from its default must be one that ``owner``'s value uses."""
        for name, owners in users.items():
            if getattr(self, name) != _DEFAULTS[name] and getattr(self, owner) not in owners:
                raise ConfigError(
                    f"{label(name)} is used only by {label(owner)} {' or '.join(owners)}; "
                    f"got {label(owner)} {getattr(self, owner)} (leave {label(name)} at "
                    f"{OPTIONS[name].rule.format(_DEFAULTS[name])})"
                )

    def _check_param_names(self, name: str) -> None:
        rule: Params = OPTIONS[name].rule  # type: ignore[assignment]
        parent = getattr(self, rule.parent)
        allowed = rule.allowed.get(parent, ())
        for key in getattr(self, name):
            if key in allowed:
                continue
            owners = [owner for owner, keys in rule.allowed.items() if key in keys]
            if owners:
                raise ConfigError(
                    f"{rule.key_label(name, key)} needs {label(rule.parent)} "
                    f"{' or '.join(owners)}; got {label(rule.parent)} {parent}"
                )
            valid = ", ".join(allowed) if allowed else "none"
            raise ConfigError(
                f"{label(name)} has unknown key {key!r}; valid keys for "
                f"{label(rule.parent)} {parent}: {valid}"
            )

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
        return {
            name: option.rule.to_json(getattr(self, name)) for name, option in OPTIONS.items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Inverse of `to_dict`; unknown keys are an error naming the valid ones.

        A validation_fraction saved without early stopping (accepted and unused before it
        became an error) reads as the default: it had no effect on that run.
        """
        unknown = sorted(set(data) - set(OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown config keys {unknown}; valid keys: {', '.join(sorted(OPTIONS))}"
            )
        data = dict(data)
        if data.get("early_stopping") is None and "validation_fraction" in data:
            data["validation_fraction"] = _DEFAULTS["validation_fraction"]
        return cls(**data)


#: every option of `Config`, in field order
OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in dataclasses.fields(Config)}


def default_of(name: str) -> Any:
    """The Python default of option ``name``."""
    spec = next(f for f in dataclasses.fields(Config) if f.name == name)
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


_DEFAULTS = {name: default_of(name) for name in OPTIONS}


#: the options whose command-line default differs from the Python default
CLI_DEFAULTS = {
    name: option.cli_default for name, option in OPTIONS.items() if option.cli_default is not _UNSET
}


def cli_default(name: str) -> Any:
    """The command line's default of option ``name``."""
    option = OPTIONS[name]
    return _DEFAULTS[name] if option.cli_default is _UNSET else option.cli_default


def sweepable() -> tuple[str, ...]:
    """The options a sweep grid may vary."""
    return tuple(name for name, option in OPTIONS.items() if option.sweep)


def markdown_table() -> str:
    """The README's table of every option, generated from `OPTIONS`."""
    lines = [
        "| option | flag | values | default | `learn` name | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for name, option in OPTIONS.items():
        rule = option.rule
        default = rule.format(_DEFAULTS[name])
        if option.cli_default is not _UNSET:
            default += f" (command line: {rule.format(option.cli_default)})"
        values = rule.describe()
        flag = f"`{option.flag}`" if option.flag else "from the data"
        cells = [
            f"`{name}`",
            flag,
            values.replace("|", "\\|"),
            f"`{default}`",
            f"`{option.learn}`" if option.learn else "",
            option.help.replace("|", "\\|") + ("" if option.sweep else "; not swept"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
