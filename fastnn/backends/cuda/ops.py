"""The per-op overrides of the kernel path: each op's guard (dtype, shape, layout), its
kernel launches, and the reference (``super()``) for anything the kernels do not take: another
array type or dtype, a view that is not C-contiguous, a multiplier of a dtype NumPy would
promote.

`KernelOps` is one class for two devices, given as a `KernelDevice` (`device.py`): a GPU
through CuPy (`cupy_device.CupyOps`, the "cupy" backend), or the CPU shim (`shim_device`),
so that the GPU code path, every launch with its grid, block and exactly typed arguments,
runs and is held to the NumPy reference on a machine without a GPU. The whole epoch is
`training.py`, the evaluation `evaluation.py`; both launch the same kernels as these ops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ... import rng
from ...cuda import COLUMN_BLOCK, GEMM_TILE, LINEAR_BLOCK
from ..base import HiddenCache, HiddenSpec
from ..codes import (
    ACTIVATION_CODES,
    BATCH_NORM_CODES,
    DECAY_CODES,
    DROPOUT_CODES,
    OPTIMIZER_CODES,
    OUTPUT_CODES,
    STATS_CODES,
)
from .device import FLOATS
from .evaluation import KernelEvaluation
from .launches import GRID_Y_MAX, Launch, bn_code, cdiv, linear_grid
from .training import KernelTraining

if TYPE_CHECKING:
    from ...plan import DropoutSpec, OptimizerSpec

Array = Any


class KernelOps(KernelTraining, KernelEvaluation):
    """The reference ops with the CUDA kernels where they apply, and a whole epoch and
    evaluation as kernel launches; runs on the `KernelDevice` it is given."""

    name = "cuda-kernels"

    # ---- random masks ----
    def article_mask(self, key: int, d: int, keep: float, dtype: str) -> Array:
        """(d,) mask with exactly round(keep * d) ones (article_mask kernel)."""
        if np.dtype(dtype) not in FLOATS or d < 1:
            return super().article_mask(key, d, keep, dtype)
        mask = self._empty(d, dtype)
        self.launch("article_mask", dtype, (cdiv(d, LINEAR_BLOCK[0]), 1, 1), LINEAR_BLOCK,
                    key=key, key_at=None, d=d, keep_count=rng.keep_count(keep, d),
                    mask=mask).run()
        return mask

    def _bernoulli(self, key: int, shape: tuple[int, int], keep: float, dtype: Any,
                   on_value: Any) -> Array:
        out = self._empty(shape, dtype)
        count = int(np.prod(shape))
        self.launch("bernoulli_mask", dtype, linear_grid(count), LINEAR_BLOCK, key=key,
                    count=count, keep=keep, on_value=on_value, out=out).run()
        return out

    def bernoulli_mask(self, key: int, shape: tuple[int, int], keep: float, dtype: str) -> Array:
        """Per-element keep mask (bernoulli_mask kernel, on_value 1)."""
        dtype_ = np.dtype(dtype)
        if dtype_ not in FLOATS or int(np.prod(shape)) < 1:
            return super().bernoulli_mask(key, shape, keep, dtype)
        return self._bernoulli(key, shape, keep, dtype_, dtype_.type(1))

    def dropout_multiplier(
        self, key: int, spec: DropoutSpec, rows: int, mode: str, dtype: str
    ) -> Array:
        """The step's multiplier from its key: the article mask, or the Bernoulli mask times
        T(1) / T(keep) in one kernel."""
        dtype_ = np.dtype(dtype)
        if mode == "article" or dtype_ not in FLOATS or rows * spec.size < 1 or spec.keep <= 0:
            return super().dropout_multiplier(key, spec, rows, mode, dtype)
        scalar = dtype_.type
        return self._bernoulli(key, (rows, spec.size), spec.keep, dtype_,
                               scalar(1) / scalar(spec.keep))

    # ---- layers ----
    def _affine_fits(self, x: Array, w: Array, b: Array) -> bool:
        return (self._fits(x, w, b) and x.ndim == 2 and w.ndim == 2 and b.ndim == 1
                and len(x) > 0 and x.shape[1] == w.shape[0] > 0 and b.shape[0] == w.shape[1]
                and cdiv(len(x), GEMM_TILE) <= GRID_Y_MAX)

    def affine(self, x: Array, w: Array, b: Array) -> Array:
        """u = x W + b (gemm_nn with the bias)."""
        if not self._affine_fits(x, w, b):
            return super().affine(x, w, b)
        n, (k, m) = len(x), w.shape
        u = self._empty((n, m), x.dtype)
        self.launch.gemm("nn", x, w, u, b, n, m, k).run()
        return u

    def _backward_fits(self, x: Array, w: Array, du: Array) -> bool:
        return (self._fits(x, w, du) and x.ndim == 2 and w.ndim == 2 and du.ndim == 2
                and len(x) > 0 and x.shape[1] == w.shape[0] > 0
                and du.shape == (x.shape[0], w.shape[1])
                and cdiv(max(len(x), w.shape[0]), GEMM_TILE) <= GRID_Y_MAX)

    def _backward_launches(self, x: Array, w: Array, du: Array, need_dx: bool
                           ) -> tuple[list[Launch], Array, Array, Array | None]:
        n, (k, m) = len(x), w.shape
        dw, db = self._empty((k, m), w.dtype), self._empty(m, w.dtype)
        dx = self._empty((n, k), x.dtype) if need_dx else None
        launches = [self.launch.gemm("nt", du, w, dx, None, n, k, m)] if need_dx else []
        launches += [self.launch.gemm("tn", x, du, dw, None, k, m, n),
                     self.launch.column_sums(du, n, m, db)]
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
            launches += [self.launch.sgd(w, dw, rate, decay, lam), self.launch.sgd(b, db, rate)]
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
        bn = bn_code(spec, gamma)
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
        affine = bn >= BATCH_NORM_CODES["bn"]
        self.launch(
            "hidden_forward", u.dtype, (cdiv(d, 32), 1, 1), COLUMN_BLOCK, u=u, n=n, d=d,
            act=ACTIVATION_CODES[spec.activation], alpha=spec.alpha, bn=bn,
            gamma=gamma if affine else None, beta=beta if affine else None,
            stats=STATS_CODES["batch" if stats is None else "given"], mean=mean, var=var,
            std_dev=std, drop=DROPOUT_CODES[drop], key=0, key_at=None, keep_count=d, keep=keep,
            mask_out=None, y_out=y, u_hat_out=u_hat, z=z).run()
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
        bn = bn_code(spec, gamma)
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
        self.launch(
            "hidden_backward", dz.dtype, (cdiv(d, 32), 1, 1), COLUMN_BLOCK, dz=dz, n=n, d=d,
            act=ACTIVATION_CODES[spec.activation], alpha=spec.alpha, y=y, bn=bn,
            gamma=gamma if sums else None, u_hat=cache.u_hat, std_dev=cache.std,
            drop=DROPOUT_CODES[drop], key=0, key_at=None, keep_count=d, keep=keep, du=du,
            dgamma_nodes=dgamma, dbeta_nodes=dbeta).run()
        if not sums:
            return du, None, None
        if spec.batch_norm == "bn":  # one scalar per layer: the node sums averaged over d
            scalars = self._empty(1, dz.dtype), self._empty(1, dz.dtype)
            self.launch.node_mean(dgamma, d, scalars[0]).run()
            self.launch.node_mean(dbeta, d, scalars[1]).run()
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
        self.launch.output_loss(u, t, output, y, du, loss).run()
        return y, loss.reshape(()), du

    def output_grad(self, u: Array, t: Array, output: str) -> Array:
        """du = (output(u) - t) / N (output_loss_grad without y and the loss)."""
        if not self._output_fits(u, t, output):
            return super().output_grad(u, t, output)
        du = self._empty(u.shape, u.dtype)
        self.launch.output_loss(u, t, output, None, du, None).run()
        return du

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
        self.launch.sgd(param, grad, rate, decay, lam).run()

    def optimizer_update(
        self, param: Array, grad: Array, slots: tuple[Array, ...], rate: float,
        spec: OptimizerSpec, step: int, decay: str | None = None, lam: float = 0.0,
    ) -> None:
        """One update of param and its slots by the plan's optimiser: one optimizer_update
        launch (none when rate is 0)."""
        if not rate:
            return
        if not (self._fits(param, grad, *slots) and param.ndim in (1, 2) and param.size > 0
                and all(a.shape == param.shape for a in (grad, *slots))
                and len(slots) == len(spec.slots) and self._writable(param, *slots)
                and decay in DECAY_CODES and spec.kind in OPTIMIZER_CODES):
            super().optimizer_update(param, grad, slots, rate, spec, step, decay, lam)
            return
        self.launch.optimizer(param, grad, slots, spec, rate, decay, lam,
                              (1 - spec.beta1**step, 1 - spec.beta2**step)).run()

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
        self.launch.update_running(mean, var, cache.mean, cache.var, momentum).run()
