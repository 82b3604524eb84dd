"""What the numba kernels accept: the guards behind every ``super()`` fallback, and the
`Layers` and `Slots` records of a plan's live arrays.

A kernel runs on C-contiguous NumPy arrays of one float32/float64 dtype, shaped as it expects;
anything else (another dtype, a view, an odd mask) goes to the NumPy reference.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..codes import ACTIVATION_CODES, OUTPUT_CODES
from .kernels.common import Layers, Slots

if TYPE_CHECKING:
    from ...plan import Plan
    from ..optimizers import OptimizerState
    from ..workspace import Workspace

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def same_float_arrays(*arrays: Any) -> bool:
    """True when every array is a C-contiguous NumPy array of one float32/float64 dtype."""
    first = arrays[0]
    if not isinstance(first, np.ndarray) or first.dtype not in FLOAT_DTYPES:
        return False
    return all(
        isinstance(a, np.ndarray) and a.dtype == first.dtype and a.flags.c_contiguous
        for a in arrays
    )


def as_multiplier(mask: Any, like: np.ndarray) -> np.ndarray | None:
    """A mask or scale as a (1 or n, 1 or d) array of like's dtype; None when not supported.

    A Python number scales like a NumPy weak scalar (cast to the dtype); arrays must already
    have the dtype (NumPy would promote otherwise, which the reference handles).
    """
    n, d = like.shape
    if mask is None:
        return np.ones((1, 1), like.dtype)
    if type(mask) in (int, float):
        return np.full((1, 1), mask, like.dtype)
    if not isinstance(mask, (np.ndarray, np.generic)) or mask.dtype != like.dtype:
        return None
    array = np.asarray(mask)
    if array.ndim == 0:
        return array.reshape(1, 1)
    if array.ndim == 1 and array.shape[0] in (1, d):
        return np.ascontiguousarray(array.reshape(1, -1))
    if array.ndim == 2 and array.shape[0] in (1, n) and array.shape[1] in (1, d):
        return np.ascontiguousarray(array)
    return None


def plan_fits(plan: Plan, x: Any, t: Any, rows: int | None = None) -> bool:
    """Whether the compiled epoch and evaluation can run this plan on (x, t): one float dtype,
    the plan's widths, codes for every choice, and every hidden layer batch-normalised as the
    plan says (each layer's activation and alpha are the kernels' own, per layer). ``rows``:
    the set's rows when x is the placeholder of a `inputs.CsrRows` (no rows of its own)."""
    dtype = np.dtype(plan.dtype)
    rows = len(x) if rows is None else rows
    return (dtype in FLOAT_DTYPES and same_float_arrays(x, t) and x.dtype == dtype
            and x.ndim == 2 and t.ndim == 2 and len(x) in (0, rows)
            and x.shape[1] == plan.sizes[0]
            and t.shape == (rows, plan.sizes[-1]) and plan.output in OUTPUT_CODES
            and all(spec.activation in ACTIVATION_CODES and spec.batch_norm == plan.batch_norm
                    for spec in plan.hidden))


def hidden_activations(plan: Plan, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each hidden layer's activation code (int64) and alpha (in the dtype), entry k - 1 for
    hidden layer k (one unused entry when there is no hidden layer)."""
    codes = np.array([ACTIVATION_CODES[spec.activation] for spec in plan.hidden] or [0],
                     np.int64)
    alphas = np.array([spec.alpha for spec in plan.hidden] or [0.0], np.float64)
    return codes, alphas.astype(dtype)


def layers_record(
    plan: Plan, params: Mapping[str, Any], running: Mapping[int, Any], dtype: Any,
    with_running: bool,
) -> Layers | None:
    """The `Layers` record of the live arrays (dummies where a layer has none); None when
    an array does not fit the kernels (the reference then runs)."""
    n_layers, sizes = plan.n_layers, plan.sizes
    weights = tuple(params[f"W{k}"] for k in range(1, n_layers + 1))
    biases = tuple(params[f"b{k}"] for k in range(1, n_layers + 1))
    gammas = tuple(params[f"gamma{k}"] for k in range(1, n_layers)) if plan.learnable_bn else ()
    betas = tuple(params[f"beta{k}"] for k in range(1, n_layers)) if plan.learnable_bn else ()
    if not all(isinstance(a, np.ndarray) and a.dtype == dtype
               for a in (*weights, *biases, *gammas, *betas)):
        return None
    if not same_float_arrays(*weights, *biases, *gammas, *betas):
        return None
    means: tuple[Any, ...] = ()
    variances: tuple[Any, ...] = ()
    if with_running:
        if any(k not in running for k in range(1, n_layers)):
            return None
        means = tuple(running[k][0] for k in range(1, n_layers))
        variances = tuple(running[k][1] for k in range(1, n_layers))
        if not all(isinstance(s, np.ndarray) and s.dtype == dtype and s.flags.c_contiguous
                   and s.shape == (sizes[k],)
                   for group in (means, variances) for k, s in enumerate(group, start=1)):
            return None
    dummy = np.ones(1, dtype)

    def padded(group: tuple[Any, ...]) -> tuple[Any, ...]:
        return (*group, *([dummy] * (n_layers - len(group))))

    return Layers(weights, biases, padded(gammas), padded(betas), padded(means),
                  padded(variances))


def slots_record(plan: Plan, optimizer: OptimizerState | None, dtype: Any) -> Slots | None:
    """The `Slots` record of the optimiser's state (dummies where a rule keeps fewer slots or
    a layer has no gamma/beta; all dummies for plain SGD); None when the state is missing or
    does not fit the kernels (the reference then runs, or raises)."""
    n_layers, names, shapes = plan.n_layers, plan.optimizer.slots, plan.param_shapes()
    matrix, vector = np.ones((1, 1), dtype), np.ones(1, dtype)
    state: dict[str, tuple[Any, Any]] = {}
    for name, shape in shapes.items():
        if not names:
            state[name] = (matrix, matrix) if len(shape) == 2 else (vector, vector)
            continue
        arrays = () if optimizer is None else optimizer.slots.get(name, ())
        if len(arrays) != len(names) or not same_float_arrays(*arrays) or any(
                a.dtype != dtype or a.shape != shape for a in arrays):
            return None
        state[name] = (arrays[0], arrays[-1])

    def group(prefix: str, index: int, layers: range, dummy: np.ndarray) -> tuple[Any, ...]:
        found = tuple(state[f"{prefix}{k}"][index] for k in layers if f"{prefix}{k}" in state)
        return (*found, *([dummy] * (n_layers - len(found))))

    every, hidden = range(1, n_layers + 1), range(1, n_layers)
    return Slots(group("W", 0, every, matrix), group("W", 1, every, matrix),
                 group("b", 0, every, vector), group("b", 1, every, vector),
                 group("gamma", 0, hidden, vector), group("gamma", 1, hidden, vector),
                 group("beta", 0, hidden, vector), group("beta", 1, hidden, vector))


def remembered(workspace: Workspace, name: str, identity: tuple[Any, ...],
               make: Callable[[], Any]) -> Any:
    """``make()``, once per run for the same objects: kept in the run's workspace under
    ``name`` while every object of ``identity`` (the plan, the live arrays a record wraps) is
    the very one it was made for. The kernels update those arrays in place, so a run's
    records are built in its first epoch and reused after (a record costs about as much to
    build as a small set's epoch takes to train)."""

    def same(kept: tuple[tuple[Any, ...], Any]) -> bool:
        return len(kept[0]) == len(identity) and all(map(operator.is_, kept[0], identity))

    return workspace.buffer(("numba record", name), lambda: (identity, make()), same)[1]


def live_arrays(params: Mapping[str, Any], running: Mapping[int, Any],
                optimizer: OptimizerState | None) -> tuple[Any, ...]:
    """Every array a run's records can wrap: parameters, running statistics, optimiser slots."""
    arrays = [*params.values()]
    for pair in running.values():
        arrays.extend(pair)
    if optimizer is not None:
        for slots in optimizer.slots.values():
            arrays.extend(slots)
    return tuple(arrays)
