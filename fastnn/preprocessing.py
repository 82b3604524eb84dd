"""Input normalisation fitted on the training set, and target encoding (host NumPy)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError

STAT_FLOOR = 1e-7
#: values normalised, checked or summed at a time (whole rows of them): bounds the float64
#: temporaries of a large set to a few MB
CHUNK_VALUES = 1 << 20


#: a column's spread below this share of its size counts as constant ("standard")
CONSTANT_SPREAD = 1e-10
#: a column whose mean and standard deviation are within this of 0 and 1 is left as it is
ALREADY_STANDARD = 1e-8


@dataclass
class Normalizer:
    """min_max: (x - min) / max(max - min, 1e-7); z_score: (x - mean) / max(std, 1e-7) (over
    all inputs, or per column with axis 0); standard: per column (x - mean) / std, where a
    constant column keeps scale 1 and a column already standardised (mean 0 and std 1 to
    within 1e-8, a StandardScaler's output) is left exactly as it is."""

    method: str = "min_max"
    axis: int | None = None
    shift: Any = 0.0
    scale: Any = 1.0

    def fit(self, x: np.ndarray, what: str = "the data") -> Normalizer:
        """Fit the statistics on (training) inputs, in float64; `DataError` (naming ``what``
        and, per column, the column) when a shift or scale is not finite: values whose range
        or spread overflows float64 would otherwise all become 0 or NaN."""
        if self.axis not in (None, 0):
            raise ValueError(f"Normalizer axis must be None (all inputs) or 0 (per column); "
                             f"got {self.axis!r}")
        x = np.asarray(x)
        with np.errstate(over="ignore", invalid="ignore"):
            if self.method == "standard":
                self.shift, self.scale = standard_statistics(x, what)
            elif self.method == "min_max":  # exact in x's own type: float64 keeps the order
                low = np.asarray(x.min(axis=self.axis), np.float64)
                high = np.asarray(x.max(axis=self.axis), np.float64)
                self.shift, self.scale = low, np.maximum(high - low, STAT_FLOOR)
            elif self.method == "z_score":
                if self.axis == 0:
                    mean, std = column_moments(x)
                else:  # NumPy's pairwise sum over all values: the whole set in float64
                    whole = np.asarray(x, dtype=np.float64)
                    mean, std = whole.mean(), whole.std()
                self.shift, self.scale = mean, np.maximum(std, STAT_FLOOR)
            else:
                self.shift, self.scale = 0.0, 1.0
        require_finite_statistics(self.shift, self.scale, self.method, what)
        return self

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Undo `transform` (a regressor's scaled outputs back in the target's units)."""
        return np.asarray(y, dtype=np.float64) * self.scale + self.shift

    def transform(self, x: np.ndarray, what: str | None = None, first_row: int = 0
                  ) -> np.ndarray:
        """Apply the fitted statistics (float64); with ``what`` (e.g. "x_test"), `DataError`
        if a normalised value overflows float64 (rows far outside the training range; the
        row named counts from ``first_row``)."""
        if what is None:
            return (np.asarray(x, dtype=np.float64) - self.shift) / self.scale
        with np.errstate(over="ignore", invalid="ignore"):
            out = (np.asarray(x, dtype=np.float64) - self.shift) / self.scale
        finite = np.isfinite(out)
        if not np.all(finite):
            row = first_row + int(np.flatnonzero(~finite.reshape(len(out), -1).all(axis=1))[0])
            raise DataError(f"{what}: inputs too large to normalise ({self.method}): row {row} "
                            "overflows float64 with the training set's statistics")
        return out

    def transform_to(self, x: np.ndarray, dtype: Any, what: str | None = None) -> np.ndarray:
        """`transform` into a new array of ``dtype``, a block of rows at a time: the same
        values as casting the float64 result, without a float64 copy of the whole set."""
        out = np.empty(x.shape, dtype)
        for rows in row_chunks(x):
            out[rows] = self.transform(x[rows], what, rows.start)
        return out

    def blocks(self, x: np.ndarray, dtype: Any, what: str | None = None
               ) -> Iterator[tuple[slice, np.ndarray]]:
        """(rows, those rows normalised into ``dtype``) a block at a time, in order: the
        values of `transform_to`, one block in memory at a time."""
        for rows in row_chunks(x):
            yield rows, self.transform(x[rows], what, rows.start).astype(dtype)


def row_chunks(x: np.ndarray) -> list[slice]:
    """The slices of x's rows, in order, about `CHUNK_VALUES` values (at least a row) each."""
    n = len(x)
    size = max(1, CHUNK_VALUES // max(1, x[:1].size))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _sum_rows(chunks: Any, width: int) -> np.ndarray:
    """The float64 sum over the rows of every chunk, added row after row in order: NumPy's
    axis-0 sum of the whole stacked array, bit for bit, one chunk in memory at a time."""
    total = None
    for chunk in chunks:
        total = (np.add.reduce(chunk, axis=0) if total is None
                 else np.add.reduce(np.vstack([total[None], chunk]), axis=0))
    return np.zeros(width) if total is None else total


def column_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's mean and (population) standard deviation in float64, equal to
    ``x.astype(float64).mean(axis=0)`` and ``.std(axis=0)`` without that copy of x.

    NumPy sums a row-major array row after row (done here a block of rows at a time) and the
    columns of a column-major one (a pandas frame's values) each pairwise (done here a column
    at a time, one column in float64)."""
    n, width = len(x), x.shape[1]
    if width == 1 or abs(x.strides[0]) < abs(x.strides[1]):
        means, stds = np.empty(width), np.empty(width)
        for j in range(width):
            column = np.asarray(x[:, j], np.float64)
            means[j] = np.add.reduce(column) / n
            deviation = column - means[j]
            stds[j] = np.sqrt(np.add.reduce(np.multiply(deviation, deviation, out=deviation)) / n)
        return means, stds
    chunks = row_chunks(x)
    mean = _sum_rows((np.asarray(x[rows], np.float64) for rows in chunks), width) / n

    def squares() -> Any:
        for rows in chunks:
            deviation = np.asarray(x[rows], np.float64) - mean
            yield np.multiply(deviation, deviation, out=deviation)

    return mean, np.sqrt(_sum_rows(squares(), width) / n)


def standard_statistics(x: np.ndarray, what: str = "the data") -> tuple[np.ndarray, np.ndarray]:
    """Per-column (shift, scale) of "standard": mean and standard deviation; a constant
    column's scale is 1 (its values become 0, and later rows that vary are not blown up), and
    an already standardised column's shift and scale are exactly 0 and 1. `DataError` naming
    the first column whose mean or spread is not finite in float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = column_moments(x) if len(x) else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
    require_finite_statistics(mean, std, "standard", what, positive=False)  # std 0: scale 1
    constant = std <= CONSTANT_SPREAD * np.maximum(np.abs(mean), 1.0)
    standard = (np.abs(mean) <= ALREADY_STANDARD) & (np.abs(std - 1.0) <= ALREADY_STANDARD)
    shift = np.where(standard, 0.0, mean)
    scale = np.where(standard | constant, 1.0, std)
    return shift, scale


def require_finite_statistics(
    shift: Any, scale: Any, method: str, what: str, positive: bool = True
) -> None:
    """`DataError` unless every shift is finite and every scale finite (and > 0 when
    ``positive``); per column, the message names the first bad column."""
    shift, scale = np.asarray(shift, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    usable = np.isfinite(scale) & (scale > 0) if positive else np.isfinite(scale)
    for name, values, bad in (("shift", shift, ~np.isfinite(shift)), ("scale", scale, ~usable)):
        if np.any(bad):
            where = f"column {int(np.flatnonzero(bad.ravel())[0])}'s" if values.ndim else "the"
            found = values.ravel()[np.flatnonzero(bad.ravel())[0]]
            raise DataError(
                f"{what}: cannot normalise ({method}): {where} {name} is {found:g}, not a "
                "finite number in float64 (values too large? rescale them first)"
            )


def labels_and_one_hot(
    t: Any, n_outputs: int, what: str, output: str = "softmax_cross_entropy",
    dtype: Any = np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """(integer labels, one-hot rows) from either integer labels or one-hot rows, checked.

    Targets must be real and finite; integer labels in 0..n_outputs-1; one-hot rows (a
    classifier, ``output`` softmax_cross_entropy) one 1 and zeros otherwise. A regression
    (``output`` identity_mse) takes any finite real (N, n_outputs) rows as they are. The
    one-hot rows of integer labels are made in ``dtype`` (exact: zeros and ones); given rows
    stay float64."""
    t = _dense(t, what)
    if np.iscomplexobj(t):
        raise DataError(f"{what}: complex values; give real numbers")
    if not (np.issubdtype(t.dtype, np.number) or t.dtype == np.bool_):
        raise DataError(
            f"{what}: numeric targets expected (integer labels 0..{n_outputs - 1} or one-hot "
            f"rows); got dtype {t.dtype} (encode string labels as integers first)"
        )
    if t.ndim == 1:
        _require_finite(t, what)
        if t.size and (not np.issubdtype(t.dtype, np.integer) and not np.all(t == np.round(t))):
            raise DataError(f"{what}: integer labels expected; got non-integer values")
        if t.size and (t.min() < 0 or t.max() >= n_outputs):  # in t's own type: no wrap
            low, high = (v.item() if isinstance(v, np.generic) else v for v in (t.min(), t.max()))
            raise DataError(f"{what}: labels must be in 0..{n_outputs - 1}; got {low}..{high}")
        labels = t.astype(np.int64)
        one_hot = np.zeros((labels.size, n_outputs), dtype)
        one_hot[np.arange(labels.size), labels] = 1.0
        return labels, one_hot
    if t.ndim == 2 and t.shape[1] == n_outputs:
        one_hot = t.astype(np.float64)
        _require_finite(one_hot, what)
        if output != "identity_mse":
            _require_one_hot(one_hot, what)
        return one_hot.argmax(axis=1), one_hot
    raise DataError(
        f"{what}: expected integer labels (N,) or one-hot (N, {n_outputs}); got shape {t.shape}"
    )


def _require_finite(values: np.ndarray, what: str) -> None:
    """`DataError` saying how many values are NaN or infinite, and the first one's row."""
    finite = np.isfinite(values)
    if not np.all(finite):
        bad = np.flatnonzero(~finite.reshape(len(values), -1).all(axis=1))
        count = int(finite.size - np.count_nonzero(finite))
        raise DataError(f"{what}: {count} value{'s are' if count != 1 else ' is'} NaN or "
                        f"infinite (first at row {bad[0]})")


def _require_one_hot(rows: np.ndarray, what: str) -> None:
    """`DataError` naming the first row that is not one 1 and zeros otherwise."""
    binary = (rows == 0.0) | (rows == 1.0)
    ones = np.count_nonzero(rows == 1.0, axis=1)
    bad = np.flatnonzero(~binary.all(axis=1) | (ones != 1))
    if bad.size == 0:
        return
    row = int(bad[0])
    if not binary[row].all():
        found = f"holds {rows[row][~binary[row]][0]:g}"
    else:
        found = "holds no 1" if ones[row] == 0 else f"holds {ones[row]} ones"
    others = f" ({bad.size} such rows)" if bad.size > 1 else ""
    raise DataError(f"{what}: one-hot rows must hold one 1 and zeros otherwise; row {row} "
                    f"{found}{others}")


def _dense(values: Any, what: str) -> np.ndarray:
    """``values`` as a NumPy array; `DataError` for a sparse matrix or rows of different
    lengths (which NumPy would make an object array, or refuse with its own message)."""
    if hasattr(values, "toarray") and hasattr(values, "nnz"):  # scipy.sparse
        raise DataError(f"{what}: a sparse matrix ({type(values).__name__}); fastnn trains "
                        f"dense arrays: pass {what}.toarray() (the numba backend skips the "
                        "zeros of dense inputs by itself)")
    try:
        array = np.asarray(values)
    except ValueError as exc:  # ragged rows, NumPy >= 1.24
        raise DataError(f"{what}: rows of different lengths, or not an array ({exc})") from None
    if array.dtype == object:
        raise DataError(f"{what}: not an array of numbers (rows of different lengths, or "
                        f"objects); got {type(values).__name__}")
    return array


def as_inputs(x: Any, n_inputs: int, what: str) -> np.ndarray:
    """Inputs as a 2-D array (N, n_inputs) of real, finite numbers in their own dtype (the
    caller's array itself where it is one: nothing here copies the set); images are
    flattened."""
    x = _dense(x, what)
    if x.ndim > 2:
        x = x.reshape(x.shape[0], -1)
    if x.ndim != 2 or x.shape[1] != n_inputs:
        raise DataError(f"{what}: expected shape (N, {n_inputs}); got {x.shape}")
    if np.iscomplexobj(x):
        raise DataError(f"{what}: complex values; give real numbers")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{what}: numeric inputs expected; got dtype {x.dtype}")
    if x.dtype.kind == "f":  # integers are finite; floats are checked a block at a time
        for rows in row_chunks(x):
            if not np.isfinite(x[rows]).all():
                _require_finite(x, what)
    return x
