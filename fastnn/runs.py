"""A run's lifecycle, below the command line: what ``train``, ``sweep`` and ``reproduce`` share.

- before training, every output is checked (`check_output_file`, `check_output_folder`,
  `check_checkpoint_dir`), so a run never ends with nowhere to write;
- the run record (`run_record`: config, history, summary, `environment`), written atomically,
  or put on stdout when it cannot be (`write_run_file`);
- stop signals: SIGTERM and SIGHUP raise `Terminated` where they land, as Ctrl-C raises
  KeyboardInterrupt (`stop_signals_as_interrupts`); a stopped run keeps a checkpoint of its last
  completed epoch and its partial record (`TrainingRun.save_stopped`) and exits with
  `stop_code`;
- a training run: its data, config sized for it, the state it continues from and its
  checkpoints (`TrainingRun`);
- one point of a sweep, trained in any process, continuing from its own checkpoint
  (`run_point`), and the folder of a sweep's run files: which finished runs are kept, each run's
  file written as it finishes (`SweepFolder`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import stat
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import Config
from .datasets import Data, data_checksum, data_marker, read_data, read_data_once, sized_for
from .errors import CheckpointError, FastnnError
from .fileio import check_writable_folder, os_reason, remove_partial_files, write_atomically
from .history import History
from .threads import default_threads

if TYPE_CHECKING:
    from .checkpoint import CheckpointWriter
    from .train import Trainer, TrainState

#: the exit status of a run stopped by Ctrl-C
EXIT_INTERRUPTED = 130
#: where a stopped run without --checkpoint saves its checkpoint (in the working folder)
INTERRUPT_DIR = "fastnn-interrupted"
#: the signals that stop a command the way Ctrl-C does (batch schedulers send SIGTERM first)
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)
#: where a sweep's runs checkpoint, under its folder (removed once a run's file is written)
SWEEP_CHECKPOINTS = "checkpoints"


class OutputError(FastnnError):
    """An output the command line names cannot be written (found before training)."""


# ---- the up-front output checks ----


def check_output_folder(folder: Path, flag: str, path: str | Path | None = None) -> None:
    """Create ``folder`` (and its parents) and write a test file in it, or an `OutputError`
    that names ``flag`` and ``path`` (default: the folder)."""
    path = folder if path is None else path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{flag} {path}: cannot create folder {folder} ({exc.strerror or exc})"
        ) from None
    try:
        check_writable_folder(folder)
    except OSError as exc:
        raise OutputError(
            f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc})"
        ) from None


def check_output_file(path: str | None, flag: str) -> None:
    """Fail before training, not after, when output file ``path`` (None: none) cannot be
    written."""
    if not path:
        return
    if str(path).endswith(("/", os.sep)):  # "--out results/": a folder was meant
        raise OutputError(f"{flag} {path}: ends with '/', so names a folder; give the name of "
                          "a file (in that folder, if that was meant)")
    target = Path(path)
    try:
        os.stat(target)
    except FileNotFoundError:  # a new file (or a link to one to be made)
        pass
    except OSError as exc:  # a loop of links, a component that is not a folder, ...
        raise OutputError(f"{flag} {path}: cannot be written ({os_reason(exc)})") from None
    if target.is_dir():
        raise OutputError(f"{flag} {path}: is a directory; give a file name")
    check_output_folder(target.parent, flag, path)


def check_distinct_outputs(outputs: Mapping[str, str | Path | None]) -> None:
    """An `OutputError` when two outputs (flag -> path; None: not given) are one file, so that
    one would silently replace the other. Paths are compared with links and relative parts
    resolved; a device or a pipe (/dev/null) may take any number of them."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if not path:
            continue
        resolved = Path(os.path.realpath(path))
        try:
            if not stat.S_ISREG(os.stat(resolved).st_mode):
                continue
        except OSError:  # not there yet (or unreadable: the other checks say so)
            pass
        if resolved in seen:
            raise OutputError(f"{flag} {path}: the same file as {seen[resolved]}; give each "
                              "output a file of its own")
        seen[resolved] = f"{flag} {path}"


def check_folder_apart(flag: str, folder: str | None,
                       files: Mapping[str, str | Path | None]) -> None:
    """An `OutputError` when output folder ``folder`` is one of the output ``files`` (flag ->
    path) or lies under one (``--out x.json --checkpoint x.json``): making the folder would
    leave the file nowhere to go. Call it before the folder is made."""
    if not folder:
        return
    inside = Path(os.path.realpath(folder))
    for file_flag, path in files.items():
        if not path:
            continue
        file = Path(os.path.realpath(path))
        if file == inside or file in inside.parents:
            raise OutputError(f"{flag} {folder}: a folder where {file_flag} {path} is to be "
                              "written; give them different names")


def check_checkpoint_dir(path: str | None, flag: str) -> None:
    """Fail before training when checkpoints cannot be written into directory ``path``."""
    from .checkpoint import FILENAME

    if not path:
        return
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise OutputError(
            f"{flag} {path}: is a file, not a directory; checkpoints go into a directory "
            f"(DIR/{FILENAME}): give a new or existing directory name"
        )
    if (directory / FILENAME).is_dir():
        raise OutputError(f"{flag} {path}: {directory / FILENAME} is a directory; remove it")
    check_output_folder(directory, flag, path)


# ---- the run record ----


def environment(
    config: Config, threads: int | None = None, data: str | None = None
) -> dict[str, Any]:
    """Backend, dtype, threads, data (an IDX folder; None: MNIST from the cache), versions and
    CPU of this run."""
    import numpy

    versions = {
        "fastnn": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    for name in ("numba", "cupy"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return {
        "backend": config.backend,
        "dtype": config.dtype,
        "threads": threads,
        "data": data,
        "versions": versions,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_record(config: Config, history: History, environment: dict[str, Any]) -> dict[str, Any]:
    """The record of a run, as its run file holds it: config, history, summary, environment
    (a sweep's point gives its threads and data; `SweepFolder.save` adds the rest)."""
    return {
        "config": config.to_dict(),
        "history": history.to_dict(),
        "summary": history.summary(),
        "environment": environment,
    }


def strict_json(data: Any) -> Any:
    """``data`` with NaN and infinities replaced by None, so the JSON is strict."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(strict_json(data), indent=1, allow_nan=False)
    write_atomically(path, lambda handle: handle.write(text.encode()))


def write_run_file(path: str | Path, record: dict[str, Any], what: str) -> str | None:
    """Write a run record to ``path``; when that fails, print it on stdout (one line of JSON)
    and return the one-line reason, which calls the record ``what``."""
    try:
        write_json_atomic(path, record)
    except OSError as exc:
        print(json.dumps(strict_json(record), allow_nan=False), flush=True)
        return f"could not write {path} ({os_reason(exc)}); the {what} are on stdout, as JSON"
    return None


# ---- stop signals ----


class Terminated(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP), raised where it lands so that the command takes the
    path of Ctrl-C: the step ends, the last completed epoch is saved, then the exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_text(exc: BaseException) -> str:
    """How the command was stopped, for its one-line message."""
    if isinstance(exc, Terminated):
        return f"terminated by {signal.Signals(exc.signum).name}"
    return "interrupted"


def stop_code(exc: BaseException) -> int:
    """The exit status of a stopped command: 128 + the signal's number (130 for Ctrl-C)."""
    return 128 + exc.signum if isinstance(exc, Terminated) else EXIT_INTERRUPTED


@contextmanager
def stop_signals_as_interrupts() -> Iterator[None]:
    """Within the block (in the main thread), SIGTERM and SIGHUP raise `Terminated`, once: a
    second signal while the command saves its work is ignored. A signal the process ignores
    (SIGHUP under ``nohup``) stays ignored. The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Terminated(signum)

    previous = {}
    for signum in STOP_SIGNALS:
        before = signal.getsignal(signum)
        if before is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before if before is not None else signal.SIG_DFL)


# ---- a training run ----


@dataclass
class TrainingRun:
    """One training run of ``fastnn train``: its config (sized for its data), the data, the
    state it continues from, its checkpoint writer and what every checkpoint stores beside the
    state (``extra``: the data marker, how often it checkpoints)."""

    config: Config
    data: Data
    threads: int
    resume: TrainState | None
    writer: CheckpointWriter | None
    extra: dict[str, Any]

    @classmethod
    def prepare(
        cls,
        config: Config,
        threads: int,
        data_path: str | None,
        *,
        resume: TrainState | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int | None = None,
        outputs: dict[str, str] | None = None,
        other_data: bool = False,
    ) -> TrainingRun:
        """Read the data (a resumed run's own, unless ``data_path`` names other), size a new
        run's config for it, and make the writer of checkpoints into ``checkpoint_dir`` (every
        ``checkpoint_every`` epochs; default: as the resumed run did, else every epoch).

        Checkpoints record the data (its folder and a checksum of its arrays) and the run's
        ``outputs`` (output flag -> absolute path), so that a resume continues into them. A
        resume on data whose checksum differs from the checkpoint's is a `CheckpointError`
        unless ``other_data``."""
        from .checkpoint import CheckpointWriter

        saved = resume.extra if resume else {}
        every = checkpoint_every or saved.get("checkpoint_every") or 1
        if resume is not None and not data_path:
            data_path = saved.get("data")
        data = read_data(data_path)
        extra: dict[str, Any] = {"data": data_marker(data_path), "checkpoint_every": every,
                                 "outputs": dict(outputs or {})}
        if checkpoint_dir or resume is not None:
            extra["data_checksum"] = data_checksum(data)
            recorded = saved.get("data_checksum")
            if resume is not None and recorded not in (None, extra["data_checksum"]) and (
                    not other_data):
                where = data_path or "MNIST from the cache"
                raise CheckpointError(
                    f"--data {where}: not the data the checkpoint was trained on (it was "
                    f"{saved.get('data') or 'MNIST from the cache'}, checksum "
                    f"{str(recorded)[:12]}, this is {extra['data_checksum'][:12]}); add "
                    "--resume-other-data to continue on it anyway")
        if resume is None:
            config = sized_for(config, data)
        writer = CheckpointWriter(checkpoint_dir, config, extra, every) if checkpoint_dir else None
        return cls(config, data, threads, resume, writer, extra)

    def checkpoint(self, trainer: Trainer, epoch: int) -> None:
        """After epoch ``epoch``: write the checkpoint when one is due."""
        if self.writer is not None and self.writer.due(epoch):
            self.writer.save(trainer.state)

    def environment(self) -> dict[str, Any]:
        """This run's whole environment, for its run record."""
        return environment(self.config, self.threads, self.extra.get("data"))

    def keep_checkpoint(self, state: TrainState) -> tuple[Path | None, int | None, str]:
        """Make sure a checkpoint of ``state`` is on disk (in the writer's directory, else
        `INTERRUPT_DIR`): the directory holding a checkpoint of this run (None: none), the
        epoch of that checkpoint, and what happened, in words."""
        from . import checkpoint as ckpt

        writer = self.writer
        if writer is not None and writer.saved_epoch == state.epoch:
            return writer.directory, state.epoch, f"checkpoint saved to {writer.directory}"
        directory = writer.directory if writer is not None else Path(INTERRUPT_DIR)
        try:
            ckpt.save_checkpoint(directory, self.config, state, self.extra)
        except OSError as exc:
            text = f"could not write checkpoint {directory / ckpt.FILENAME} ({os_reason(exc)})"
            if writer is not None and writer.saved_epoch is not None:
                kept = writer.saved_epoch
                return directory, kept, f"{text}; the one there is of epoch {kept}"
            return None, None, text
        return directory, state.epoch, f"checkpoint saved to {directory}"

    def save_stopped(self, trainer: Trainer, out: str | None, stop: BaseException) -> str:
        """Save the checkpoint of the last completed epoch and the partial record (to ``out``,
        when given); return the one line that says what was saved where (and what could
        not be)."""
        what = stop_text(stop)
        if trainer.state is None:
            return f"{what} before the first evaluation; nothing to save"
        state = trainer.state
        parts = [f"{what} after epoch {state.epoch}"]
        directory, _, text = self.keep_checkpoint(state)
        parts.append(text)
        trainer.history = state.history
        trainer.history.events["interrupted_after_epoch"] = state.epoch
        if out:
            record = run_record(self.config, trainer.history, self.environment())
            failure = write_run_file(out, record, "partial results")
            parts.append(failure or f"partial results in {out}")
        if directory is not None:
            parts.append(f"continue with: fastnn train --resume {directory}")
        return "; ".join(parts)

    def save_model(self, trainer: Trainer, path: str) -> str | None:
        """Write the trained model to ``path``; when that fails, keep a checkpoint to write it
        from and return the one-line reason (with how to get the model back, if it can be)."""
        try:
            trainer.save(path)
        except OSError as exc:
            state = trainer.state
            directory, epoch, text = self.keep_checkpoint(state)
            hint = (
                f"{text}: `fastnn train --resume {directory} --save-model {path}` "
                "writes the network from it"
                if epoch == state.epoch
                else f"{text}; the trained network is lost"
            )
            return f"could not write {path} ({os_reason(exc)}); {hint}"
        return None


# ---- one point of a sweep ----


def resumable_state(
    directory: str | Path, config: Config, data_path: str | None
) -> TrainState | None:
    """The `TrainState` checkpointed in ``directory`` when a run of ``config`` on
    ``data_path`` can continue from it; None when there is none, or it is unreadable, of
    another config or of other data."""
    from .checkpoint import FILENAME, check_compatible, load_checkpoint

    if not (Path(directory) / FILENAME).is_file():
        return None
    try:
        saved, state = load_checkpoint(directory)
        check_compatible(saved, config, state, directory)
    except CheckpointError:
        return None
    if state.extra.get("data", "") != data_marker(data_path):
        return None
    return state


def run_point(
    name: str,
    config: dict[str, Any],
    data_path: str | None,
    threads: int | None = None,
    checkpoint_dir: str | None = None,
    tracking: Any = None,
) -> tuple[str, dict[str, Any]]:
    """Train one point of a sweep (in any process); return its name and run record.

    ``tracking``: a `fastnn.tracking.Tracking` the run logs to, as a run named ``name``
    (its MLflow run's id goes into the record's ``tracking``, so that the run file can be
    attached to it once written).

    ``threads`` None: ``FASTNN_THREADS`` of this process, else its usable CPUs.
    ``checkpoint_dir``: write a checkpoint there after every epoch, and continue from the one
    there when it is of this config and data (the history is the same as without a stop).
    """
    from .train import Trainer

    used = default_threads() if threads is None else threads
    data = read_data_once(data_path)
    cfg = sized_for(Config.from_dict(config), data)
    from .tracking import finish, start_runs

    trackers = tracking.loggers(cfg, name) if tracking else []
    resume, on_epoch = None, None
    if checkpoint_dir is not None:
        resume = resumable_state(checkpoint_dir, cfg, data_path)
    # a resumed point continues the MLflow run its checkpoint names
    entry, notices = start_runs(trackers, resume.extra if resume is not None else None)
    for notice in notices:
        print(f"notice: {name}: {notice}", file=sys.stderr, flush=True)
    if checkpoint_dir is not None:
        from .checkpoint import CheckpointWriter

        extra = {"data": data_marker(data_path)}
        if entry is not None:
            extra["tracking"] = entry
        writer = CheckpointWriter(checkpoint_dir, cfg, extra)

        def on_epoch(trainer: Trainer, epoch: int) -> None:
            if writer.due(epoch):
                writer.save(trainer.state)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # divergence is recorded in the history's events
            history = Trainer(cfg, on_epoch=on_epoch, threads=used).fit(
                *data, resume=resume, callbacks=trackers)
    except KeyboardInterrupt:
        finish(trackers, status="KILLED")
        raise
    finish(trackers)
    record = run_record(cfg, history, {"threads": used, "data": data_marker(data_path)})
    if entry is not None:
        record["tracking"] = entry
    return name, record


# ---- the folder of a sweep's run files ----


def read_finished_run(path: Path, config: Config, data: str | None) -> dict[str, Any] | None:
    """The record in run file ``path`` when it is a finished run of ``config`` on ``data``
    (a later sweep keeps it), else None."""
    try:
        record = json.loads(path.read_text())
        history = History.from_dict(record["history"])
        history.summary()
        same = record["config"] == json.loads(json.dumps(config.to_dict()))
        env = record.get("environment") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    events = history.events
    finished = len(history.test_acc) == config.epochs + 1 or any(
        key in events for key in ("stopped_early_at", "stopped_on_divergence_at")
    )
    if not same or "data" not in env or env["data"] != data:
        return None
    if "interrupted_after_epoch" in events or not finished:
        return None
    return record


#: the lock file a sweep holds in its --out-dir
SWEEP_LOCK = ".fastnn-sweep.lock"


class SweepFolder:
    """The folder of a sweep: one run file per point (``NAME.json``), and, when its runs
    checkpoint (local runs), a checkpoint folder per running point under `SWEEP_CHECKPOINTS`.

    A point whose run file is a finished run of its config and data is kept; a stopped sweep
    run again continues the others from their checkpoints.
    """

    def __init__(self, folder: Path, data_path: str | None, checkpointing: bool) -> None:
        self.folder = folder
        self.data = data_marker(data_path)
        self.checkpoints = folder / SWEEP_CHECKPOINTS if checkpointing else None

    def run_file(self, name: str) -> Path:
        """The run file of point ``name``."""
        return self.folder / f"{name}.json"

    @contextmanager
    def locked(self, command: str = "sweep") -> Iterator[None]:
        """Hold the folder's lock (`SWEEP_LOCK`, with this process's id in it) while a sweep
        writes there: a second sweep into the same folder is an `OutputError` naming the
        first. The operating system drops the lock when its process ends, so a killed sweep
        leaves none behind."""
        try:
            import fcntl
        except ImportError:  # no advisory locks here (Windows): nothing to hold
            yield
            return
        path = self.folder / SWEEP_LOCK
        handle = open(path, "a+")  # noqa: SIM115 - held open for the whole sweep
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                raise OutputError(
                    f"--out-dir {self.folder}: another {command} ({owner}) is writing there; "
                    "wait for it to end or give another --out-dir") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {platform.node() or 'this machine'}")
            handle.flush()
            yield
        finally:
            handle.close()

    def kept_runs(
        self, points: Iterable[Any], data: Data, redo: bool
    ) -> dict[str, dict[str, Any]]:
        """The records of the points (each with ``name`` and ``config``) whose run file is a
        finished run of them on ``data``, by name. ``redo``: none, and no point continues from
        a checkpoint either."""
        records: dict[str, dict[str, Any]] = {}
        for point in points:
            if redo:  # train afresh, not from a checkpoint either
                if self.checkpoints is not None:
                    shutil.rmtree(self.checkpoints / point.name, ignore_errors=True)
                continue
            kept = read_finished_run(self.run_file(point.name), sized_for(point.config, data),
                                   self.data)
            if kept is not None:
                records[point.name] = kept
        return records

    def save(self, name: str, record: dict[str, Any]) -> str | None:
        """Complete the environment of a finished point's record (what its process did not
        say), write its run file and drop its checkpoint. When the file cannot be written,
        the record goes on stdout (one line of JSON) and the reason is returned."""
        config = Config.from_dict(record["config"])
        record["environment"] = {
            **environment(config, data=self.data),
            **record.get("environment", {}),
        }
        failure = write_run_file(self.run_file(name), record, "results")
        if failure is None and self.checkpoints is not None:
            shutil.rmtree(self.checkpoints / name, ignore_errors=True)
        return failure

    def remove_partial_checkpoints(self, names: Iterable[str]) -> None:
        """Remove the temporary files of checkpoints whose writer was killed mid-write."""
        from .checkpoint import FILENAME

        if self.checkpoints is not None:
            for name in names:
                remove_partial_files(self.checkpoints / name / FILENAME)

    def tidy(self) -> None:
        """Remove the checkpoint folder when it is empty (a run whose file is missing keeps
        its own)."""
        if self.checkpoints is not None:
            try:
                self.checkpoints.rmdir()
            except OSError:
                pass

