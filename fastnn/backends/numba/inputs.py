"""Sparse inputs: a run's CSR form of x (built once, kept in its workspace) and the choice,
call by call, between the sparse and the dense first layer.

When a run's input matrix is mostly exact zeros (MNIST after min-max scaling: ~81%), the first
layer's product and weight gradient skip the zeros. Results match the dense path to rounding;
a step whose W1 (or first-layer gradient) is not finite runs densely, so inf/NaN propagate as
there.

A fit's sets are normalised straight into that form (`normalised_inputs`, a block of rows at a
time) and kept as a `CsrRows`, with no dense copy beside it: a dense step or evaluation gathers
its rows from the CSR form. uint8 inputs keep a byte per nonzero (its raw value) and a table
of each byte's normalised value per column: the very values a dense copy would hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ...errors import DataError
from ...memory import check_memory, memory_advice
from ...preprocessing import Normalizer, row_chunks
from ..workspace import Workspace
from .fit import same_float_arrays
from .kernels.common import Csr

#: the codes of a `Csr` that holds its values (no compact form)
NO_CODES = np.zeros(0, np.uint8)


def no_table(dtype: Any) -> np.ndarray:
    """The table of a `Csr` that holds its values (one column: not the compact form)."""
    return np.zeros((1, 1), dtype)


def dense_csr(dtype: Any) -> Csr:
    """The `Csr` record of the dense path (dummy arrays)."""
    return Csr(False, np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, dtype),
               NO_CODES, no_table(dtype))


def csr_values(csr: Csr, low: int = 0, high: int | None = None) -> np.ndarray:
    """The values of a `Csr`'s entries low..high-1 (all by default; decoded from the compact
    form)."""
    entries = slice(low, csr.indices.size if high is None else high)
    table = csr.table
    if table.shape[1] == 1:
        return csr.values[entries]
    return table[csr.indices[entries] if table.shape[0] > 1 else 0, csr.codes[entries]]


def code_table(normalizer: Normalizer, dtype: Any, columns: int) -> np.ndarray:
    """The compact form's table: row j, column c is byte c normalised as column j's inputs
    (`Normalizer.transform`, then cast: the very values of a normalised uint8 input); one row
    when every column is normalised alike."""
    per_column = np.ndim(normalizer.shift) > 0 or np.ndim(normalizer.scale) > 0
    codes = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None],
                            (256, columns if per_column else 1))
    with np.errstate(all="ignore"):  # a byte no input holds may normalise to anything
        return np.ascontiguousarray(normalizer.transform(codes).astype(dtype).T)


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
        return sum(array.nbytes for array in self.csr[1:])

    def dense(self) -> np.ndarray:
        """The normalised inputs as one (rows, columns) array (`DataError` first when the
        machine has not the memory for it)."""
        check_memory(self.shape[0] * self.shape[1] * self.dtype.itemsize
                     + 16 * self.csr.indices.size,  # the row of each entry, its value
                     f"the dense array of {self.shape[0]:,} normalised input rows", DataError,
                     memory_advice(self.dtype.name))
        out = np.zeros(self.shape, self.dtype)
        rows = np.repeat(np.arange(len(self)), np.diff(self.csr.indptr))
        out[rows, self.csr.indices] = csr_values(self.csr)
        return out

    def __getitem__(self, index: Any) -> np.ndarray:
        """Rows (an index, a slice or an array of them) as a dense array."""
        selected = np.arange(len(self))[index]
        out = np.zeros((*np.shape(selected), self.shape[1]), self.dtype)
        for place, row in np.ndenumerate(selected):
            low, high = self.csr.indptr[row], self.csr.indptr[row + 1]
            out[(*place, self.csr.indices[low:high])] = csr_values(self.csr, low, high)
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a CsrRows holds no dense array to share: it is made anew")
        return self.dense() if dtype is None else self.dense().astype(dtype)


def kernel_inputs(x: Any) -> Any:
    """The array a kernel takes for x: a `CsrRows`' placeholder, else x itself."""
    return x.placeholder if isinstance(x, CsrRows) else x


def takes_sparse(mode: str, density: float, threshold: float) -> bool:
    """Whether inputs of this nonzero ``density`` take the sparse path: always with
    ``sparse_mode`` "1", else (auto) below the threshold."""
    return mode == "1" or density < threshold


def normalised_inputs(sparse: Any, x: np.ndarray, normalizer: Normalizer, dtype: Any,
                      what: str, workspace: Workspace) -> np.ndarray | CsrRows:
    """x normalised into ``dtype`` a block of rows at a time: the `CsrRows` of its CSR form
    when the sparse path would take it (no dense copy is made; uint8 inputs in the compact
    form, a byte per value, decoded through `code_table`), else the dense array, the density
    attached in ``workspace`` either way."""
    options = workspace.options
    mode = options.get("sparse_mode", "auto")
    dtype = np.dtype(dtype)
    threshold = options.get("sparse_threshold", 0.35)
    if mode == "0" or dtype not in (np.float32, np.float64) or x.size == 0:
        return _dense_inputs(x, normalizer, dtype, what, workspace, None)
    table = code_table(normalizer, dtype, x.shape[1]) if x.dtype == np.uint8 else None

    def blocks() -> Iterator[tuple[slice, np.ndarray]]:
        """The blocks of rows the kernels read: normalised, or (uint8) the raw bytes, which
        normalise to finite values: nothing to check."""
        if table is None:
            yield from normalizer.blocks(x, dtype, what)
        else:
            for rows in row_chunks(x):
                yield rows, np.ascontiguousarray(x[rows])

    counts = np.zeros(len(x), np.int64)
    found, certainly_dense = 0, threshold * x.size
    for rows, block in blocks():
        found += int(sparse.count_nonzeros(block, counts[rows]) if table is None
                     else sparse.count_nonzero_codes(block, table, counts[rows]))
        if mode != "1" and found >= certainly_dense:  # dense, whatever the other rows hold
            return _dense_inputs(x, normalizer, dtype, what, workspace, None)
    density = found / x.size
    if not takes_sparse(mode, density, threshold):
        return _dense_inputs(x, normalizer, dtype, what, workspace, density)
    # each entry's value in the dtype, or (uint8) its byte
    indptr, indices, entries = _csr_arrays(counts, dtype, dtype if table is None else np.uint8)
    for rows, block in blocks():
        if table is None:
            sparse.fill_csr(block, indptr[rows.start:rows.stop + 1], indices, entries)
        else:
            sparse.fill_csr_codes(block, table, indptr[rows.start:rows.stop + 1], indices,
                                  entries)
    csr = (Csr(True, indptr, indices, entries, NO_CODES, no_table(dtype)) if table is None
           else Csr(True, indptr, indices, np.zeros(0, dtype), entries, table))
    inputs = CsrRows(csr, x.shape, dtype)
    workspace.attach(inputs, (density, csr))
    return inputs


def _dense_inputs(x: np.ndarray, normalizer: Normalizer, dtype: Any, what: str,
                  workspace: Workspace, density: float | None) -> np.ndarray:
    """x normalised into one array; its density attached when it was measured."""
    check_memory(x.size * np.dtype(dtype).itemsize,
                 f"{what} normalised to {np.dtype(dtype).name}", DataError,
                 memory_advice(np.dtype(dtype).name))
    dense = normalizer.transform_to(x, dtype, what)
    if density is not None:
        workspace.attach(dense, (density, None))
    return dense


def _csr_arrays(counts: np.ndarray, dtype: Any, value_dtype: Any
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr filled from each row's nonzero ``counts``, indices, values of
    ``value_dtype``: the run's dtype, or uint8 codes) of a CSR form; `DataError` first when
    the machine has not the memory for it."""
    nonzeros = int(counts.sum())
    check_memory(nonzeros * (4 + np.dtype(value_dtype).itemsize) + 8 * len(counts),
                 f"the sparse form of {len(counts):,} input rows ({nonzeros:,} nonzeros)",
                 DataError, memory_advice(np.dtype(dtype).name))
    indptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, np.empty(nonzeros, np.int32), np.empty(nonzeros, value_dtype)


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
    if not takes_sparse(mode, density, options.get("sparse_threshold", 0.35)):
        workspace.attach(x, (density, None))
        return
    indptr, indices, values = _csr_arrays(counts, x.dtype, x.dtype)
    sparse.fill_csr(x, indptr, indices, values)
    workspace.attach(x, (density, Csr(True, indptr, indices, values, NO_CODES,
                                      no_table(x.dtype))))


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
