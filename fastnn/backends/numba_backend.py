"""The Numba backend: NumPy arrays, the hot ops as compiled kernels, and a compiled epoch.

`NumbaOps` overrides only what it has kernels for, on float32/float64 C-contiguous NumPy arrays;
anything else (another dtype, a view, an odd mask) falls back to the NumPy reference. Kernels
live in `numba_kernels` (one module per concern) and compile lazily, on first use or in
`warm_up`. The compiled epoch (`numba_kernels.epoch`) is a loop around the same kernels the
per-op overrides below run; the object itself keeps no per-run state (that is the run's
`Workspace`), so one instance serves every thread at once.

Two threads: with two free threads or more, each training step is shared by two (the batch's
rows forward, the rows of each W backward, a spin barrier between the phases; see
`numba_kernels.epoch`), then evaluation shares its blocks. The workspace option ``parallel``
(FASTNN_NUMBA_PARALLEL) "overlap" trains on one thread instead while a trainer evaluates the
previous epoch on another. Every choice gives the same bits: the parts of a step are the same
with one thread or two.

Sparse inputs: when a run's input matrix is mostly exact zeros (MNIST after min-max scaling:
~81%), `prepare_inputs` builds its CSR form in the run's workspace, and the first layer's
product and weight gradient skip the zeros. Workspace options (from the environment when the
workspace is made): ``sparse_mode`` "auto" (CSR when the nonzero fraction is below
``sparse_threshold``, 0.35), "1" (always) or "0" (never), from FASTNN_NUMBA_SPARSE;
``sparse_train_dtypes`` (dtypes whose training "auto" runs sparse: both; on MNIST the sparse
float32 epoch trains 15-20 % faster than the dense BLAS one); ``eval_block`` (rows per
evaluation block) and ``eval_threads`` (threads sharing the blocks, default the run's thread
count). The workspace's ``counters``
count which first-layer path each call took ("train_sparse", "evaluate_dense", ...), and
``counters["sparse_steps"]`` the steps that ran sparse. Results match the dense path to
rounding; a step whose W1 (or first-layer gradient) is not finite runs densely, so inf/NaN
propagate as there.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numba  # noqa: F401 - an ImportError here is turned into an install hint by the registry
import numpy as np

from ..errors import BackendUnavailable
from ..threads import check_threads
from .base import HiddenCache, HiddenSpec
from .numba_kernels.common import (
    ACTIVATION_CODES,
    BATCH_NORM_CODES,
    BN_OFF,
    BN_SCALAR,
    DECAY_CODES,
    OUTPUT_CODES,
    Csr,
    EvalPlan,
    EvalRows,
    Layers,
    StepPlan,
)
from .numpy_backend import NumpyOps
from .workspace import Workspace

if TYPE_CHECKING:
    from ..plan import DropoutSpec, Plan

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: seconds of warm-up after which "compiling kernels" is said (a cache hit takes far less)
COMPILE_NOTICE_AFTER = 1.5


#: the options of a new workspace (FASTNN_NUMBA_SPARSE sets ``sparse_mode``); see the docstring
WORKSPACE_DEFAULTS: dict[str, Any] = {
    "sparse_threshold": 0.35,
    "sparse_train_dtypes": ("float32", "float64"),
    "eval_block": 2048,
    "parallel": "split",
}
#: how a run with two threads or more uses them (FASTNN_NUMBA_PARALLEL): "split" shares each
#: training step between two threads, then evaluation's blocks; "overlap" trains on one thread
#: while the previous epoch is evaluated on another
PARALLEL_MODES = ("split", "overlap")


def _same_float_arrays(*arrays: Any) -> bool:
    """True when every array is a C-contiguous NumPy array of one float32/float64 dtype."""
    first = arrays[0]
    if not isinstance(first, np.ndarray) or first.dtype not in _FLOAT_DTYPES:
        return False
    return all(
        isinstance(a, np.ndarray) and a.dtype == first.dtype and a.flags.c_contiguous
        for a in arrays
    )


def _dense(dtype: Any) -> Any:
    """The `Csr` record of the dense path (dummy arrays)."""
    return Csr(False, np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, dtype))


def _multiplier(mask: Any, like: np.ndarray) -> np.ndarray | None:
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


class LazyBatchNormCache(HiddenCache):
    """The cache of a batch-normalised hidden layer that builds u_hat and y on first access.

    It keeps u (not copied: the network never writes to it), the statistics and a copy of the
    forward pass's gamma/beta, so what it builds equals what the forward pass computed.
    """

    def __init__(
        self, ops: NumbaOps, u: Any, mask: Any, std: Any, mean: Any, var: Any,
        forward_parameters: tuple[Any, Any] | None,
    ) -> None:
        # the dataclass __init__ would assign u_hat/pre_activation: they are properties here
        self.mask, self.std, self.mean, self.var = mask, std, mean, var
        self.u, self.forward_parameters = u, forward_parameters
        self._ops = ops
        self._u_hat: Any = None
        self._pre_activation: Any = None

    @property
    def built(self) -> bool:
        return self._u_hat is not None

    def _build(self) -> None:
        u = self.u
        self._u_hat = np.empty_like(u)
        if self.forward_parameters is None:
            self._pre_activation = self._u_hat
            dummy = np.ones(1, u.dtype)
            self._ops.kernels.layers.normalise(u, self.mean, self.std, dummy, dummy, False,
                                        self._u_hat, self._u_hat)
        else:
            self._pre_activation = np.empty_like(u)
            self._ops.kernels.layers.normalise(u, self.mean, self.std, *self.forward_parameters,
                                               True, self._u_hat, self._pre_activation)

    @property  # type: ignore[override]
    def u_hat(self) -> Any:
        if self._u_hat is None:
            self._build()
        return self._u_hat

    @u_hat.setter
    def u_hat(self, value: Any) -> None:
        if self._u_hat is None:
            self._build()
        self._u_hat = value

    @property  # type: ignore[override]
    def pre_activation(self) -> Any:
        if self._pre_activation is None:
            self._build()
        return self._pre_activation

    @pre_activation.setter
    def pre_activation(self, value: Any) -> None:
        if self._u_hat is None:
            self._build()
        self._pre_activation = value


class NumbaOps(NumpyOps):
    """Reference ops on NumPy arrays with compiled fused kernels and a compiled epoch."""

    name = "numba"

    def __init__(self) -> None:
        self._modules: Any = None
        self._lock = threading.Lock()
        self._warmed: set[tuple[Any, ...]] = set()  # compiled signatures, not run state

    # ---- set-up ----
    def check_available(self) -> None:
        """numba's BLAS access needs SciPy: fail early with an install hint without it."""
        try:
            import scipy.linalg.cython_blas  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(
                f"backend 'numba' needs numba and scipy: pip install numba scipy ({exc})"
            ) from None

    @property
    def kernels(self) -> Any:
        """The kernel modules, imported on first use (creating dispatchers compiles nothing)."""
        if self._modules is None:
            from .numba_kernels import blas, epoch, evaluate, layers, masks, sparse, sync

            self._modules = SimpleNamespace(
                blas=blas, epoch=epoch, evaluate=evaluate, layers=layers, masks=masks,
                sparse=sparse, sync=sync,
            )
        return self._modules

    def _blas(self, dtype: Any) -> Any:
        """The `Blas` record the kernels call for this dtype."""
        return self.kernels.blas.blas_for(dtype)

    def workspace(self, threads: int | None = None) -> Workspace:
        """A run's workspace, with this backend's options read from the environment now."""
        workspace = Workspace(threads)
        mode = os.environ.get("FASTNN_NUMBA_SPARSE", "auto").strip().lower() or "auto"
        parallel = os.environ.get("FASTNN_NUMBA_PARALLEL", "").strip().lower()
        workspace.options.update(
            WORKSPACE_DEFAULTS,
            sparse_mode=mode if mode in ("0", "1", "auto") else "auto",
            eval_threads=workspace.threads,
        )
        if parallel in PARALLEL_MODES:
            workspace.options["parallel"] = parallel
        return workspace

    def overlaps_evaluation(self, workspace: Workspace) -> bool:
        """With ``parallel`` "overlap" (and two threads or more): epoch e is evaluated on one
        thread while e + 1 trains on another. With "split", each step is shared instead."""
        return workspace.threads >= 2 and workspace.options.get("parallel") == "overlap"

    def _splits_steps(self, workspace: Workspace) -> bool:
        """Whether this epoch's steps are shared by two threads (two are free, "split")."""
        return workspace.free_threads >= 2 and workspace.options.get("parallel") == "split"

    def blas_thread_count(self, threads: int) -> int:
        """One: a batch's products are too small to gain from a second BLAS thread, and a
        helper thread descheduled by another busy process stalls every product (seen: 40x).
        Evaluation shares its blocks among the run's threads instead."""
        return 1

    def warm_up(self, plan: Plan) -> None:
        """Compile (or load from the cache) the epoch and evaluation kernels of this plan."""
        dtype = np.dtype(plan.dtype)
        key = (dtype.name, plan.n_layers, plan.batch_norm, plan.dropout_mode, plan.output)
        if dtype not in _FLOAT_DTYPES or key in self._warmed:
            return
        notice = None
        if sys.stderr is not None and sys.stderr.isatty():
            notice = threading.Timer(COMPILE_NOTICE_AFTER, _say_compiling)
            notice.daemon = True
            notice.start()
        try:
            self.run_probe(plan, dtype)
        finally:
            if notice is not None:
                notice.cancel()
        with self._lock:
            self._warmed.add(key)

    # ---- random masks ----
    def article_mask(self, key: int, d: int, keep: float, dtype: str) -> Any:
        """(d,) mask with exactly round(keep * d) ones: the k smallest values of the stream."""
        if np.dtype(dtype) not in _FLOAT_DTYPES:
            return super().article_mask(key, d, keep, dtype)
        from .. import rng

        mask = np.empty(d, dtype)
        self.kernels.masks.article_mask(np.uint64(key), rng.keep_count(keep, d), mask)
        return mask

    def bernoulli_mask(self, key: int, shape: tuple[int, int], keep: float, dtype: str) -> Any:
        """Per-element keep mask: 1 where uniform01 < keep."""
        dtype = np.dtype(dtype)
        if dtype not in _FLOAT_DTYPES:
            return super().bernoulli_mask(key, shape, keep, dtype)
        mask = np.empty(shape, dtype)
        self.kernels.masks.fill_bernoulli_multiplier(np.uint64(key), float(keep),
                                                     dtype.type(1.0), mask)
        return mask

    def dropout_multiplier(
        self, key: int, spec: DropoutSpec, rows: int, mode: str, dtype: str
    ) -> Any:
        """The step's multiplier of a layer from its mask key (the compiled epoch's kernel)."""
        dtype = np.dtype(dtype)
        if dtype not in _FLOAT_DTYPES:
            return super().dropout_multiplier(key, spec, rows, mode, dtype)
        inverted = mode == "inverted"
        multiplier = np.empty((rows if inverted else 1, spec.size), dtype)
        self.kernels.masks.dropout_multiplier(
            np.uint64(key), float(spec.keep), spec.keep_count, inverted,
            np.empty(spec.size, np.uint64), multiplier,
        )
        return multiplier if inverted else multiplier[0]

    # ---- layers ----
    def affine(self, x: Any, w: Any, b: Any) -> Any:
        """u = x W + b with the product in numba (BLAS by address)."""
        if not self._affine_fits(x, w, b):
            return super().affine(x, w, b)
        u = np.empty((x.shape[0], w.shape[1]), x.dtype)
        self.kernels.layers.affine(self._blas(x.dtype), x, w, b, u)
        return u

    @staticmethod
    def _affine_fits(x: Any, w: Any, b: Any) -> bool:
        return (_same_float_arrays(x, w, b) and x.ndim == 2 and w.ndim == 2 and b.ndim == 1
                and x.shape[1] == w.shape[0] and b.shape[0] == w.shape[1])

    def affine_backward(
        self, x: Any, w: Any, du: Any, need_dx: bool = True
    ) -> tuple[Any, Any, Any | None]:
        """dW = x^T du, db = column sums, dx = du W^T."""
        if not (_same_float_arrays(x, w, du) and x.ndim == 2 and w.ndim == 2 and du.ndim == 2
                and x.shape[1] == w.shape[0] and du.shape == (x.shape[0], w.shape[1])):
            return super().affine_backward(x, w, du, need_dx)
        dw = np.empty(w.shape, w.dtype)
        db = np.empty(w.shape[1], w.dtype)
        dx = np.empty(x.shape, x.dtype) if need_dx else np.empty((0, 0), x.dtype)
        self.kernels.layers.affine_backward(self._blas(x.dtype), x, w, du, need_dx, dw, db, dx)
        return dw, db, dx if need_dx else None

    def affine_backward_update(
        self, x: Any, w: Any, b: Any, du: Any, rate: float, decay: str | None, lam: float,
        need_dx: bool = True,
    ) -> Any | None:
        """dx with the old W, then W and b updated in place, decay fused (one kernel)."""
        if not (self._affine_fits(x, w, b) and _same_float_arrays(x, du) and du.ndim == 2
                and du.shape == (x.shape[0], w.shape[1]) and decay in DECAY_CODES):
            return super().affine_backward_update(x, w, b, du, rate, decay, lam, need_dx)
        dtype = x.dtype.type
        dx = np.empty(x.shape, x.dtype) if need_dx else np.empty((0, 0), x.dtype)
        dw = np.empty(w.shape if decay is not None else (0, 0), w.dtype)
        db = np.empty(w.shape[1], w.dtype)
        self.kernels.layers.affine_backward_update(
            self._blas(x.dtype), x, w, b, du, dtype(rate), DECAY_CODES[decay], dtype(lam),
            need_dx, dx, dw, db,
        )
        return dx if need_dx else None

    def _layer_parameters(
        self, spec: HiddenSpec, gamma: Any, beta: Any, like: np.ndarray
    ) -> tuple[Any, Any, bool] | None:
        """(gamma, beta, has_gamma) for a kernel (dummies without them); None: not supported."""
        if spec.batch_norm not in BATCH_NORM_CODES:
            return None
        if spec.activation not in ACTIVATION_CODES:
            return None
        if spec.batch_norm == "off" or gamma is None:
            dummy = np.ones(1, like.dtype)
            return dummy, dummy, False
        d = like.shape[1]
        for array in (gamma, beta):
            if not (_same_float_arrays(like, array) and array.ndim == 1
                    and array.shape[0] in (1, d)):
                return None
        return gamma, beta, True

    def hidden_forward(
        self, u: Any, spec: HiddenSpec, gamma: Any, beta: Any, mask: Any,
        stats: tuple[Any, Any] | None = None,
    ) -> tuple[Any, HiddenCache]:
        """Fused batch norm + activation + mask in one kernel; the cache keeps the statistics.

        With batch norm only z is written: the cache builds u_hat and y when first read
        (evaluation never reads them; this backend's backward rebuilds them on the fly).
        """
        fallback = not (_same_float_arrays(u) and u.ndim == 2)
        multiplier = None if fallback else _multiplier(mask, u)
        parameters = None if fallback else self._layer_parameters(spec, gamma, beta, u)
        if stats is not None and not fallback:
            fallback = not (_same_float_arrays(u, *stats)
                            and all(s.shape == (u.shape[1],) for s in stats))
        if fallback or multiplier is None or parameters is None:
            return super().hidden_forward(u, spec, gamma, beta, mask, stats)
        kernels = self.kernels
        gamma_array, beta_array, has_gamma = parameters
        d = u.shape[1]
        act = ACTIVATION_CODES[spec.activation]
        alpha = u.dtype.type(spec.alpha)
        z = np.empty_like(u)
        batch_stats = stats is None
        if spec.batch_norm == "off":
            mean = var = std = np.ones(1, u.dtype)
        elif batch_stats:
            mean, var, std = np.empty(d, u.dtype), np.empty(d, u.dtype), np.empty(d, u.dtype)
        else:
            (mean, var), std = stats, np.empty(d, u.dtype)
        kernels.layers.hidden_forward(u, act, alpha, BATCH_NORM_CODES[spec.batch_norm],
                               gamma_array, beta_array, has_gamma, batch_stats, mean, var, std,
                               False, u, u, multiplier, z)
        if spec.batch_norm == "off":
            return z, HiddenCache(pre_activation=u, mask=mask)
        forward_parameters = (gamma_array.copy(), beta_array.copy()) if has_gamma else None
        return z, LazyBatchNormCache(self, u, mask, std, mean, var, forward_parameters)

    def hidden_backward(
        self, dz: Any, cache: HiddenCache, spec: HiddenSpec, gamma: Any
    ) -> tuple[Any, Any | None, Any | None]:
        """Mask, activation derivative and batch-norm backward fused in one kernel."""
        def reference() -> tuple[Any, Any | None, Any | None]:
            return super(NumbaOps, self).hidden_backward(dz, cache, spec, gamma)

        act_code = ACTIVATION_CODES.get(spec.activation)
        if act_code is None or not (_same_float_arrays(dz) and dz.ndim == 2):
            return reference()
        return self._fused_backward(dz, cache, spec.batch_norm, gamma, act_code, spec.alpha,
                                    cache.mask, reference)

    def batch_norm_backward(
        self, dy: Any, cache: HiddenCache, variant: str, gamma: Any
    ) -> tuple[Any, Any | None, Any | None]:
        """The article's batch-norm backward (dgamma/dbeta per the variant) in one kernel."""
        def reference() -> tuple[Any, Any | None, Any | None]:
            return super(NumbaOps, self).batch_norm_backward(dy, cache, variant, gamma)

        if variant == "off" or not (_same_float_arrays(dy) and dy.ndim == 2):
            return reference()
        identity = ACTIVATION_CODES["identity"]
        return self._fused_backward(dy, cache, variant, gamma, identity, 0.0, None, reference,
                                    activation_input=dy)

    def _fused_backward(
        self, dz: Any, cache: HiddenCache, variant: str, gamma: Any, act_code: int,
        alpha: float, mask: Any, reference: Any, activation_input: Any = None,
    ) -> tuple[Any, Any | None, Any | None]:
        """Run the fused backward kernel, or ``reference()`` when its inputs do not fit."""
        kernels = self.kernels
        if variant not in BATCH_NORM_CODES:
            return reference()
        n, d = dz.shape
        bn = BATCH_NORM_CODES[variant]
        multiplier = _multiplier(mask, dz)
        has_gamma = bn != BN_OFF and gamma is not None
        if multiplier is None or (has_gamma and not (
            _same_float_arrays(dz, gamma) and gamma.ndim == 1 and gamma.shape[0] in (1, d)
        )):
            return reference()
        gamma_array = gamma if has_gamma else np.ones(1, dz.dtype)
        forward_gamma = forward_beta = gamma_array
        recompute = (isinstance(cache, LazyBatchNormCache) and not cache.built
                     and activation_input is None
                     and (cache.forward_parameters is not None) == has_gamma)
        if bn == BN_OFF:
            u = mean = u_hat = y = std = None
            y = cache.pre_activation
        elif recompute:
            u, mean, std, u_hat, y = cache.u, cache.mean, cache.std, dz, dz
            if has_gamma:
                forward_gamma, forward_beta = cache.forward_parameters
        else:
            u = mean = None
            u_hat, std = cache.u_hat, cache.std
            y = cache.pre_activation if activation_input is None else activation_input
        u = dz if u is None else u
        mean = std if mean is None else mean
        std = np.ones(1, dz.dtype) if std is None else std
        u_hat = dz if u_hat is None else u_hat
        if not (_same_float_arrays(dz, u, mean, std, u_hat, y, forward_gamma, forward_beta)
                and u.shape == u_hat.shape == y.shape == dz.shape):
            return reference()
        if bn != BN_OFF and (std.shape != (d,) or (recompute and mean.shape != (d,))):
            return reference()
        du = np.empty_like(dz)
        dgamma_nodes = np.empty(d, dz.dtype)
        dbeta_nodes = np.empty(d, dz.dtype)
        kernels.layers.hidden_backward(dz, multiplier, act_code, dz.dtype.type(alpha), bn,
                                       recompute, u, mean, std, forward_gamma, forward_beta,
                                       u_hat, y, gamma_array, has_gamma, du, dgamma_nodes,
                                       dbeta_nodes)
        if not has_gamma:
            return du, None, None
        size = 1 if bn == BN_SCALAR else d
        dgamma, dbeta = np.empty(size, dz.dtype), np.empty(size, dz.dtype)
        kernels.layers.layer_parameter_grads(bn, dgamma_nodes, dbeta_nodes, dgamma, dbeta)
        return du, dgamma, dbeta

    # ---- output and loss ----
    def output_forward(self, u: Any, output: str) -> Any:
        """Softmax (row maximum subtracted) or identity."""
        if output == "identity_mse" or not (_same_float_arrays(u) and u.ndim == 2):
            return super().output_forward(u, output)
        y = np.empty_like(u)
        self.kernels.layers.output_forward(u, OUTPUT_CODES[output], y)
        return y

    def loss(self, y: Any, t: Any, output: str) -> Any:
        """Cross-entropy or MSE (summed in float64), as a scalar of y's dtype."""
        if output not in OUTPUT_CODES or not (
            _same_float_arrays(y, t) and y.ndim == 2 and y.shape == t.shape
        ):
            return super().loss(y, t, output)
        return y.dtype.type(self.kernels.layers.loss(y, t, OUTPUT_CODES[output]))

    def output_loss_grad(self, u: Any, t: Any, output: str) -> tuple[Any, Any, Any]:
        """(y, loss, (y - t) / N)."""
        if output not in OUTPUT_CODES or not (
            _same_float_arrays(u, t) and u.ndim == 2 and u.shape == t.shape
        ):
            return super().output_loss_grad(u, t, output)
        y = self.output_forward(u, output)
        du = np.empty_like(u)
        self.kernels.layers.output_grad(y, t, du)
        return y, self.loss(y, t, output), du

    def output_grad(self, u: Any, t: Any, output: str) -> Any:
        """du = (output(u) - t) / N in one kernel (the compiled epoch's)."""
        if output not in OUTPUT_CODES or not (
            _same_float_arrays(u, t) and u.ndim == 2 and u.shape == t.shape
        ):
            return super().output_grad(u, t, output)
        du = np.empty_like(u)
        self.kernels.layers.output_grad_from_u(u, t, OUTPUT_CODES[output], du)
        return du

    # ---- the update ----
    def sgd_update(
        self, param: Any, grad: Any, rate: float, decay: str | None = None, lam: float = 0.0
    ) -> None:
        """In place param -= rate * (grad + decay gradient): one kernel per array."""
        if not rate:
            return
        if not (_same_float_arrays(param, grad) and param.shape == grad.shape
                and param.ndim in (1, 2) and decay in DECAY_CODES):
            super().sgd_update(param, grad, rate, decay, lam)
            return
        dtype = param.dtype.type
        if param.ndim == 2 or decay is not None:
            self.kernels.layers.sgd_weights(param, grad, dtype(rate), DECAY_CODES[decay],
                                            dtype(lam))
        else:
            self.kernels.layers.sgd_vector(param, grad, dtype(rate))

    def update_running(
        self, running: tuple[Any, Any], cache: HiddenCache, momentum: float
    ) -> None:
        """running = momentum * running + (1 - momentum) * batch statistic, in place."""
        mean, var = running
        if not (_same_float_arrays(mean, var, cache.mean, cache.var)
                and mean.shape == var.shape == cache.mean.shape == cache.var.shape
                and mean.ndim == 1):
            super().update_running(running, cache, momentum)
            return
        dtype = mean.dtype.type
        self.kernels.layers.update_running(mean, var, cache.mean, cache.var, dtype(momentum),
                                           dtype(1 - momentum))

    # ---- sparse inputs ----
    def prepare_inputs(self, x: Any, workspace: Workspace) -> None:
        """Measure x's density and, when the sparse path would take it, build its CSR form
        (kept in the run's workspace, for every epoch and evaluation of the run)."""
        options = workspace.options
        mode = options.get("sparse_mode", "auto")
        if (mode == "0" or not (_same_float_arrays(x) and x.ndim == 2) or x.size == 0
                or workspace.prepared(x) is not None):
            return
        sparse = self.kernels.sparse
        counts = np.empty(len(x), np.int64)
        density = int(sparse.count_nonzeros(x, counts)) / x.size
        if mode != "1" and not density < options.get("sparse_threshold", 0.35):
            workspace.attach(x, (density, None))
            return
        indptr = np.zeros(len(x) + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        indices = np.empty(indptr[-1], np.int32)
        values = np.empty(indptr[-1], x.dtype)
        sparse.fill_csr(x, indptr, indices, values)
        workspace.attach(x, (density, Csr(True, indptr, indices, values)))

    def _first_layer(self, x: np.ndarray, w1: np.ndarray, what: str, workspace: Workspace
                     ) -> Any:
        """The `Csr` record for a kernel (counted in the workspace's counters): x's CSR form
        when the run prepared one and W1 is finite, else the dense path's dummies."""
        options = workspace.options
        prepared = workspace.prepared(x)
        csr = None if prepared is None else prepared[1]
        if (what == "train" and options.get("sparse_mode") == "auto"
                and x.dtype.name not in options.get("sparse_train_dtypes", ())):
            csr = None
        if csr is not None and not np.isfinite(w1).all():
            csr = None  # 0 * inf is NaN in the dense product: keep it
        workspace.count(f"{what}_{'dense' if csr is None else 'sparse'}")
        return _dense(x.dtype) if csr is None else csr

    # ---- the plan's arrays as kernel records ----
    def _layers(
        self, plan: Plan, params: Mapping[str, Any], running: Mapping[int, Any], dtype: Any,
        with_running: bool,
    ) -> Any:
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
        if not _same_float_arrays(*weights, *biases, *gammas, *betas):
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

    @staticmethod
    def _data_fits(plan: Plan, x: Any, t: Any) -> bool:
        dtype = np.dtype(plan.dtype)
        return (dtype in _FLOAT_DTYPES and _same_float_arrays(x, t) and x.dtype == dtype
                and x.ndim == 2 and t.ndim == 2 and x.shape == (len(x), plan.sizes[0])
                and t.shape == (len(x), plan.sizes[-1]) and plan.output in OUTPUT_CODES
                and all(spec.activation in ACTIVATION_CODES for spec in plan.hidden))

    # ---- the whole epoch ----
    def train_epoch(
        self, plan: Plan, params: Mapping[str, Any], running: Mapping[int, Any],
        x: Any, t: Any, order: Any, epoch: int, workspace: Workspace,
    ) -> None:
        """The reference epoch (same batches, masks, ops and update order) as one compiled
        loop around the per-op kernels."""
        order = np.ascontiguousarray(np.asarray(order), dtype=np.int64)
        layers = None
        if (self._data_fits(plan, x, t) and order.ndim == 1 and order.size
                and 0 <= order.min() and order.max() < len(x)):  # else the reference raises
            layers = self._layers(plan, params, running, x.dtype,
                                  plan.tracks_running and bool(running))
        if layers is None:
            super().train_epoch(plan, params, running, x, t, order, epoch, workspace)
            return
        dtype = x.dtype.type
        step_plan = StepPlan(
            batch_size=plan.batch_size,
            act=ACTIVATION_CODES[plan.hidden[0].activation] if plan.hidden else 0,
            alpha=dtype(plan.hidden[0].alpha if plan.hidden else 0.0),
            bn=BATCH_NORM_CODES[plan.batch_norm],
            has_gamma=plan.learnable_bn,
            output=OUTPUT_CODES[plan.output],
            decay=DECAY_CODES[plan.decay],
            lam=dtype(plan.lam),
            eta=dtype(plan.eta),
            bn_rate=dtype(plan.bn_rate),
            inverted=plan.dropout_mode == "inverted",
            keep_ratios=np.array([spec.keep for spec in plan.dropout], np.float64),
            keep_counts=np.array([spec.keep_count for spec in plan.dropout], np.int64),
            epoch_key=np.uint64(plan.epoch_key(epoch)),
            update_running=plan.tracks_running and bool(running),
            momentum=dtype(plan.bn_momentum),
            momentum_rest=dtype(1 - plan.bn_momentum),
        )
        csr = self._first_layer(x, layers.weights[0], "train", workspace)
        epoch_kernels = self.kernels.epoch
        buffers, parts = epoch_kernels.step_buffers(
            plan.sizes, min(plan.batch_size, len(order)), t.shape[1], x.dtype,
            step_plan.keep_ratios, step_plan.inverted, csr.sparse)
        arguments = (x, t, order, layers, step_plan, self._blas(x.dtype), csr, buffers, parts)
        threads = epoch_kernels.PARTS if self._splits_steps(workspace) else 1
        sparse_steps = _run_parts(epoch_kernels.train_epoch_part, self.kernels.sync, threads,
                                  arguments)
        workspace.count("sparse_steps", sparse_steps)
        workspace.count(f"train_threads_{threads}")

    # ---- evaluation ----
    def evaluate(
        self, plan: Plan, params: Mapping[str, Any], running: Mapping[int, Any],
        x: Any, t: Any, workspace: Workspace,
    ) -> tuple[float, Any]:
        """Loss and predicted classes of a whole set, a block of rows at a time.

        Without batch norm (or with running statistics) no (N, d) activation is ever built;
        with whole-set statistics the hidden pre-activations go to (N, d_k) buffers of the
        run's workspace. Blocks are independent: `_run_blocks` shares them out among threads.
        """
        batch_stats = plan.bn_eval == "batch" or not running
        layers = None
        if self._data_fits(plan, x, t) and x.flags.writeable and len(x) > 0:
            layers = self._layers(plan, params, running, x.dtype,
                                  plan.batch_norm != "off" and not batch_stats)
        if layers is None:
            return super().evaluate(plan, params, running, x, t, workspace)
        kernels, dtype = self.kernels.evaluate, x.dtype
        n_rows, n_layers, sizes = len(x), plan.n_layers, plan.sizes
        eval_plan = EvalPlan(
            act=ACTIVATION_CODES[plan.hidden[0].activation] if plan.hidden else 0,
            alpha=dtype.type(plan.hidden[0].alpha if plan.hidden else 0.0),
            bn=BATCH_NORM_CODES[plan.batch_norm],
            has_gamma=plan.learnable_bn,
            output=OUTPUT_CODES[plan.output],
            batch_stats=batch_stats,
        )
        widest = max(sizes[1:])
        rows = EvalRows(*(np.empty((n_layers, widest), dtype) for _ in range(5)))
        kernels.evaluate_setup(layers, eval_plan.bn, batch_stats,
                               np.array(plan.eval_scales(), dtype), rows)
        whole_set = plan.batch_norm != "off" and batch_stats
        placeholder = np.ones((1, 1), dtype)
        full = tuple(
            workspace.buffer(("evaluate", dtype.name, sizes[k]),
                             lambda k=k: np.empty((n_rows, sizes[k]), dtype),
                             lambda buffer: len(buffer) >= n_rows)
            if whole_set and k < n_layers else placeholder
            for k in range(1, n_layers + 1)
        )
        blas = self._blas(dtype)
        csr = self._first_layer(x, layers.weights[0], "evaluate", workspace)
        block = int(workspace.options.get("eval_block", 2048))
        threads = min(int(workspace.options.get("eval_threads", workspace.threads)),
                      workspace.free_threads)
        n_blocks = -(-n_rows // block)
        predicted = np.empty(n_rows, np.intp)
        first = 1
        if whole_set:  # the statistics of every row, layer by layer
            first = n_layers
            for k in range(1, n_layers):
                def pre_activations(index: int, k: int = k) -> None:
                    start = index * block
                    kernels.pre_activation_block(
                        x, start, min(block, n_rows - start), k, layers.weights, layers.biases,
                        full, eval_plan, rows, blas, csr)

                _run_blocks(n_blocks, threads, pre_activations)
                kernels.whole_set_statistics(full[k - 1][:n_rows], rows.means[k - 1, :sizes[k]],
                                             rows.stds[k - 1, :sizes[k]])
        totals = np.zeros(n_blocks)

        def outputs(index: int) -> None:
            start = index * block
            totals[index] = kernels.evaluate_block(
                x, t, start, min(block, n_rows - start), layers.weights, layers.biases, first,
                full, eval_plan, rows, blas, predicted, csr)

        _run_blocks(n_blocks, threads, outputs)
        total = 0.0
        for value in totals.tolist():  # in block order: the same sum on every run
            total += value
        identity = eval_plan.output == OUTPUT_CODES["identity_mse"]
        loss = 0.5 * total / n_rows if identity else -total / n_rows
        return float(dtype.type(loss)), predicted


def _run_parts(kernel: Any, sync: Any, threads: int, arguments: tuple[Any, ...]) -> int:
    """``kernel`` (`train_epoch_part`) with its parts on ``threads`` threads: this one and, for
    2, a helper. A thread that fails abandons the barrier, so the other returns; the error is
    raised here. Returns the kernel's count of sparse steps."""
    barrier = sync.new_barrier()
    if threads < 2:
        return int(kernel(0, 1, barrier, *arguments))
    errors: list[BaseException] = []

    def helper() -> None:
        try:
            kernel(1, threads, barrier, *arguments)
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)
            sync.abandon(barrier)

    thread = threading.Thread(target=helper, daemon=True, name="fastnn-step-part")
    try:
        thread.start()
    except RuntimeError:  # no thread to be had: the parts run one after the other
        return int(kernel(0, 1, barrier, *arguments))
    try:
        steps = int(kernel(0, threads, barrier, *arguments))
    except BaseException:
        sync.abandon(barrier)
        raise
    finally:
        thread.join()
    if errors:
        raise errors[0]
    if steps < 0:
        raise RuntimeError("a training thread stopped before the epoch's end")
    return steps


def _run_blocks(n_blocks: int, threads: int, run: Any) -> None:
    """run(0..n_blocks-1), shared out among up to ``threads`` threads as each frees up (the
    kernels release the GIL); in this thread alone when there is one block or thread."""
    workers = min(n_blocks, check_threads(threads))
    if workers <= 1:
        for block in range(n_blocks):
            run(block)
        return
    blocks = iter(range(n_blocks))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while not errors:
            with lock:
                block = next(blocks, None)
            if block is None:
                return
            try:
                run(block)
            except BaseException as exc:  # re-raised in the calling thread
                errors.append(exc)

    helpers = [threading.Thread(target=work, daemon=True) for _ in range(workers - 1)]
    for helper in helpers:
        helper.start()
    work()
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]


def _say_compiling() -> None:
    """Tell a person at a terminal why the first run waits (on its own line)."""
    print("\ncompiling kernels (first run only)", file=sys.stderr, flush=True)
