"""`NumbaOps`: NumPy arrays, the hot ops as compiled kernels, and a compiled epoch.

`NumbaOps` overrides only what it has kernels for, on float32/float64 C-contiguous NumPy arrays;
each override is a guard (`fit`), a kernel call, and ``super()`` (the NumPy reference)
otherwise. Kernels live in `kernels` (one module per concern) and compile lazily, on first use
or in `warm_up`. The whole epoch (`training`) and evaluation (`evaluation`) are loops around
the same kernels the per-op overrides below run; the object itself keeps no per-run state (that
is the run's `Workspace`), so one instance serves every thread at once.

Two threads: with two free threads or more, each training step is shared by two (the batch's
rows forward, the rows of each W backward, a spin barrier between the phases; see
`kernels.epoch`), then evaluation shares its blocks. The workspace option ``parallel``
(FASTNN_NUMBA_PARALLEL) "overlap" trains on one thread instead while a trainer evaluates the
previous epoch on another. An epoch smaller than ``split_min_work`` (rows x parameters) keeps
its steps on one thread. Every choice gives the same bits: the parts of a step are the same
with one thread or two.

Sparse inputs (`inputs`): workspace options (from the environment when the workspace is made):
``sparse_mode`` "auto" (CSR when the nonzero fraction is below ``sparse_threshold``, 0.35),
"1" (always) or "0" (never), from FASTNN_NUMBA_SPARSE; ``sparse_train_dtypes`` (dtypes whose
training "auto" runs sparse: both; on MNIST the sparse float32 epoch trains 15-20 % faster than
the dense BLAS one); ``eval_block`` (rows per evaluation block) and ``eval_threads`` (threads
sharing the blocks, default the run's thread count). The workspace's ``counters`` count which
first-layer path each call took ("train_sparse", "evaluate_dense", ...), and
``counters["sparse_steps"]`` the steps that ran sparse.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import BackendUnavailable
from ..base import HiddenCache, HiddenSpec, Ops
from ..codes import ACTIVATION_CODES, BATCH_NORM_CODES, BN_SCALAR, DECAY_CODES, OUTPUT_CODES
from ..numpy_backend import NumpyOps
from ..workspace import Workspace
from . import compile_helper, evaluation, training
from .batch_norm_cache import LazyBatchNormCache, forward_values
from .fit import FLOAT_DTYPES, as_multiplier, same_float_arrays
from .inputs import CsrRows, normalised_inputs, prepare_csr
from .kernels import common
from .kernels.common import (
    Activation,
    BatchNorm,
    Corrections,
    GammaBeta,
    Moments,
    Normalised,
    Statistics,
    Update,
)

if TYPE_CHECKING:
    from ...plan import DropoutSpec, OptimizerSpec, Plan
    from ...preprocessing import Normalizer
    from ..optimizers import OptimizerState

#: seconds of warm-up after which "compiling kernels" is said (a cache hit takes far less)
COMPILE_NOTICE_AFTER = 1.5
#: how long a first compile of one plan's kernels takes where this machine has no record yet
FIRST_COMPILE = "10 to 20 s on 2 cores"


#: the options of a new workspace (FASTNN_NUMBA_SPARSE sets ``sparse_mode``); see the docstring
WORKSPACE_DEFAULTS: dict[str, Any] = {
    "sparse_threshold": 0.35,
    "sparse_train_dtypes": ("float32", "float64"),
    "eval_block": 2048,
    # rows x parameters of an epoch below which its steps stay on one thread: starting the
    # helper and meeting at the barriers costs more than it saves (measured: breast_cancer
    # 398 x 3.3k 0.85 ms an epoch on one thread, 1.29 on two; digits 1257 x 7.5k 3.0 / 3.2;
    # make_classification 14000 x 5.5k 21.3 / 16.5; MNIST 60000 x 89k gains 1.5x)
    "split_min_work": 20_000_000,
    "parallel": "split",
}
#: how a run with two threads or more uses them (FASTNN_NUMBA_PARALLEL): "split" shares each
#: training step between two threads, then evaluation's blocks; "overlap" trains on one thread
#: while the previous epoch is evaluated on another
PARALLEL_MODES = ("split", "overlap")


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
            from .kernels import blas, epoch, evaluate, layers, masks, sparse, sync

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

    def _splits_steps(self, workspace: Workspace, plan: Plan, rows: int) -> bool:
        """Whether this epoch's steps are shared by two threads: two are free, "split", and
        the epoch is worth a second thread (rows x parameters >= ``split_min_work``)."""
        work = rows * sum(math.prod(shape) for shape in plan.param_shapes().values())
        return (workspace.free_threads >= 2 and workspace.options.get("parallel") == "split"
                and work >= workspace.options.get("split_min_work", 0))

    def blas_thread_count(self, threads: int) -> int:
        """One: a batch's products are too small to gain from a second BLAS thread, and a
        helper thread descheduled by another busy process stalls every product (seen: 40x).
        Evaluation shares its blocks among the run's threads instead."""
        return 1

    def warm_up(self, plan: Plan, *, weighted: bool = False) -> None:
        """Compile (or load from the cache) the epoch and evaluation kernels of this plan:
        its epoch loop is the one of the plan's choices (`kernels.epoch.EpochVariant`), of rows
        weighted or not."""
        dtype = np.dtype(plan.dtype)
        epoch_variant = self.epoch_variant(plan, dtype, weighted)
        variant = warm_variant(dtype.name, plan.n_layers - 1, epoch_variant)
        key = (variant, plan.batch_norm, plan.dropout_mode, plan.output, plan.tracks_running)
        if dtype not in FLOAT_DTYPES or key in self._warmed:
            return
        known = common.warm_records()
        notice = None
        if sys.stderr is not None and sys.stderr.isatty():
            notice = threading.Timer(COMPILE_NOTICE_AFTER, _say_compiling,
                                     (variant, list(known.values())))
            notice.daemon = True
            notice.start()
        helper, before_evaluation = None, None
        if variant not in known and compile_helper.enabled(common.CACHE_ENABLED):
            epoch = self.kernels.epoch
            helper = compile_helper.start(plan, weighted, epoch.epoch_loop(epoch_variant),
                                          epoch.backward_loop(epoch_variant))
            if helper is not None:  # it compiles the evaluation meanwhile
                before_evaluation = helper.before_evaluation
        start = time.perf_counter()
        try:
            self.run_probe(plan, dtype, weighted=weighted, before_evaluation=before_evaluation)
        finally:
            if notice is not None:
                notice.cancel()
            if helper is not None:
                helper.close()
        seconds = time.perf_counter() - start
        if variant not in known or seconds > COMPILE_NOTICE_AFTER:
            common.record_warm(variant, seconds)
        with self._lock:
            self._warmed.add(key)

    def epoch_variant(self, plan: Plan, dtype: Any, weighted: bool) -> Any:
        """The `EpochVariant` a run of ``plan`` trains with, its rows weighted or not."""
        record = training.step_plan(plan, 0, dtype, plan.tracks_running, training.no_rates(),
                                    weighted)
        return self.kernels.epoch.epoch_variant(record)

    # ---- random masks ----
    def article_mask(self, key: int, d: int, keep: float, dtype: str) -> Any:
        """(d,) mask with exactly round(keep * d) ones: the k smallest values of the stream."""
        if np.dtype(dtype) not in FLOAT_DTYPES:
            return super().article_mask(key, d, keep, dtype)
        from ... import rng

        mask = np.empty(d, dtype)
        self.kernels.masks.article_mask(np.uint64(key), rng.keep_count(keep, d), mask)
        return mask

    def bernoulli_mask(self, key: int, shape: tuple[int, int], keep: float, dtype: str) -> Any:
        """Per-element keep mask: 1 where uniform01 < keep."""
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
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
        if dtype not in FLOAT_DTYPES:
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
        return (same_float_arrays(x, w, b) and x.ndim == 2 and w.ndim == 2 and b.ndim == 1
                and x.shape[1] == w.shape[0] and b.shape[0] == w.shape[1])

    def affine_backward(
        self, x: Any, w: Any, du: Any, need_dx: bool = True
    ) -> tuple[Any, Any, Any | None]:
        """dW = x^T du, db = column sums, dx = du W^T."""
        if not (same_float_arrays(x, w, du) and x.ndim == 2 and w.ndim == 2 and du.ndim == 2
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
        if not (self._affine_fits(x, w, b) and same_float_arrays(x, du) and du.ndim == 2
                and du.shape == (x.shape[0], w.shape[1]) and decay in DECAY_CODES):
            return super().affine_backward_update(x, w, b, du, rate, decay, lam, need_dx)
        dtype = x.dtype.type
        dx = np.empty(x.shape, x.dtype) if need_dx else np.empty((0, 0), x.dtype)
        dw = np.empty(w.shape if decay is not None else (0, 0), w.dtype)
        db = np.empty(w.shape[1], w.dtype)
        self.kernels.layers.affine_backward_update(
            self._blas(x.dtype), x, w, b, du, Update(dtype(rate), DECAY_CODES[decay], dtype(lam)),
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
            if not (same_float_arrays(like, array) and array.ndim == 1
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
        fallback = not (same_float_arrays(u) and u.ndim == 2)
        multiplier = None if fallback else as_multiplier(mask, u)
        parameters = None if fallback else self._layer_parameters(spec, gamma, beta, u)
        if stats is not None and not fallback:
            fallback = not (same_float_arrays(u, *stats)
                            and all(s.shape == (u.shape[1],) for s in stats))
        if fallback or multiplier is None or parameters is None:
            return super().hidden_forward(u, spec, gamma, beta, mask, stats)
        gamma_array, beta_array, has_gamma = parameters
        d = u.shape[1]
        activation = Activation(ACTIVATION_CODES[spec.activation], u.dtype.type(spec.alpha))
        z = np.empty_like(u)
        batch_stats = stats is None
        if spec.batch_norm == "off":
            mean = var = std = np.ones(1, u.dtype)
        elif batch_stats:
            mean, var, std = np.empty(d, u.dtype), np.empty(d, u.dtype), np.empty(d, u.dtype)
        else:
            (mean, var), std = stats, np.empty(d, u.dtype)
        norm = BatchNorm(BATCH_NORM_CODES[spec.batch_norm], gamma_array, beta_array, has_gamma)
        self.kernels.layers.hidden_forward(u, activation, norm, batch_stats,
                                           Statistics(mean, var, std), Normalised(False, u, u),
                                           multiplier, z)
        if spec.batch_norm == "off":
            return z, HiddenCache(pre_activation=u, mask=mask)
        forward_parameters = (gamma_array.copy(), beta_array.copy()) if has_gamma else None
        return z, LazyBatchNormCache(self.kernels.layers.normalise, u, mask, std, mean, var,
                                     forward_parameters)

    def hidden_backward(
        self, dz: Any, cache: HiddenCache, spec: HiddenSpec, gamma: Any
    ) -> tuple[Any, Any | None, Any | None]:
        """Mask, activation derivative and batch-norm backward fused in one kernel (with batch
        norm off the reference runs: the kernel's inputs need a batch-norm cache)."""
        def reference() -> tuple[Any, Any | None, Any | None]:
            return super(NumbaOps, self).hidden_backward(dz, cache, spec, gamma)

        act_code = ACTIVATION_CODES.get(spec.activation)
        if (act_code is None or spec.batch_norm == "off"
                or not (same_float_arrays(dz) and dz.ndim == 2)):
            return reference()
        activation = Activation(act_code, dz.dtype.type(spec.alpha))
        return self._fused_backward(dz, cache, spec.batch_norm, gamma, activation, cache.mask,
                                    reference)

    def batch_norm_backward(
        self, dy: Any, cache: HiddenCache, variant: str, gamma: Any
    ) -> tuple[Any, Any | None, Any | None]:
        """The article's batch-norm backward (dgamma/dbeta per the variant) in one kernel."""
        def reference() -> tuple[Any, Any | None, Any | None]:
            return super(NumbaOps, self).batch_norm_backward(dy, cache, variant, gamma)

        if variant == "off" or not (same_float_arrays(dy) and dy.ndim == 2):
            return reference()
        identity = Activation(ACTIVATION_CODES["identity"], dy.dtype.type(0.0))
        return self._fused_backward(dy, cache, variant, gamma, identity, None, reference,
                                    activation_input=dy)

    def _fused_backward(
        self, dz: Any, cache: HiddenCache, variant: str, gamma: Any, activation: Activation,
        mask: Any, reference: Any, activation_input: Any = None,
    ) -> tuple[Any, Any | None, Any | None]:
        """Run the fused batch-norm backward kernel (``variant`` is not "off"), or
        ``reference()`` when its inputs do not fit."""
        if variant not in BATCH_NORM_CODES:
            return reference()
        n, d = dz.shape
        bn = BATCH_NORM_CODES[variant]
        multiplier = as_multiplier(mask, dz)
        has_gamma = gamma is not None
        if multiplier is None or (has_gamma and not (
            same_float_arrays(dz, gamma) and gamma.ndim == 1 and gamma.shape[0] in (1, d)
        )):
            return reference()
        ones = np.ones(1, dz.dtype)
        norm = BatchNorm(bn, gamma if has_gamma else ones, ones, has_gamma)  # (beta: not read)
        forward = forward_values(cache, has_gamma, dz, activation_input)
        if not (same_float_arrays(dz, forward.u, forward.mean, forward.std, forward.u_hat,
                                  forward.y, forward.gamma, forward.beta)
                and forward.u.shape == forward.u_hat.shape == forward.y.shape == dz.shape):
            return reference()
        if forward.std.shape != (d,) or (forward.recompute and forward.mean.shape != (d,)):
            return reference()
        du = np.empty_like(dz)
        node_sums = GammaBeta(np.empty(d, dz.dtype), np.empty(d, dz.dtype))
        layers = self.kernels.layers
        layers.hidden_backward(dz, multiplier, activation, norm, forward, du, node_sums)
        if not has_gamma:
            return du, None, None
        size = 1 if bn == BN_SCALAR else d
        grads = GammaBeta(np.empty(size, dz.dtype), np.empty(size, dz.dtype))
        layers.layer_parameter_grads(bn, node_sums, grads)
        return du, grads.gamma, grads.beta

    # ---- output and loss ----
    def output_forward(self, u: Any, output: str) -> Any:
        """Softmax (row maximum subtracted) or identity."""
        if output == "identity_mse" or not (same_float_arrays(u) and u.ndim == 2):
            return super().output_forward(u, output)
        y = np.empty_like(u)
        self.kernels.layers.output_forward(u, OUTPUT_CODES[output], y)
        return y

    def loss(self, y: Any, t: Any, output: str) -> Any:
        """Cross-entropy or MSE (summed in float64), as a scalar of y's dtype."""
        if output not in OUTPUT_CODES or not (
            same_float_arrays(y, t) and y.ndim == 2 and y.shape == t.shape
        ):
            return super().loss(y, t, output)
        return y.dtype.type(self.kernels.layers.loss(y, t, OUTPUT_CODES[output]))

    def output_loss_grad(self, u: Any, t: Any, output: str) -> tuple[Any, Any, Any]:
        """(y, loss, (y - t) / N)."""
        if output not in OUTPUT_CODES or not (
            same_float_arrays(u, t) and u.ndim == 2 and u.shape == t.shape
        ):
            return super().output_loss_grad(u, t, output)
        y = self.output_forward(u, output)
        du = np.empty_like(u)
        self.kernels.layers.output_grad(y, t, du)
        return y, self.loss(y, t, output), du

    def output_grad(self, u: Any, t: Any, output: str) -> Any:
        """du = (output(u) - t) / N in one kernel (the compiled epoch's)."""
        if output not in OUTPUT_CODES or not (
            same_float_arrays(u, t) and u.ndim == 2 and u.shape == t.shape
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
        if not (same_float_arrays(param, grad) and param.shape == grad.shape
                and param.ndim in (1, 2) and decay in DECAY_CODES):
            super().sgd_update(param, grad, rate, decay, lam)
            return
        dtype = param.dtype.type
        if param.ndim == 2 or decay is not None:
            self.kernels.layers.sgd_weights(param, grad,
                                            Update(dtype(rate), DECAY_CODES[decay], dtype(lam)))
        else:
            self.kernels.layers.sgd_vector(param, grad, dtype(rate))

    def optimizer_update(
        self, param: Any, grad: Any, slots: tuple[Any, ...], rate: float, spec: OptimizerSpec,
        step: int, decay: str | None = None, lam: float = 0.0,
    ) -> None:
        """One update of param and its slots by the plan's optimiser: one kernel per array."""
        if not (same_float_arrays(param, grad, *slots) and param.ndim in (1, 2)
                and all(a.shape == param.shape for a in (grad, *slots))
                and len(slots) == len(spec.slots) and decay in DECAY_CODES):
            super().optimizer_update(param, grad, slots, rate, spec, step, decay, lam)
            return
        dtype = param.dtype.type
        first, second = (slots[0], slots[-1]) if slots else (param, param)
        self.kernels.layers.optimizer_update(
            param, grad, first, second, training.optimizer_rule(spec, param.dtype),
            Update(dtype(rate), DECAY_CODES[decay], dtype(lam)),
            Corrections(dtype(1 - spec.beta1**step), dtype(1 - spec.beta2**step)))

    def update_running(
        self, running: tuple[Any, Any], cache: HiddenCache, momentum: float
    ) -> None:
        """running = momentum * running + (1 - momentum) * batch statistic, in place."""
        mean, var = running
        if not (same_float_arrays(mean, var, cache.mean, cache.var)
                and mean.shape == var.shape == cache.mean.shape == cache.var.shape
                and mean.ndim == 1):
            super().update_running(running, cache, momentum)
            return
        dtype = mean.dtype.type
        self.kernels.layers.update_running(Moments(mean, var), Moments(cache.mean, cache.var),
                                           dtype(momentum), dtype(1 - momentum))

    # ---- sparse inputs ----
    def prepare_inputs(self, x: Any, workspace: Workspace) -> None:
        """Measure x's density and, when the sparse path would take it, build its CSR form
        (kept in the run's workspace, for every epoch and evaluation of the run)."""
        prepare_csr(self.kernels.sparse, x, workspace)

    def inputs(self, x: Any, normalizer: Normalizer, dtype: str, what: str,
               workspace: Workspace | None) -> Any:
        """Sparse inputs as their CSR form alone (`inputs.CsrRows`, built a block of rows at
        a time: no dense copy of the set), dense ones as one array."""
        if workspace is None:  # one normalised array (the base's; not numpy's raw rows)
            return Ops.inputs(self, x, normalizer, dtype, what, workspace)
        return normalised_inputs(self.kernels.sparse, x, normalizer, dtype, what, workspace)

    def dense_inputs(self, x: Any) -> Any:
        """A `inputs.CsrRows` as one array (built for the call); any other x as it is."""
        return x.dense() if isinstance(x, CsrRows) else x

    # ---- the whole epoch, and evaluation ----
    def train_epoch(
        self, plan: Plan, params: Mapping[str, Any], running: Mapping[int, Any],
        x: Any, t: Any, order: Any, epoch: int, workspace: Workspace,
        optimizer: OptimizerState | None = None, rate_factors: Any = None,
        weights: Any = None, tally: Any = None,
    ) -> None:
        """The reference epoch (same batches, masks, ops and update order) as one compiled
        loop around the per-op kernels (`training`), for every optimiser, schedule and row
        weighting; the reference for what does not fit."""
        order = np.ascontiguousarray(np.asarray(order), dtype=np.int64)
        threads = training.PARTS if self._splits_steps(workspace, plan, len(order)) else 1
        if not training.train_epoch(self.kernels, self._blas, plan, params, running, x, t,
                                    order, epoch, workspace, threads=threads,
                                    optimizer=optimizer, rate_factors=rate_factors,
                                    weights=weights, tally=tally):
            super().train_epoch(plan, params, running, self.dense_inputs(x), t, order, epoch,
                                workspace, optimizer, rate_factors, weights, tally)

    def inputs_bytes(self, plan: Plan, rows: int) -> int:
        """Unknown until the inputs' density is measured: `inputs` checks the dense array or
        the CSR form it settles on before making it."""
        return 0

    def evaluation_bytes(self, plan: Plan, rows: int) -> int:
        """Blocks of rows hold little; whole-set batch-norm statistics keep every hidden
        layer's pre-activations of the set (`evaluation`), and the population statistics
        after the last epoch (the reference's `steps.population_statistics`) the dense
        inputs and the reference's activations of the set."""
        if plan.batch_norm == "off":
            return 0
        held = rows * sum(plan.sizes[1:-1]) * plan.itemsize
        if plan.tracks_running:
            return held
        return max(held, rows * plan.sizes[0] * plan.itemsize + Ops.evaluation_bytes(
            self, plan, rows))  # the reference's layers (not numpy's raw-rows blocks)

    def loss_and_classes(
        self, plan: Plan, params: Mapping[str, Any], running: Mapping[int, Any],
        x: Any, t: Any, workspace: Workspace,
    ) -> tuple[float, Any]:
        """Loss and predicted classes of a whole set, a block of rows at a time
        (`evaluation`); the reference when it does not fit."""
        result = evaluation.loss_and_classes(self.kernels.evaluate, self._blas, plan, params,
                                             running, x, t, workspace)
        if result is None:
            return super().loss_and_classes(plan, params, running, self.dense_inputs(x), t,
                                            workspace)
        return result


#: the short name (in a warm record's name) and the description of each choice of an
#: `EpochVariant` that differs from plain SGD without batch norm, dropout or weights
_CHOICES = {
    "batch_norm": ("bn", "batch norm"), "plain_sgd": ("optimizer", "an optimiser with state"),
    "dropout": ("dropout", "dropout"), "weighted": ("weighted", "row weights"),
}


def warm_variant(dtype: str, hidden_layers: int, epoch_variant: Any) -> str:
    """The name of the kernels a plan compiles: one set per dtype, network depth and epoch
    variant (``float32-2-hidden``, ``float64-1-hidden-bn+optimizer``)."""
    chosen = [short for field, (short, _) in _CHOICES.items()
              if getattr(epoch_variant, field) != (field == "plain_sgd")]
    return f"{dtype}-{hidden_layers}-hidden" + (f"-{'+'.join(chosen)}" if chosen else "")


def compiled_kernels() -> dict[str, float]:
    """The kernel sets compiled on this machine for this fastnn ("float32, 2 hidden layers")
    and the seconds compiling each took (what `fastnn info` lists)."""
    return {describe_variant(name): seconds for name, seconds in common.warm_records().items()}


def describe_variant(variant: str) -> str:
    """``float32-2-hidden`` as "float32, 2 hidden layers", ``float32-1-hidden-bn+dropout``
    as "float32, 1 hidden layer, batch norm, dropout"."""
    dtype, layers, _, *chosen = variant.split("-")
    described = {short: text for short, text in _CHOICES.values()}
    choices = [described.get(short, short) for part in chosen for short in part.split("+")]
    return ", ".join([dtype, f"{layers} hidden layer{'' if layers == '1' else 's'}", *choices])


def _say_compiling(variant: str, earlier: list[float]) -> None:
    """Tell a person at a terminal why the first run waits and for about how long (what
    compiling took here before, else what it takes on a 2-core machine), on its own line."""
    took = (f"about {round(statistics.median(earlier))} s, as before on this machine" if earlier
            else FIRST_COMPILE)
    print(f"\ncompiling kernels for {describe_variant(variant)} (first run only; {took})",
          file=sys.stderr, flush=True)
