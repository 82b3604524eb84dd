"""Finite-difference gradient checks in float64 (in the spirit of Chainer's check_backward)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fastnn import Config, Network


def small_config(**changes: Any) -> Config:
    """A tiny float64 network: 5 inputs, hidden (6, 4), 3 outputs."""
    # non-zero biases keep ReLU inputs off the kink at exactly 0 (dead rows would sit on it)
    base = dict(
        hidden=(6, 4),
        n_inputs=5,
        n_outputs=3,
        dtype="float64",
        seed=3,
        bias_init="normal_b",
        bias_init_params={"std": 0.1},
    )
    base.update(changes)
    return Config(**base)


def small_batch(n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.default_rng(seed)
    x = 0.5 * rs.normal(size=(n, 5))  # small enough that no probability hits the 1e-7 log floor
    t = np.eye(3)[rs.integers(0, 3, n)]
    return x, t


def numerical_grads(
    net: Network, x: np.ndarray, t: np.ndarray, masks: Mapping[int, Any] | None, h: float = 1e-6
) -> dict[str, np.ndarray]:
    """Central differences of net.loss_and_grads's loss for every parameter element."""
    out = {}
    params = {k: v.copy() for k, v in net.numpy_params().items()}
    for name, value in params.items():
        grad = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            for sign in (1, -1):
                trial = {k: v.copy() for k, v in params.items()}
                trial[name][i] += sign * h
                net.params = trial
                grad[i] += sign * net.loss_and_grads(x, t, masks)[0] / (2 * h)
        out[name] = grad
    net.params = params
    return out


def assert_grads_close(
    analytic: Mapping[str, Any],
    numeric: Mapping[str, np.ndarray],
    scale: Mapping[str, float] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> None:
    """Every analytic gradient matches the numeric one (times an optional per-name scale)."""
    assert set(analytic) == set(numeric), (sorted(analytic), sorted(numeric))
    for name, num in numeric.items():
        expected = num * (scale or {}).get(name, 1.0)
        got = np.asarray(analytic[name])
        err = np.abs(got - expected)
        worst = np.unravel_index(np.argmax(err), err.shape) if err.size else ()
        assert np.allclose(got, expected, rtol=rtol, atol=atol), (
            f"{name}: worst |diff| {err.max():.3g} at {worst}: analytic {got[worst]!r} "
            f"numeric {expected[worst]!r}"
        )
