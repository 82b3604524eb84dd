"""The ``fastnn`` command: ``train``, ``summary`` and ``info``.

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
from .config import (
    ACTIVATIONS,
    BATCH_NORMS,
    BIAS_INITS,
    BN_EVALS,
    DROPOUT_MODES,
    DTYPES,
    NORMALIZATIONS,
    OUTPUTS,
    WEIGHT_INITS,
    Config,
)
from .errors import ConfigError, FastnnError
from .fileio import write_atomically

EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130
INTERRUPT_DIR = "fastnn-interrupted"


class UsageError(FastnnError):
    """A bad command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        raise UsageError(f"{self.prog}: {message} (see --help)")


# ---- option parsing helpers ----


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"hidden sizes must be like 100,50; got {text!r}"
        ) from None
    if not sizes:
        raise argparse.ArgumentTypeError("hidden sizes must name at least one layer, like 100,50")
    return sizes


def _weight_decay(text: str) -> tuple[str, float] | None:
    if text.lower() in ("none", "off"):
        return None
    kind, _, lam = text.partition(":")
    try:
        return kind.lower(), float(lam)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"weight decay must be l1:LAMBDA or l2:LAMBDA (e.g. l2:1e-4); got {text!r}"
        ) from None


def _axis(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if text == "0":
        return 0
    raise argparse.ArgumentTypeError(f"normalize axis must be none or 0; got {text!r}")


def _key_values(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=NUMBER (e.g. std=0.1); got {text!r}"
        ) from None


#: CLI flag -> Config field (flags left out keep the config defaults)
_CONFIG_FLAGS = {
    "hidden": "hidden",
    "activation": "activation",
    "init": "init",
    "bias_init": "bias_init",
    "output": "output",
    "normalize": "normalize",
    "normalize_axis": "normalize_axis",
    "eta": "eta",
    "batch_size": "batch_size",
    "epochs": "epochs",
    "weight_decay": "weight_decay",
    "dropout_input": "dropout_input",
    "dropout_hidden": "dropout_hidden",
    "dropout_mode": "dropout_mode",
    "batch_norm": "batch_norm",
    "batch_norm_eta": "batch_norm_eta",
    "bn_eval": "bn_eval",
    "bn_momentum": "bn_momentum",
    "dtype": "dtype",
    "backend": "backend",
    "seed": "seed",
    "early_stopping": "early_stopping",
    "validation_fraction": "validation_fraction",
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every configuration option (shared by ``train`` and ``sweep``)."""
    add = parser.add_argument
    add("--data", metavar="DIR", help="folder with the four IDX files (default: cache, fetched)")
    add("--backend", help="numpy (default), numba or cupy")
    add("--dtype", choices=DTYPES, help="default float32 (the article computes in float64)")
    add("--epochs", type=int, help="default 50")
    add("--batch-size", type=int, help="default 100")
    add("--eta", type=float, help="learning rate, default 0.1")
    add("--hidden", type=_hidden, metavar="SIZES", help="hidden layer sizes, default 100,50")
    add("--activation", choices=ACTIVATIONS, help="hidden activation, default relu")
    add("--alpha", type=float, help="leaky_relu slope (default 0.01)")
    add("--init", choices=WEIGHT_INITS, help="weight initialiser, default he_normal")
    add(
        "--init-param",
        type=_key_values,
        action="append",
        metavar="NAME=X",
        help="initialiser parameter (mean, std/var, min, max); repeatable",
    )
    add("--bias-init", choices=BIAS_INITS, help="bias initialiser, default zeros_b")
    add("--bias-init-param", type=_key_values, action="append", metavar="NAME=X")
    add("--output", choices=OUTPUTS, help="output/loss pair, default softmax_cross_entropy")
    add("--normalize", choices=NORMALIZATIONS, help="input normalisation, default min_max")
    add("--normalize-axis", type=_axis, metavar="none|0")
    add("--weight-decay", type=_weight_decay, metavar="l1:LAM|l2:LAM")
    add("--dropout-input", type=float, metavar="KEEP", help="input keep ratio in (0, 1]")
    add("--dropout-hidden", type=float, metavar="KEEP", help="hidden keep ratio in (0, 1]")
    add("--dropout-mode", choices=DROPOUT_MODES)
    add("--batch-norm", choices=BATCH_NORMS, help="off, n (N), bn (BN) or node (BN(n))")
    add("--batch-norm-eta", type=float, help="rate of gamma/beta, default eta")
    add("--bn-eval", choices=BN_EVALS, help="batch (article) or running statistics")
    add("--bn-momentum", type=float)
    add("--seed", type=int)
    add("--no-shuffle", action="store_true", help="visit the training set in order")
    add(
        "--early-stopping",
        type=int,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without a lower validation loss",
    )
    add("--validation-fraction", type=float, help="share of training data held out (0.1)")
    add("--stop-on-divergence", action="store_true", help="end the run when it diverges")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="fastnn", description="Article-exact, fast MLP training on MNIST.")
    parser.add_argument("--version", action="version", version=f"fastnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a network on MNIST (or any IDX folder)")
    add_config_flags(train)
    add = train.add_argument
    add("--out", metavar="RUN.json", help="write config, history, summary and environment")
    add("--save-model", metavar="MODEL.npz", help="write the trained network")
    add("--checkpoint", metavar="DIR", help="write a checkpoint after every epoch")
    add("--checkpoint-every", type=int, metavar="N", help="checkpoint every N epochs")
    add("--resume", metavar="DIR", help="continue the run checkpointed in DIR")
    add("--quiet", action="store_true", help="no per-epoch output")

    sweep = sub.add_parser("sweep", help="train every point of a grid of options, then tabulate")
    add_config_flags(sweep)
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
        help="run the points on a Dask cluster (needs fastnn[dask])",
    )
    summary = sub.add_parser("summary", help="the article-style table of runs")
    summary.add_argument("runs", nargs="+", metavar="RUN.json")
    plot = sub.add_parser("plot", help="accuracy and loss curves of runs on one chart")
    plot.add_argument("runs", nargs="+", metavar="RUN.json")
    plot.add_argument("--out", default="runs.png", metavar="CHART.png")
    sub.add_parser("info", help="backends and why any is unavailable")
    return parser


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """A Config from the flags given (others keep ``base``'s values, or the CLI defaults)."""
    changes: dict[str, Any] = {
        field: getattr(args, flag)
        for flag, field in _CONFIG_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if args.no_shuffle:
        changes["shuffle"] = False
    if args.stop_on_divergence:
        changes["stop_on_divergence"] = True
    if args.alpha is not None:
        changes["activation_params"] = {"alpha": args.alpha}
    if args.init_param:
        changes["init_params"] = dict(args.init_param)
    if args.bias_init_param:
        changes["bias_init_params"] = dict(args.bias_init_param)
    if base is None:
        changes.setdefault("dtype", "float32")
        return Config(**changes)
    return base.replace(**changes)


# ---- output ----


def environment(config: Config) -> dict[str, Any]:
    """Backend, dtype, versions and CPU of this run."""
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


def _check_writable(path: str | None, flag: str) -> None:
    """Fail before training, not after, when an output file cannot be written."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot create {parent} ({exc.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: {parent} is not writable")


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


def _load_data(args: argparse.Namespace) -> tuple:
    from .datasets import load_mnist

    return load_mnist(args.data) if args.data else load_mnist()


def cmd_train(args: argparse.Namespace) -> int:
    """Train, report per epoch, write --out/--save-model/checkpoints."""
    from . import checkpoint as ckpt
    from .sweep import sized_for
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
    _check_writable(args.out, "--out")
    _check_writable(args.save_model, "--save-model")
    checkpoint_dir = args.checkpoint or args.resume
    saved_extra = resume_state.extra if resume_state else {}
    every = args.checkpoint_every or saved_extra.get("checkpoint_every") or 1
    if args.resume and not args.data:
        args.data = saved_extra.get("data")
    extra = {
        "data": str(Path(args.data).resolve()) if args.data else None,
        "checkpoint_every": every,
    }
    data = _load_data(args)
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

    trainer = Trainer(config, on_epoch=on_epoch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.showwarning = _show_warning
            warnings.simplefilter("always", _divergence_warning())
            trainer.fit(*data, resume=resume_state)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        _save_interrupted(trainer, config, args, checkpoint_dir, extra)
        return EXIT_INTERRUPTED
    if bar is not None:
        bar.close()
    _finish(trainer, config, args)
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
    trainer: Any, config: Config, args: argparse.Namespace, directory: Any, extra: dict
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
        write_json_atomic(args.out, _run_record(trainer, config))
    print(
        f"interrupted after epoch {trainer.state.epoch}; checkpoint saved to {directory}"
        f"{'; partial results in ' + args.out if args.out else ''}; "
        f"continue with: fastnn train --resume {directory}",
        file=sys.stderr,
    )


def _run_record(trainer: Any, config: Config) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "history": trainer.history.to_dict(),
        "summary": trainer.history.summary(),
        "environment": environment(config),
    }


def _finish(trainer: Any, config: Config, args: argparse.Namespace) -> None:
    from .history import format_table

    history = trainer.history
    if args.out:
        write_json_atomic(args.out, _run_record(trainer, config))
    if args.save_model:
        trainer.network.save(args.save_model)
    for event in ("stopped_early_at", "stopped_on_divergence_at", "restored_best_epoch"):
        if event in history.events:
            print(f"{event.replace('_', ' ')} {history.events[event]}")
    print(format_table([(f"{config.backend}/{config.dtype}", history.summary())]))
    print(
        f"total {history.total_seconds:.2f}s for {history.epochs} epochs "
        f"({history.total_seconds / max(history.epochs, 1):.3f}s per epoch)"
    )


def cmd_summary(args: argparse.Namespace) -> int:
    """Print the article-style table of several runs."""
    from .history import format_table

    rows = [(label, history.summary()) for label, history in _read_runs(args.runs)]
    print(format_table(rows))
    return 0


def _read_runs(paths: list[str]) -> list[tuple[str, Any]]:
    """(label, History) of each run file; DataError naming a bad one."""
    from .errors import DataError
    from .history import History

    runs = []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
            history = History.from_dict(record["history"])
            cfg = record.get("config", {})
            history.summary()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path}: not a fastnn run file ({exc.__class__.__name__}: {exc})"
            ) from None
        runs.append((f"{Path(path).stem} {cfg.get('backend', '')}/{cfg.get('dtype', '')}", history))
    return runs


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw the runs' accuracy and loss curves into one PNG."""
    from .plots import plot_runs

    path = plot_runs(_read_runs(args.runs), args.out)
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
    """Train each grid point (locally or on Dask), write one run file each, print the table."""
    from .history import History, format_table
    from .sweep import load_data, parse_grid, run_sweep

    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1; got {args.workers}")
    base = config_from_args(args)
    points = parse_grid(args.grid, base)
    data = args.data or None
    load_data(data)  # data errors (and the first-use download) before any run starts
    out_dir = Path(args.out_dir)
    _check_writable(str(out_dir / "x.json"), "--out-dir")
    print(f"sweeping {len(points)} runs into {out_dir}", flush=True)
    rows = []
    for name, record in run_sweep(points, data, workers=args.workers, dask=args.dask):
        record["environment"] = environment(Config.from_dict(record["config"]))
        write_json_atomic(out_dir / f"{name}.json", record)
        history = History.from_dict(record["history"])
        rows.append((name, history.summary()))
        if not args.quiet:
            print(f"done {name}: test acc {history.test_acc[-1]:.4f}", flush=True)
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
