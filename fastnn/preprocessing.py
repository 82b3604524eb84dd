"""Input normalisation fitted on the training set, and target encoding (host NumPy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError

STAT_FLOOR = 1e-7


@dataclass
class Normalizer:
    """min_max: (x - min) / max(max - min, 1e-7); z_score: (x - mean) / max(std, 1e-7)."""

    method: str = "min_max"
    axis: int | None = None
    shift: Any = 0.0
    scale: Any = 1.0

    def fit(self, x: np.ndarray) -> Normalizer:
        """Fit the statistics on (training) inputs, in float64."""
        x = np.asarray(x, dtype=np.float64)
        if self.method == "min_max":
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

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Apply the fitted statistics (float64)."""
        return (np.asarray(x, dtype=np.float64) - self.shift) / self.scale


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
