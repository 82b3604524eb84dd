"""Input normalisation fitted on the training set, and target encoding (host NumPy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError

STAT_FLOOR = 1e-7


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

    def fit(self, x: np.ndarray) -> Normalizer:
        """Fit the statistics on (training) inputs, in float64."""
        x = np.asarray(x, dtype=np.float64)
        if self.method == "standard":
            self.shift, self.scale = standard_statistics(x)
        elif self.method == "min_max":
            low, high = x.min(axis=self.axis), x.max(axis=self.axis)
            self.shift, self.scale = low, np.maximum(high - low, STAT_FLOOR)
        elif self.method == "z_score":
            self.shift, self.scale = (
                x.mean(axis=self.axis),
                np.maximum(x.std(axis=self.axis), STAT_FLOOR),
            )
        else:
            self.shift, self.scale = 0.0, 1.0
        return self

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Undo `transform` (a regressor's scaled outputs back in the target's units)."""
        return np.asarray(y, dtype=np.float64) * self.scale + self.shift

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Apply the fitted statistics (float64)."""
        return (np.asarray(x, dtype=np.float64) - self.shift) / self.scale


def standard_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (shift, scale) of "standard": mean and standard deviation; a constant
    column's scale is 1 (its values become 0, and later rows that vary are not blown up), and
    an already standardised column's shift and scale are exactly 0 and 1."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
        std = x.std(axis=0) if len(x) else np.ones(x.shape[1])
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise DataError("inputs too large to standardise: a column's mean or spread is not "
                        "finite in float64")
    constant = std <= CONSTANT_SPREAD * np.maximum(np.abs(mean), 1.0)
    standard = (np.abs(mean) <= ALREADY_STANDARD) & (np.abs(std - 1.0) <= ALREADY_STANDARD)
    shift = np.where(standard, 0.0, mean)
    scale = np.where(standard | constant, 1.0, std)
    return shift, scale


def labels_and_one_hot(t: Any, n_outputs: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(integer labels, float64 one-hot) from either integer labels or one-hot rows."""
    t = np.asarray(t)
    if not (np.issubdtype(t.dtype, np.number) or t.dtype == np.bool_):
        raise DataError(
            f"{what}: numeric targets expected (integer labels 0..{n_outputs - 1} or one-hot "
            f"rows); got dtype {t.dtype} (encode string labels as integers first)"
        )
    if t.ndim == 1:
        if t.size and (not np.issubdtype(t.dtype, np.integer) and not np.all(t == np.round(t))):
            raise DataError(f"{what}: integer labels expected; got non-integer values")
        labels = t.astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= n_outputs):
            raise DataError(
                f"{what}: labels must be in 0..{n_outputs - 1}; got {labels.min()}..{labels.max()}"
            )
        one_hot = np.zeros((labels.size, n_outputs))
        one_hot[np.arange(labels.size), labels] = 1.0
        return labels, one_hot
    if t.ndim == 2 and t.shape[1] == n_outputs:
        one_hot = t.astype(np.float64)
        return one_hot.argmax(axis=1), one_hot
    raise DataError(
        f"{what}: expected integer labels (N,) or one-hot (N, {n_outputs}); got shape {t.shape}"
    )


def as_inputs(x: Any, n_inputs: int, what: str) -> np.ndarray:
    """Inputs as a 2-D float64 array (N, n_inputs); images are flattened."""
    x = np.asarray(x)
    if x.ndim > 2:
        x = x.reshape(x.shape[0], -1)
    if x.ndim != 2 or x.shape[1] != n_inputs:
        raise DataError(f"{what}: expected shape (N, {n_inputs}); got {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{what}: numeric inputs expected; got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what}: inputs contain NaN or infinity")
    return x
