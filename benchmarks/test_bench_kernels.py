"""Micro-benchmarks (pytest-benchmark): batch-norm forward/backward and dropout masks, NumPy vs
Numba ops, on one MNIST-sized mini-batch (100 x 100) and on a whole evaluation set (60 000 x 100).

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-group-by=func
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("pytest_benchmark")

from fastnn import rng  # noqa: E402
from fastnn.backends import HiddenSpec, get_backend  # noqa: E402

BACKENDS = ("numpy", "numba")
SPEC = HiddenSpec(activation="relu", batch_norm="bn")


def _layer(rows: int, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gen = np.random.default_rng(0)
    u = gen.normal(size=(rows, 100)).astype(dtype)
    return u, np.ones(1, dtype), np.zeros(1, dtype)


@pytest.fixture(params=BACKENDS)
def ops(request: pytest.FixtureRequest) -> Any:
    backend = get_backend(request.param)
    u, gamma, beta = _layer(4)  # compile outside the timing
    z, cache = backend.hidden_forward(u, SPEC, gamma, beta, None)
    backend.hidden_backward(z, cache, SPEC, gamma)
    backend.article_mask(1, 784, 0.8, "float32")
    backend.bernoulli_mask(1, (100, 100), 0.8, "float32")
    return backend


@pytest.mark.parametrize("rows", (100, 60_000))
def test_bn_forward(benchmark: Any, ops: Any, rows: int) -> None:
    u, gamma, beta = _layer(rows)
    benchmark(ops.hidden_forward, u, SPEC, gamma, beta, None)


def test_bn_backward(benchmark: Any, ops: Any) -> None:
    u, gamma, beta = _layer(100)
    z, cache = ops.hidden_forward(u, SPEC, gamma, beta, None)
    benchmark(ops.hidden_backward, z, cache, SPEC, gamma)


def test_article_mask(benchmark: Any, ops: Any) -> None:
    key = rng.dropout_key(0, 1, 2, 0)
    benchmark(ops.article_mask, key, 784, 0.8, "float32")


def test_bernoulli_mask(benchmark: Any, ops: Any) -> None:
    key = rng.dropout_key(0, 1, 2, 1)
    benchmark(ops.bernoulli_mask, key, (100, 100), 0.8, "float32")
