"""Activations and their derivatives (written in ``xp``) and weight/bias initialisers.

Initialisers draw on the host from a NumPy ``Generator`` in float64, so every backend starts
from the same bits; the caller moves the arrays to the backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

Array = Any


# ---- activations: forward f(u) and derivative f'(u), both at the activation's input u ----


def _sigmoid(xp: Any, u: Array, p: dict) -> Array:
    return 1.0 / (1.0 + xp.exp(-u))


def _sigmoid_grad(xp: Any, u: Array, p: dict) -> Array:
    s = _sigmoid(xp, u, p)
    return s * (1.0 - s)


def _tanh_grad(xp: Any, u: Array, p: dict) -> Array:
    return 1.0 - xp.tanh(u) ** 2


def _relu(xp: Any, u: Array, p: dict) -> Array:
    return xp.maximum(u, 0.0)


def _relu_grad(xp: Any, u: Array, p: dict) -> Array:
    return (u > 0).astype(u.dtype)


def _leaky_relu(xp: Any, u: Array, p: dict) -> Array:
    return xp.where(u > 0, u, p.get("alpha", 0.01) * u)


def _leaky_relu_grad(xp: Any, u: Array, p: dict) -> Array:
    return xp.where(u > 0, 1.0, p.get("alpha", 0.01)).astype(u.dtype)


def _softplus(xp: Any, u: Array, p: dict) -> Array:
    return xp.log(1.0 + xp.exp(u))


def _softsign(xp: Any, u: Array, p: dict) -> Array:
    return u / (1.0 + xp.abs(u))


def _softsign_grad(xp: Any, u: Array, p: dict) -> Array:
    return 1.0 / (1.0 + xp.abs(u)) ** 2


def _step(xp: Any, u: Array, p: dict) -> Array:
    return (u > 0).astype(u.dtype)


def _zeros_like(xp: Any, u: Array, p: dict) -> Array:
    return xp.zeros_like(u)


def _ones_like(xp: Any, u: Array, p: dict) -> Array:
    return xp.ones_like(u)


ActivationFn = Callable[[Any, Array, dict], Array]

#: name -> (forward, derivative)
ACTIVATIONS: dict[str, tuple[ActivationFn, ActivationFn]] = {
    "sigmoid": (_sigmoid, _sigmoid_grad),
    "tanh": (lambda xp, u, p: xp.tanh(u), _tanh_grad),
    "relu": (_relu, _relu_grad),
    "leaky_relu": (_leaky_relu, _leaky_relu_grad),
    "identity": (lambda xp, u, p: u, _ones_like),
    "softplus": (_softplus, _sigmoid),
    "softsign": (_softsign, _softsign_grad),
    "step": (_step, _zeros_like),
}


# ---- initialisers (host, float64) ----


def _std(params: dict, default: float = 1.0) -> float:
    return float(params.get("std", params.get("var", default)))


def _weights(
    rng: np.random.Generator, name: str, fan_in: int, fan_out: int, params: dict
) -> np.ndarray:
    shape = (fan_in, fan_out)
    if name == "lecun_normal":
        return rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape)
    if name == "lecun_uniform":
        limit = math.sqrt(3.0 / fan_in)
        return rng.uniform(-limit, limit, shape)
    if name == "glorot_normal":
        return rng.normal(0.0, math.sqrt(2.0 / (fan_in + fan_out)), shape)
    if name == "glorot_uniform":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape)
    if name == "he_normal":
        return rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)
    if name == "he_uniform":
        limit = math.sqrt(6.0 / fan_in)
        return rng.uniform(-limit, limit, shape)
    if name == "normal_w":
        return rng.normal(float(params.get("mean", 0.0)), _std(params), shape)
    if name == "uniform_w":
        return rng.uniform(float(params.get("min", 0.0)), float(params.get("max", 1.0)), shape)
    if name == "zeros_w":
        return np.zeros(shape)
    if name == "ones_w":
        return np.ones(shape)
    raise KeyError(name)


def _biases(
    rng: np.random.Generator, name: str, fan_in: int | None, size: int, params: dict
) -> np.ndarray:
    if name == "glorot_uniform_b":  # scikit-learn's MLP (not logistic): the weights' bound
        if fan_in is None:
            raise ValueError("bias initialiser glorot_uniform_b needs the layer's fan_in")
        limit = math.sqrt(6.0 / (fan_in + size))
        return rng.uniform(-limit, limit, size)
    if name == "zeros_b":
        return np.zeros(size)
    if name == "ones_b":
        return np.ones(size)
    if name == "normal_b":
        return rng.normal(float(params.get("mean", 0.0)), _std(params), size)
    if name == "uniform_b":
        return rng.uniform(float(params.get("min", 0.0)), float(params.get("max", 1.0)), size)
    raise KeyError(name)


def init_weights(
    rng: np.random.Generator, name: str, fan_in: int, fan_out: int, params: dict
) -> np.ndarray:
    """A (fan_in, fan_out) float64 weight matrix drawn by the named initialiser."""
    return _weights(rng, name, fan_in, fan_out, params)


def init_biases(
    rng: np.random.Generator, name: str, size: int, params: dict, *, fan_in: int | None = None
) -> np.ndarray:
    """A (size,) float64 bias vector drawn by the named initialiser for a layer of ``fan_in``
    inputs (needed by glorot_uniform_b only) and ``size`` outputs."""
    return _biases(rng, name, fan_in, size, params)
