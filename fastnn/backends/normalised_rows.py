"""`NormalisedRows`: a data set's raw inputs with the normalisation that makes its rows, the
numpy backend's form of `Ops.inputs`: rows are normalised into the run's dtype when a batch or
an evaluation block asks for them, never the whole set at once (no float64 or dtype copy of
the set beside the caller's raw array, which may be a `numpy.memmap`).

The rows are the values `Normalizer.transform_to` gives (the same elementwise arithmetic, cast
once): a batch gathered from it is bit for bit the batch gathered from the whole normalised
array. Evaluations take the first layer's product a block of rows at a time (`blocks`), in
blocks of at least `BLOCK_ROWS` rows (a short last block joins the one before it); a block's
product equals those rows of the whole set's product to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError
from ..memory import check_memory, memory_advice

if TYPE_CHECKING:
    from ..preprocessing import Normalizer

#: the fewest rows of an evaluation block
BLOCK_ROWS = 4096


class NormalisedRows:
    """Raw inputs ``raw`` (rows, columns) and the ``normalizer`` that maps them into
    ``dtype``; ``what`` names the set in errors (None: unchecked)."""

    ndim = 2

    def __init__(self, raw: np.ndarray, normalizer: Normalizer, dtype: Any,
                 what: str | None) -> None:
        self.raw = raw
        self.normalizer = normalizer
        self.dtype = np.dtype(dtype)
        self.what = what
        self.shape: tuple[int, int] = (int(raw.shape[0]), int(raw.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def check(self) -> None:
        """Normalise every row once, a block at a time, keeping nothing: a `DataError` now
        (naming the row) for inputs that overflow, as a whole-set copy would have raised."""
        for _ in self.normalizer.blocks(self.raw, self.dtype, self.what):
            pass

    def __getitem__(self, index: Any) -> np.ndarray:
        """Rows (an index array or a slice) normalised into the dtype."""
        rows = np.asarray(self.raw[index])
        return self.normalizer.transform(rows).astype(self.dtype)

    def blocks(self, size: int = BLOCK_ROWS) -> Iterator[tuple[slice, np.ndarray]]:
        """(rows, those rows normalised) over the whole set in order, blocks of ``size``
        rows or more (the last takes the remainder: a set of fewer than 2 * size rows is one
        block)."""
        n = len(self)
        starts = list(range(0, max(n - size, 0) + 1, size)) if n >= 2 * size else [0]
        for number, start in enumerate(starts):
            stop = n if number == len(starts) - 1 else start + size
            yield slice(start, stop), self[start:stop]

    def dense(self) -> np.ndarray:
        """The whole set normalised as one array (`DataError` first when the machine has not
        the memory for it)."""
        check_memory(self.shape[0] * self.shape[1] * self.dtype.itemsize,
                     f"the normalised array of {self.shape[0]:,} input rows", DataError,
                     memory_advice(self.dtype.name))
        return self.normalizer.transform_to(self.raw, self.dtype, self.what)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a NormalisedRows holds no normalised array to share: it is "
                             "made anew")
        return self.dense() if dtype is None else self.dense().astype(dtype)
