"""`fastnn predict`'s reading and writing: inputs from an IDX, .npy or CSV file, and one line of
predictions per row (labels, regression values or class probabilities)."""

from __future__ import annotations

import csv
import io
import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import read_idx
from .errors import DataError
from .fileio import os_reason

#: the input formats, by how a file's name ends (anything else: by its first bytes)
FORMATS = ("IDX (raw or .gz)", ".npy", ".csv")


def read_inputs(path: str | Path) -> np.ndarray:
    """The rows of an input file: an IDX file of images (raw or gzip), a NumPy ``.npy`` array
    (N, ...) of numbers, or a CSV file of numbers, one row per line (a first line that is
    not numbers is taken as a header); `DataError` naming the file otherwise."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: no such input file") from None
    except OSError as exc:  # a loop of links, a component that is not a folder, ...
        raise DataError(f"{path}: cannot be read ({os_reason(exc)})") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a folder; give an input file ({', '.join(FORMATS)})")
    name = path.name.lower()
    if name.endswith(".npy"):
        return _read_npy(path)
    if name.endswith((".csv", ".txt")):
        return _read_csv(path)
    try:
        array = read_idx(path)
    except DataError as exc:
        raise DataError(f"{exc} (inputs: an IDX images file, raw or .gz; a .npy array; or a "
                        ".csv file)") from None
    return array.reshape(len(array), -1) if array.ndim > 1 else array.reshape(-1, 1)


def check_width(path: str | Path, x: np.ndarray, model: Any) -> None:
    """A `DataError` naming input file ``path`` when its rows do not have the model's width."""
    width = model.network.sizes[0]
    if x.shape[1] != width:
        raise DataError(f"{path}: rows of {x.shape[1]} value{'s' * (x.shape[1] != 1)}; the "
                        f"model takes rows of {width} (as its training data had)")


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray) or array.ndim < 1 or array.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected an array of real numbers, one row per input; got "
                        f"{getattr(array, 'dtype', type(array).__name__)}")
    return array.reshape(len(array), -1) if array.ndim > 1 else array.reshape(-1, 1)


def _read_csv(path: Path) -> np.ndarray:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as text ({exc})") from None
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if rows and not _numeric(rows[0]):
        rows = rows[1:]  # a header
    if not rows:
        raise DataError(f"{path}: no rows of numbers")
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        raise DataError(f"{path}: rows of {sorted(widths)} values; every row needs the same")
    try:
        return np.array([[float(cell) for cell in row] for row in rows])
    except ValueError as exc:
        raise DataError(f"{path}: not a number ({exc})") from None


def _numeric(row: list[str]) -> bool:
    try:
        for cell in row:
            float(cell)
    except ValueError:
        return False
    return True


def prediction_lines(model: Any, x: np.ndarray, proba: bool) -> list[str]:
    """One line per row: its label (a classifier), its values (a regression, comma
    separated), or with ``proba`` a classifier's probabilities (comma separated)."""
    if proba:
        return [",".join(_number(v) for v in row) for row in model.predict_proba(x)]
    predicted = model.predict(x)
    if predicted.ndim == 2:
        return [",".join(_number(v) for v in row) for row in predicted]
    return [str(value.item() if isinstance(value, np.generic) else value) for value in predicted]


def _number(value: Any) -> str:
    """A float with the digits its own precision needs (float32: about 8), "nan" and "inf"
    as such."""
    if not math.isfinite(float(value)):
        return str(float(value))
    return str(value) if isinstance(value, np.floating) else repr(float(value))
