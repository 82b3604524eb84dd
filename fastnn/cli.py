"""The ``fastnn`` command: ``train``, ``sweep``, ``tune``, ``summary``, ``plot``, ``predict``,
``export``, ``data`` and ``info``.

Exit codes: 0 success; 2 usage/config/data errors (one line on stderr); 1 internal error;
3 the run finished but its results file (``--out``, a sweep's run file) or ``--save-model``
could not be written (the run record is printed on stdout as one line of JSON); 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM), 129 hung up (SIGHUP), each after saving a checkpoint and
the partial results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import CLI_DEFAULTS, OPTIONS, Config, cli_default, flag_names
from .errors import ConfigError, DataError, FastnnError
from .fileio import os_reason, write_atomically
from .runs import (
    SweepFolder,
    TrainingRun,
    check_checkpoint_dir,
    check_distinct_outputs,
    check_folder_apart,
    check_output_file,
    check_output_folder,
    run_record,
    stop_code,
    stop_signals_as_interrupts,
    stop_text,
    write_run_file,
)
from .threads import THREADS_ENV, check_threads, default_threads, usable_cpus

EXIT_USAGE, EXIT_INTERNAL = 2, 1
#: the run finished, but --out, a sweep's run file or --save-model could not be written
EXIT_UNSAVED = 3


class UsageError(FastnnError):
    """A bad command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (main adds "fastnn: error:")
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """argparse's, refusing an empty text for a path, name or address (``--out ""``
        would otherwise be taken as not given, ``--data ""`` as the working folder)."""
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if action.metavar is None or action.type is not None:
                continue  # a switch, a choice, or a value its type reads
            value = getattr(namespace, action.dest, None)
            if value == "" or (isinstance(value, list) and "" in value):
                name = "/".join(action.option_strings) or action.metavar
                self.error(f"argument {name}: an empty {action.metavar}")
        return namespace, extras


# ---- flags, derived from the config schema ----


def _text_reader(name: str) -> Any:
    """argparse ``type`` for option ``name``: its rule's parse, errors as argparse's."""
    rule = OPTIONS[name].rule

    def read(text: str) -> Any:
        try:
            return rule.read(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    read.__name__ = name
    return read


def _integer(text: str) -> int:
    """argparse ``type`` of the count flags: an integer in ASCII digits (``int`` alone takes
    full-width and other scripts' digits, ``２``)."""
    if not text.isascii():
        raise argparse.ArgumentTypeError(f"expected an integer in ASCII digits; got {text!r}")
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None


def _seconds(text: str) -> float:
    """argparse ``type`` of --timeout: a finite number of seconds in ASCII."""
    try:
        if not text.isascii():
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds; got {text!r}")
    return value


def _threads(text: str) -> int:
    """--threads as a count >= 1, capped at the usable CPUs with a one-line notice."""
    from .threads import ThreadsCapped, within_cpus

    try:
        count = check_threads(text, "--threads")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ThreadsCapped)
        count = within_cpus(count, "--threads")
    for warning in caught:
        print(f"notice: {warning.message}", file=sys.stderr, flush=True)
    return count


#: defaults the command line decides when it runs rather than from the schema
_DEFAULT_TEXT = {"backend": "default numba when it loads here, else numpy ($FASTNN_BACKEND "
                            "sets it)"}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per configuration option (shared by ``train`` and ``sweep``), from `OPTIONS`."""
    group = parser.add_argument_group("configuration (README.md, Configuration, lists them all)")
    for name, option in OPTIONS.items():
        if option.flag is None:
            continue
        rule = option.rule
        default = _DEFAULT_TEXT.get(name) or f"default {rule.format(cli_default(name))}"
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


def add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    """--mlflow [URI], --mlflow-experiment NAME, --tensorboard DIR."""
    from .tracking import DEFAULT_EXPERIMENT, DEFAULT_MLFLOW_URI

    parser.add_argument("--mlflow", nargs="?", const=DEFAULT_MLFLOW_URI, metavar="URI",
                        help="log to MLflow: options as parameters, every epoch's figures as "
                        f"metrics, files as artifacts (default URI {DEFAULT_MLFLOW_URI}; needs "
                        "mlflow)")
    parser.add_argument("--mlflow-experiment", default=DEFAULT_EXPERIMENT, metavar="NAME",
                        help=f"the MLflow experiment (default {DEFAULT_EXPERIMENT})")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="write TensorBoard event files there (needs tensorboardX)")


def _tracking(args: argparse.Namespace) -> Any:
    """The `Tracking` the flags ask for, its packages checked before any work."""
    from .tracking import Tracking

    tracking = Tracking(args.mlflow, args.mlflow_experiment, args.tensorboard)
    if tracking.mlflow is not None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise UsageError("--mlflow needs mlflow: pip install mlflow") from None
        from .tracking import prepare_mlflow

        try:
            prepare_mlflow(tracking.mlflow, tracking.experiment)
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds for a bad store
            raise UsageError(f"--mlflow {tracking.mlflow}: cannot use this tracking store "
                             f"({exc.__class__.__name__}: {exc})") from None
    if tracking.tensorboard is not None:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise UsageError("--tensorboard needs tensorboardX: pip install tensorboardX") \
                from None
        check_output_folder(Path(tracking.tensorboard), "--tensorboard")
    return tracking


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="fastnn", description="Article-exact, fast MLP training on MNIST.")
    parser.add_argument("--version", action="version", version=f"fastnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a network on MNIST (or any IDX folder)")
    add_run_flags(train)
    add = train.add_argument
    add("--out", metavar="RUN.json", help="write config, history, summary and environment")
    add("--save-model", metavar="MODEL.npz",
        help="write the trained model: network, input normaliser (fastnn.Model.load)")
    add("--log-csv", metavar="LOG.csv", help="append each epoch's figures to a CSV file")
    add("--log-jsonl", metavar="LOG.jsonl", help="append each epoch's figures as JSON lines")
    add("--checkpoint", metavar="DIR", help="write a checkpoint after every epoch")
    add("--checkpoint-every", type=_integer, metavar="N", help="checkpoint every N epochs")
    add("--resume", metavar="DIR",
        help="continue the run checkpointed in DIR (on its data, into its outputs unless "
             "given)")
    add("--resume-other-data", action="store_true",
        help="with --resume: continue on --data that differs from the checkpoint's")
    add("--quiet", action="store_true", help="no per-epoch output")
    add_tracking_flags(train)
    add_config_flags(train)

    reproduce = sub.add_parser(
        "reproduce", help="re-run a table of the article over several seeds, beside its figures"
    )
    add_run_flags(reproduce)
    reproduce.add_argument("name", nargs="?", metavar="NAME", help="the preset (see --list)")
    reproduce.add_argument("--list", action="store_true", help="name every preset and its size")
    reproduce.add_argument("--seeds", type=_integer, default=1, metavar="N", help="seeds 0..N-1")
    reproduce.add_argument("--epochs", type=_integer, metavar="N",
                           help="train N epochs instead of the article's (a quick look; the "
                                "table says so)")
    reproduce.add_argument("--out-dir", metavar="DIR",
                           help="run files and the tables (default: reproduce/NAME)")
    reproduce.add_argument("--backend", choices=("numpy", "numba", "cupy"),
                           help="default: numba when it loads, else numpy")
    reproduce.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    reproduce.add_argument("--workers", type=_integer, default=1, help="parallel local processes")
    reproduce.add_argument("--dask", metavar="ADDRESS|local", help="run the points on Dask")
    reproduce.add_argument("--redo", action="store_true", help="train finished points again")
    reproduce.add_argument("--quiet", action="store_true", help="no line per finished run")
    add_tracking_flags(reproduce)

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
    sweep.add_argument("--workers", type=_integer, default=1, help="parallel local processes")
    add_tracking_flags(sweep)
    sweep.add_argument(
        "--redo",
        action="store_true",
        help="train every point again (default: a point whose run file in --out-dir has the "
        "same config and data is kept)",
    )
    sweep.add_argument(
        "--dask",
        metavar="ADDRESS|local",
        help='run the points on a Dask cluster (needs pip install "dask[distributed]")',
    )
    add_config_flags(sweep)
    predict = sub.add_parser(
        "predict", help="labels (or probabilities) of a saved model for the rows of a file")
    predict.add_argument("model", metavar="MODEL.npz", help="a file of fastnn train --save-model")
    predict.add_argument("inputs", metavar="INPUTS",
                         help="an IDX images file (raw or .gz), a .npy array or a .csv file")
    predict.add_argument("--out", metavar="FILE",
                         help="write the predictions there (default: stdout)")
    predict.add_argument("--proba", action="store_true",
                         help="class probabilities (comma separated) instead of labels")
    tune = sub.add_parser("tune", help="search hyper-parameters with Optuna (needs optuna)")
    add_run_flags(tune)
    tune.add_argument("--space", action="append", required=True,
                      metavar="OPTION=LOW..HIGH[:log] | OPTION=V1,V2,...",
                      help="an option to search: a range (eta=1e-3..1:log, batch_size=16..256) "
                      "or choices (batch_norm=off,n,bn,node); repeatable")
    tune.add_argument("--trials", type=_integer, default=20, metavar="N",
                      help="trials to add to the study (default 20)")
    tune.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                      help="stop starting trials after this long")
    tune.add_argument("--sampler", default="tpe", choices=("tpe", "random"))
    tune.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"),
                      help="stops trials whose validation loss lags (default median)")
    tune.add_argument("--out-dir", default="tune", metavar="DIR",
                      help="one run file per trial, and the study (study.db) unless --storage")
    tune.add_argument("--storage", metavar="URL",
                      help="an Optuna storage URL (default sqlite:///DIR/study.db)")
    tune.add_argument("--study", default="fastnn", metavar="NAME", help="the study's name")
    tune.add_argument("--workers", type=_integer, default=1, help="parallel local processes")
    tune.add_argument("--dask", metavar="ADDRESS|local",
                      help="run the trials on a Dask cluster (its workers must reach the "
                      "study's storage)")
    add_tracking_flags(tune)
    add_config_flags(tune)
    export = sub.add_parser("export", help="a saved model as an ONNX graph (needs onnx)")
    export.add_argument("model", metavar="MODEL.npz", help="a file of fastnn train --save-model")
    export.add_argument("out", metavar="MODEL.onnx", help="the ONNX file to write")
    summary = sub.add_parser("summary", help="the article-style table of runs")
    summary.add_argument("runs", nargs="+", metavar="RUN.json")
    from .plots import KINDS

    plot = sub.add_parser("plot", help="charts of runs (curves, gamma/beta) or saved models")
    plot.add_argument("runs", nargs="+", metavar="RUN.json",
                      help="run files (--out of train/sweep); MODEL.npz files for --kind weights")
    plot.add_argument("--kind", choices=KINDS, default=KINDS[0],
                      help="curves: accuracy and loss; loss-direction: test loss marked fell/rose; "
                      "weights: weight histograms of models; gamma-beta: batch-norm gamma and "
                      "beta per epoch; gamma-beta-hist: their final per-node histograms; "
                      "tune: a tune study's history and option importances (give its "
                      "--out-dir)")
    plot.add_argument("--out", default="runs.png", metavar="CHART.png",
                      help="the image; its extension names the format (.png, .pdf, .svg, ...)")
    plot.add_argument("--title", help="a title over the chart")
    plot.add_argument("--full-range", action="store_true",
                      help="curves, loss-direction: show every value, epoch 0's included "
                      "(default: the y-axis zoomed on where the runs differ; epoch 0's untrained "
                      "loss, and the lowest accuracies, may be off the chart)")
    sub.add_parser("info", help="backends (and why any is unavailable), optimizers and "
                               "learning-rate schedules")
    data = sub.add_parser("data", help="check or repair the MNIST cache")
    actions = data.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for action, text in (
        ("verify", "check every cached MNIST file's checksum: ok, missing or damaged"),
        ("fetch", "fetch the missing or damaged MNIST files (not with FASTNN_OFFLINE=1)"),
    ):
        actions.add_parser(action, help=text).add_argument(
            "--data-dir",
            metavar="DIR",
            help="the cache folder (default: $FASTNN_DATA, else ~/.cache/fastnn/mnist)",
        )
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
            return Config(**{**CLI_DEFAULTS, "backend": default_backend(), **changes})
        return base.replace(**changes)


#: the environment variable that sets the command line's default backend
BACKEND_ENV = "FASTNN_BACKEND"


def default_backend() -> str:
    """The command line's backend when --backend is not given: $FASTNN_BACKEND, else numba
    when it loads here, else numpy (a GPU is never picked without being asked)."""
    from .backends import available

    named = os.environ.get(BACKEND_ENV, "").strip()
    if named:
        if named not in available():
            raise UsageError(f"{BACKEND_ENV}={named}: no such backend; backends: "
                             f"{', '.join(available())}")
        return named
    return "numba" if available()["numba"] is None else "numpy"


# ---- output ----


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _epoch_line(history: Any, epoch: int) -> str:
    """One epoch's figures; with early stopping also the validation loss that decides."""
    validation = (f"  val acc {history.val_acc[-1]:.4f} loss {history.val_loss[-1]:.5f}"
                  if history.val_loss else "")
    return (
        f"epoch {epoch:3d}  train acc {history.train_acc[-1]:.4f} loss {history.train_loss[-1]:.5f}"
        f"  test acc {history.test_acc[-1]:.4f} loss {history.test_loss[-1]:.5f}{validation}"
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
    from .train import Trainer

    resume_state = None
    if args.resume:
        saved, resume_state = ckpt.load_checkpoint(args.resume)
        config = config_from_args(args, base=saved)
        ckpt.check_compatible(saved, config, resume_state, args.resume)
        for flag, path in (resume_state.extra.get("outputs") or {}).items():
            if flag in OUTPUT_FLAGS and isinstance(path, str) and not getattr(args, flag):
                setattr(args, flag, path)  # the outputs of the run it continues
    else:
        if args.resume_other_data:
            raise UsageError("--resume-other-data needs --resume DIR")
        config = config_from_args(args)
    if args.checkpoint_every is not None:
        if args.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1; got {args.checkpoint_every}")
        if not (args.checkpoint or args.resume):
            raise UsageError("--checkpoint-every needs --checkpoint DIR")
    threads = args.threads if args.threads is not None else default_threads()
    _check_backend(config.backend)
    check_output_file(args.out, "--out")
    check_output_file(args.save_model, "--save-model")
    check_output_file(args.log_csv, "--log-csv")
    check_output_file(args.log_jsonl, "--log-jsonl")
    checkpoint_flag = "--checkpoint" if args.checkpoint else "--resume"
    checkpoint_dir = args.checkpoint or args.resume
    check_folder_apart(checkpoint_flag, checkpoint_dir, {
        flag: getattr(args, flag.lstrip("-").replace("-", "_"))
        for flag in ("--out", "--save-model", "--log-csv", "--log-jsonl")})
    if checkpoint_dir:
        check_checkpoint_dir(checkpoint_dir, checkpoint_flag)
    check_distinct_outputs({
        "--out": args.out, "--save-model": args.save_model, "--log-csv": args.log_csv,
        "--log-jsonl": args.log_jsonl,
        checkpoint_flag: Path(checkpoint_dir) / ckpt.FILENAME if checkpoint_dir else None,
    })
    tracking = _tracking(args)
    run = TrainingRun.prepare(
        config, threads, args.data, resume=resume_state,
        checkpoint_dir=args.checkpoint or args.resume, checkpoint_every=args.checkpoint_every,
        outputs={flag: os.path.abspath(getattr(args, flag))
                 for flag in OUTPUT_FLAGS if getattr(args, flag)},
        other_data=args.resume_other_data,
    )
    bar = _progress_bar(run.config, args, run.resume)

    def on_epoch(trainer: Trainer, epoch: int) -> None:
        run.checkpoint(trainer, epoch)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(test_acc=f"{trainer.history.test_acc[-1]:.4f}")
        elif not args.quiet:
            print(_epoch_line(trainer.history, epoch), flush=True)

    from .tracking import finish

    trackers = tracking.loggers(run.config)
    _start_mlflow_run(trackers, run)
    trainer = Trainer(run.config, on_epoch=on_epoch, threads=threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.showwarning = _show_warning
            warnings.simplefilter("always", _divergence_warning())
            trainer.fit(*run.data, resume=run.resume, callbacks=[*_loggers(args), *trackers])
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP as `Terminated`
        if bar is not None:
            bar.close()
        print(run.save_stopped(trainer, args.out, exc), file=sys.stderr, flush=True)
        finish(trackers, [args.out], status="KILLED")
        return stop_code(exc)
    if bar is not None:
        bar.close()
    code = _finish(trainer, run, args)
    finish(trackers, [args.out, args.save_model])
    return code


#: the output flags of ``fastnn train`` (argparse names) a checkpoint remembers for its resume
OUTPUT_FLAGS = ("out", "save_model", "log_csv", "log_jsonl")


def _start_mlflow_run(trackers: list[Any], run: TrainingRun) -> None:
    """Start the MLflow run of ``fastnn train --mlflow`` before the training, and have every
    checkpoint name it (``tracking.mlflow_run`` beside the state): a resumed training continues
    the run its checkpoint names, or, when the store has that run no more, starts a new one
    after a one-line notice."""
    from .tracking import start_runs

    entry, notices = start_runs(trackers, run.resume.extra if run.resume is not None else None)
    for notice in notices:
        print(f"notice: {notice}", file=sys.stderr, flush=True)
    if entry is not None:
        run.extra["tracking"] = entry  # the checkpoints' extra


def _loggers(args: argparse.Namespace) -> list[Any]:
    """The epoch loggers the flags ask for (a resumed run appends to their files)."""
    from .callbacks import CsvLogger, JsonLinesLogger

    loggers: list[Any] = []
    if args.log_csv:
        loggers.append(CsvLogger(args.log_csv))
    if args.log_jsonl:
        loggers.append(JsonLinesLogger(args.log_jsonl))
    return loggers


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


def _run_label(config: Config) -> str:
    """A run's label in its table: backend/dtype and every option that is not the default
    (sizes from the data aside), e.g. ``numba/float32 batch_norm=bn eta=0.5``."""
    from .config import default_of

    changed = []
    for name, value in config.to_dict().items():
        if name in ("backend", "dtype", "n_inputs", "n_outputs"):
            continue
        default = default_of(name)
        if isinstance(default, tuple):
            default = list(default)
        if value != default:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            changed.append(f"{name}={text}")
    return " ".join([f"{config.backend}/{config.dtype}", *changed])


def _finish(trainer: Any, run: TrainingRun, args: argparse.Namespace) -> int:
    """Write --out and --save-model, print the events and the table; `EXIT_UNSAVED` (the
    record on stdout, the reasons on stderr) when an output could not be written."""
    from .history import format_table

    config, history = run.config, trainer.history
    record = run_record(config, history, run.environment())
    failures = []
    if args.save_model:
        failure = run.save_model(trainer, args.save_model)
        if failure:
            failures.append(failure)
    for event in ("stopped_early_at", "stopped_on_divergence_at", "restored_best_epoch"):
        if event in history.events:
            print(f"{event.replace('_', ' ')} {history.events[event]}")
    print(format_table([(_run_label(config), history.summary())]))
    print(
        f"total {history.total_seconds:.2f}s for {_plural(history.epochs, 'epoch')} "
        f"({history.total_seconds / max(history.epochs, 1):.3f}s per epoch)",
        flush=True,
    )
    if args.out:
        failure = write_run_file(args.out, record, "results")
        if failure:
            failures.insert(0, failure)
    for failure in failures:
        print(f"fastnn: error: {failure}", file=sys.stderr, flush=True)
    return EXIT_UNSAVED if failures else 0


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
        except RecursionError:  # JSON nested deeper than a run file ever is
            raise DataError(f"{path}: not a fastnn run file (nested too deeply)") from None
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
    """Draw one chart (--kind) of run files, or of saved models for weights, into one image
    in the format --out names; the files are labelled by their names."""
    from . import plots

    check_output_file(args.out, "--out")
    try:
        plots.image_format(args.out)
    except ConfigError as exc:
        raise UsageError(f"--out {exc}") from None
    labels = plots.labels_for(args.runs)
    if args.kind == "tune":
        if len(args.runs) != 1:
            raise UsageError("--kind tune draws one study: give one tune --out-dir")
        fig = plots.tune_figure(plots.read_study(args.runs[0]), title=args.title)
    elif args.kind == "weights":
        models = [(label, plots.read_weights(path))
                  for label, path in zip(labels, args.runs, strict=True)]
        fig = plots.weights_figure(models, title=args.title)
    else:
        runs = [(label, run.history)
                for label, run in zip(labels, _read_runs(args.runs), strict=True)]
        if args.kind in ("gamma-beta", "gamma-beta-hist"):
            for p, (_, history) in zip(args.runs, runs, strict=True):
                if not history.bn_params:
                    raise DataError(f"{p}: no batch-norm gamma/beta in the run; --kind "
                                    f"{args.kind} needs a run trained with --batch-norm bn or node")
            draw = plots.gamma_beta_figure if args.kind == "gamma-beta" else (
                plots.gamma_beta_hist_figure)
            fig = draw(runs, title=args.title)
        else:
            draw = plots.curves_figure if args.kind == "curves" else plots.loss_direction_figure
            fig = draw(runs, full_range=args.full_range, title=args.title)
    path = plots.save_figure(fig, args.out)
    print(f"wrote {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """One line per input row: the saved model's label, regression values, or (--proba) class
    probabilities; to --out (written whole) or stdout."""
    from .model import Model
    from .predict import check_width, prediction_lines, read_inputs

    check_output_file(args.out, "--out")
    model = Model.load(args.model)
    x = read_inputs(args.inputs)
    check_width(args.inputs, x, model)
    lines = prediction_lines(model, x, args.proba)
    text = "".join(f"{line}\n" for line in lines)
    if args.out:
        try:
            write_atomically(args.out, lambda handle: handle.write(text.encode()))
        except OSError as exc:
            raise UsageError(f"--out {args.out}: cannot be written ({os_reason(exc)})") from None
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Add --trials trials to the study (in --out-dir, or --storage), each a run file; print
    the best trial and the command that trains it."""
    from . import tune
    from .datasets import read_data_once

    tune.optuna_module()  # a missing optuna is said before anything is read
    if args.trials < 1:
        raise UsageError(f"--trials must be >= 1; got {args.trials}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1; got {args.workers}")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0; got {args.timeout}")
    if args.dask and args.workers != 1:
        raise UsageError("--workers and --dask exclude each other: the Dask cluster's workers "
                         "run the trials")
    base = config_from_args(args)
    _check_backend(base.backend)
    with flag_names():
        space = tuple(tune.parse_space(args.space))
    out_dir = Path(args.out_dir)
    with ExitStack() as stack:
        stack.enter_context(_output_folder(out_dir))
        read_data_once(args.data or None)  # data errors (and the first-use download) first
        tracking = _tracking(args)
        search = tune.Search(base.to_dict(), space, args.data or None, str(out_dir),
                             tune.storage_url(args.storage, out_dir), args.study, None,
                             args.timeout, args.sampler, args.pruner, args.threads,
                             tracking or None)
        client = stack.enter_context(_dask_client(args.dask))
        stack.enter_context(SweepFolder(out_dir, None, checkpointing=False).locked("tune"))
        study = tune.open_study(search, base.seed)
        if args.storage is None:  # the folder's own study: no one else runs its trials now
            stale = tune.fail_interrupted_trials(search)
            if stale:
                print(f"{stale} trial(s) of an interrupted tune marked failed; the study goes "
                      "on", flush=True)
        before = tune.finished_trials(study)
        search = dataclasses.replace(search, trials=before + args.trials)
        print(f"tuning {', '.join(dim.name for dim in space)}: {args.trials} trial(s) into "
              f"{search.storage} (study {args.study}, {before} trial(s) there)", flush=True)
        try:
            if client is not None:
                from .sweep import tune_on_dask

                tune_on_dask(client, search, base.seed)
            elif args.workers == 1:
                tune.optimize(search, base.seed)
            else:
                from .sweep import threads_per_run, tune_in_processes

                per_run = threads_per_run(args.threads, args.workers)
                tune_in_processes(dataclasses.replace(search, threads=per_run), base.seed,
                                  args.workers)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP as `Terminated`
            done = tune.finished_trials(tune.open_study(search, base.seed)) - before
            return _stopped(exc, f"{done} new trial(s) are in the study; the same command goes "
                            "on with it")
    study = tune.open_study(search, base.seed)
    finished = tune.finished_trials(study)
    print(f"{finished} trial(s) in the study, {finished - before} new; run files in {out_dir}")
    try:
        best = study.best_trial
    except ValueError:
        print("no trial completed (every one was pruned or refused)")
        return 0
    params = " ".join(f"{name}={value}" for name, value in best.params.items())
    print(f"best: trial {best.number}, validation loss {best.value:.5f}, {params}")
    print(f"train it with: {best.user_attrs.get('command', '?')}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a saved model as an ONNX graph (inputs: raw rows; outputs y and label)."""
    from .model import Model
    from .onnx_export import _onnx

    _onnx()  # a missing onnx is said before anything is read
    check_output_file(args.out, "MODEL.onnx")
    check_distinct_outputs({"MODEL.npz": args.model, "MODEL.onnx": args.out})
    model = Model.load(args.model)
    try:
        model.to_onnx(args.out)
    except OSError as exc:
        raise UsageError(f"{args.out}: cannot be written ({os_reason(exc)})") from None
    print(f"wrote {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """List the backends (and why any is unavailable), the optimisers and the learning-rate
    schedules."""
    from .backends import available
    from .config import LR_SCHEDULE_RULES, OPTIMIZER_RULES, TRAIN_FIGURE_RULES

    print(f"fastnn {__version__}")
    print("backends (--backend):")
    backends = available()
    for name, reason in backends.items():
        print(f"  {name:12s} {'available' if reason is None else 'unavailable: ' + reason}")
    if backends.get("numba") is None:
        from .backends.numba.ops import FIRST_COMPILE, compiled_kernels

        compiled = compiled_kernels()
        print("numba kernels compiled on this machine (a first run of another dtype or depth "
              f"compiles for {FIRST_COMPILE}):")
        for variant, seconds in compiled.items():
            print(f"  {variant} (compiling took {seconds:.0f} s)")
        if not compiled:
            print("  none yet")
    print("optimizers (--optimizer; coefficients --momentum, --beta1, --beta2, --eps):")
    for name, rule in OPTIMIZER_RULES.items():
        print(f"  {name:12s} {rule}")
    print("learning-rate schedules (--lr-schedule; --warmup N ramps the rate up linearly, "
          "step by step, over the first N epochs):")
    for name, rule in LR_SCHEDULE_RULES.items():
        print(f"  {name:12s} {rule}")
    print("training figures (--train-figures; the estimators' default is running):")
    for name, rule in TRAIN_FIGURE_RULES.items():
        print(f"  {name:12s} {rule}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Check the grid, backends and output folder, then train each grid point (locally or on
    Dask), write each run file as the run finishes and print the table with the grid values
    as columns. Points whose run file is already there (same config and data) are kept; local
    runs checkpoint every epoch under --out-dir, so a stopped sweep continues where it was."""
    from .history import format_table
    from .sweep import parse_grid

    points = parse_grid(args.grid, config_from_args(args))
    _check_points(points, args)
    outcome = _train_points(points, args, Path(args.out_dir))
    if isinstance(outcome, int):
        return outcome
    records, unsaved = outcome
    print(format_table([_row(p.values, records[p.name]) for p in points]))
    return _unsaved_code(unsaved)


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Train a preset's cells over --seeds seeds (as a sweep: run files kept and resumed),
    then print and write its table beside the article's figures (NAME.md, NAME.csv)."""
    from . import reproduce

    if args.list:
        print(reproduce.listing())
        return 0
    if not args.name:
        raise UsageError("name a preset (fastnn reproduce --list shows them)")
    preset = reproduce.PRESETS.get(args.name)
    if preset is None:
        raise UsageError(
            f"unknown preset {args.name!r}; presets: {', '.join(reproduce.PRESETS)}"
        )
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1; got {args.seeds}")
    if args.epochs is not None:
        if args.epochs < 1:
            raise UsageError(f"--epochs must be >= 1; got {args.epochs}")
        preset = dataclasses.replace(preset, epochs=args.epochs, article_epochs=preset.epochs)
    backend = args.backend or default_backend()
    with flag_names():
        base = Config(**{**CLI_DEFAULTS, "backend": backend, "dtype": args.dtype})
    points = preset.points(base, args.seeds)
    _check_points(points, args)
    out_dir = Path(args.out_dir or Path("reproduce") / preset.name)
    outcome = _train_points(points, args, out_dir)
    if isinstance(outcome, int):
        return outcome
    records, unsaved = outcome
    rows = reproduce.summarize(preset, records, args.seeds, base)
    table = reproduce.markdown(preset, rows, args.seeds)
    print(table)
    tables_saved = True
    for suffix, text in ((".md", table), (".csv", reproduce.csv_text(preset, rows))):
        path = out_dir / f"{preset.name}{suffix}"
        try:
            write_atomically(path, lambda handle, text=text: handle.write(text.encode()))
        except OSError as exc:
            print(f"fastnn: error: could not write {path} ({os_reason(exc)}); the table is "
                  "above", file=sys.stderr)
            tables_saved = False
            continue
        print(f"wrote {path}")
    code = _unsaved_code(unsaved)
    return code if code or tables_saved else EXIT_UNSAVED


def _check_points(points: list[Any], args: argparse.Namespace) -> None:
    """--workers/--dask make sense and every point's backend loads (by name on Dask)."""
    from .backends import names as backend_names

    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1; got {args.workers}")
    if args.dask and args.workers != 1:
        raise UsageError("--workers is for local processes; with --dask the cluster decides")
    for backend in dict.fromkeys(point.config.backend for point in points):
        if args.dask:  # the workers load it; here only the name is checked
            if backend not in backend_names():
                raise ConfigError(
                    f"unknown backend {backend!r}; valid backends: {', '.join(backend_names())}"
                )
        else:
            _check_backend(backend)


def _unsaved_code(unsaved: list[str]) -> int:
    """0, or `EXIT_UNSAVED` after saying that some run files could not be written."""
    if not unsaved:
        return 0
    print(
        f"fastnn: error: {_plural(len(unsaved), 'run file')} could not be written (see above); "
        "their records are on stdout, one line of JSON each",
        file=sys.stderr,
    )
    return EXIT_UNSAVED


def _train_points(
    points: list[Any], args: argparse.Namespace, out_dir: Path
) -> tuple[dict[str, dict[str, Any]], list[str]] | int:
    """Train every point into ``out_dir`` (one run file each; finished points kept unless
    --redo; local runs checkpoint every epoch there). Returns (records by name, names whose
    file could not be written), or the exit code of a stopped run."""
    from .datasets import read_data_once
    from .sweep import run_sweep
    from .tracking import attach

    data = args.data or None
    folder = SweepFolder(out_dir, data, checkpointing=not args.dask)
    values = {point.name: point.values for point in points}
    unsaved: list[str] = []
    with ExitStack() as stack:
        stack.enter_context(_output_folder(out_dir))
        tracking = _tracking(args)
        client = stack.enter_context(_dask_client(args.dask))
        loaded = read_data_once(data)  # data errors (and the first-use download) before any run
        stack.enter_context(folder.locked())
        records = folder.kept_runs(points, loaded, redo=args.redo)
        todo = [point for point in points if point.name not in records]
        kept_text = (
            f" ({len(records)} already there, kept; --redo trains them again)" if records else ""
        )
        print(f"sweeping {_plural(len(points), 'run')} into {out_dir}{kept_text}", flush=True)
        results = run_sweep(
            todo, data, workers=args.workers, client=client, threads=args.threads,
            checkpoints=folder.checkpoints, tracking=tracking or None,
        )
        try:
            with closing(results):  # an interrupt stops the worker processes at once
                for name, record in results:
                    records[name] = record
                    failure = folder.save(name, record)
                    if failure is not None:
                        print(f"warning: {failure}", file=sys.stderr, flush=True)
                        unsaved.append(name)
                    else:
                        attach(tracking, record, folder.run_file(name))
                    if not args.quiet:
                        where = " ".join(f"{key}={text}" for key, text in values[name].items())
                        test_acc = record["history"]["test_acc"][-1]
                        print(f"done {where}: test acc {_number(test_acc)}", flush=True)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP as `Terminated`
            folder.remove_partial_checkpoints(point.name for point in todo)
            later = (
                "the running ones continue from their checkpoints"
                if folder.checkpoints is not None
                else "the others are trained"
            )
            return _stopped(exc, f"{len(records)} of {_plural(len(points), 'run')} done, their "
                            f"files are in {out_dir}; {later} when the same command runs again")
    folder.tidy()
    return records, unsaved


@contextmanager
def _output_folder(folder: Path, flag: str = "--out-dir") -> Iterator[None]:
    """Create ``folder`` (`check_output_folder`) for the block; when the block fails (a bad
    option, data or Dask address, an interrupt) the folders made for it that are still empty
    are removed again, so a command that wrote nothing leaves nothing behind."""
    made = []
    for path in (folder, *folder.parents):
        if os.path.lexists(path):
            break
        made.append(path)
    check_output_folder(folder, flag)
    try:
        yield
    except BaseException:
        for path in made:  # deepest first; one that is not empty stops it
            try:
                path.rmdir()
            except OSError:
                break
        raise


@contextmanager
def _dask_client(address: str | None) -> Iterator[Any]:
    """The client of the Dask scheduler at ``address`` (``local``: a new local cluster) for the
    block; None without an address. A sweep or tune connects before it takes its folder's
    lock, so an unreachable scheduler leaves no lock file behind."""
    if not address:
        yield None
        return
    from .sweep import dask_client

    with dask_client(address) as client:
        yield client


def _stopped(stop: BaseException, kept: str) -> int:
    """Say (on stderr) how a sweep or tune was stopped and what of its work is ``kept``; its
    exit status (130 for Ctrl-C, 128 + the signal's number for SIGTERM/SIGHUP)."""
    print(f"fastnn: {stop_text(stop)}: {kept}", file=sys.stderr, flush=True)
    return stop_code(stop)


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _row(values: dict[str, str], record: dict[str, Any]) -> tuple[dict[str, str], Any]:
    from .history import History

    return values, History.from_dict(record["history"]).summary()


def cmd_data(args: argparse.Namespace) -> int:
    """``data verify``: one line per cached MNIST file (ok, missing, damaged), exit 2 unless
    all are ok; ``data fetch``: fetch the missing or damaged ones (not when offline)."""
    from .datasets import MNIST_FILES, OFFLINE_ENV, cache_dir, cache_status, fetch_mnist, offline

    folder = Path(args.data_dir).expanduser() if args.data_dir else cache_dir()
    statuses = cache_status(folder)
    bad = [name for name, status in statuses.items() if status != "ok"]
    if args.action == "fetch" and bad:
        if offline():
            _print_statuses(folder, statuses)
            raise DataError(
                f"{OFFLINE_ENV}=1: not fetching {_plural(len(bad), 'MNIST file')} into {folder}; "
                f"unset {OFFLINE_ENV}, or put the four IDX files (raw or .gz) there by hand"
            )
        statuses = fetch_mnist(folder)
        bad = [name for name, status in statuses.items() if status != "ok"]
    _print_statuses(folder, statuses)
    if bad:
        where = f" --data-dir {args.data_dir}" if args.data_dir else ""
        raise DataError(
            f"{len(bad)} of {len(MNIST_FILES)} MNIST files in {folder} are missing or damaged; "
            f"run `fastnn data fetch{where}`"
        )
    return 0


def _print_statuses(folder: Path, statuses: dict[str, str]) -> None:
    from .datasets import cached_file

    for name, status in statuses.items():
        print(f"{status:8s} {cached_file(folder, name) or folder / name}", flush=True)


COMMANDS = {
    "train": cmd_train,
    "sweep": cmd_sweep,
    "reproduce": cmd_reproduce,
    "summary": cmd_summary,
    "plot": cmd_plot,
    "info": cmd_info,
    "predict": cmd_predict,
    "export": cmd_export,
    "tune": cmd_tune,
    "data": cmd_data,
}


class _StdoutWithoutReader:
    """sys.stdout that stops printing, never the command, once its reader has gone
    (``fastnn train ... | head -1``): the run goes on and writes its outputs. The stream's
    descriptor then points at the null device, so nothing fails at exit either."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._lose_reader()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._lose_reader()

    def _lose_reader(self) -> None:
        self.reader_gone = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self._stream.fileno())
            finally:
                os.close(null)
        except (OSError, ValueError, AttributeError):  # no descriptor (a test's capture)
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastnn`` command."""
    stdout = sys.stdout
    if stdout is not None:
        sys.stdout = _StdoutWithoutReader(stdout)
    try:
        return _run_command(argv)
    finally:
        sys.stdout = stdout


def _run_command(argv: list[str] | None) -> int:
    """Parse and run one command; every failure becomes a one-line message and an exit code."""
    try:
        with stop_signals_as_interrupts():
            args = build_parser().parse_args(argv)
            return COMMANDS[args.command](args)
    except FastnnError as exc:
        print(f"fastnn: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # before training started, or after it ended
        print(f"fastnn: {stop_text(exc)}", file=sys.stderr)
        return stop_code(exc)
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
