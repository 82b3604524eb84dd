"""fastnn: an article-exact, fast multilayer-perceptron trainer on pluggable array backends."""

from __future__ import annotations

from . import datasets
from .config import Config
from .errors import BackendUnavailable, CheckpointError, ConfigError, DataError, FastnnError
from .history import History
from .model import Model
from .network import Network
from .train import Trainer

__version__ = "0.1.0"


def load_mnist(path=None, **kwargs):  # noqa: ANN001, ANN201 - thin lazy wrapper
    """MNIST as (x_train, t_train, x_test, t_test); see `fastnn.datasets.load_mnist`."""
    from .datasets import load_mnist as _load

    return _load(path, **kwargs)


def __getattr__(name: str) -> object:
    """`MLPClassifier` and `MLPRegressor`, imported on first use (`fastnn.estimators`)."""
    if name in ("MLPClassifier", "MLPRegressor"):
        from . import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackendUnavailable",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "FastnnError",
    "History",
    "MLPClassifier",
    "MLPRegressor",
    "Model",
    "Network",
    "Trainer",
    "datasets",
    "load_mnist",
    "__version__",
]
