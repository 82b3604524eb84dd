"""Sparse inputs: a run's CSR form of x (built once, kept in its workspace) and the choice,
call by call, between the sparse and the dense first layer.

When a run's input matrix is mostly exact zeros (MNIST after min-max scaling: ~81%), the first
layer's product and weight gradient skip the zeros. Results match the dense path to rounding;
a step whose W1 (or first-layer gradient) is not finite runs densely, so inf/NaN propagate as
there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import DataError
from ...memory import check_memory
from ..workspace import Workspace

if TYPE_CHECKING:
    from ...preprocessing import Normalizer
from .fit import same_float_arrays
from .kernels.common import Csr


def dense_csr(dtype: Any) -> Csr:
    """The `Csr` record of the dense path (dummy arrays)."""
    return Csr(False, np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, dtype))


class CsrRows:
    """A data set's normalised inputs held in CSR form only (no dense copy beside it): what
    `normalised_inputs` gives for sparse inputs. The kernels take ``placeholder`` (x with no
    rows: they then gather dense rows from the CSR form, the same values); `dense` (and
    ``numpy.asarray``) builds the whole array for whatever needs one."""

    ndim = 2

    def __init__(self, csr: Csr, shape: tuple[int, int], dtype: Any) -> None:
        self.csr = csr
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.placeholder = np.empty((0, shape[1]), self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """The bytes the CSR form holds."""
        return self.csr.indptr.nbytes + self.csr.indices.nbytes + self.csr.values.nbytes

    def dense(self) -> np.ndarray:
        """The normalised inputs as one (rows, columns) array."""
        out = np.zeros(self.shape, self.dtype)
        rows = np.repeat(np.arange(len(self)), np.diff(self.csr.indptr))
        out[rows, self.csr.indices] = self.csr.values
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.dense() if dtype is None else self.dense().astype(dtype)


def kernel_inputs(x: Any) -> Any:
    """The array a kernel takes for x: a `CsrRows`' placeholder, else x itself."""
    return x.placeholder if isinstance(x, CsrRows) else x


def normalised_inputs(sparse: Any, x: np.ndarray, normalizer: Normalizer, dtype: Any,
                      what: str, workspace: Workspace) -> np.ndarray | CsrRows:
    """x normalised into ``dtype`` a block of rows at a time (`Normalizer.blocks`): the
    `CsrRows` of its CSR form when the sparse path would take it (no dense copy is made),
    else the dense array, the density attached in ``workspace`` either way."""
    options = workspace.options
    mode = options.get("sparse_mode", "auto")
    dtype = np.dtype(dtype)
    threshold = options.get("sparse_threshold", 0.35)
    counts = np.zeros(len(x), np.int64)
    if mode == "0" or dtype not in (np.float32, np.float64) or x.size == 0:
        return _dense_inputs(x, normalizer, dtype, what, workspace, None)
    found, certainly_dense = 0, threshold * x.size
    for rows, block in normalizer.blocks(x, dtype, what):
        found += int(sparse.count_nonzeros(block, counts[rows]))
        if mode != "1" and found >= certainly_dense:  # dense, whatever the other rows hold
            return _dense_inputs(x, normalizer, dtype, what, workspace, None)
    density = found / x.size
    if mode != "1" and not density < threshold:
        return _dense_inputs(x, normalizer, dtype, what, workspace, density)
    indptr, indices, values = _csr_arrays(counts, dtype)
    for rows, block in normalizer.blocks(x, dtype, what):
        sparse.fill_csr(block, indptr[rows.start:rows.stop + 1], indices, values)
    inputs = CsrRows(Csr(True, indptr, indices, values), x.shape, dtype)
    workspace.attach(inputs, (density, inputs.csr))
    return inputs


def _dense_inputs(x: np.ndarray, normalizer: Normalizer, dtype: Any, what: str,
                  workspace: Workspace, density: float | None) -> np.ndarray:
    """x normalised into one array; its density attached when it was measured."""
    check_memory(x.size * np.dtype(dtype).itemsize,
                 f"{what} normalised to {np.dtype(dtype).name}", DataError,
                 "train on fewer rows, or free memory")
    dense = normalizer.transform_to(x, dtype, what)
    if density is not None:
        workspace.attach(dense, (density, None))
    return dense


def _csr_arrays(counts: np.ndarray, dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr filled from each row's nonzero ``counts``, indices, values) of a CSR form;
    `DataError` first when the machine has not the memory for it."""
    nonzeros = int(counts.sum())
    check_memory(nonzeros * (4 + np.dtype(dtype).itemsize) + 8 * len(counts),
                 f"the sparse form of {len(counts):,} input rows ({nonzeros:,} nonzeros)",
                 DataError, "train on fewer rows, or free memory")
    indptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, np.empty(nonzeros, np.int32), np.empty(nonzeros, dtype)


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
    indptr, indices, values = _csr_arrays(counts, x.dtype)
    sparse.fill_csr(x, indptr, indices, values)
    workspace.attach(x, (density, Csr(True, indptr, indices, values)))


def first_layer(x: np.ndarray | CsrRows, w1: np.ndarray, what: str, workspace: Workspace,
                sparse_allowed: bool = True) -> Csr:
    """The `Csr` record for a kernel (counted in the workspace's counters as ``what``_sparse
    or ``what``_dense): x's CSR form when the run prepared one, ``sparse_allowed`` and W1 is
    finite, else the dense path's (for a `CsrRows`: its arrays marked dense, which the
    kernels gather dense rows from; else dummies)."""
    prepared = workspace.prepared(x)
    csr = None if prepared is None or not sparse_allowed else prepared[1]
    if csr is not None and not np.isfinite(w1).all():
        csr = None  # 0 * inf is NaN in the dense product: keep it
    workspace.count(f"{what}_{'dense' if csr is None else 'sparse'}")
    if csr is not None:
        return csr
    if isinstance(x, CsrRows):
        return x.csr._replace(sparse=False)
    return dense_csr(x.dtype)
