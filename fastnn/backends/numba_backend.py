"""The Numba backend: NumPy arrays, the hot ops as compiled kernels, and a compiled epoch.

`NumbaOps` overrides only what it has kernels for, on float32/float64 C-contiguous NumPy arrays;
anything else (another dtype, a view, an odd mask) falls back to the NumPy reference. Kernels
live in `_numba_kernels` and compile lazily (on first use, or in `warm_up`).

Sparse inputs: when the input matrix of `train_epoch` or `evaluate` is mostly exact zeros
(MNIST after min-max scaling: ~81%), the first layer's product and weight gradient run on a
CSR copy of it and skip the zeros. The choice is made per array: ``NumbaOps.sparse_mode`` is
``"auto"`` (CSR when the nonzero fraction is below ``sparse_threshold``, 0.35 by default),
``"1"`` (always) or ``"0"`` (never, the dense BLAS path); it starts from the environment
variable ``FASTNN_NUMBA_SPARSE`` (0/1/auto). The density and CSR form are computed once per
array and cached (the array itself, its shape, address and a checksum of a sample of its rows
must match; at most ``SPARSE_CACHE_SIZE`` arrays), so a fit builds them once, not per epoch;
an array changed in place outside the sampled rows is not noticed (`clear_sparse_cache`).
"auto" trains sparse only for the dtypes in ``sparse_train_dtypes`` (float64: float32's
dense BLAS epoch measured as fast); evaluation goes sparse for both.
``first_layer_paths`` counts which path each call took. Results match the dense path to
rounding (the sums run in another order); a step whose W1 (or first-layer gradient) is not
finite runs densely, so inf/NaN propagate as they do there.
"""

from __future__ import annotations

import os
import sys
import threading
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numba  # noqa: F401 - an ImportError here is turned into an install hint by the registry
import numpy as np

from .. import rng
from ..errors import BackendUnavailable
from .base import HiddenCache, HiddenSpec
from .numpy_backend import NumpyOps

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _same_float_arrays(*arrays: Any) -> bool:
    """True when every array is a C-contiguous NumPy array of one float32/float64 dtype."""
    first = arrays[0]
    if not isinstance(first, np.ndarray) or first.dtype not in _FLOAT_DTYPES:
        return False
    return all(
        isinstance(a, np.ndarray) and a.dtype == first.dtype and a.flags.c_contiguous
        for a in arrays
    )


def _usable_cpus() -> int:
    """How many CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
            self._ops.kernels.normalise(u, self.mean, self.std, dummy, dummy, False,
                                        self._u_hat, self._u_hat)
        else:
            self._pre_activation = np.empty_like(u)
            self._ops.kernels.normalise(u, self.mean, self.std, *self.forward_parameters, True,
                                        self._u_hat, self._pre_activation)

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

    #: how many input arrays keep their density and CSR form cached
    SPARSE_CACHE_SIZE = 6
    #: rows whose bytes make an array's checksum in the sparse cache
    SPARSE_SAMPLE_ROWS = 16

    def __init__(self) -> None:
        self._kernels: Any = None
        self._threads: Any = None
        self._warmed: set[tuple[str, int]] = set()
        self._eval_buffers: dict[tuple[str, int], Any] = {}
        mode = os.environ.get("FASTNN_NUMBA_SPARSE", "auto").strip().lower() or "auto"
        #: "auto" (CSR below ``sparse_threshold``), "1" (always CSR) or "0" (always dense)
        self.sparse_mode: str = mode if mode in ("0", "1", "auto") else "auto"
        #: the nonzero fraction below which "auto" takes the sparse first layer
        self.sparse_threshold: float = 0.35
        #: dtypes whose training "auto" runs sparse (measured on MNIST, 2-core AVX2: float32's
        #: dense BLAS epoch is as fast as the sparse one; float64 gains ~15%)
        self.sparse_train_dtypes: tuple[str, ...] = ("float64",)
        #: calls per first-layer path: "train_sparse", "train_dense", "evaluate_sparse", ...
        self.first_layer_paths: Counter[str] = Counter()
        #: steps of the last `train_epoch` call that ran the sparse first layer
        self.last_sparse_steps = 0
        self._sparse_cache: OrderedDict[tuple[Any, ...], list[Any]] = OrderedDict()

    # ---- set-up ----
    def check_available(self) -> None:
        """numba's np.dot needs SciPy's BLAS: fail early with an install hint without it."""
        try:
            import scipy.linalg.cython_blas  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(
                f'backend \'numba\' needs scipy: pip install "fastnn[numba]" ({exc})'
            ) from None

    @property
    def kernels(self) -> Any:
        """The kernel module, imported on first use (creating dispatchers compiles nothing)."""
        if self._kernels is None:
            from . import _numba_kernels

            self._kernels = _numba_kernels
        return self._kernels

    def warm_up(self, network: Any) -> None:
        """Compile (or load from the cache) the epoch and evaluation kernels of this network."""
        from ..network import Network

        dtype = np.dtype(network.dtype)
        key = (dtype.name, network.n_layers)
        if dtype not in _FLOAT_DTYPES or key in self._warmed:
            return
        if sys.stderr is not None and sys.stderr.isatty() and self._needs_compile():
            print("compiling kernels (first run only)", file=sys.stderr, flush=True)
        probe = Network(network.config, params=network.numpy_params())
        rows = 3
        x = np.linspace(-1.0, 1.0, rows * network.sizes[0]).reshape(rows, -1).astype(dtype)
        labels = np.arange(rows) % network.sizes[-1]
        t = np.eye(network.sizes[-1], dtype=dtype)[labels]
        with np.errstate(all="ignore"):
            self.train_epoch(probe, x, t, np.arange(rows), 0)
            probe.evaluate(x, t, labels)
        self._warmed.add(key)

    def _needs_compile(self) -> bool:
        """False when the epoch kernel is compiled in-process or has an on-disk cache index."""
        dispatcher = self.kernels.train_epoch
        if dispatcher.signatures:
            return False
        try:
            from pathlib import Path

            cache = dispatcher._cache  # noqa: SLF001 - numba has no public query for this
            return not Path(cache._cache_path, cache._index_name).exists()  # noqa: SLF001
        except AttributeError:
            return True

    def _blas_threads(self) -> Any:
        if self._threads is None:
            self._threads = self.kernels.BlasThreads()
        return self._threads

    @contextmanager
    def _one_blas_thread(self) -> Iterator[None]:
        """Run the block with the kernels' BLAS on one thread (restored afterwards)."""
        threads = self._blas_threads().get()
        if threads is not None and threads > 1:
            self._blas_threads().set(1)
        try:
            yield
        finally:
            if threads is not None and threads > 1:
                self._blas_threads().set(threads)

    def _blas(self, dtype: Any) -> tuple[int, int]:
        """(kind, gemm address) of the BLAS the kernels call for this dtype."""
        return self.kernels.blas_for(dtype)

    # ---- random masks ----
    def article_mask(self, key: int, d: int, keep: float, dtype: str) -> Any:
        """(d,) mask with exactly round(keep * d) ones: the k smallest values of the stream."""
        if np.dtype(dtype) not in _FLOAT_DTYPES:
            return super().article_mask(key, d, keep, dtype)
        mask = np.empty(d, dtype)
        self.kernels.article_mask(np.uint64(key), rng.keep_count(keep, d), mask)
        return mask

    def bernoulli_mask(self, key: int, shape: tuple[int, int], keep: float, dtype: str) -> Any:
        """Per-element keep mask: 1 where uniform01 < keep."""
        dtype = np.dtype(dtype)
        if dtype not in _FLOAT_DTYPES:
            return super().bernoulli_mask(key, shape, keep, dtype)
        mask = np.empty(shape, dtype)
        self.kernels.fill_bernoulli_multiplier(np.uint64(key), float(keep), dtype.type(1.0), mask)
        return mask

    # ---- layers ----
    def affine(self, x: Any, w: Any, b: Any) -> Any:
        """u = x W + b with the product in numba (SciPy's BLAS: one thread pool throughout)."""
        if not (_same_float_arrays(x, w, b) and x.ndim == 2 and w.ndim == 2 and b.ndim == 1
                and x.shape[1] == w.shape[0] and b.shape[0] == w.shape[1]):
            return super().affine(x, w, b)
        u = np.empty((x.shape[0], w.shape[1]), x.dtype)
        self.kernels.affine(*self._blas(x.dtype), x, w, b, u)
        return u

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
        self.kernels.affine_backward(*self._blas(x.dtype), x, w, du, need_dx, dw, db, dx)
        return dw, db, dx if need_dx else None

    def _layer_parameters(
        self, spec: HiddenSpec, gamma: Any, beta: Any, like: np.ndarray
    ) -> tuple[Any, Any, bool] | None:
        """(gamma, beta, has_gamma) for a kernel (dummies without them); None: not supported."""
        if spec.batch_norm not in self.kernels.BATCH_NORM_CODES:
            return None
        if spec.activation not in self.kernels.ACTIVATION_CODES:
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
        act = kernels.ACTIVATION_CODES[spec.activation]
        alpha = u.dtype.type(spec.alpha)
        z = np.empty_like(u)
        batch_stats = stats is None
        if spec.batch_norm == "off":
            mean = var = std = np.ones(1, u.dtype)
        elif batch_stats:
            mean, var, std = np.empty(d, u.dtype), np.empty(d, u.dtype), np.empty(d, u.dtype)
        else:
            (mean, var), std = stats, np.empty(d, u.dtype)
        kernels.hidden_forward(u, act, alpha, kernels.BATCH_NORM_CODES[spec.batch_norm],
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

        act_code = self.kernels.ACTIVATION_CODES.get(spec.activation)
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
        identity = self.kernels.ACTIVATION_CODES["identity"]
        return self._fused_backward(dy, cache, variant, gamma, identity, 0.0, None, reference,
                                    activation_input=dy)

    def _fused_backward(
        self, dz: Any, cache: HiddenCache, variant: str, gamma: Any, act_code: int,
        alpha: float, mask: Any, reference: Any, activation_input: Any = None,
    ) -> tuple[Any, Any | None, Any | None]:
        """Run the fused backward kernel, or ``reference()`` when its inputs do not fit."""
        kernels = self.kernels
        if variant not in kernels.BATCH_NORM_CODES:
            return reference()
        n, d = dz.shape
        bn = kernels.BATCH_NORM_CODES[variant]
        multiplier = _multiplier(mask, dz)
        has_gamma = bn != kernels.BN_OFF and gamma is not None
        if multiplier is None or (has_gamma and not (
            _same_float_arrays(dz, gamma) and gamma.ndim == 1 and gamma.shape[0] in (1, d)
        )):
            return reference()
        gamma_array = gamma if has_gamma else np.ones(1, dz.dtype)
        forward_gamma = forward_beta = gamma_array
        recompute = (isinstance(cache, LazyBatchNormCache) and not cache.built
                     and activation_input is None
                     and (cache.forward_parameters is not None) == has_gamma)
        if bn == kernels.BN_OFF:
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
        if bn != kernels.BN_OFF and (std.shape != (d,) or (recompute and mean.shape != (d,))):
            return reference()
        du = np.empty_like(dz)
        dgamma_nodes = np.empty(d, dz.dtype)
        dbeta_nodes = np.empty(d, dz.dtype)
        kernels.hidden_backward(dz, multiplier, act_code, dz.dtype.type(alpha), bn, recompute,
                                u, mean, std, forward_gamma, forward_beta, u_hat, y, gamma_array,
                                has_gamma, du, dgamma_nodes, dbeta_nodes)
        if not has_gamma:
            return du, None, None
        size = 1 if bn == kernels.BN_SCALAR else d
        dgamma, dbeta = np.empty(size, dz.dtype), np.empty(size, dz.dtype)
        kernels.layer_parameter_grads(bn, dgamma_nodes, dbeta_nodes, dgamma, dbeta)
        return du, dgamma, dbeta

    # ---- output and loss ----
    def output_forward(self, u: Any, output: str) -> Any:
        """Softmax (row maximum subtracted) or identity."""
        if output == "identity_mse" or not (_same_float_arrays(u) and u.ndim == 2):
            return super().output_forward(u, output)
        y = np.empty_like(u)
        self.kernels.output_forward(u, self.kernels.OUTPUT_CODES[output], y)
        return y

    def loss(self, y: Any, t: Any, output: str) -> Any:
        """Cross-entropy or MSE (summed in float64), as a scalar of y's dtype."""
        if output not in self.kernels.OUTPUT_CODES or not (
            _same_float_arrays(y, t) and y.ndim == 2 and y.shape == t.shape
        ):
            return super().loss(y, t, output)
        return y.dtype.type(self.kernels.loss(y, t, self.kernels.OUTPUT_CODES[output]))

    def output_loss_grad(self, u: Any, t: Any, output: str) -> tuple[Any, Any, Any]:
        """(y, loss, (y - t) / N)."""
        if output not in self.kernels.OUTPUT_CODES or not (
            _same_float_arrays(u, t) and u.ndim == 2 and u.shape == t.shape
        ):
            return super().output_loss_grad(u, t, output)
        y = self.output_forward(u, output)
        du = np.empty_like(u)
        self.kernels.output_grad(y, t, du)
        return y, self.loss(y, t, output), du

    # ---- the update ----
    def sgd_update(
        self, params: Mapping[str, Any], grads: Mapping[str, Any], rates: Mapping[str, float]
    ) -> None:
        """In place p -= rate * grad (a kernel per array; NumPy for anything unusual)."""
        kernels = self.kernels
        for name, grad in grads.items():
            rate, param = rates[name], params[name]
            if not rate:
                continue
            if not (_same_float_arrays(param, grad) and param.shape == grad.shape
                    and param.ndim in (1, 2)):
                super().sgd_update({name: param}, {name: grad}, {name: rate})
            elif param.ndim == 2:
                zero = param.dtype.type(0.0)
                kernels.sgd_weights(param, grad, param.dtype.type(rate), kernels.DECAY_NONE, zero)
            else:
                kernels.sgd_vector(param, grad, param.dtype.type(rate))

    # ---- sparse inputs ----
    def clear_sparse_cache(self) -> None:
        """Forget every cached density and CSR form."""
        self._sparse_cache.clear()

    def _fingerprint(self, x: np.ndarray) -> int:
        """A checksum of up to ``SPARSE_SAMPLE_ROWS`` evenly spaced rows of x."""
        count = min(len(x), self.SPARSE_SAMPLE_ROWS)
        rows = np.linspace(0, len(x) - 1, count).astype(np.intp) if count else []
        return zlib.crc32(np.ascontiguousarray(x[rows]).tobytes())

    def sparse_form(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """x's CSR form (indptr int64, indices int32, values) when x takes the sparse path.

        x must be a 2-d C-contiguous float array. None when ``sparse_mode`` is "0", or "auto"
        and x's nonzero fraction is not below ``sparse_threshold``.
        """
        mode = self.sparse_mode
        if mode == "0" or x.size == 0:
            return None
        key = (id(x), x.__array_interface__["data"][0], x.shape, x.strides, x.dtype.str)
        fingerprint = self._fingerprint(x)
        entry = self._sparse_cache.get(key)
        if entry is None or entry[0] is not x or entry[1] != fingerprint:
            counts = np.empty(len(x), np.int64)
            nonzeros = int(self.kernels.count_nonzeros(x, counts))
            entry = [x, fingerprint, nonzeros / x.size, counts, None]
            self._sparse_cache[key] = entry
            while len(self._sparse_cache) > self.SPARSE_CACHE_SIZE:
                self._sparse_cache.popitem(last=False)
        self._sparse_cache.move_to_end(key)
        if mode != "1" and not entry[2] < self.sparse_threshold:
            return None
        if entry[4] is None:
            counts = entry[3]
            indptr = np.zeros(len(x) + 1, np.int64)
            np.cumsum(counts, out=indptr[1:])
            indices = np.empty(indptr[-1], np.int32)
            values = np.empty(indptr[-1], x.dtype)
            self.kernels.fill_csr(x, indptr, indices, values)
            entry[3], entry[4] = None, (indptr, indices, values)
        csr: tuple[np.ndarray, np.ndarray, np.ndarray] = entry[4]
        return csr

    def _first_layer(self, x: np.ndarray, w1: np.ndarray, what: str) -> tuple[Any, ...]:
        """(sparse, indptr, indices, values) for a kernel, counted in ``first_layer_paths``.

        Dense (with dummy arrays) unless x has a CSR form and W1 is finite.
        """
        auto_dense = (what == "train" and self.sparse_mode == "auto"
                      and x.dtype.name not in self.sparse_train_dtypes)
        csr = None if auto_dense else self.sparse_form(x)
        if csr is not None and not np.isfinite(w1).all():
            csr = None  # 0 * inf is NaN in the dense product: keep it
        self.first_layer_paths[f"{what}_{'dense' if csr is None else 'sparse'}"] += 1
        if csr is None:
            return False, np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, x.dtype)
        return (True, *csr)

    # ---- evaluation ----
    #: rows per block of the blocked evaluation (buffers of a few MB: they stay in cache)
    EVAL_BLOCK = 2048
    #: threads that share out an evaluation's blocks (None: one per usable CPU)
    EVAL_THREADS: int | None = None

    def evaluate(self, network: Any, x: Any, t: Any) -> tuple[float, Any]:
        """Loss and predicted classes of a whole set, ``EVAL_BLOCK`` rows at a time.

        Without batch norm (or with running statistics) no (N, d) activation is ever built;
        with whole-set statistics the hidden pre-activations go to reused (N, d_k) buffers.
        Blocks are independent: `_run_blocks` shares them out among threads.
        """
        arguments = self._evaluate_arguments(network, x, t)
        if arguments is None:
            return super().evaluate(network, x, t)
        (x, t, weights, biases, gammas, betas, running_means, running_vars, act, alpha, bn,
         has_gamma, batch_stats, output, scales, full, blas_kind, address, predicted) = arguments
        first_layer = self._first_layer(x, weights[0], "evaluate")
        kernels, dtype = self.kernels, x.dtype
        n_rows, n_layers = len(x), len(weights)
        widest = max(w.shape[1] for w in weights)
        scale_rows, means, stds, gamma_rows, beta_rows = (
            np.empty((n_layers, widest), dtype) for _ in range(5)
        )
        kernels.evaluate_setup(weights, gammas, betas, running_means, running_vars, bn,
                               batch_stats, scales, scale_rows, means, stds, gamma_rows,
                               beta_rows)
        rows = self.EVAL_BLOCK
        n_blocks = -(-n_rows // rows)
        layer_rows = (act, alpha, bn, has_gamma)
        fixed = (scale_rows, means, stds, gamma_rows, beta_rows, blas_kind, address)
        first = 1
        # One BLAS thread: threads take whole blocks instead (a busy core then only slows the
        # blocks it takes; a multithreaded product waits for its slowest thread every time).
        with self._one_blas_thread():
            if bn != kernels.BN_OFF and batch_stats:  # whole-set statistics, layer by layer
                first = n_layers
                for k in range(1, n_layers):
                    def pre_activations(block: int, k: int = k) -> None:
                        start = block * rows
                        kernels.pre_activation_block(
                            x, start, min(rows, n_rows - start), k, weights, biases, full,
                            *layer_rows, *fixed, *first_layer)

                    self._run_blocks(n_blocks, pre_activations)
                    d = weights[k - 1].shape[1]
                    kernels.whole_set_statistics(full[k - 1][:n_rows], means[k - 1, :d],
                                                 stds[k - 1, :d])
            totals = np.zeros(n_blocks)

            def outputs(block: int) -> None:
                start = block * rows
                totals[block] = kernels.evaluate_block(
                    x, t, start, min(rows, n_rows - start), weights, biases, first, full,
                    *layer_rows, output, *fixed[:5], blas_kind, address, predicted,
                    *first_layer)

            self._run_blocks(n_blocks, outputs)
        total = 0.0
        for value in totals.tolist():  # in block order: the same sum on every run
            total += value
        loss = 0.5 * total / n_rows if output == kernels.OUTPUT_IDENTITY else -total / n_rows
        return float(dtype.type(loss)), predicted

    def _run_blocks(self, n_blocks: int, run: Any) -> None:
        """run(0..n_blocks-1), shared out among up to ``EVAL_THREADS`` threads as each frees up
        (the kernels release the GIL); in this thread alone when there is one block or CPU."""
        workers = min(n_blocks, self.EVAL_THREADS or _usable_cpus())
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

    def _evaluate_arguments(self, network: Any, x: Any, t: Any) -> tuple[Any, ...] | None:
        """The evaluation kernel's arguments; None when this network/data needs the reference."""
        kernels, cfg = self.kernels, network.config
        dtype = np.dtype(network.dtype)
        n_layers, sizes, params = network.n_layers, network.sizes, network.params
        if dtype not in _FLOAT_DTYPES or cfg.output not in kernels.OUTPUT_CODES:
            return None
        if not (_same_float_arrays(x, t) and x.dtype == dtype and x.ndim == 2 and t.ndim == 2
                and x.flags.writeable and len(x) > 0 and x.shape == (len(x), sizes[0])
                and t.shape == (len(x), sizes[-1])):
            return None
        spec = self._uniform_spec(network)
        if spec is None:
            return None
        weights = tuple(params[f"W{k}"] for k in range(1, n_layers + 1))
        biases = tuple(params[f"b{k}"] for k in range(1, n_layers + 1))
        learnable = cfg.batch_norm in ("bn", "node")
        gammas = tuple(params[f"gamma{k}"] for k in range(1, n_layers)) if learnable else ()
        betas = tuple(params[f"beta{k}"] for k in range(1, n_layers)) if learnable else ()
        if not _same_float_arrays(x, *weights, *biases, *gammas, *betas):
            return None
        dummy = np.ones(1, dtype)
        batch_stats = cfg.bn_eval == "batch" or not network.running
        means: tuple[Any, ...] = ()
        variances: tuple[Any, ...] = ()
        if cfg.batch_norm != "off" and not batch_stats:
            running = [network.running[k] for k in range(1, n_layers)]
            means = tuple(mean for mean, _ in running)
            variances = tuple(var for _, var in running)
            if not all(_same_float_arrays(x, s) and s.shape == (sizes[k],)
                       for stats in (means, variances) for k, s in enumerate(stats, start=1)):
                return None
        full: tuple[Any, ...] = ()
        if cfg.batch_norm != "off" and batch_stats:
            full = tuple(self._eval_buffer(dtype, len(x), sizes[k]) for k in range(1, n_layers))
        rows = np.ones((1, 1), dtype)
        multipliers = network._eval_multipliers()
        scales = np.array([multipliers.get(k, 1.0) for k in range(n_layers)], dtype)
        return (
            x, t, weights, biases, *(
                (*group, *([dummy] * (n_layers - len(group))))
                for group in (gammas, betas, means, variances)
            ),
            kernels.ACTIVATION_CODES[spec.activation], dtype.type(spec.alpha),
            kernels.BATCH_NORM_CODES[cfg.batch_norm], learnable, batch_stats,
            kernels.OUTPUT_CODES[cfg.output], scales,
            (*full, *([rows] * (n_layers - len(full)))), *self._blas(dtype),
            np.empty(len(x), np.intp),
        )

    def _eval_buffer(self, dtype: Any, n: int, d: int) -> Any:
        """A reused (at least n, d) buffer for whole-set pre-activations (grown when needed)."""
        key = (np.dtype(dtype).name, d)
        buffer = self._eval_buffers.get(key)
        if buffer is None or len(buffer) < n:
            buffer = self._eval_buffers[key] = np.empty((n, d), dtype)
        return buffer

    def _uniform_spec(self, network: Any) -> HiddenSpec | None:
        """The one spec all hidden layers share when the kernels support it, else None."""
        specs = set(network.specs)
        spec = next(iter(specs)) if specs else HiddenSpec(batch_norm=network.config.batch_norm)
        if (len(specs) > 1 or spec.activation not in self.kernels.ACTIVATION_CODES
                or spec.batch_norm not in self.kernels.BATCH_NORM_CODES):
            return None
        return spec

    # ---- the whole epoch ----
    def train_epoch(self, network: Any, x: Any, t: Any, order: Any, epoch: int) -> None:
        """The reference epoch (same batches, masks and update order) as one compiled call."""
        arguments = self._epoch_arguments(network, x, t, order, epoch)
        if arguments is None:
            super().train_epoch(network, x, t, order, epoch)
            return
        # One BLAS thread: a batch's products are too small to gain from a second thread, and
        # a helper thread descheduled by another busy process stalls every product (seen: 40x).
        first_layer = self._first_layer(arguments[0], arguments[3][0], "train")
        with self._one_blas_thread():
            self.last_sparse_steps = int(self.kernels.train_epoch(*arguments, *first_layer))
        running_means, running_vars = arguments[7], arguments[8]
        if self._tracks_running(network):
            for k in range(1, network.n_layers):
                network.running[k] = (running_means[k - 1], running_vars[k - 1])

    @staticmethod
    def _tracks_running(network: Any) -> bool:
        return network.config.bn_eval == "running" and bool(network.running)

    def _epoch_arguments(
        self, network: Any, x: Any, t: Any, order: Any, epoch: int
    ) -> tuple[Any, ...] | None:
        """The epoch kernel's arguments; None when this network/data needs the reference."""
        kernels, cfg = self.kernels, network.config
        dtype = np.dtype(network.dtype)
        n_layers, sizes, params = network.n_layers, network.sizes, network.params
        order = np.ascontiguousarray(np.asarray(order), dtype=np.int64)
        if dtype not in _FLOAT_DTYPES or order.ndim != 1 or order.size == 0:
            return None
        if not (_same_float_arrays(x, t) and x.dtype == dtype and x.ndim == 2 and t.ndim == 2
                and x.shape == (len(x), sizes[0]) and t.shape == (len(x), sizes[-1])):
            return None
        if order.min() < 0 or order.max() >= len(x):
            return None  # the reference raises the IndexError
        specs = set(network.specs)
        spec = next(iter(specs)) if specs else HiddenSpec(batch_norm=cfg.batch_norm)
        if len(specs) > 1 or spec.activation not in kernels.ACTIVATION_CODES:
            return None
        weights = tuple(params[f"W{k}"] for k in range(1, n_layers + 1))
        biases = tuple(params[f"b{k}"] for k in range(1, n_layers + 1))
        dummy = np.ones(1, dtype)
        learnable = cfg.batch_norm in ("bn", "node")
        gammas = tuple(params[f"gamma{k}"] for k in range(1, n_layers)) if learnable else ()
        betas = tuple(params[f"beta{k}"] for k in range(1, n_layers)) if learnable else ()
        if not _same_float_arrays(x, *weights, *biases, *gammas, *betas):
            return None
        gammas = (*gammas, *([dummy] * (n_layers - len(gammas))))
        betas = (*betas, *([dummy] * (n_layers - len(betas))))
        if self._tracks_running(network):
            running = [network.running[k] for k in range(1, n_layers)]
            means = tuple(np.array(mean, dtype=dtype) for mean, _ in running)
            variances = tuple(np.array(var, dtype=dtype) for _, var in running)
        else:
            means = variances = ()
        means = (*means, *([dummy] * (n_layers - len(means))))
        variances = (*variances, *([dummy] * (n_layers - len(variances))))
        keep_ratios = np.array([network.keep_ratio(k) for k in range(n_layers)], np.float64)
        keep_counts = np.array(
            [rng.keep_count(keep, sizes[k]) for k, keep in enumerate(keep_ratios)], np.int64
        )
        decay_kind, lam = cfg.weight_decay if cfg.weight_decay is not None else (None, 0.0)
        momentum = cfg.bn_momentum
        return (
            x, t, order, weights, biases, gammas, betas, means, variances,
            cfg.batch_size, kernels.ACTIVATION_CODES[spec.activation], dtype.type(spec.alpha),
            kernels.BATCH_NORM_CODES[cfg.batch_norm], kernels.OUTPUT_CODES[cfg.output],
            kernels.DECAY_CODES[decay_kind], dtype.type(lam), dtype.type(cfg.eta),
            dtype.type(cfg.bn_rate), cfg.dropout_mode == "inverted", keep_ratios, keep_counts,
            np.uint64(rng.fold_key(cfg.seed, rng.STREAM_DROPOUT, epoch)),
            self._tracks_running(network), dtype.type(momentum), dtype.type(1 - momentum),
            *self._blas(dtype),
        )
