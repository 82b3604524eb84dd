"""Per-epoch callbacks of `Trainer.fit`: see each epoch's figures, log them, or stop the run.

A callback is any callable taking an `EpochMetrics` (or an object with such an
``on_epoch(metrics)`` method); returning True stops the run after that epoch (the history says
``stopped_by_callback_at``). It is called after the initial evaluation (epoch 0) and after
every trained epoch, in order, from the thread that called ``fit``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from .tracking import MLflowLogger, TensorBoardLogger  # noqa: F401 - callbacks of fit too

FIELDS = ("epoch", "train_acc", "train_loss", "test_acc", "test_loss", "val_acc", "val_loss",
          "seconds")


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's figures (None where the run has no such set); losses include the penalty."""

    epoch: int
    train_acc: float
    train_loss: float
    test_acc: float | None
    test_loss: float | None
    val_acc: float | None
    val_loss: float | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """Plain values, non-finite numbers as None (JSON has no NaN)."""
        return {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in asdict(self).items()
        }


class Callback(Protocol):
    def __call__(self, metrics: EpochMetrics) -> bool | None: ...


def call(callback: Any, metrics: EpochMetrics) -> bool:
    """Run one callback; True when it asks the run to stop."""
    method = getattr(callback, "on_epoch", None)
    result = method(metrics) if method is not None else callback(metrics)
    return result is True


class _FileLogger:
    """Writes one record per epoch to a file, flushed as it goes (a crash loses nothing
    written). A run that starts at epoch 0 replaces the file; a resumed one appends to it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle: IO[str] | None = None

    def _open(self, epoch: int) -> IO[str]:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = epoch == 0 or not self.path.exists()
            self._handle = open(self.path, "w" if fresh else "a", newline="", encoding="utf-8")
            if fresh:
                self._start(self._handle)
        return self._handle

    def _start(self, handle: IO[str]) -> None:
        """Write whatever opens a fresh file."""

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __del__(self) -> None:
        self.close()


class CsvLogger(_FileLogger):
    """A CSV file with a header and one row per epoch (empty cells where a set is absent)."""

    def _start(self, handle: IO[str]) -> None:
        csv.writer(handle).writerow(FIELDS)

    def on_epoch(self, metrics: EpochMetrics) -> None:
        handle = self._open(metrics.epoch)
        values = metrics.as_dict()
        csv.writer(handle).writerow(["" if values[key] is None else values[key] for key in FIELDS])
        handle.flush()


class JsonLinesLogger(_FileLogger):
    """A JSON-lines file: one object per epoch (null where a set is absent)."""

    def on_epoch(self, metrics: EpochMetrics) -> None:
        handle = self._open(metrics.epoch)
        handle.write(json.dumps(metrics.as_dict()) + "\n")
        handle.flush()
