"""Grids of runs: parse ``OPTION=V1,V2`` grids, train every point locally or on Dask."""

from __future__ import annotations

import functools
import itertools
import re
import warnings
from collections.abc import Iterator
from typing import Any

from .config import Config
from .errors import ConfigError, MissingDependency

_INTS = ("batch_size", "epochs", "seed", "early_stopping")
_FLOATS = (
    "eta",
    "dropout_input",
    "dropout_hidden",
    "batch_norm_eta",
    "bn_momentum",
    "validation_fraction",
)
_WORDS = (
    "activation",
    "init",
    "bias_init",
    "output",
    "normalize",
    "dropout_mode",
    "batch_norm",
    "bn_eval",
    "dtype",
    "backend",
)
SWEEPABLE = (*_INTS, *_FLOATS, *_WORDS, "hidden", "weight_decay", "shuffle")


def _value(field: str, text: str) -> Any:
    text = text.strip()
    try:
        if field in _INTS:
            return int(text)
        if field in _FLOATS:
            return float(text)
        if field == "hidden":
            return tuple(int(part) for part in text.split("/"))
        if field == "weight_decay":
            if text.lower() in ("none", "off"):
                return None
            kind, _, lam = text.partition(":")
            return kind.lower(), float(lam)
        if field == "shuffle":
            return {"true": True, "false": False}[text.lower()]
    except (ValueError, KeyError):
        raise ConfigError(f"grid {field}: cannot read value {text!r}") from None
    return text


def parse_grid(items: list[str], base: Config) -> list[tuple[str, Config]]:
    """Every point of the product of the grids, as (name, validated Config)."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        field, sep, values = item.partition("=")
        field = field.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"grid must look like OPTION=V1,V2; got {item!r}")
        if field not in SWEEPABLE:
            raise ConfigError(f"cannot sweep {field!r}; sweepable: {', '.join(SWEEPABLE)}")
        if field in axes:
            raise ConfigError(f"grid {field!r} given twice")
        axes[field] = [_value(field, text) for text in values.split(",")]
    points = []
    for combination in itertools.product(*axes.values()):
        changes = dict(zip(axes, combination, strict=True))
        points.append((_name(changes), base.replace(**changes)))
    return points


def _name(changes: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        if isinstance(value, tuple):
            return "-".join(str(v) for v in value)
        return str(value)

    text = "_".join(f"{field}={show(value)}" for field, value in changes.items()) or "run"
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", text)


def sized_for(config: Config, data: tuple) -> Config:
    """Input and output sizes taken from the data (any IDX folder, not only 28x28 digits)."""
    x_train, t_train, _, t_test = data
    n_inputs = int(x_train[0].size) if len(x_train) else config.n_inputs
    top = max(int(t_train.max()) if len(t_train) else 0, int(t_test.max()) if len(t_test) else 0)
    return config.replace(n_inputs=n_inputs, n_outputs=max(top + 1, 2))


@functools.lru_cache(maxsize=1)
def load_data(data_path: str | None) -> tuple:
    """The data set of a sweep, read once per process (every point of a sequential sweep and
    the up-front check share it; training never writes to it)."""
    from .datasets import load_mnist

    return load_mnist(data_path) if data_path else load_mnist()


def run_point(name: str, config: dict[str, Any], data_path: str | None) -> tuple[str, dict]:
    """Train one point (in any process); return its name and run record."""
    from .train import Trainer

    data = load_data(data_path)
    cfg = sized_for(Config.from_dict(config), data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # divergence is recorded in the history's events
        history = Trainer(cfg).fit(*data)
    return name, {
        "config": cfg.to_dict(),
        "history": history.to_dict(),
        "summary": history.summary(),
    }


def run_sweep(
    points: list[tuple[str, Config]],
    data_path: str | None,
    *,
    workers: int = 1,
    dask: str | None = None,
) -> Iterator[tuple[str, dict]]:
    """Run every point, yielding (name, record) in grid order."""
    jobs = [(name, config.to_dict(), data_path) for name, config in points]
    if dask:
        yield from _on_dask(jobs, dask)
    elif workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            yield from pool.map(run_point, *zip(*jobs, strict=True))
    else:
        for job in jobs:
            yield run_point(*job)


def _on_dask(jobs: list[tuple], address: str) -> Iterator[tuple[str, dict]]:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise MissingDependency('sweeping on Dask needs dask: pip install "fastnn[dask]"') from None
    cluster = LocalCluster(processes=True) if address == "local" else None
    with Client(cluster if cluster is not None else address) as client:
        futures = client.map(run_point, *zip(*jobs, strict=True), pure=False)
        for future in futures:
            yield future.result()
    if cluster is not None:
        cluster.close()
