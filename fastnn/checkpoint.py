"""Checkpoints: a run's state after a completed epoch, written atomically, read without pickle.

A checkpoint directory holds ``checkpoint.npz``: the parameters, batch-norm running statistics,
early-stopping state and a JSON header (format version, config, epoch, history). Shuffling and
dropout draw from counter-based streams keyed by (seed, epoch, step), so no generator state is
needed: resuming repeats the interrupted epoch exactly.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .backends.optimizers import STEPS_KEY
from .config import Config
from .errors import CheckpointError, ConfigError
from .fileio import ARCHIVE_ERRORS, os_reason, remove_partial_files, write_atomically
from .history import History
from .train import TrainState

FORMAT = "fastnn-checkpoint"
VERSION = 1
FILENAME = "checkpoint.npz"
BEST_PREFIX = "best__"
#: options that may differ between the checkpointed run and the resumed one
RESUMABLE_CHANGES = ("epochs", "stop_on_divergence")


def save_checkpoint(
    directory: str | Path, config: Config, state: TrainState, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``state`` atomically (temporary file, flush, fsync, rename); return the path.

    ``extra`` (JSON-ready) is stored beside it, e.g. where the data came from.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "epoch": state.epoch,
        "history": state.history.to_dict(),
        "best_val_loss": state.best_val_loss,
        "epochs_without_gain": state.epochs_without_gain,
        "best_train_loss": state.best_train_loss,
        "epochs_without_train_gain": state.epochs_without_train_gain,
        "plateau": state.plateau,
        "extra": {**state.extra, **(extra or {})},
    }
    arrays = dict(state.arrays)
    for name, value in (state.best_arrays or {}).items():
        arrays[BEST_PREFIX + name] = value
    return write_atomically(
        directory / FILENAME,
        lambda handle: np.savez(handle, __header__=np.array(json.dumps(header)), **arrays),
    )


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CheckpointWriter:
    """Writes a run's checkpoints into ``directory`` every ``every`` epochs (and at the last).

    A write that fails (a full disk, a lost mount) does not end the run: it is reported in one
    line on stderr, naming the file and the reason (once, until the reason changes or a write
    succeeds again), the checkpoint already there stays as it was, and the next checkpoint
    tries again.
    """

    def __init__(
        self,
        directory: str | Path,
        config: Config,
        extra: dict[str, Any] | None = None,
        every: int = 1,
        report: Callable[[str], None] = _warn,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILENAME
        self.config = config
        self.extra = extra
        self.every = every
        self.report = report
        #: the epoch of the last checkpoint written by this writer (None: none yet)
        self.saved_epoch: int | None = None
        #: the reason the last write failed (None: it succeeded, or none was tried)
        self.failure: str | None = None
        remove_partial_files(self.path)  # left by a process killed mid-write

    def due(self, epoch: int) -> bool:
        """True when a checkpoint is to be written after ``epoch``."""
        return epoch % self.every == 0 or epoch == self.config.epochs

    def save(self, state: TrainState) -> bool:
        """Write ``state``; False (reported) when the write failed."""
        try:
            save_checkpoint(self.directory, self.config, state, self.extra)
        except OSError as exc:
            reason = os_reason(exc)
            if reason != self.failure:
                self.report(
                    f"warning: could not write checkpoint {self.path} after epoch {state.epoch} "
                    f"({reason}); training goes on and retries at the next checkpoint"
                )
            self.failure = reason
            return False
        if self.failure is not None:
            self.report(f"checkpoint {self.path} written again after epoch {state.epoch}")
        self.failure = None
        self.saved_epoch = state.epoch
        return True


def load_checkpoint(directory: str | Path) -> tuple[Config, TrainState]:
    """Read a checkpoint directory; `CheckpointError` naming the problem if it is unusable."""
    path = Path(directory) / FILENAME
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no checkpoint found (was the run started with --checkpoint?)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["__header__"]))
            arrays = {name: np.array(data[name]) for name in data.files if name != "__header__"}
    except (OSError, *ARCHIVE_ERRORS) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint, damaged or cut short "
                              f"({exc.__class__.__name__}: {exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastnn checkpoint")
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {header.get('version')} but this fastnn reads {VERSION}"
        )
    try:
        config = Config.from_dict(header["config"])
        history = History.from_dict(header["history"])
        epoch = header["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        best_val_loss = header.get("best_val_loss")
        state = TrainState(
            epoch=epoch,
            history=history,
            arrays={k: v for k, v in arrays.items() if not k.startswith(BEST_PREFIX)},
            best_arrays={
                k[len(BEST_PREFIX) :]: v for k, v in arrays.items() if k.startswith(BEST_PREFIX)
            }
            or None,
            best_val_loss=None if best_val_loss is None else float(best_val_loss),
            epochs_without_gain=int(header.get("epochs_without_gain", 0)),
            extra=dict(header.get("extra") or {}),
            best_train_loss=_optional_float(header.get("best_train_loss")),
            epochs_without_train_gain=int(header.get("epochs_without_train_gain", 0)),
            plateau=_plateau(header.get("plateau")),
        )
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: damaged checkpoint ({exc.__class__.__name__}: {exc})"
        ) from None
    lengths = {
        len(getattr(history, key))
        for key in ("train_acc", "train_loss", "test_acc", "test_loss", "epoch_seconds")
    }
    if lengths != {epoch + 1}:
        raise CheckpointError(
            f"{path}: damaged checkpoint (history lengths {sorted(lengths)} for epoch {epoch})"
        )
    problem = _arrays_problem(config, state.arrays) or (
        _arrays_problem(config, state.best_arrays) if state.best_arrays else None)
    if problem:
        raise CheckpointError(f"{path}: damaged checkpoint ({problem})")
    return config, state


def _arrays_problem(config: Config, arrays: dict[str, np.ndarray]) -> str | None:
    """What is wrong with a checkpoint's arrays for ``config`` (None: nothing): each array a
    run of it writes, of its shape, real floating point and finite (the update count: one
    integer >= 0); no other array. Population statistics are optional."""
    from .network import POPULATION_PREFIX, Network

    try:
        expected = Network(config.replace(backend="numpy")).state_arrays()
    except (ConfigError, ValueError, MemoryError) as exc:
        return f"its config cannot be built: {exc}"
    extra = sorted(name for name in arrays if name not in expected
                   and not name.startswith(POPULATION_PREFIX))
    if extra:
        return f"arrays a run of its config does not have: {', '.join(extra[:5])}"
    for name, want in expected.items():
        if name not in arrays:
            return f"array {name} is missing"
        got = arrays[name]
        if got.shape != want.shape:
            return f"array {name} has shape {got.shape}, expected {want.shape}"
        if name == STEPS_KEY:
            if got.dtype.kind not in "iu" or int(got) < 0:
                return f"{name} must be an integer >= 0"
            continue
        if got.dtype.kind != "f":
            return f"array {name} holds {got.dtype}, not real floating-point numbers"
        if not np.all(np.isfinite(got)):
            return f"array {name} holds NaN or infinite values"
    for name, got in arrays.items():
        if name.startswith(POPULATION_PREFIX) and (
                got.dtype.kind != "f" or not np.all(np.isfinite(got))):
            return f"array {name} holds values that are not finite real numbers"
    return None


def check_compatible(saved: Config, wanted: Config, state: TrainState, where: Any) -> None:
    """Raise `CheckpointError` if ``wanted`` differs from ``saved`` beyond resumable options,
    or the saved arrays do not fit the network ``wanted`` builds."""
    a, b = saved.to_dict(), wanted.to_dict()
    diffs = [k for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k]]
    if diffs:
        detail = ", ".join(f"{k}: {a[k]!r} in checkpoint vs {b[k]!r}" for k in diffs)
        raise CheckpointError(f"{where}: config differs from the checkpoint ({detail})")
    if state.epoch > wanted.epochs:
        raise CheckpointError(
            f"{where}: checkpoint is at epoch {state.epoch}, past the requested {wanted.epochs}"
        )
    from .network import Network

    shapes = Network(wanted).state_arrays()
    for name, value in shapes.items():
        if name not in state.arrays or state.arrays[name].shape != value.shape:
            got = state.arrays[name].shape if name in state.arrays else "missing"
            raise CheckpointError(f"{where}: array {name} is {got}, expected {value.shape}")


def _optional_float(value: Any) -> float | None:
    """None, or a number of the header as a float (ValueError for anything else)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number or null; got {value!r}")
    return float(value)


def _plateau(value: Any) -> dict[str, Any] | None:
    """The plateau schedule's state of a header, checked (None: not started)."""
    from .schedules import Plateau

    return None if value is None else Plateau.from_dict(value).to_dict()
