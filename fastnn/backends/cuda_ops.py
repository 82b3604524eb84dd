"""The CUDA kernel path: a `Plan` executed through the kernels of ``kernels/*.cu``.

`KernelOps` is one class for two devices, given as a `KernelDevice` (the array module, how a
kernel source becomes a module, how a device array reaches the host):

- a GPU: CuPy arrays and ``cupy.RawModule`` (`fastnn.backends.cupy_backend`, the "cupy"
  backend);
- the CPU: NumPy arrays and the modules of the CPU shim (`shim_device`, `fastnn.cuda.shim`),
  so that the GPU code path, every launch with its grid, block and exactly typed arguments,
  runs and is held to the NumPy reference on a machine without a GPU.

Kernels are loaded on first use (`warm_up` loads and runs every one a plan needs), never at
import. The per-op overrides run one kernel (or a few) per op and fall back to the reference
(``super()``) for anything the kernels do not take: another array type or dtype, a view that is
not C-contiguous, a multiplier of a dtype NumPy would promote.

A training step (`train_epoch`) is a fixed list of launches built once per epoch and batch
size (`Launch`), the same kernels in the same order as the per-op overrides and the reference
executor: the batch rows are gathered on the device from the epoch's order (uploaded once per
epoch), masks are made inside the kernels from their keys (computed on the host: only the
launch argument changes from step to step), each layer is updated as soon as its gradients
exist, loss and accuracy are never read. Nothing inside an epoch waits for the device.
No CUDA graph is captured: the kernels take the mask key as a launch argument, so a graph
would need its kernel nodes' parameters updated before every replay.

`evaluate` runs a whole set layer by layer (products in row blocks), with the article's
whole-set batch statistics from ``col_partial_sums``/``col_stats_finalize`` and the hidden
layers normalised with them (``hidden_forward`` with given statistics); ``eval_output`` adds
up the loss and writes the predicted classes into one device buffer that is read once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import rng
from ..cuda import (
    ACTIVATION_CODES,
    BATCH_NORM_CODES,
    COLUMN_BLOCK,
    DECAY_CODES,
    DROPOUT_CODES,
    GEMM_TILE,
    LINEAR_BLOCK,
    OUTPUT_BLOCK,
    OUTPUT_CODES,
    STATS_CODES,
    module_args,
)
from .base import HiddenCache, HiddenSpec, Ops
from .workspace import Workspace

if TYPE_CHECKING:
    from ..plan import DropoutSpec, Plan

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
    "sum_reduce": "reduce",
    "gemm_nn": "gemm",
    "gemm_nt": "gemm",
    "gemm_tn": "gemm",
}
_SUFFIX = {"float32": "f32", "float64": "f64"}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
#: the largest grid.y (and grid.z) of a launch
GRID_Y_MAX = 65535
#: rows of one product launch in `KernelOps.evaluate` (workspace option "eval_block")
EVAL_BLOCK = 16384
#: rows per block row of the whole-set statistics and of the evaluation's hidden layers
STATS_ROWS, EVAL_ROWS = 512, 64
#: the most blocks of a grid-stride 1-D launch
LINEAR_GRID_MAX = 4096

i32, i64, u64, f64 = np.int32, np.int64, np.uint64, np.float64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _linear_grid(count: int) -> tuple[int, int, int]:
    return (max(1, min(_cdiv(count, LINEAR_BLOCK[0]), LINEAR_GRID_MAX)), 1, 1)


@dataclass(frozen=True)
class KernelDevice:
    """Where `KernelOps` runs: array module, module loader and the way back to the host.

    ``load_module(code, options, name_expressions)`` returns an object with
    ``get_function(name)``, whose functions launch as ``function(grid, block, args)``
    (``cupy.RawModule`` or `fastnn.cuda.shim.Module`); ``to_host`` copies a device array into a
    NumPy array (waiting for the device); ``synchronize`` waits for every launch so far.
    """

    name: str
    xp: Any
    load_module: Callable[[str, tuple[str, ...], tuple[str, ...]], Any]
    to_host: Callable[[Any], np.ndarray]
    synchronize: Callable[[], None]


def shim_device(thread_order: str = "forward", guard_bytes: int = 256) -> KernelDevice:
    """NumPy arrays and the CPU shim's modules (launches run synchronously on the CPU)."""
    from ..cuda import shim

    def load(code: str, options: tuple[str, ...], names: tuple[str, ...]) -> Any:
        return shim.Module(code, options, names, thread_order=thread_order,
                           guard_bytes=guard_bytes)

    return KernelDevice(f"shim-{thread_order}", np, load, np.asarray, lambda: None)


@dataclass
class Launch:
    """One kernel launch; ``key_at`` >= 0: the argument there is the mask key of ``layer``,
    given per step to `run`."""

    kernel: Any
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[Any, ...]
    key_at: int = -1
    layer: int = 0

    def run(self, keys: Sequence[Any] = ()) -> None:
        args = self.args
        if self.key_at >= 0:
            args = (*args[: self.key_at], keys[self.layer], *args[self.key_at + 1 :])
        self.kernel(self.grid, self.block, args)


@dataclass
class _Batch:
    """The buffers of a training step: the gathered batch, the input mask, every layer's."""

    x: Array
    t: Array
    mask0: Array
    layers: list[_Layer]


@dataclass
class _Layer:
    """The per-step buffers of one layer (rows = the batch size); views of them per step."""

    u: Array
    z: Array | None = None
    y: Array | None = None
    u_hat: Array | None = None
    mean: Array | None = None
    var: Array | None = None
    std: Array | None = None
    du: Array | None = None
    dz: Array | None = None  # the gradient at z (hidden layers)
    dw: Array | None = None
    db: Array | None = None
    dgamma_nodes: Array | None = None
    dbeta_nodes: Array | None = None
    dgamma: Array | None = None
    dbeta: Array | None = None


class KernelOps(Ops):
    """The reference ops with the CUDA kernels where they apply, and a whole epoch and
    evaluation as kernel launches; runs on the `KernelDevice` it is given."""

    name = "cuda-kernels"

    def __init__(self, device: KernelDevice) -> None:
        self.device = device
        self.xp = device.xp
        self._lock = threading.Lock()
        self._modules: dict[str, Any] = {}
        self._functions: dict[tuple[str, str], Any] = {}
        self._warmed: set[tuple[Any, ...]] = set()

    # ---- kernels ----
    def kernel(self, stem: str, dtype: Any) -> Any:
        """The ``<stem>_f32``/``_f64`` function of its module (loaded and compiled on first
        use)."""
        name = np.dtype(dtype).name
        found = self._functions.get((stem, name))
        if found is None:
            with self._lock:
                file = KERNEL_FILES[stem]
                module = self._modules.get(file)
                if module is None:
                    code, options, names = module_args(file)
                    module = self._modules[file] = self.device.load_module(code, options, names)
                found = module.get_function(f"{stem}_{_SUFFIX[name]}")
                self._functions[(stem, name)] = found
        return found

    def to_numpy(self, array: Array) -> Any:
        return self.device.to_host(array)

    def _fits(self, *arrays: Any) -> bool:
        """True when every array is a C-contiguous device array of one float32/64 dtype."""
        first = arrays[0]
        kind = self.xp.ndarray
        if not isinstance(first, kind) or first.dtype not in _FLOATS:
            return False
        return all(isinstance(a, kind) and a.dtype == first.dtype and a.flags.c_contiguous
                   for a in arrays)

    def _writable(self, *arrays: Any) -> bool:
        return all(getattr(a.flags, "writeable", True) for a in arrays)

    def _empty(self, shape: Any, dtype: Any) -> Array:
        return self.xp.empty(shape, dtype=dtype)

    # ---- launches (shared by the per-op overrides and the compiled step) ----
    def _gemm(self, op: str, a: Array, b: Array, c: Array, bias: Array | None, m: int, n: int,
              k: int) -> Launch:
        """C (m, n) = op(A) op(B) (+ bias): "nn" A B, "nt" A B^T, "tn" A^T B (row-major)."""
        scalar = c.dtype.type
        return Launch(
            self.kernel(f"gemm_{op}", c.dtype), (_cdiv(n, GEMM_TILE), _cdiv(m, GEMM_TILE), 1),
            (GEMM_TILE, GEMM_TILE, 1),
            (i32(m), i32(n), i32(k), scalar(1), a, i32(a.shape[1]), b, i32(b.shape[1]),
             scalar(0), c, i32(n), bias),
        )

    def _column_sums(self, x: Array, rows: int, d: int, out: Array) -> Launch:
        """out (d,) = column sums of x (rows, d)."""
        return Launch(self.kernel("col_partial_sums", x.dtype), (_cdiv(d, 32), 1, 1),
                      COLUMN_BLOCK, (x, i32(rows), i32(d), None, out))

    def _sgd(self, param: Array, grad: Array, rate: float, decay: str | None = None,
             lam: float = 0.0) -> Launch:
        """param -= rate * (grad + decay gradient): sgd_weight (matrices, decay) or sgd_vector."""
        scalar, count = param.dtype.type, param.size
        if param.ndim == 2 or decay is not None:
            return Launch(self.kernel("sgd_weight", param.dtype), _linear_grid(count),
                          LINEAR_BLOCK, (param, grad, i64(count), scalar(rate),
                                         i32(DECAY_CODES[decay]), scalar(lam)))
        return Launch(self.kernel("sgd_vector", param.dtype), _linear_grid(count), LINEAR_BLOCK,
                      (param, grad, i64(count), scalar(rate)))

    def _node_mean(self, nodes: Array, d: int, out: Array) -> Launch:
        """out (1,) = sum(nodes) / d: the "bn" variant's scalar gradient."""
        scalar = nodes.dtype.type
        return Launch(self.kernel("sum_reduce", nodes.dtype), (1, 1, 1), LINEAR_BLOCK,
                      (nodes, i64(d), i32(0), scalar(1), scalar(d), out, i32(0)))

    def _update_running(self, mean: Array, var: Array, batch_mean: Array, batch_var: Array,
                        momentum: float) -> Launch:
        d = mean.shape[0]
        return Launch(self.kernel("update_running", mean.dtype), _linear_grid(d), LINEAR_BLOCK,
                      (mean, var, batch_mean, batch_var, i32(d), f64(momentum)))

    @staticmethod
    def _bn_code(spec: HiddenSpec, gamma: Array | None) -> int:
        """The kernels' bn code: the variant's normalisation, the affine part by gamma's
        shape (the reference applies gamma whenever it is given)."""
        if spec.batch_norm == "off":
            return BATCH_NORM_CODES["off"]
        if gamma is None:
            return BATCH_NORM_CODES["n"]
        return BATCH_NORM_CODES["bn"] if gamma.shape == (1,) else BATCH_NORM_CODES["node"]

    # ---- random masks ----
    def article_mask(self, key: int, d: int, keep: float, dtype: str) -> Array:
        """(d,) mask with exactly round(keep * d) ones (article_mask kernel)."""
        if np.dtype(dtype) not in _FLOATS or d < 1:
            return super().article_mask(key, d, keep, dtype)
        mask = self._empty(d, dtype)
        Launch(self.kernel("article_mask", dtype), (_cdiv(d, LINEAR_BLOCK[0]), 1, 1),
               LINEAR_BLOCK, (u64(key), i32(d), i32(rng.keep_count(keep, d)), mask)).run()
        return mask

    def _bernoulli(self, key: int, shape: tuple[int, int], keep: float, dtype: Any,
                   on_value: Any) -> Array:
        out = self._empty(shape, dtype)
        count = int(np.prod(shape))
        Launch(self.kernel("bernoulli_mask", dtype), _linear_grid(count), LINEAR_BLOCK,
               (u64(key), i64(count), f64(keep), on_value, out)).run()
        return out

    def bernoulli_mask(self, key: int, shape: tuple[int, int], keep: float, dtype: str) -> Array:
        """Per-element keep mask (bernoulli_mask kernel, on_value 1)."""
        dtype_ = np.dtype(dtype)
        if dtype_ not in _FLOATS or int(np.prod(shape)) < 1:
            return super().bernoulli_mask(key, shape, keep, dtype)
        return self._bernoulli(key, shape, keep, dtype_, dtype_.type(1))

    def dropout_multiplier(
        self, key: int, spec: DropoutSpec, rows: int, mode: str, dtype: str
    ) -> Array:
        """The step's multiplier from its key: the article mask, or the Bernoulli mask times
        T(1) / T(keep) in one kernel."""
        dtype_ = np.dtype(dtype)
        if mode == "article" or dtype_ not in _FLOATS or rows * spec.size < 1 or spec.keep <= 0:
            return super().dropout_multiplier(key, spec, rows, mode, dtype)
        scalar = dtype_.type
        return self._bernoulli(key, (rows, spec.size), spec.keep, dtype_,
                               scalar(1) / scalar(spec.keep))

    # ---- layers ----
    def _affine_fits(self, x: Array, w: Array, b: Array) -> bool:
        return (self._fits(x, w, b) and x.ndim == 2 and w.ndim == 2 and b.ndim == 1
                and len(x) > 0 and x.shape[1] == w.shape[0] > 0 and b.shape[0] == w.shape[1]
                and _cdiv(len(x), GEMM_TILE) <= GRID_Y_MAX)

    def affine(self, x: Array, w: Array, b: Array) -> Array:
        """u = x W + b (gemm_nn with the bias)."""
        if not self._affine_fits(x, w, b):
            return super().affine(x, w, b)
        n, (k, m) = len(x), w.shape
        u = self._empty((n, m), x.dtype)
        self._gemm("nn", x, w, u, b, n, m, k).run()
        return u

    def _backward_fits(self, x: Array, w: Array, du: Array) -> bool:
        return (self._fits(x, w, du) and x.ndim == 2 and w.ndim == 2 and du.ndim == 2
                and len(x) > 0 and x.shape[1] == w.shape[0] > 0
                and du.shape == (x.shape[0], w.shape[1])
                and _cdiv(max(len(x), w.shape[0]), GEMM_TILE) <= GRID_Y_MAX)

    def _backward_launches(self, x: Array, w: Array, du: Array, need_dx: bool
                           ) -> tuple[list[Launch], Array, Array, Array | None]:
        n, (k, m) = len(x), w.shape
        dw, db = self._empty((k, m), w.dtype), self._empty(m, w.dtype)
        dx = self._empty((n, k), x.dtype) if need_dx else None
        launches = [self._gemm("nt", du, w, dx, None, n, k, m)] if need_dx else []
        launches += [self._gemm("tn", x, du, dw, None, k, m, n), self._column_sums(du, n, m, db)]
        return launches, dw, db, dx

    def affine_backward(
        self, x: Array, w: Array, du: Array, need_dx: bool = True
    ) -> tuple[Array, Array, Array | None]:
        """dW = x^T du (gemm_tn), db = column sums (col_partial_sums), dx = du W^T (gemm_nt)."""
        if not self._backward_fits(x, w, du):
            return super().affine_backward(x, w, du, need_dx)
        launches, dw, db, dx = self._backward_launches(x, w, du, need_dx)
        for launch in launches:
            launch.run()
        return dw, db, dx

    def affine_backward_update(
        self, x: Array, w: Array, b: Array, du: Array, rate: float, decay: str | None,
        lam: float, need_dx: bool = True,
    ) -> Array | None:
        """dx with the old W, then W and b updated in place (sgd_weight with the decay fused,
        sgd_vector)."""
        if not (self._backward_fits(x, w, du) and self._fits(w, b) and b.shape == (w.shape[1],)
                and self._writable(w, b) and decay in DECAY_CODES):
            return super().affine_backward_update(x, w, b, du, rate, decay, lam, need_dx)
        launches, dw, db, dx = self._backward_launches(x, w, du, need_dx)
        if rate:
            launches += [self._sgd(w, dw, rate, decay, lam), self._sgd(b, db, rate)]
        for launch in launches:
            launch.run()
        return dx

    def _multiplier(self, mask: Any, like: Array) -> tuple[str, float, Array | None] | None:
        """(dropout code, keep, array to multiply by with xp) of a mask; None: unsupported.

        A Python number scales like a weak scalar (the kernel's T(keep)); an array of like's
        dtype that broadcasts without changing the shape is multiplied in as it is."""
        n, d = like.shape
        if mask is None:
            return "none", 1.0, None
        if type(mask) in (int, float):
            return "article_eval", float(mask), None
        if (self._fits(like, mask) and mask.ndim in (1, 2)
                and tuple(mask.shape) in ((d,), (1, d), (n, d))):
            return "none", 1.0, mask
        return None

    def _stats_fit(self, u: Array, stats: tuple[Array, Array] | None) -> bool:
        if stats is None:
            return True
        d = u.shape[1]
        return self._fits(u, *stats) and all(s.shape == (d,) for s in stats)

    def _bn_parameters_fit(self, u: Array, spec: HiddenSpec, gamma: Any, beta: Any) -> bool:
        if spec.batch_norm == "off" or gamma is None:
            return True
        d = u.shape[1]
        return (beta is not None and self._fits(u, gamma, beta) and gamma.shape == beta.shape
                and gamma.shape in ((1,), (d,)))

    def hidden_forward(
        self, u: Array, spec: HiddenSpec, gamma: Array | None, beta: Array | None,
        mask: Array | None, stats: tuple[Array, Array] | None = None,
    ) -> tuple[Array, HiddenCache]:
        """Batch norm, activation and multiplier in the hidden_forward kernel (a multiplier
        array is applied after it)."""
        multiplier = self._multiplier(mask, u) if self._fits(u) and u.ndim == 2 else None
        if (multiplier is None or spec.activation not in ACTIVATION_CODES or len(u) < 1
                or spec.batch_norm not in BATCH_NORM_CODES or not self._stats_fit(u, stats)
                or not self._bn_parameters_fit(u, spec, gamma, beta)):
            return super().hidden_forward(u, spec, gamma, beta, mask, stats)
        drop, keep, array = multiplier
        n, d = u.shape
        bn = self._bn_code(spec, gamma)
        normalised = bn != BATCH_NORM_CODES["off"]
        z = self._empty((n, d), u.dtype)
        u_hat = self._empty((n, d), u.dtype) if normalised else None
        y = (self._empty((n, d), u.dtype) if bn >= BATCH_NORM_CODES["bn"] else u_hat)
        std = self._empty(d, u.dtype) if normalised else None
        if stats is None:
            mean, var = (self._empty(d, u.dtype), self._empty(d, u.dtype)) if normalised \
                else (None, None)
        else:
            mean, var = stats
        scalar = u.dtype.type
        Launch(self.kernel("hidden_forward", u.dtype), (_cdiv(d, 32), 1, 1), COLUMN_BLOCK,
               (u, i32(n), i32(d), i32(ACTIVATION_CODES[spec.activation]), scalar(spec.alpha),
                i32(bn), gamma if bn >= 2 else None, beta if bn >= 2 else None,
                i32(STATS_CODES["batch" if stats is None else "given"]), mean, var, std,
                i32(DROPOUT_CODES[drop]), u64(0), i32(d), f64(keep), None, y, u_hat,
                z)).run()
        if array is not None:
            z *= array
        if not normalised:
            return z, HiddenCache(pre_activation=u, mask=mask)
        return z, HiddenCache(y, mask, u_hat=u_hat, std=std, mean=mean, var=var)

    def hidden_backward(
        self, dz: Array, cache: HiddenCache, spec: HiddenSpec, gamma: Array | None
    ) -> tuple[Array, Array | None, Array | None]:
        """The hidden_backward kernel (plus sum_reduce for the "bn" variant's scalars)."""
        y = cache.pre_activation
        ok = (self._fits(dz, y) and dz.ndim == 2 and dz.shape == y.shape and len(dz) > 0
              and spec.activation in ACTIVATION_CODES and spec.batch_norm in BATCH_NORM_CODES)
        multiplier = self._multiplier(cache.mask, dz) if ok else None
        bn = self._bn_code(spec, gamma)
        if multiplier is not None and bn != BATCH_NORM_CODES["off"]:
            d = dz.shape[1]
            ok = (cache.u_hat is not None and cache.std is not None
                  and self._fits(dz, cache.u_hat, cache.std) and cache.u_hat.shape == dz.shape
                  and cache.std.shape == (d,)
                  and (gamma is None or (self._fits(dz, gamma) and gamma.shape in ((1,), (d,)))))
        if multiplier is None or not ok:
            return super().hidden_backward(dz, cache, spec, gamma)
        drop, keep, array = multiplier
        if array is not None:
            dz = dz * array
        n, d = dz.shape
        du = self._empty((n, d), dz.dtype)
        sums = bn >= BATCH_NORM_CODES["bn"]
        dgamma = self._empty(d, dz.dtype) if sums else None
        dbeta = self._empty(d, dz.dtype) if sums else None
        scalar = dz.dtype.type
        Launch(self.kernel("hidden_backward", dz.dtype), (_cdiv(d, 32), 1, 1), COLUMN_BLOCK,
               (dz, i32(n), i32(d), i32(ACTIVATION_CODES[spec.activation]), scalar(spec.alpha),
                y, i32(bn), gamma if sums else None, cache.u_hat, cache.std,
                i32(DROPOUT_CODES[drop]), u64(0), i32(d), f64(keep), du, dgamma,
                dbeta)).run()
        if not sums:
            return du, None, None
        if spec.batch_norm == "bn":  # one scalar per layer: the node sums averaged over d
            scalars = self._empty(1, dz.dtype), self._empty(1, dz.dtype)
            self._node_mean(dgamma, d, scalars[0]).run()
            self._node_mean(dbeta, d, scalars[1]).run()
            return du, scalars[0], scalars[1]
        return du, dgamma, dbeta

    # ---- output ----
    def _output_fits(self, u: Array, t: Array, output: str) -> bool:
        return (output in OUTPUT_CODES and self._fits(u, t) and u.ndim == 2
                and u.shape == t.shape and len(u) > 0 and u.shape[1] > 0)

    def output_loss_grad(self, u: Array, t: Array, output: str) -> tuple[Array, Array, Array]:
        """(y, loss as a 0-d array, (y - t) / N) in one output_loss_grad launch."""
        if not self._output_fits(u, t, output):
            return super().output_loss_grad(u, t, output)
        y, du, loss = self._empty(u.shape, u.dtype), self._empty(u.shape, u.dtype), \
            self._empty(1, u.dtype)
        self._output_launch(u, t, output, y, du, loss).run()
        return y, loss.reshape(()), du

    def output_grad(self, u: Array, t: Array, output: str) -> Array:
        """du = (output(u) - t) / N (output_loss_grad without y and the loss)."""
        if not self._output_fits(u, t, output):
            return super().output_grad(u, t, output)
        du = self._empty(u.shape, u.dtype)
        self._output_launch(u, t, output, None, du, None).run()
        return du

    def _output_launch(self, u: Array, t: Array, output: str, y: Array | None, du: Array | None,
                       loss: Array | None) -> Launch:
        n, c = u.shape
        return Launch(self.kernel("output_loss_grad", u.dtype), (1, 1, 1), OUTPUT_BLOCK,
                      (u, t, i32(n), i32(c), i32(OUTPUT_CODES[output]), y, du, loss))

    # ---- the update ----
    def sgd_update(
        self, param: Array, grad: Array, rate: float, decay: str | None = None, lam: float = 0.0
    ) -> None:
        """In place param -= rate * (grad + decay gradient): one kernel (none when rate is 0)."""
        if not rate:
            return
        if not (self._fits(param, grad) and param.shape == grad.shape and param.ndim in (1, 2)
                and param.size > 0 and self._writable(param) and decay in DECAY_CODES):
            super().sgd_update(param, grad, rate, decay, lam)
            return
        self._sgd(param, grad, rate, decay, lam).run()

    def update_running(
        self, running: tuple[Array, Array], cache: HiddenCache, momentum: float
    ) -> None:
        """running = momentum * running + (1 - momentum) * batch statistic (one kernel)."""
        mean, var = running
        if not (cache.mean is not None and cache.var is not None
                and self._fits(mean, var, cache.mean, cache.var) and mean.ndim == 1
                and mean.shape == var.shape == cache.mean.shape == cache.var.shape
                and mean.size > 0 and self._writable(mean, var)):
            super().update_running(running, cache, momentum)
            return
        self._update_running(mean, var, cache.mean, cache.var, momentum).run()

    # ---- the plan's arrays ----
    def _plan_fits(self, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any],
                   x: Array, t: Array, with_running: bool) -> bool:
        """True when the kernels take this plan, its live arrays and the data set."""
        dtype = np.dtype(plan.dtype)
        if (dtype not in _FLOATS or plan.output not in OUTPUT_CODES
                or plan.batch_norm not in BATCH_NORM_CODES
                or any(spec.activation not in ACTIVATION_CODES for spec in plan.hidden)
                or any(spec.active and spec.keep <= 0 for spec in plan.dropout)):
            return False
        if not (self._fits(x, t) and x.dtype == dtype and x.ndim == 2 and t.ndim == 2
                and len(x) > 0 and x.shape == (len(x), plan.sizes[0])
                and t.shape == (len(x), plan.sizes[-1])):
            return False
        shapes = plan.param_shapes()
        if set(shapes) - set(params):
            return False
        arrays = [params[name] for name in shapes]
        if not (self._fits(x, *arrays) and self._writable(*arrays)
                and all(tuple(params[name].shape) == shape for name, shape in shapes.items())):
            return False
        if with_running:
            for k in range(1, plan.n_layers):
                if k not in running:
                    return False
                mean, var = running[k]
                if not (self._fits(x, mean, var) and self._writable(mean, var)
                        and mean.shape == var.shape == (plan.sizes[k],)):
                    return False
        return True

    def _buffer(self, workspace: Workspace, name: Any, shape: tuple[int, ...], dtype: Any
                ) -> Array:
        """A buffer of the run's workspace, kept for the next epoch or evaluation."""
        dtype = np.dtype(dtype)
        key = ("cuda-kernels", self.device.name, name, dtype.name, shape)
        return workspace.buffer(key, lambda: self._empty(shape, dtype),
                                lambda b: tuple(b.shape) == shape and b.dtype == dtype)

    # ---- the whole epoch ----
    def _train_buffers(self, plan: Plan, workspace: Workspace) -> _Batch:
        """The step's buffers, for batches of up to plan.batch_size rows."""
        dtype, rows, sizes = np.dtype(plan.dtype), plan.batch_size, plan.sizes
        buffer = lambda name, shape: self._buffer(workspace, ("train", name), shape, dtype)  # noqa: E731
        x = buffer("x", (rows, sizes[0]))
        t = buffer("t", (rows, sizes[-1]))
        mask0 = buffer("mask0", (sizes[0],))
        layers = [_Layer(u=x)]  # layer 0: the (dropped) input batch
        normalised = plan.batch_norm != "off"
        for k in range(1, plan.n_layers + 1):
            d, d_in = sizes[k], sizes[k - 1]
            layer = _Layer(u=buffer(("u", k), (rows, d)), du=buffer(("du", k), (rows, d)),
                           dw=buffer(("dw", k), (d_in, d)), db=buffer(("db", k), (d,)))
            if k < plan.n_layers:
                layer.z = buffer(("z", k), (rows, d))
                layer.dz = buffer(("dz", k), (rows, d))
                if normalised:
                    layer.u_hat = buffer(("u_hat", k), (rows, d))
                    layer.y = (buffer(("y", k), (rows, d)) if plan.learnable_bn
                               else layer.u_hat)
                    for name in ("mean", "var", "std"):
                        setattr(layer, name, buffer((name, k), (d,)))
                if plan.learnable_bn:
                    layer.dgamma_nodes = buffer(("dgamma_nodes", k), (d,))
                    layer.dbeta_nodes = buffer(("dbeta_nodes", k), (d,))
                    layer.dgamma = buffer(("dgamma", k), (1,))
                    layer.dbeta = buffer(("dbeta", k), (1,))
            layers.append(layer)
        return _Batch(x, t, mask0, layers)

    def _step(self, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any],
              batch: _Batch, n: int) -> list[Launch]:
        """Every launch of one training step on the first n rows of the batch buffers, in the
        reference's order (`steps.train_step`); mask keys are filled in per step."""
        dtype, sizes, n_layers = np.dtype(plan.dtype), plan.sizes, plan.n_layers
        scalar = dtype.type
        drop = DROPOUT_CODES["inverted" if plan.dropout_mode == "inverted" else "article"]
        bn = BATCH_NORM_CODES[plan.batch_norm]
        key = u64(0)  # placeholder: `Launch.run` puts the step's key there
        launches: list[Launch] = []
        layers, mask0 = batch.layers, batch.mask0
        x = batch.x[:n]
        spec0 = plan.dropout[0]
        if spec0.active:  # the input layer's dropout, in place
            d0 = sizes[0]
            if drop == DROPOUT_CODES["article"]:
                launches.append(Launch(
                    self.kernel("article_mask", dtype), (_cdiv(d0, LINEAR_BLOCK[0]), 1, 1),
                    LINEAR_BLOCK, (key, i32(d0), i32(spec0.keep_count), mask0), 0, 0))
            launches.append(Launch(
                self.kernel("dropout_input", dtype), _linear_grid(n * d0), LINEAR_BLOCK,
                (x, i32(n), i32(d0), i32(drop), key, f64(spec0.keep),
                 mask0 if drop == DROPOUT_CODES["article"] else None, x), 4, 0))
        inputs = [x]
        # forward
        for k in range(1, n_layers + 1):
            layer, d = layers[k], sizes[k]
            u = layer.u[:n]
            launches.append(self._gemm("nn", inputs[-1], params[f"W{k}"], u, params[f"b{k}"],
                                       n, d, sizes[k - 1]))
            if k == n_layers:
                break
            spec, dropout = plan.hidden[k - 1], plan.dropout[k]
            z = layer.z[:n]
            launches.append(Launch(
                self.kernel("hidden_forward", dtype), (_cdiv(d, 32), 1, 1), COLUMN_BLOCK,
                (u, i32(n), i32(d), i32(ACTIVATION_CODES[spec.activation]), scalar(spec.alpha),
                 i32(bn), params.get(f"gamma{k}"), params.get(f"beta{k}"),
                 i32(STATS_CODES["batch"]), layer.mean, layer.var, layer.std,
                 i32(drop if dropout.active else DROPOUT_CODES["none"]), key,
                 i32(dropout.keep_count), f64(dropout.keep), None,
                 None if layer.y is None else layer.y[:n],
                 None if layer.u_hat is None else layer.u_hat[:n], z),
                13 if dropout.active else -1, k))
            inputs.append(z)
        # the output's gradient
        last = layers[n_layers]
        launches.append(self._output_launch(last.u[:n], batch.t[:n], plan.output, None,
                                            last.du[:n], None))
        # backward, each layer updated as soon as its gradients exist
        du = last.du[:n]
        for k in range(n_layers, 0, -1):
            layer, d, d_in = layers[k], sizes[k], sizes[k - 1]
            w, b = params[f"W{k}"], params[f"b{k}"]
            below = layers[k - 1]
            if k > 1:  # dz of the layer below, with the old W
                launches.append(self._gemm("nt", du, w, below.dz[:n], None, n, d_in, d))
            launches.append(self._gemm("tn", inputs[k - 1], du, layer.dw, None, d_in, d, n))
            launches.append(self._column_sums(du, n, d, layer.db))
            if plan.eta:
                launches.append(self._sgd(w, layer.dw, plan.eta, plan.decay, plan.lam))
                launches.append(self._sgd(b, layer.db, plan.eta))
            if k == 1:
                break
            j, spec, dropout = k - 1, plan.hidden[k - 2], plan.dropout[k - 1]
            gamma = params.get(f"gamma{j}")
            nodes = plan.learnable_bn and bool(plan.bn_rate)
            launches.append(Launch(
                self.kernel("hidden_backward", dtype), (_cdiv(d_in, 32), 1, 1), COLUMN_BLOCK,
                (below.dz[:n], i32(n), i32(d_in), i32(ACTIVATION_CODES[spec.activation]),
                 scalar(spec.alpha), below.u[:n] if below.y is None else below.y[:n], i32(bn),
                 gamma, None if below.u_hat is None else below.u_hat[:n], below.std,
                 i32(drop if dropout.active else DROPOUT_CODES["none"]), key,
                 i32(dropout.keep_count), f64(dropout.keep), below.du[:n],
                 below.dgamma_nodes if nodes else None, below.dbeta_nodes if nodes else None),
                11 if dropout.active else -1, j))
            if nodes:
                dgamma, dbeta = below.dgamma_nodes, below.dbeta_nodes
                if plan.batch_norm == "bn":
                    launches.append(self._node_mean(dgamma, d_in, below.dgamma))
                    launches.append(self._node_mean(dbeta, d_in, below.dbeta))
                    dgamma, dbeta = below.dgamma, below.dbeta
                launches.append(self._sgd(gamma, dgamma, plan.bn_rate))
                launches.append(self._sgd(params[f"beta{j}"], dbeta, plan.bn_rate))
            du = below.du[:n]
        if plan.tracks_running:
            for k in range(1, n_layers):
                mean, var = running[k]
                launches.append(self._update_running(mean, var, layers[k].mean, layers[k].var,
                                                     plan.bn_momentum))
        return launches

    def train_epoch(
        self, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any],
        x: Array, t: Array, order: Any, epoch: int, workspace: Workspace,
    ) -> None:
        """The reference epoch as kernel launches: per step, the batch gathered on the device
        from the order uploaded once, then the step's fixed launch list with that step's mask
        keys. Nothing is read back."""
        # a host order as it is; a device one is read once, before the epoch
        host_order = order if isinstance(order, np.ndarray) else np.asarray(self.to_numpy(order))
        fits = (self._plan_fits(plan, params, running, x, t, plan.tracks_running)
                and host_order.ndim == 1 and np.issubdtype(host_order.dtype, np.integer)
                and _cdiv(plan.batch_size, GEMM_TILE) <= GRID_Y_MAX)
        if fits and host_order.size:
            fits = 0 <= int(host_order.min()) and int(host_order.max()) < len(x)
        if not fits:
            super().train_epoch(plan, params, running, x, t, order, epoch, workspace)
            return
        total = len(host_order)
        if total == 0:
            return
        xp = self.xp
        indices = xp.asarray(np.ascontiguousarray(host_order, dtype=np.int64))  # one upload
        buffers = self._train_buffers(plan, workspace)
        programs: dict[int, list[Launch]] = {}
        active = [spec.layer for spec in plan.dropout if spec.active]
        keys = [u64(0)] * plan.n_layers
        for step, start in enumerate(range(0, total, plan.batch_size)):
            rows = min(plan.batch_size, total - start)
            program = programs.get(rows)
            if program is None:
                program = programs[rows] = self._step(plan, params, running, buffers, rows)
            batch = indices[start : start + rows]
            xp.take(x, batch, axis=0, out=buffers.x[:rows])
            xp.take(t, batch, axis=0, out=buffers.t[:rows])
            for layer in active:
                keys[layer] = u64(plan.mask_key(epoch, step, layer))
            for launch in program:
                launch.run(keys)
        workspace.count("train_kernels")

    # ---- evaluation ----
    def evaluate(
        self, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any],
        x: Array, t: Array, workspace: Workspace,
    ) -> tuple[float, Any]:
        """(data loss, predicted classes) of a whole set: layer by layer over every row (the
        products in row blocks), whole-set statistics with the colstats kernels, the output
        through eval_output, one read of the device at the end."""
        batch_stats = plan.bn_eval == "batch" or not running
        normalised = plan.batch_norm != "off"
        if not self._plan_fits(plan, params, running, x, t, normalised and not batch_stats):
            return super().evaluate(plan, params, running, x, t, workspace)
        dtype, sizes, n_layers = np.dtype(plan.dtype), plan.sizes, plan.n_layers
        scalar, n = dtype.type, len(x)
        block = max(1, min(int(workspace.options.get("eval_block", EVAL_BLOCK)),
                           GRID_Y_MAX * GEMM_TILE))
        scales = plan.eval_scales()

        def buffer(name: Any, shape: tuple[int, ...], kind: Any = dtype) -> Array:
            return self._buffer(workspace, ("evaluate", name), shape, kind)

        launches: list[Launch] = []
        z = x
        for k in range(1, n_layers + 1):
            d, d_in = sizes[k], sizes[k - 1]
            u = buffer(("u", k), (n, d))
            for start in range(0, n, block):
                rows = min(block, n - start)
                a = z[start : start + rows]
                if k == 1 and scales[0] != 1.0:  # the article's input scale at evaluation
                    scaled = buffer("x", (min(block, n), d_in))[:rows]
                    launches.append(Launch(
                        self.kernel("dropout_input", dtype), _linear_grid(rows * d_in),
                        LINEAR_BLOCK, (a, i32(rows), i32(d_in), i32(DROPOUT_CODES["article_eval"]),
                                       u64(0), f64(scales[0]), None, scaled)))
                    a = scaled
                launches.append(self._gemm("nn", a, params[f"W{k}"], u[start : start + rows],
                                           params[f"b{k}"], rows, d, d_in))
            if k == n_layers:
                z = u
                break
            mean = var = None
            if normalised and batch_stats:  # the statistics of the whole set
                blocks = min(_cdiv(n, STATS_ROWS), GRID_Y_MAX)
                partial = buffer(("partial", k), (blocks, d))
                mean, var, std = (buffer((name, k), (d,)) for name in ("mean", "var", "std"))
                sums = self.kernel("col_partial_sums", dtype)
                finalize = self.kernel("col_stats_finalize", dtype)
                grid = (_cdiv(d, 32), blocks, 1)
                launches += [
                    Launch(sums, grid, COLUMN_BLOCK, (u, i32(n), i32(d), None, partial)),
                    Launch(finalize, _linear_grid(d), LINEAR_BLOCK,
                           (partial, i32(blocks), i32(n), i32(d), mean, None)),
                    Launch(sums, grid, COLUMN_BLOCK, (u, i32(n), i32(d), mean, partial)),
                    Launch(finalize, _linear_grid(d), LINEAR_BLOCK,
                           (partial, i32(blocks), i32(n), i32(d), var, std)),
                ]
            elif normalised:
                mean, var = running[k]
            spec, scale = plan.hidden[k - 1], scales[k]
            z = buffer(("z", k), (n, d))
            gamma = params.get(f"gamma{k}")
            launches.append(Launch(
                self.kernel("hidden_forward", dtype),
                (_cdiv(d, 32), min(_cdiv(n, EVAL_ROWS), GRID_Y_MAX), 1), COLUMN_BLOCK,
                (u, i32(n), i32(d), i32(ACTIVATION_CODES[spec.activation]), scalar(spec.alpha),
                 i32(self._bn_code(spec, gamma)), gamma, params.get(f"beta{k}"),
                 i32(STATS_CODES["given"]), mean, var, None,
                 i32(DROPOUT_CODES["article_eval" if scale != 1.0 else "none"]), u64(0),
                 i32(d), f64(scale), None, None, None, z)))
        # loss sum (float64) and predicted classes (int32) share one buffer: one read back
        out = buffer("out", (8 + 4 * n,), np.uint8)
        loss_sum, predicted = out[:8].view(np.float64), out[8:].view(np.int32)
        c = sizes[-1]
        for launch in launches:
            launch.run()
        loss_sum.fill(0)
        Launch(self.kernel("eval_output", dtype), (_cdiv(n, LINEAR_BLOCK[0]), 1, 1),
               LINEAR_BLOCK, (z, t, i32(n), i32(c), i32(OUTPUT_CODES[plan.output]), None,
                              predicted, loss_sum, None)).run()
        host = np.asarray(self.device.to_host(out))
        workspace.count("evaluate_kernels")
        loss = float(host[:8].view(np.float64)[0]) / n
        return float(dtype.type(loss)), host[8:].view(np.int32).astype(np.intp)

    # ---- compiling ----
    def warm_up(self, plan: Plan) -> None:
        """Load (compile) every kernel the plan uses and run each once: a 3-row epoch and an
        evaluation on throw-away arrays."""
        dtype = np.dtype(plan.dtype)
        key = (dtype.name, plan.n_layers, plan.batch_norm, plan.dropout_mode, plan.output,
               plan.tracks_running)
        if dtype not in _FLOATS or key in self._warmed:
            return
        self.run_probe(plan, dtype)
        self.device.synchronize()
        with self._lock:
            self._warmed.add(key)
