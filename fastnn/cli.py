"""The ``fastnn`` command: ``train``, ``sweep``, ``summary``, ``plot`` and ``info``.

Exit codes: 0 success, 2 usage/config/data errors (one line on stderr), 1 internal error,
130 interrupted (after saving a checkpoint and the partial results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import CLI_DEFAULTS, OPTIONS, Config, cli_default, flag_names
from .errors import ConfigError, FastnnError
from .fileio import check_writable_folder, write_atomically
from .threads import THREADS_ENV, check_threads, default_threads, usable_cpus

EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130
INTERRUPT_DIR = "fastnn-interrupted"


class UsageError(FastnnError):
    """A bad command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (main adds "fastnn: error:")
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---- flags, derived from the config schema ----


def _text_reader(name: str) -> Any:
    """argparse ``type`` for option ``name``: its rule's parse, errors as argparse's."""
    rule = OPTIONS[name].rule

    def read(text: str) -> Any:
        try:
            return rule.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    read.__name__ = name
    return read


def _threads(text: str) -> int:
    try:
        return check_threads(text, "--threads")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per configuration option (shared by ``train`` and ``sweep``), from `OPTIONS`."""
    group = parser.add_argument_group("configuration (README.md, Configuration, lists them all)")
    for name, option in OPTIONS.items():
        if option.flag is None:
            continue
        rule = option.rule
        default = f"default {rule.format(cli_default(name))}"
        if option.switch:
            group.add_argument(
                option.flag,
                dest=name,
                action="store_const",
                const=not cli_default(name),
                default=None,
                help=option.help,
            )
            continue
        words = getattr(rule, "words", None)
        kwargs: dict[str, Any] = {"dest": name, "help": f"{option.help}; {default}"}
        if words:
            kwargs["choices"] = words
        else:
            kwargs.update(type=_text_reader(name), metavar=option.metavar)
            kwargs["help"] = f"{option.help}: {rule.describe()}; {default}"
        if option.repeat:
            kwargs["action"] = "append"
            kwargs["help"] += "; repeatable"
        group.add_argument(option.flag, **kwargs)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of how runs execute (not part of the config: they do not change results)."""
    parser.add_argument(
        "--data", metavar="DIR", help="folder with the four IDX files (default: cache, fetched)"
    )
    parser.add_argument(
        "--threads",
        type=_threads,
        metavar="N",
        help=f"CPU threads per run (default: ${THREADS_ENV}, else the {usable_cpus()} CPUs "
        "this process may use; a sweep with --workers splits them)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="fastnn", description="Article-exact, fast MLP training on MNIST.")
    parser.add_argument("--version", action="version", version=f"fastnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a network on MNIST (or any IDX folder)")
    add_run_flags(train)
    add = train.add_argument
    add("--out", metavar="RUN.json", help="write config, history, summary and environment")
    add("--save-model", metavar="MODEL.npz", help="write the trained network")
    add("--checkpoint", metavar="DIR", help="write a checkpoint after every epoch")
    add("--checkpoint-every", type=int, metavar="N", help="checkpoint every N epochs")
    add("--resume", metavar="DIR", help="continue the run checkpointed in DIR")
    add("--quiet", action="store_true", help="no per-epoch output")
    add_config_flags(train)

    sweep = sub.add_parser("sweep", help="train every point of a grid of options, then tabulate")
    add_run_flags(sweep)
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="OPTION=V1,V2,...",
        help="values to sweep, e.g. eta=0.01,0.1,1 or batch_norm=off,n,bn,node "
        "or seed=0,1,2 (hidden=100/50,256/128); repeatable: the product",
    )
    sweep.add_argument("--out-dir", default="runs", metavar="DIR", help="one RUN.json per point")
    sweep.add_argument("--quiet", action="store_true", help="no line per finished run")
    sweep.add_argument("--workers", type=int, default=1, help="parallel local processes")
    sweep.add_argument(
        "--dask",
        metavar="ADDRESS|local",
        help='run the points on a Dask cluster (needs pip install "dask[distributed]")',
    )
    add_config_flags(sweep)
    summary = sub.add_parser("summary", help="the article-style table of runs")
    summary.add_argument("runs", nargs="+", metavar="RUN.json")
    plot = sub.add_parser("plot", help="accuracy and loss curves of runs on one chart")
    plot.add_argument("runs", nargs="+", metavar="RUN.json")
    plot.add_argument("--out", default="runs.png", metavar="CHART.png")
    sub.add_parser("info", help="backends and why any is unavailable")
    return parser


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """A Config from the flags given (others keep ``base``'s values, or the CLI defaults);
    messages name the flags."""
    changes: dict[str, Any] = {}
    for name, option in OPTIONS.items():
        value = getattr(args, name, None) if option.flag else None
        if value is None:
            continue
        if option.repeat:  # NAME=X given several times: one dict
            value = {key: number for part in value for key, number in part.items()}
        changes[name] = value
    with flag_names():
        if base is None:
            return Config(**{**CLI_DEFAULTS, **changes})
        return base.replace(**changes)


# ---- output ----


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def environment(config: Config, threads: int | None = None) -> dict[str, Any]:
    """Backend, dtype, threads, versions and CPU of this run."""
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


def _finite(data: Any) -> Any:
    """``data`` with NaN and infinities replaced by None, so the JSON is strict."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def _writable_folder(folder: Path, flag: str, path: str | Path) -> None:
    """Create ``folder`` (and its parents) and write a test file in it, or a UsageError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"{flag} {path}: cannot create folder {folder} ({exc.strerror or exc})"
        ) from None
    try:
        check_writable_folder(folder)
    except OSError as exc:
        raise UsageError(
            f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc})"
        ) from None


def _check_writable(path: str | None, flag: str) -> None:
    """Fail before training, not after, when an output file cannot be written."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    _writable_folder(target.parent, flag, path)


def _check_checkpoint_dir(path: str | None, flag: str) -> None:
    """Fail before training when checkpoints cannot be written into directory ``path``."""
    from .checkpoint import FILENAME

    if not path:
        return
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise UsageError(
            f"{flag} {path}: is a file, not a directory; checkpoints go into a directory "
            f"(DIR/{FILENAME}): give a new or existing directory name"
        )
    if (directory / FILENAME).is_dir():
        raise UsageError(f"{flag} {path}: {directory / FILENAME} is a directory; remove it")
    _writable_folder(directory, flag, path)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(data), indent=1, allow_nan=False)
    write_atomically(path, lambda handle: handle.write(text.encode()))


def _epoch_line(history: Any, epoch: int) -> str:
    return (
        f"epoch {epoch:3d}  train acc {history.train_acc[-1]:.4f} loss {history.train_loss[-1]:.5f}"
        f"  test acc {history.test_acc[-1]:.4f} loss {history.test_loss[-1]:.5f}"
        f"  {history.epoch_seconds[-1]:.2f}s"
    )


# ---- commands ----


def _check_backend(name: str) -> None:
    """The backend exists and loads here (a clear error before any data is touched)."""
    from .backends import get_backend

    with flag_names():
        get_backend(name)


def cmd_train(args: argparse.Namespace) -> int:
    """Check every option and output path, then read the data, train, report per epoch and
    write --out/--save-model/checkpoints."""
    from . import checkpoint as ckpt
    from .sweep import read_data, sized_for
    from .train import Trainer

    resume_state = None
    if args.resume:
        saved, resume_state = ckpt.load_checkpoint(args.resume)
        config = config_from_args(args, base=saved)
        ckpt.check_compatible(saved, config, resume_state, args.resume)
    else:
        config = config_from_args(args)
    if args.checkpoint_every is not None:
        if args.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1; got {args.checkpoint_every}")
        if not (args.checkpoint or args.resume):
            raise UsageError("--checkpoint-every needs --checkpoint DIR")
    threads = args.threads if args.threads is not None else default_threads()
    _check_backend(config.backend)
    _check_writable(args.out, "--out")
    _check_writable(args.save_model, "--save-model")
    if args.checkpoint:
        _check_checkpoint_dir(args.checkpoint, "--checkpoint")
    elif args.resume:
        _check_checkpoint_dir(args.resume, "--resume")
    checkpoint_dir = args.checkpoint or args.resume
    saved_extra = resume_state.extra if resume_state else {}
    every = args.checkpoint_every or saved_extra.get("checkpoint_every") or 1
    if args.resume and not args.data:
        args.data = saved_extra.get("data")
    extra = {
        "data": str(Path(args.data).resolve()) if args.data else None,
        "checkpoint_every": every,
    }
    data = read_data(args.data)
    if resume_state is None:
        config = sized_for(config, data)
    bar = _progress_bar(config, args, resume_state)

    def on_epoch(trainer: Trainer, epoch: int) -> None:
        if checkpoint_dir and (epoch % every == 0 or epoch == config.epochs):
            ckpt.save_checkpoint(checkpoint_dir, config, trainer.state, extra)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(test_acc=f"{trainer.history.test_acc[-1]:.4f}")
        elif not args.quiet:
            print(_epoch_line(trainer.history, epoch), flush=True)

    trainer = Trainer(config, on_epoch=on_epoch, threads=threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.showwarning = _show_warning
            warnings.simplefilter("always", _divergence_warning())
            trainer.fit(*data, resume=resume_state)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        _save_interrupted(trainer, config, args, checkpoint_dir, extra, threads)
        return EXIT_INTERRUPTED
    if bar is not None:
        bar.close()
    _finish(trainer, config, args, threads)
    return 0


def _divergence_warning() -> type[Warning]:
    from .train import DivergenceWarning

    return DivergenceWarning


def _show_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _progress_bar(config: Config, args: argparse.Namespace, resume_state: Any) -> Any:
    if args.quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    done = resume_state.epoch if resume_state else 0
    return tqdm(total=config.epochs, initial=done, unit="epoch", desc="training")


def _save_interrupted(
    trainer: Any,
    config: Config,
    args: argparse.Namespace,
    directory: Any,
    extra: dict,
    threads: int,
) -> None:
    from . import checkpoint as ckpt

    if trainer.state is None:
        print("interrupted before the first evaluation; nothing to save", file=sys.stderr)
        return
    directory = directory or INTERRUPT_DIR
    ckpt.save_checkpoint(directory, config, trainer.state, extra)
    trainer.history = trainer.state.history
    trainer.history.events["interrupted_after_epoch"] = trainer.state.epoch
    if args.out:
        write_json_atomic(args.out, _run_record(trainer, config, threads))
    print(
        f"interrupted after epoch {trainer.state.epoch}; checkpoint saved to {directory}"
        f"{'; partial results in ' + args.out if args.out else ''}; "
        f"continue with: fastnn train --resume {directory}",
        file=sys.stderr,
    )


def _run_record(trainer: Any, config: Config, threads: int) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "history": trainer.history.to_dict(),
        "summary": trainer.history.summary(),
        "environment": environment(config, threads),
    }


def _finish(trainer: Any, config: Config, args: argparse.Namespace, threads: int) -> None:
    from .history import format_table

    history = trainer.history
    if args.out:
        write_json_atomic(args.out, _run_record(trainer, config, threads))
    if args.save_model:
        trainer.network.save(args.save_model)
    for event in ("stopped_early_at", "stopped_on_divergence_at", "restored_best_epoch"):
        if event in history.events:
            print(f"{event.replace('_', ' ')} {history.events[event]}")
    print(format_table([(f"{config.backend}/{config.dtype}", history.summary())]))
    print(
        f"total {history.total_seconds:.2f}s for {_plural(history.epochs, 'epoch')} "
        f"({history.total_seconds / max(history.epochs, 1):.3f}s per epoch)"
    )


class _RunFile:
    """A run file as read back: its name, config (as saved) and history."""

    def __init__(self, path: str, config: dict[str, Any], history: Any) -> None:
        self.name = Path(path).stem
        self.config = config
        self.history = history

    @property
    def label(self) -> str:
        return f"{self.name} {self.config.get('backend', '')}/{self.config.get('dtype', '')}"

    def describe(self, option: str) -> str:
        """The saved value of ``option`` as the grid writes it."""
        value = self.config.get(option)
        try:
            return OPTIONS[option].rule.format(value)
        except (TypeError, ValueError, KeyError, IndexError):
            return str(value)


def _read_runs(paths: list[str]) -> list[_RunFile]:
    """Every run file; DataError naming a bad one."""
    from .errors import DataError
    from .history import History

    runs = []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
            history = History.from_dict(record["history"])
            config = dict(record.get("config") or {})
            history.summary()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path}: not a fastnn run file ({exc.__class__.__name__}: {exc})"
            ) from None
        runs.append(_RunFile(path, config, history))
    return runs


def summary_rows(runs: list[_RunFile]) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """Table rows of runs: the file name, every option whose value differs between the runs
    (as columns, in full), and backend/dtype."""
    varying = [
        name
        for name in OPTIONS
        if name not in ("backend", "dtype")
        and len({run.describe(name) for run in runs}) > 1
    ]
    rows = []
    for run in runs:
        label = {"run": run.name}
        label.update({name: run.describe(name) for name in varying})
        label["backend/dtype"] = f"{run.describe('backend')}/{run.describe('dtype')}"
        rows.append((label, run.history.summary()))
    return rows


def cmd_summary(args: argparse.Namespace) -> int:
    """Print the article-style table of several runs."""
    from .history import format_table

    print(format_table(summary_rows(_read_runs(args.runs))))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw the runs' accuracy and loss curves into one image, in the format --out names."""
    from .plots import image_format, plot_runs

    _check_writable(args.out, "--out")
    try:
        image_format(args.out)
    except ConfigError as exc:
        raise UsageError(f"--out {exc}") from None
    runs = _read_runs(args.runs)
    path = plot_runs([(run.label, run.history) for run in runs], args.out)
    print(f"wrote {path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """List the backends and why any is unavailable."""
    from .backends import available

    print(f"fastnn {__version__}")
    for name, reason in available().items():
        print(f"  {name:6s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Check the grid, backends and output folder, then train each grid point (locally or on
    Dask), write one run file each and print the table with the grid values as columns."""
    from contextlib import ExitStack

    from .backends import names as backend_names
    from .history import History, format_table
    from .sweep import dask_client, load_data, parse_grid, run_sweep

    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1; got {args.workers}")
    if args.dask and args.workers != 1:
        raise UsageError("--workers is for local processes; with --dask the cluster decides")
    base = config_from_args(args)
    points = parse_grid(args.grid, base)
    for backend in dict.fromkeys(point.config.backend for point in points):
        if args.dask:  # the workers load it; here only the name is checked
            if backend not in backend_names():
                raise ConfigError(
                    f"unknown backend {backend!r}; valid backends: {', '.join(backend_names())}"
                )
        else:
            _check_backend(backend)
    out_dir = Path(args.out_dir)
    _writable_folder(out_dir, "--out-dir", out_dir)
    with ExitStack() as stack:
        client = stack.enter_context(dask_client(args.dask)) if args.dask else None
        data = args.data or None
        load_data(data)  # data errors (and the first-use download) before any run starts
        print(f"sweeping {_plural(len(points), 'run')} into {out_dir}", flush=True)
        values = {point.name: point.values for point in points}
        rows = []
        results = run_sweep(
            points, data, workers=args.workers, client=client, threads=args.threads
        )
        for name, record in results:
            config = Config.from_dict(record["config"])
            record["environment"] = {
                **environment(config),
                **record.get("environment", {}),
            }
            write_json_atomic(out_dir / f"{name}.json", record)
            history = History.from_dict(record["history"])
            rows.append((values[name], history.summary()))
            if not args.quiet:
                where = " ".join(f"{key}={text}" for key, text in values[name].items())
                print(f"done {where}: test acc {history.test_acc[-1]:.4f}", flush=True)
    print(format_table(rows))
    return 0


COMMANDS = {
    "train": cmd_train,
    "sweep": cmd_sweep,
    "summary": cmd_summary,
    "plot": cmd_plot,
    "info": cmd_info,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastnn`` command."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except FastnnError as exc:
        print(f"fastnn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fastnn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if os.environ.get("FASTNN_DEBUG"):
            raise
        print(
            f"fastnn: internal error: {exc.__class__.__name__}: {exc} "
            "(rerun with FASTNN_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
