"""What every kernel module shares: the lazy ``jit`` decorators, the on-disk cache, the floors,
and the typed records kernels take instead of long argument lists (the integer codes of the
plan's choices are `fastnn.backends.codes`, imported from there by every kernel module).

Importing a kernel module creates dispatchers and compiles nothing; each kernel compiles on its
first call for the argument types it gets (float32 or float64). Compiled code is cached on disk
in the package's ``__pycache__`` when it is writable (else in ``~/.cache/fastnn/numba``). numba
checks a cached kernel against its own source file only, and freezes the global constants it
reads (the codes) into the compiled code, so the cache is keyed by a digest of every kernel
module and of `fastnn.backends.codes`: after any edit or upgrade, stale entries are dropped,
never run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import types as pytypes
from collections import namedtuple
from pathlib import Path
from typing import Any

import numba
from numba import types
from numba.core.registry import CPUDispatcher

from .. import compile_helper
from . import call_by_symbol, light_pipeline, shared_cache

_HERE = Path(__file__).resolve().parent
#: sources outside this folder whose constants the kernels compile in
_CONSTANT_SOURCES = (_HERE.parent.parent / "codes.py",)
_STAMP = "fastnn-kernels.digest"
#: a record, beside the cached kernels, that a plan's kernels were compiled (and how long it took)
_WARM_RECORD = "fastnn-warm-{}.json"


def _writable_folder(folder: Path) -> bool:
    """True when files can be created in ``folder`` (made if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


def _sources_digest() -> str:
    """A digest of every kernel module's source and of the codes they compile in (what
    compiled entries depend on)."""
    digest = hashlib.sha256(numba.__version__.encode())
    for path in (*sorted(_HERE.glob("*.py")), *_CONSTANT_SOURCES):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def _drop_stale_entries(folder: Path, digest: str) -> None:
    """Delete cached kernels of other sources than these (best effort)."""
    stamp = folder / _STAMP
    try:
        if stamp.exists() and stamp.read_text() == digest:
            return
        for entry in (*folder.glob("*.nbi"), *folder.glob("*.nbc"),
                      *folder.glob("*.nbi" + shared_cache.LOCK_SUFFIX),
                      *folder.glob(_WARM_RECORD.format("*"))):
            entry.unlink(missing_ok=True)
        stamp.write_text(digest)
    except OSError:
        pass


def _configure_cache() -> bool:
    """Pick where compiled kernels are cached; False when nowhere is writable."""
    chosen = numba.config.CACHE_DIR or os.environ.get("NUMBA_CACHE_DIR")
    if chosen:  # the user's choice: numba's own source checks apply
        return _writable_folder(Path(chosen))
    digest = _sources_digest()
    local = _HERE / "__pycache__"
    if _writable_folder(local):
        _drop_stale_entries(local, digest)
        return True
    fallback = Path.home() / ".cache" / "fastnn" / "numba" / digest
    if _writable_folder(fallback):
        numba.config.CACHE_DIR = str(fallback)
        return True
    return False


CACHE_ENABLED = _configure_cache()


def cache_folder() -> Path | None:
    """The folder compiled kernels are cached in (None: nowhere writable, nothing is kept)."""
    if not CACHE_ENABLED:
        return None
    chosen = numba.config.CACHE_DIR or os.environ.get("NUMBA_CACHE_DIR")
    return Path(chosen) if chosen else _HERE / "__pycache__"


def record_warm(name: str, seconds: float) -> None:
    """Note that the kernels of ``name`` (a plan's variant) are in the cache, and how long
    compiling them took (best effort: an unwritable cache records nothing)."""
    folder = cache_folder()
    if folder is None:
        return
    record = {"digest": _sources_digest(), "seconds": round(seconds, 1),
              "numba": numba.__version__}
    try:
        (folder / _WARM_RECORD.format(name)).write_text(json.dumps(record))
    except OSError:
        pass


def warm_records() -> dict[str, float]:
    """The variants whose kernels this machine has compiled for these sources, with the
    seconds compiling took (stale or unreadable records are left out)."""
    folder = cache_folder()
    if folder is None:
        return {}
    digest, found = _sources_digest(), {}
    prefix, suffix = _WARM_RECORD.split("{}")
    for path in sorted(folder.glob(_WARM_RECORD.format("*"))):
        try:
            record = json.loads(path.read_text())
            if record["digest"] == digest:
                found[path.name[len(prefix):-len(suffix)]] = float(record["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


class _CalleeKernel(CPUDispatcher):
    """A kernel as other kernels call it: compiled without numba's CPython wrapper (the code
    that unboxes Python arguments, as large as the kernel itself for a kernel that takes
    records of arrays), and once per argument type, never once per constant value. numba types
    a constant argument of a kernel-to-kernel call (``0``, ``True``) as a literal and would
    compile the callee again for it, and link both copies into the caller: a second full
    compile that runs the same code. The literal types are widened before the callee is looked
    up (a kernel's branches never depend on them)."""

    def get_call_template(self, args: Any, kws: Any) -> Any:
        return super().get_call_template(
            tuple(types.unliteral(arg) for arg in args),
            {name: types.unliteral(arg) for name, arg in kws.items()})

    def compile(self, sig: Any) -> Any:
        compile_helper.wait_for(self)  # a helper process may be compiling it
        return super().compile(sig)

    def add_overload(self, cres: Any) -> None:
        super().add_overload(cres)
        function = self.py_func
        call_by_symbol.mark_callee(cres, call_by_symbol.kernel_key(
            function, function.__qualname__.removesuffix(CALLEE_SUFFIX)))

    def enable_caching(self) -> None:
        _enable_caching(self)


#: the qualified-name suffix of a kernel's copy that other kernels call (its own cache entries)
CALLEE_SUFFIX = ".from_kernels"


class _Kernel(CPUDispatcher):
    """A kernel as Python calls it. A kernel that calls it is compiled against its
    `from_kernels` sibling instead (numba types a global dispatcher by ``_numba_type_``): the
    same function, compiled apart, without the wrapper Python calls need, cached under its own
    name. A production run calls only the drivers from Python, so every other kernel compiles
    once, without a wrapper nobody calls."""

    def __init__(self, py_func: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(py_func, *args, **kwargs)
        self._callee: _CalleeKernel | None = None
        self._callee_lock = threading.Lock()

    @property
    def from_kernels(self) -> _CalleeKernel:
        """The sibling other kernels call (made on first use; compiles nothing itself)."""
        with self._callee_lock:
            if self._callee is None:
                self._callee = _sibling(self.py_func, self.targetoptions)
            return self._callee

    @property
    def _numba_type_(self) -> Any:
        return types.Dispatcher(self.from_kernels)

    def enable_caching(self) -> None:
        _enable_caching(self)


def _enable_caching(kernel: CPUDispatcher) -> None:
    """The disk cache of ``kernel`` (`shared_cache`); a driver's (`call_by_symbol`) loads its
    callees before itself."""
    cache = (call_by_symbol.DriverCache if light_pipeline.registered(kernel.py_func)
             else call_by_symbol.KernelCache)
    kernel._cache = cache(kernel.py_func)


def _sibling(function: Any, targetoptions: dict[str, Any]) -> _CalleeKernel:
    """A `_CalleeKernel` of a copy of ``function`` whose qualified name ends in
    `CALLEE_SUFFIX`: its compiled code and cache files are its own, never taken for the
    Python-callable kernel's."""
    copy = pytypes.FunctionType(function.__code__, function.__globals__, function.__name__,
                                function.__defaults__, function.__closure__)
    copy.__qualname__ = function.__qualname__ + CALLEE_SUFFIX
    copy.__module__, copy.__doc__ = function.__module__, function.__doc__
    copy.__kwdefaults__ = function.__kwdefaults__
    if light_pipeline.registered(function):
        light_pipeline.register(copy)
    kernel = _CalleeKernel(py_func=copy, locals={}, targetoptions={
        **targetoptions, "no_cpython_wrapper": True})
    if CACHE_ENABLED:
        kernel.enable_caching()
    return kernel


def _kernel(function: Any, light: bool = False, **options: Any) -> Any:
    """A lazily compiled `_Kernel` of ``function`` (nopython, NumPy's float error model,
    cached when possible) with numba's jit ``options``; ``light``: its own code takes
    `light_pipeline`'s passes. No kernel gets numba's C-callable wrapper (nothing here calls a
    kernel through a C function pointer)."""
    if light:
        light_pipeline.register(function)
        call_by_symbol.install()
    kernel = _Kernel(function, locals={}, targetoptions={
        "nopython": True, "boundscheck": None, "error_model": "numpy", "no_cfunc_wrapper": True,
        **options})
    if CACHE_ENABLED:
        kernel.enable_caching()
    call_by_symbol.register_kernel(call_by_symbol.kernel_key(function), kernel)
    return kernel


def jit(function: Any) -> Any:
    """Lazily compiled nopython kernel (NumPy's float error model, cached when possible)."""
    return _kernel(function)


def jit_nogil(function: Any) -> Any:
    """`jit` that releases the GIL, so that Python threads may run it at once."""
    return _kernel(function, nogil=True)


def jit_driver(function: Any) -> Any:
    """`jit_nogil` for a kernel whose work is in the kernels it calls (a loop around them):
    its own code is compiled with `light_pipeline`'s passes, not numba's O3 twice."""
    return _kernel(function, light=True, nogil=True)


def jit_inline(function: Any) -> Any:
    """`jit` inlined into each kernel that calls it (a small hot helper: no call overhead,
    its loops optimised with the caller's)."""
    return _kernel(function, inline="always")


@jit_inline
def copy_into(source: Any, target: Any) -> None:
    """target[j] = source[j] for every j of two (d,) arrays. Kernels copy with this loop, not a
    slice assignment from an array: numba compiles that with a shape-mismatch message built by
    string formatting, which cost a first run about 1.7 s of compiling."""
    for j in range(target.shape[0]):
        target[j] = source[j]


# ---- constants every kernel module shares (the integer codes: `fastnn.backends.codes`) ----

#: the parts a training step is computed in (two threads may share a step)
PARTS = 2
BN_STD_FLOOR = 1e-7
LOG_FLOOR = 1e-7


# ---- typed records: what a kernel takes instead of a long positional argument list ----

#: the BLAS the products call: its interface kind and the address of its gemm
Blas = namedtuple("Blas", "kind address")
#: the first layer's input in CSR form (``sparse`` False: dense, the arrays are dummies).
#: Entry p's value is values[p]; in the compact form of uint8 inputs (``table`` of 256
#: columns, ``values`` empty) it is table[indices[p] or 0, codes[p]]: the normalised value of
#: its raw byte in its column (one row of ``table`` when every column is normalised alike)
Csr = namedtuple("Csr", "sparse indptr indices values codes table")
#: the live arrays of every layer (one entry per layer; dummies where a layer has none)
Layers = namedtuple("Layers", "weights biases gammas betas running_means running_vars")
#: an update's rate, the weight decay's code (DECAY_CODES) and its lambda
Update = namedtuple("Update", "rate decay lam")
#: an optimiser's rule: its code (OPTIMIZER_CODES) and coefficients in the dtype
#: (``beta1_rest`` is 1 - beta1 rounded once, as the reference computes it)
Rule = namedtuple("Rule", "code momentum beta1 beta1_rest beta2 beta2_rest eps")
#: Adam's bias corrections of one update t, 1 - beta1^t and 1 - beta2^t, in the dtype
Corrections = namedtuple("Corrections", "first second")
#: per step of an epoch (float64, from the host: the reference's own numbers): the rate, the
#: batch-norm rate, and the bias corrections of its update
StepRates = namedtuple("StepRates", "rates bn_rates corrections_first corrections_second")
#: the optimiser's two slots of each layer's W, b, gamma and beta: ``weights_first[k]`` is
#: W(k+1)'s velocity or first moment, ``*_second`` its second moment (dummies where none)
Slots = namedtuple(
    "Slots",
    "weights_first weights_second biases_first biases_second gammas_first gammas_second "
    "betas_first betas_second",
)
#: the CSR rows of one part of a training batch (``span``: its first row in the batch and its
#: row count, set each step), the same rows by column (``col_*``, from `transpose_part`), and
#: the scratch its share of the weight update gathers one column of the whole batch into
SparseBatch = namedtuple(
    "SparseBatch", "span ptr idx val col_ptr col_fill col_row col_val merged_row merged_val acc")
#: the arrays one epoch's steps share (index k: layer k, 0 the input; ``finite``: per part,
#: whether its rows of W1 are finite; ``row_scales``: each batch row's weight over the batch's
#: total, when rows are weighted; ``row_tally``: each batch row's loss and correctness, (rows, 2)
#: float64)
StepBuffers = namedtuple(
    "StepBuffers",
    "z u u_hat y du dz mean var std dw multiplier t_batch db dgamma_nodes dbeta_nodes dgamma "
    "dbeta mean_g mean_gu finite row_scales row_tally",
)
#: what one training step does (the plan's numbers as codes and scalars of the dtype; ``acts``
#: and ``alphas``: each hidden layer's activation code and alpha, entry k - 1 for layer k;
#: ``rule``: a `Rule`; ``rates``: the `StepRates`; ``weighted``: each row's loss is weighted
#: by ``Data.row_weights``; ``tally``: each step's sums of ``row_tally`` go to row ``step`` of
#: ``tallies``, (steps, 2) float64)
StepPlan = namedtuple(
    "StepPlan",
    "batch_size acts alphas bn has_gamma output decay lam rule rates weighted inverted "
    "keep_ratios keep_counts epoch_key update_running momentum momentum_rest tally tallies",
)
#: what evaluation does per hidden layer (codes; ``acts``/``alphas`` as in `StepPlan`), and
#: whether it uses the set's statistics
EvalPlan = namedtuple("EvalPlan", "acts alphas bn has_gamma output batch_stats")
#: per-layer rows evaluation reads (row k - 1: hidden layer k; row 0 of scales: the input)
EvalRows = namedtuple("EvalRows", "scales means stds gammas betas")
#: the rows evaluation applies to one hidden layer (mean, std, gamma, beta and the scale its
#: output is multiplied by, each of the layer's width)
EvalLayer = namedtuple("EvalLayer", "mean std gamma beta scale")
#: a set's inputs and targets, the inputs' CSR form (a `Csr`) and each row's loss weight
#: (training with weights only; else a dummy)
Data = namedtuple("Data", "x t csr row_weights")

# ---- the records of one hidden layer's kernels ----

#: a hidden layer's activation: its code (ACTIVATION_CODES) and alpha (in the dtype)
Activation = namedtuple("Activation", "code alpha")
#: a layer's batch norm: the variant's code (BN_*) and its learnable parameters (``gamma``,
#: ``beta``: (1,) or (d,); (1,) dummies and ``has_gamma`` False when it has none)
BatchNorm = namedtuple("BatchNorm", "bn gamma beta has_gamma")
#: per-node statistics of a batch: mean, population variance, std = max(sqrt(var), 1e-7)
Statistics = namedtuple("Statistics", "mean var std")
#: a per-node mean and variance (running statistics, or a batch's)
Moments = namedtuple("Moments", "mean var")
#: where a forward pass writes the normalised values when ``store``: u_hat = (u - mean) / std
#: and y = gamma * u_hat + beta (pass y = u_hat without gamma)
Normalised = namedtuple("Normalised", "store u_hat y")
#: what a backward pass reads of its forward pass: the stored u_hat and y (the activation's
#: input; u itself without batch norm) or, with ``recompute``, u, mean, std and the forward
#: pass's gamma and beta to rebuild them from. Fields the chosen way does not read are dummies
#: of the right dtype (see `fastnn.backends.numba.batch_norm_cache`)
ForwardValues = namedtuple("ForwardValues", "recompute u mean std gamma beta u_hat y")
#: a pair of per-node arrays for gamma and beta (their gradients, or the sums behind them)
GammaBeta = namedtuple("GammaBeta", "gamma beta")
#: the batch-norm backward's column means of g = gamma * dy and of g * u_hat
ColumnMeans = namedtuple("ColumnMeans", "g gu")
