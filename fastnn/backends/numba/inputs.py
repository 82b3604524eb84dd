"""Sparse inputs: a run's CSR form of x (built once, kept in its workspace) and the choice,
call by call, between the sparse and the dense first layer.

When a run's input matrix is mostly exact zeros (MNIST after min-max scaling: ~81%), the first
layer's product and weight gradient skip the zeros. Results match the dense path to rounding;
a step whose W1 (or first-layer gradient) is not finite runs densely, so inf/NaN propagate as
there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import DataError
from ...memory import check_memory
from ..workspace import Workspace
from .fit import same_float_arrays
from .kernels.common import Csr


def dense_csr(dtype: Any) -> Csr:
    """The `Csr` record of the dense path (dummy arrays)."""
    return Csr(False, np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, dtype))


def prepare_csr(sparse: Any, x: Any, workspace: Workspace) -> None:
    """Measure x's density and, when the sparse path would take it, build its CSR form with
    the ``sparse`` kernels (kept in the run's workspace, for every epoch and evaluation)."""
    options = workspace.options
    mode = options.get("sparse_mode", "auto")
    if (mode == "0" or not (same_float_arrays(x) and x.ndim == 2) or x.size == 0
            or workspace.prepared(x) is not None):
        return
    counts = np.empty(len(x), np.int64)
    density = int(sparse.count_nonzeros(x, counts)) / x.size
    if mode != "1" and not density < options.get("sparse_threshold", 0.35):
        workspace.attach(x, (density, None))
        return
    nonzeros = int(counts.sum())
    check_memory(nonzeros * (4 + x.dtype.itemsize) + 8 * len(x),
                 f"the sparse form of {len(x):,} input rows ({nonzeros:,} nonzeros)", DataError,
                 "train on fewer rows, or free memory")
    indptr = np.zeros(len(x) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.empty(indptr[-1], np.int32)
    values = np.empty(indptr[-1], x.dtype)
    sparse.fill_csr(x, indptr, indices, values)
    workspace.attach(x, (density, Csr(True, indptr, indices, values)))


def first_layer(x: np.ndarray, w1: np.ndarray, what: str, workspace: Workspace,
                sparse_allowed: bool = True) -> Csr:
    """The `Csr` record for a kernel (counted in the workspace's counters as ``what``_sparse
    or ``what``_dense): x's CSR form when the run prepared one, ``sparse_allowed`` and W1 is
    finite, else the dense path's dummies."""
    prepared = workspace.prepared(x)
    csr = None if prepared is None or not sparse_allowed else prepared[1]
    if csr is not None and not np.isfinite(w1).all():
        csr = None  # 0 * inf is NaN in the dense product: keep it
    workspace.count(f"{what}_{'dense' if csr is None else 'sparse'}")
    return dense_csr(x.dtype) if csr is None else csr
