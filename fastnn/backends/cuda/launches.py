"""Kernel launches built by name: each argument given by the name of its parameter in the
signature the ``.cu`` source declares, cast to that parameter's exact C type, put in its slot.

``Launches(function)("hidden_forward", dtype, grid, block, u=u, n=n, d=d, act=..., ...)``
returns a `Launch`: the kernel's function, grid, block and the positional argument tuple the
device wants. A missing, unknown or mistyped argument is an `ArgumentError` naming the kernel
and the parameter. Scalars become NumPy scalars of the parameter's C type (``int`` ->
``numpy.int32``, ``unsigned long long`` -> ``numpy.uint64``, ``double``, float or double for
T); a pointer takes a device array of its pointee's dtype, or None.

A built launch keeps its tuple and is run as it is (`Launch.run`): nothing is redone per
launch, and the name -> slot map of each kernel is built once (`kernel_layout`). What changes
from one training step to the next (mask keys, rates) is read by the kernels from device
memory (``key_at``, ``rate_at``, ``corrections_at``), so a step's launches are the same at
every step (`fastnn.backends.cuda.training`).

The `Launches` helpers (`Launches.gemm`, `column_sums`, `sgd`, `optimizer`, ...) are the
launches the per-op overrides, the epoch and the evaluation share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from ...cuda import (
    C_TYPES,
    COLUMN_BLOCK,
    GEMM_TILE,
    LINEAR_BLOCK,
    OUTPUT_BLOCK,
    kernel_signatures,
    read_source,
)
from ...cuda.sources import Param
from ..codes import (
    BATCH_NORM_CODES,
    DECAY_CODES,
    OPTIMIZER_CODES,
    OUTPUT_CODES,
    TRANSFORM_IDENTITY,
)

if TYPE_CHECKING:
    from ...plan import HiddenSpec, OptimizerSpec

Array = Any

#: the .cu file of every kernel (stem without the _f32/_f64 suffix)
KERNEL_FILES: dict[str, str] = {
    "article_mask": "masks",
    "bernoulli_mask": "masks",
    "dropout_input": "masks",
    "hidden_forward": "hidden_forward",
    "hidden_backward": "hidden_backward",
    "output_loss_grad": "output_loss",
    "eval_output": "eval_output",
    "col_partial_sums": "colstats",
    "col_stats_finalize": "colstats",
    "update_running": "running_stats",
    "sgd_weight": "sgd",
    "sgd_vector": "sgd",
    "optimizer_update": "optimizer",
    "sum_reduce": "reduce",
    "gemm_nn": "gemm",
    "gemm_nt": "gemm",
    "gemm_tn": "gemm",
    "step_begin": "step",
    "gather_batch": "step",
}
#: the kernel name's suffix per dtype
SUFFIX = {"float32": "f32", "float64": "f64"}
#: the largest grid.y (and grid.z) of a launch
GRID_Y_MAX = 65535
#: the most blocks of a grid-stride 1-D launch
LINEAR_GRID_MAX = 4096


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def linear_grid(count: int) -> tuple[int, int, int]:
    """The grid of a grid-stride 1-D launch over ``count`` elements."""
    return (max(1, min(cdiv(count, LINEAR_BLOCK[0]), LINEAR_GRID_MAX)), 1, 1)


class ArgumentError(TypeError):
    """A launch's arguments do not match the kernel's signature."""


class Launch:
    """One kernel launch, its positional arguments built."""

    __slots__ = ("args", "block", "function", "grid", "kernel")

    def __init__(self, kernel: str, function: Any, grid: tuple[int, int, int],
                 block: tuple[int, int, int], args: tuple[Any, ...]) -> None:
        self.kernel, self.function, self.grid, self.block = kernel, function, grid, block
        self.args = args

    def run(self) -> None:
        """Launch (on the device's current stream; recorded instead while it captures)."""
        self.function(self.grid, self.block, self.args)


_POINTER, _INTEGER, _FLOAT = "pointer", "integer", "float"
_INTEGERS = (int, np.integer)
_NUMBERS = (int, float, np.integer, np.floating)


class KernelLayout:
    """The parameters of one kernel (one dtype variant): each one's slot by name, and how an
    argument for it is checked and cast (worked out once per kernel)."""

    def __init__(self, kernel: str, params: tuple[Param, ...]) -> None:
        self.kernel = kernel
        self.params = params
        self.slots = {param.name: slot for slot, param in enumerate(params)}
        checks = []
        for param in params:
            dtype = None if param.ctype == "void" else C_TYPES.get(param.ctype)
            if dtype is None and not (param.pointer and param.ctype == "void"):
                raise ArgumentError(f"kernel {kernel}: no NumPy type for parameter {param}")
            if param.pointer:
                checks.append((param.name, _POINTER, dtype, None, 0, 0))
            elif dtype.kind in "iub":
                limits = np.iinfo(dtype) if dtype.kind != "b" else None
                checks.append((param.name, _INTEGER, dtype, dtype.type,
                               0 if limits is None else int(limits.min),
                               1 if limits is None else int(limits.max)))
            else:
                checks.append((param.name, _FLOAT, dtype, dtype.type, 0, 0))
        self._checks = tuple(checks)

    def signature(self) -> str:
        return f"{self.kernel}({', '.join(str(p) for p in self.params)})"

    def arguments(self, named: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional arguments of named arguments: each checked against its parameter,
        a scalar cast to the parameter's C type."""
        if named.keys() != self.slots.keys():
            self._names_error(named)
        args: list[Any] = []
        for slot, (name, kind, dtype, cast, low, high) in enumerate(self._checks):
            value = named[name]
            if kind is _POINTER:
                if value is not None:
                    found = getattr(value, "dtype", None)
                    if found is None or isinstance(value, np.generic):
                        raise self._error(slot, f"needs an array or None; got "
                                                f"{type(value).__name__}")
                    if dtype is not None and found != dtype:
                        raise self._error(slot, f"needs a {dtype} array; got {found}")
                args.append(value)
            elif kind is _INTEGER:
                if not isinstance(value, _INTEGERS):
                    raise self._error(slot, f"needs an integer; got {type(value).__name__}")
                if not low <= value <= high:
                    raise self._error(slot, f"{value} is out of the range of {dtype}")
                args.append(cast(value))
            else:
                if not isinstance(value, _NUMBERS):
                    raise self._error(slot, f"needs a number; got {type(value).__name__}")
                args.append(cast(value))
        return tuple(args)

    def _error(self, slot: int, problem: str) -> ArgumentError:
        param = self.params[slot]
        return ArgumentError(f"kernel {self.kernel} argument {param.name} ({param}): {problem}")

    def _names_error(self, named: Mapping[str, Any]) -> None:
        unknown = [name for name in named if name not in self.slots]
        if unknown:
            raise ArgumentError(f"kernel {self.kernel}: no parameter {', '.join(unknown)} in "
                                f"{self.signature()}")
        missing = [p.name for p in self.params if p.name not in named]
        raise ArgumentError(f"kernel {self.kernel}: missing argument {', '.join(missing)} of "
                            f"{self.signature()}")


@cache
def _file_signatures(file: str) -> dict[str, Any]:
    return kernel_signatures(read_source(file))


@cache
def kernel_layout(stem: str, dtype: np.dtype) -> KernelLayout:
    """The layout of ``<stem>_f32``/``_f64`` (``dtype`` float32/float64), from its source."""
    if stem not in KERNEL_FILES:
        raise ArgumentError(f"no kernel {stem!r}; kernels: {', '.join(KERNEL_FILES)}")
    name = f"{stem}_{SUFFIX[np.dtype(dtype).name]}"
    signature = _file_signatures(KERNEL_FILES[stem]).get(name)
    if signature is None:
        raise ArgumentError(f"no kernel {name} in {KERNEL_FILES[stem]}.cu")
    return KernelLayout(name, signature.params)


def bn_code(spec: HiddenSpec, gamma: Array | None) -> int:
    """The kernels' ``bn`` code: the variant's normalisation, the affine part by gamma's shape
    (the reference applies gamma whenever it is given)."""
    if spec.batch_norm == "off":
        return BATCH_NORM_CODES["off"]
    if gamma is None:
        return BATCH_NORM_CODES["n"]
    return BATCH_NORM_CODES["bn"] if gamma.shape == (1,) else BATCH_NORM_CODES["node"]


class Launches:
    """Builds launches of one device's kernels by name; ``function(stem, dtype)`` gives a
    kernel's device function (loaded on first use)."""

    def __init__(self, function: Callable[[str, Any], Any]) -> None:
        self._function = function

    def __call__(self, stem: str, dtype: Any, grid: tuple[int, int, int],
                 block: tuple[int, int, int], /, **named: Any) -> Launch:
        """The launch of ``<stem>`` (its ``dtype`` variant) with its arguments by name."""
        dtype = np.dtype(dtype)
        layout = kernel_layout(stem, dtype)
        return Launch(layout.kernel, self._function(stem, dtype), grid, block,
                      layout.arguments(named))

    # ---- the launches shared by the per-op overrides, the epoch and the evaluation ----
    def gemm(self, op: str, a: Array, b: Array, c: Array, bias: Array | None, m: int, n: int,
             k: int) -> Launch:
        """C (m, n) = op(A) op(B) (+ bias): "nn" A B, "nt" A B^T, "tn" A^T B (row-major)."""
        return self(f"gemm_{op}", c.dtype, (cdiv(n, GEMM_TILE), cdiv(m, GEMM_TILE), 1),
                    (GEMM_TILE, GEMM_TILE, 1), M=m, N=n, K=k, alpha=1, A=a, lda=a.shape[1],
                    B=b, ldb=b.shape[1], beta=0, C=c, ldc=n, bias=bias)

    def column_sums(self, x: Array, rows: int, d: int, out: Array) -> Launch:
        """out (d,) = column sums of x (rows, d)."""
        return self("col_partial_sums", x.dtype, (cdiv(d, 32), 1, 1), COLUMN_BLOCK, u=x,
                    n=rows, d=d, center=None, partial=out)

    def sgd(self, param: Array, grad: Array, rate: float, decay: str | None = None,
            lam: float = 0.0) -> Launch:
        """param -= rate * (grad + decay gradient): sgd_weight (matrices, decay) or
        sgd_vector."""
        count = param.size
        if param.ndim == 2 or decay is not None:
            return self("sgd_weight", param.dtype, linear_grid(count), LINEAR_BLOCK, w=param,
                        dw=grad, count=count, rate=rate, decay=DECAY_CODES[decay], lam=lam)
        return self("sgd_vector", param.dtype, linear_grid(count), LINEAR_BLOCK, p=param,
                    g=grad, count=count, rate=rate)

    def optimizer(self, param: Array, grad: Array, slots: tuple[Array, ...],
                  spec: OptimizerSpec, rate: float, decay: str | None, lam: float,
                  corrections: tuple[float, float] = (1.0, 1.0), rate_at: Array | None = None,
                  corrections_at: Array | None = None) -> Launch:
        """One update of param and its ``slots`` (velocity, or m and v; none for sgd) by the
        rule of ``spec`` at ``rate`` with Adam's ``corrections`` (1 - beta1^t, 1 - beta2^t);
        ``rate_at`` (1,) / ``corrections_at`` (2,), float64 device arrays, replace them with
        the values they hold when the kernel runs (a training step's)."""
        count = param.size
        first = slots[0] if slots else None
        second = slots[-1] if len(slots) > 1 else None
        return self("optimizer_update", param.dtype, linear_grid(count), LINEAR_BLOCK,
                    param=param, grad=grad, first=first, second=second, count=count,
                    rule=OPTIMIZER_CODES[spec.kind], rate=rate, decay=DECAY_CODES[decay],
                    lam=lam, momentum=spec.momentum, beta1=spec.beta1,
                    beta1_rest=1 - spec.beta1, beta2=spec.beta2, beta2_rest=1 - spec.beta2,
                    eps=spec.eps, correction_first=corrections[0],
                    correction_second=corrections[1], rate_at=rate_at,
                    corrections_at=corrections_at)

    def node_mean(self, nodes: Array, d: int, out: Array) -> Launch:
        """out (1,) = sum(nodes) / d: the "bn" variant's scalar gradient."""
        return self("sum_reduce", nodes.dtype, (1, 1, 1), LINEAR_BLOCK, x=nodes, count=d,
                    transform=TRANSFORM_IDENTITY, scale=1, divisor=d, out=out, accumulate=0)

    def update_running(self, mean: Array, var: Array, batch_mean: Array, batch_var: Array,
                       momentum: float) -> Launch:
        """running = momentum * running + (1 - momentum) * the batch's statistic."""
        d = mean.shape[0]
        return self("update_running", mean.dtype, linear_grid(d), LINEAR_BLOCK, mean=mean,
                    var=var, batch_mean=batch_mean, batch_var=batch_var, d=d,
                    momentum=momentum)

    def output_loss(self, u: Array, t: Array, output: str, y: Array | None, du: Array | None,
                    loss: Array | None) -> Launch:
        """The output's function, loss and gradient (each written when given)."""
        n, c = u.shape
        return self("output_loss_grad", u.dtype, (1, 1, 1), OUTPUT_BLOCK, u=u, t=t, n=n, c=c,
                    output=OUTPUT_CODES[output], y=y, du=du, loss=loss)
