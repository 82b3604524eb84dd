"""The parity harness: every fast backend against the NumPy reference, tolerances by op name.

In Chainer's style: a test names the op it checks, the harness looks its tolerance up by that
name and dtype. A fast backend that cannot load here is skipped, unless it is named in
FASTNN_REQUIRE_BACKENDS (e.g. ``numba,cupy``): then its absence fails, for machines that must
have it.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np
import pytest

from fastnn import backends

#: the backends held to the reference (every registered one but numpy itself)
FAST_BACKENDS = tuple(name for name in backends.names() if name != "numpy")

#: largest allowed |fast - reference|, relative to the reference's largest magnitude: (f64, f32)
TOLERANCES: dict[str, tuple[float, float]] = {
    "affine": (1e-12, 1e-5),
    "affine_backward": (1e-12, 1e-5),
    "affine_backward_update": (1e-12, 1e-5),
    "hidden_forward": (1e-12, 1e-5),
    "hidden_backward": (1e-11, 1e-4),
    "batch_norm_backward": (1e-11, 1e-4),
    "output_forward": (1e-12, 1e-5),
    "loss": (1e-12, 1e-5),
    "output_loss_grad": (1e-12, 1e-5),
    "output_grad": (1e-12, 1e-5),
    "sgd_update": (1e-14, 1e-6),
    "optimizer_update": (1e-14, 1e-6),
    "update_running": (1e-14, 1e-6),
    "loss_and_grads": (1e-10, 1e-4),
    "loss_and_classes": (1e-10, 1e-4),
    "evaluate_loss": (1e-10, 1e-4),
    # rows whose reference top-two outputs are closer than this (relative to max|y|) are
    # near-ties: the predicted class may differ there (the test data keeps them rare)
    "evaluate_near_tie": (1e-9, 1e-5),
    "train_epoch": (1e-10, 1e-4),
    "fit": (1e-9, 2e-4),
    # finite differences of the fast backend's own loss (float64 only)
    "gradient_check": (1e-5, 1e-5),
}


def required_backends() -> set[str]:
    """The backends FASTNN_REQUIRE_BACKENDS says must be available."""
    text = os.environ.get("FASTNN_REQUIRE_BACKENDS", "")
    return {name.strip() for name in text.split(",") if name.strip()}


def backend_or_skip(name: str) -> Any:
    """The backend's ops; skip when it cannot load here (fail when it is required)."""
    reason = backends.available()[name]
    if reason is None:
        return backends.get_backend(name)
    if name in required_backends():
        pytest.fail(f"backend {name!r} is required (FASTNN_REQUIRE_BACKENDS) but: {reason}")
    pytest.skip(f"backend {name!r}: {reason}")


def tolerance(op: str, dtype: str) -> float:
    return TOLERANCES[op][0 if dtype == "float64" else 1]


def host(value: Any) -> np.ndarray:
    """A float64 NumPy copy of a NumPy or CuPy array (or a scalar)."""
    if hasattr(value, "get"):  # a CuPy array
        value = value.get()
    return np.asarray(value, dtype=np.float64)


def assert_close(
    op: str, actual: Any, expected: Any, dtype: str, what: str = "", scale: float | None = None
) -> None:
    """|actual - expected| <= tolerance(op) * scale (default max|expected|); else name the worst.

    Pass ``scale`` for results of sums that cancel: the magnitude of their terms.
    """
    allowed = tolerance(op, dtype)
    actual, expected = host(actual), host(expected)
    assert actual.shape == expected.shape, f"{op} {what}: shape {actual.shape} != {expected.shape}"
    if actual.size == 0:
        return
    same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    diff = np.where(same, 0.0, np.abs(actual - expected))
    if scale is None:
        scale = max(float(np.nanmax(np.abs(expected))), 1e-30)
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    worst_abs = float(diff[worst])
    relative = worst_abs / max(abs(float(expected[worst])), 1e-300)
    assert worst_abs <= allowed * scale, (
        f"{op} {what} ({dtype}): worst abs diff {worst_abs:.3e} (rel {relative:.3e}, allowed "
        f"{allowed:.0e} x max|ref| {scale:.3e}) at {tuple(int(i) for i in worst)}: "
        f"got {actual[worst]!r} vs reference {expected[worst]!r}"
    )


def assert_all_close(op: str, actual: Any, expected: dict[str, Any], dtype: str) -> None:
    """`assert_close` for every named array, on one scale: the largest of them all.

    (With batch norm a hidden layer's bias gradient, and so the bias, is rounding noise.)
    """
    assert list(actual) == list(expected), (list(actual), list(expected))
    scale = max(float(np.abs(host(v)).max()) for v in expected.values())
    for name, value in expected.items():
        assert_close(op, actual[name], value, dtype, name, scale)


def random_arrays(dtype: str, seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    return [gen.normal(size=shape).astype(dtype) for shape in shapes]


# ---- a covering grid: every pair of option values in at least one configuration ----

#: the options whose pairs the grid covers (weight decay as a (kind, lambda) or None)
GRID_OPTIONS: dict[str, tuple[Any, ...]] = {
    "activation": ("sigmoid", "tanh", "relu", "leaky_relu", "identity", "softplus", "softsign",
                   "step"),
    "batch_norm": ("off", "n", "bn", "node"),
    "weight_decay": (None, ("l1", 1e-3), ("l2", 1e-2)),
    "dropout_mode": ("article", "inverted"),
    "dtype": ("float64", "float32"),
    "shuffle": (True, False),
    "bn_eval": ("batch", "running"),
    "output": ("softmax_cross_entropy", "identity_mse"),
    "optimizer": ("sgd", "momentum", "nesterov", "adam", "adamw"),
    "train_figures": ("evaluate", "running"),
}


def valid_pair(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    """False for a pair no configuration may hold (running statistics need batch norm)."""
    values = dict((a, b))
    return not (values.get("batch_norm") == "off" and values.get("bn_eval") == "running")


def valid_config(options: dict[str, Any]) -> bool:
    return all(valid_pair(a, b) for a, b in itertools.combinations(options.items(), 2))


def all_pairs() -> set[frozenset[tuple[str, Any]]]:
    """Every valid pair of (option, value) of two different options."""
    pairs = set()
    for (name_a, values_a), (name_b, values_b) in itertools.combinations(GRID_OPTIONS.items(), 2):
        for a, b in itertools.product(values_a, values_b):
            if valid_pair((name_a, a), (name_b, b)):
                pairs.add(frozenset(((name_a, a), (name_b, b))))
    return pairs


def covered_pairs(grid: list[dict[str, Any]]) -> set[frozenset[tuple[str, Any]]]:
    return {
        frozenset(pair) for options in grid for pair in itertools.combinations(options.items(), 2)
    }


def pairwise_grid() -> list[dict[str, Any]]:
    """A small list of valid configurations covering every valid pair (greedy all-pairs)."""
    uncovered = all_pairs()
    names = list(GRID_OPTIONS)
    grid: list[dict[str, Any]] = []
    while uncovered:
        seed_pair = min(uncovered, key=lambda pair: sorted(map(repr, pair)))
        options = dict(seed_pair)
        for name in names:
            if name in options:
                continue
            best, best_gain = None, -1
            for value in GRID_OPTIONS[name]:
                trial = {**options, name: value}
                if not valid_config(trial):
                    continue
                gain = sum(
                    frozenset(((name, value), item)) in uncovered for item in options.items()
                )
                if gain > best_gain:
                    best, best_gain = value, gain
            options[name] = best
        ordered = {name: options[name] for name in names}
        grid.append(ordered)
        uncovered -= covered_pairs([ordered])
    return grid


def grid_id(options: dict[str, Any]) -> str:
    decay = options["weight_decay"][0] if options["weight_decay"] else "nodecay"
    return "-".join(
        [options["activation"], options["batch_norm"], decay, options["dropout_mode"],
         options["dtype"][-2:], "shuf" if options["shuffle"] else "ord", options["bn_eval"],
         options["output"][:7], options.get("optimizer", "sgd")]
    )
