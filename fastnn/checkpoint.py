"""Checkpoints: a run's state after a completed epoch, written atomically, read without pickle.

A checkpoint directory holds ``checkpoint.npz``: the parameters, batch-norm running statistics,
early-stopping state and a JSON header (format version, config, epoch, history). Shuffling and
dropout draw from counter-based streams keyed by (seed, epoch, step), so no generator state is
needed: resuming repeats the interrupted epoch exactly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .errors import CheckpointError, ConfigError
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
        "extra": {**state.extra, **(extra or {})},
    }
    arrays = dict(state.arrays)
    for name, value in (state.best_arrays or {}).items():
        arrays[BEST_PREFIX + name] = value
    target = directory / FILENAME
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, __header__=np.array(json.dumps(header)), **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


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
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastnn checkpoint")
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {header.get('version')} but this fastnn reads {VERSION}"
        )
    try:
        config = Config.from_dict(header["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: invalid config in checkpoint ({exc})") from None
    best = {k[len(BEST_PREFIX) :]: v for k, v in arrays.items() if k.startswith(BEST_PREFIX)}
    plain = {k: v for k, v in arrays.items() if not k.startswith(BEST_PREFIX)}
    history = History.from_dict(header["history"])
    state = TrainState(
        epoch=int(header["epoch"]),
        history=history,
        arrays=plain,
        best_arrays=best or None,
        best_val_loss=header.get("best_val_loss"),
        epochs_without_gain=int(header.get("epochs_without_gain", 0)),
        extra=dict(header.get("extra") or {}),
    )
    if len(history.test_acc) != state.epoch + 1:
        raise CheckpointError(
            f"{path}: history has {len(history.test_acc)} entries for epoch {state.epoch}"
        )
    return config, state


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
