"""The NumPy backend: the reference ops with ``xp = numpy``. A data set whose normalised copy
would take more than `DENSE_BYTES` is kept raw and normalised a batch or an evaluation block at
a time (`NormalisedRows`); a smaller one is normalised once into one array."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy

from .base import Ops
from .normalised_rows import BLOCK_ROWS, NormalisedRows
from .workspace import Workspace

if TYPE_CHECKING:
    from ..plan import Plan
    from ..preprocessing import Normalizer

Array = Any

#: the largest normalised copy of a data set the numpy backend makes (256 MiB); a larger set
#: stays raw (`NormalisedRows`). A whole set's first-layer product is then made a block of rows
#: at a time: each block's rows equal the whole product's to rounding (NumPy's BLAS may pick
#: another kernel for a block's shape than for the whole set's), not always bit for bit.
DENSE_BYTES = 256 * 2**20


class NumpyOps(Ops):
    """Reference ops on NumPy arrays."""

    name = "numpy"
    xp = numpy

    def inputs(self, x: Any, normalizer: Normalizer, dtype: str, what: str,
               workspace: Workspace | None) -> Any:
        """One normalised array, or for a set whose copy would be larger than `DENSE_BYTES`
        the raw rows with their normalisation (`NormalisedRows`: no copy), every row checked
        once now, as the copy would be."""
        if self.inputs_bytes_of(x.shape, dtype) <= DENSE_BYTES:
            return super().inputs(x, normalizer, dtype, what, workspace)
        rows = NormalisedRows(x, normalizer, dtype, what)
        if what is not None:
            rows.check()
        return rows

    @staticmethod
    def inputs_bytes_of(shape: tuple[int, ...], dtype: Any) -> int:
        """The bytes of a normalised copy of a set of this shape in ``dtype``."""
        return int(numpy.prod(shape)) * numpy.dtype(dtype).itemsize

    def dense_inputs(self, x: Any) -> Any:
        """A `NormalisedRows` as one normalised array (made for the call); x otherwise."""
        return x.dense() if isinstance(x, NormalisedRows) else x

    def inputs_bytes(self, plan: Plan, rows: int) -> int:
        """The normalised copy, when it is made (at most `DENSE_BYTES`); a larger set's raw
        rows are the caller's: nothing more is held for them."""
        size = self.inputs_bytes_of((rows, plan.sizes[0]), plan.dtype)
        return size if size <= DENSE_BYTES else 0

    def evaluation_bytes(self, plan: Plan, rows: int) -> int:
        """The reference's layers of the whole set, and for a set kept raw one block of
        normalised inputs (in float64, then the dtype) for the first layer's product."""
        layers = super().evaluation_bytes(plan, rows)
        if self.inputs_bytes(plan, rows) or not rows:
            return layers
        return layers + min(rows, 2 * BLOCK_ROWS) * plan.sizes[0] * (8 + plan.itemsize)

    def input_affine(self, x: Any, multiplier: Any, w: Array, b: Array) -> Array:
        """The first layer's u of a whole set: of a `NormalisedRows` a block of rows at a time
        (each block's rows normalised, masked and multiplied), else in one product."""
        if not isinstance(x, NormalisedRows):
            return super().input_affine(x, multiplier, w, b)
        u = numpy.empty((len(x), w.shape[1]), numpy.result_type(x.dtype, w.dtype))
        for rows, block in x.blocks():
            u[rows] = self.affine(self.apply_mask(block, multiplier), w, b)
        return u
