"""What every kernel module shares: the lazy ``jit`` decorators, the on-disk cache, the integer
codes of the plan's choices, and the typed records kernels take instead of long argument lists.

Importing a kernel module creates dispatchers and compiles nothing; each kernel compiles on its
first call for the argument types it gets (float32 or float64). Compiled code is cached on disk
in the package's ``__pycache__`` when it is writable (else in ``~/.cache/fastnn/numba``). numba
checks a cached kernel against its own source file only, so the cache is keyed by a digest of
every kernel module: after any edit or upgrade, stale entries are dropped, never run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import namedtuple
from pathlib import Path
from typing import Any

import numba

_HERE = Path(__file__).resolve().parent
_STAMP = "fastnn-kernels.digest"


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
    """A digest of every kernel module's source (what compiled entries depend on)."""
    digest = hashlib.sha256(numba.__version__.encode())
    for path in sorted(_HERE.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def _drop_stale_entries(folder: Path, digest: str) -> None:
    """Delete cached kernels of other sources than these (best effort)."""
    stamp = folder / _STAMP
    try:
        if stamp.exists() and stamp.read_text() == digest:
            return
        for entry in (*folder.glob("*.nbi"), *folder.glob("*.nbc")):
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


def jit(function: Any) -> Any:
    """Lazily compiled nopython kernel (NumPy's float error model, cached when possible)."""
    return numba.njit(cache=CACHE_ENABLED, error_model="numpy")(function)


def jit_nogil(function: Any) -> Any:
    """`jit` that releases the GIL, so that Python threads may run it at once."""
    return numba.njit(cache=CACHE_ENABLED, error_model="numpy", nogil=True)(function)


def jit_inline(function: Any) -> Any:
    """`jit` inlined into each kernel that calls it (a small hot helper: no call overhead,
    its loops optimised with the caller's)."""
    return numba.njit(cache=CACHE_ENABLED, error_model="numpy", inline="always")(function)


# ---- codes shared with the backend ----

ACTIVATION_CODES = {
    "sigmoid": 0, "tanh": 1, "relu": 2, "leaky_relu": 3,
    "identity": 4, "softplus": 5, "softsign": 6, "step": 7,
}
BN_OFF, BN_N, BN_SCALAR, BN_NODE = 0, 1, 2, 3
BATCH_NORM_CODES = {"off": BN_OFF, "n": BN_N, "bn": BN_SCALAR, "node": BN_NODE}
OUTPUT_SOFTMAX, OUTPUT_IDENTITY = 0, 1
OUTPUT_CODES = {"softmax_cross_entropy": OUTPUT_SOFTMAX, "identity_mse": OUTPUT_IDENTITY}
DECAY_NONE, DECAY_L1, DECAY_L2 = 0, 1, 2
DECAY_CODES = {None: DECAY_NONE, "l1": DECAY_L1, "l2": DECAY_L2}
BN_STD_FLOOR = 1e-7
LOG_FLOOR = 1e-7


# ---- typed records: what a kernel takes instead of a long positional argument list ----

#: the BLAS the products call: its interface kind and the address of its gemm
Blas = namedtuple("Blas", "kind address")
#: the first layer's input in CSR form (``sparse`` False: dense, the arrays are dummies)
Csr = namedtuple("Csr", "sparse indptr indices values")
#: the live arrays of every layer (one entry per layer; dummies where a layer has none)
Layers = namedtuple("Layers", "weights biases gammas betas running_means running_vars")
#: what one training step does (the plan's numbers as codes and scalars of the dtype)
StepPlan = namedtuple(
    "StepPlan",
    "batch_size act alpha bn has_gamma output decay lam eta bn_rate inverted keep_ratios "
    "keep_counts epoch_key update_running momentum momentum_rest",
)
#: what evaluation does per hidden layer (codes), and whether it uses the set's statistics
EvalPlan = namedtuple("EvalPlan", "act alpha bn has_gamma output batch_stats")
#: per-layer rows evaluation reads (row k - 1: hidden layer k; row 0 of scales: the input)
EvalRows = namedtuple("EvalRows", "scales means stds gammas betas")
