"""`fastnn tune`: a hyper-parameter search on Optuna instead of a full grid.

A search space is written like grids, one option per ``--space``: ``eta=1e-3..1:log`` (a
range: numbers, or integers for integer options; ``:log`` samples it on a log scale) or
``batch_norm=off,n,bn,node`` (choices, read as the option reads them). Every trial trains one
configuration with a validation split (``validation_fraction`` of the training rows), reports
each epoch's validation loss to Optuna, which may prune it (median or hyperband), and scores
the lowest validation loss, the epoch that early stopping keeps. The study lives in SQLite
inside the output folder (any database URL Optuna takes for many machines), so running the
command again adds trials to it. Each finished trial writes a run file as a sweep does.

``optuna`` is an optional dependency, imported only here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import OPTIONS, Config, Integer, Number, cli_default
from .errors import ConfigError, MissingDependency
from .sweep import grid_option, parse_grid_values

#: the samplers and pruners `--sampler` and `--pruner` choose from
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
#: the study's name in its storage when none is given
STUDY = "fastnn"


def optuna_module() -> Any:
    """The optuna package, or `MissingDependency` saying what to install."""
    try:
        import optuna
    except ImportError:
        raise MissingDependency("fastnn tune needs optuna: pip install optuna") from None
    return optuna


@dataclass(frozen=True)
class Dimension:
    """One option of the search space: a range (``low``..``high``, on a log scale with
    ``log``, integers with ``integer``) or ``choices`` (the option's values as text)."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[str, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The trial's value of this option, as the option takes it."""
        if self.choices:
            text = trial.suggest_categorical(self.name, list(self.choices))
            return OPTIONS[self.name].rule.read(text)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


def parse_space(items: Sequence[str]) -> list[Dimension]:
    """The dimensions of ``--space OPTION=LOW..HIGH[:log]`` / ``OPTION=V1,V2,...`` items;
    `ConfigError` naming what is wrong."""
    dimensions: dict[str, Dimension] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not text.strip() or not key.strip():
            raise ConfigError(f"--space must look like OPTION=LOW..HIGH[:log] or "
                              f"OPTION=V1,V2; got {item!r}")
        name = grid_option(key)
        if name in dimensions:
            raise ConfigError(f"--space {name} given twice")
        dimensions[name] = _dimension(name, text.strip())
    if not dimensions:
        raise ConfigError("give at least one --space")
    return list(dimensions.values())


def _dimension(name: str, text: str) -> Dimension:
    rule = OPTIONS[name].rule
    if ".." not in text:
        values = parse_grid_values(name, text)
        return Dimension(name, choices=tuple(rule.format(value) for value in values))
    bounds, _, scale = text.partition(":")
    if scale not in ("", "log"):
        raise ConfigError(f"--space {name}: the scale after ':' can only be log; got {scale!r}")
    if not isinstance(rule, (Number, Integer)):
        raise ConfigError(f"--space {name}: a range needs a numeric option; give choices "
                          f"({name}=V1,V2,...)")
    low_text, _, high_text = bounds.partition("..")
    try:
        low, high = (rule.check(f"--space {name}", rule.read(part))
                     for part in (low_text, high_text))
    except ValueError as exc:
        raise ConfigError(f"--space {name}: cannot read the range, {exc}") from None
    if low is None or high is None or not low < high:
        raise ConfigError(f"--space {name}: the range needs LOW < HIGH; got {bounds!r}")
    if scale == "log" and low <= 0:
        raise ConfigError(f"--space {name}: a log scale needs LOW > 0; got {low}")
    return Dimension(name, low, high, scale == "log", isinstance(rule, Integer))


def make_sampler(optuna: Any, name: str, seed: int) -> Any:
    if name not in SAMPLERS:
        raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(optuna: Any, name: str) -> Any:
    if name not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}; got {name!r}")
    if name == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def trial_config(base: Config, values: Mapping[str, Any]) -> Config:
    """The configuration of a trial: ``base`` with its values, and a validation split whose
    loss scores it (early stopping's patience: ``base``'s, else the whole run)."""
    patience = base.early_stopping if base.early_stopping is not None else base.epochs
    return base.replace(**values, early_stopping=patience)


class PruneOnValidation:
    """A `Trainer` callback that reports each epoch's validation loss to an Optuna trial and
    stops the run when the pruner says so (``pruned`` is then True)."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruned = False

    def __call__(self, metrics: Any) -> bool:
        if metrics.epoch == 0 or metrics.val_loss is None:
            return False
        loss = metrics.val_loss
        self.trial.report(loss if math.isfinite(loss) else float("inf"), metrics.epoch)
        self.pruned = bool(self.trial.should_prune())
        return self.pruned


def best_value(history: Any) -> float:
    """A trial's score: the lowest validation loss of its run (inf when none is finite)."""
    finite = [loss for loss in history.val_loss[1:] if math.isfinite(loss)]
    return min(finite) if finite else float("inf")


def command_line(config: Config, data: str | None) -> str:
    """The ``fastnn train`` command that trains ``config`` (options off the command line's
    defaults only)."""
    words = ["fastnn", "train"]
    if data:
        words += ["--data", data]
    for name, option in OPTIONS.items():
        value = getattr(config, name)
        if option.flag is None or value == cli_default(name):
            continue
        if option.switch:
            words.append(option.flag)
        elif option.repeat:
            for key, number in dict(value).items():
                words += [option.flag, f"{key}={number}"]
        else:
            words += [option.flag, option.rule.format(value)]
    return " ".join(words)


def storage_url(storage: str | None, out_dir: Path) -> str:
    """``storage``, else SQLite in ``out_dir`` (``study.db``)."""
    return storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"


@dataclass(frozen=True)
class Search:
    """What every worker of a search needs (plain data: it travels to worker processes)."""

    base: dict[str, Any]  # the base Config as a dict
    space: tuple[Dimension, ...]
    data: str | None
    out_dir: str
    storage: str
    study: str
    trials: int | None
    timeout: float | None
    sampler: str
    pruner: str
    threads: int | None
    tracking: Any = None  # a fastnn.tracking.Tracking: each trial a run of its experiment


def open_study(search: Search, seed: int) -> Any:
    """The search's study in its storage: created on first use, else loaded (its trials go
    on), minimising the score."""
    optuna = optuna_module()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=search.study, storage=search.storage, direction="minimize",
        sampler=make_sampler(optuna, search.sampler, seed),
        pruner=make_pruner(optuna, search.pruner), load_if_exists=True)


def run_trial(trial: Any, search: Search) -> float:
    """Train the trial's configuration, write its run file (``trial-NNNN.json``) and return
    its score; `optuna.TrialPruned` when the pruner stopped it."""
    import warnings

    from .datasets import data_marker, read_data_once, sized_for
    from .runs import run_record, write_run_file
    from .threads import default_threads
    from .train import Trainer

    optuna = optuna_module()
    values = {dim.name: dim.suggest(trial) for dim in search.space}
    data = read_data_once(search.data)
    try:
        config = sized_for(trial_config(Config.from_dict(search.base), values), data)
    except ConfigError as exc:  # a combination the options refuse (e.g. beta1 without adam)
        trial.set_user_attr("refused", str(exc))
        raise optuna.TrialPruned(f"refused: {exc}") from None
    from .tracking import finish

    threads = search.threads or default_threads()
    pruning = PruneOnValidation(trial)
    name = f"trial-{trial.number:04d}"
    trackers = search.tracking.loggers(config, name) if search.tracking else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # divergence is in the history's events
        history = Trainer(config, threads=threads).fit(*data, callbacks=[pruning, *trackers])
    record = run_record(config, history, {"threads": threads, "data": data_marker(search.data)})
    record["trial"] = {"number": trial.number, "params": dict(trial.params),
                       "pruned": pruning.pruned}
    path = Path(search.out_dir) / f"{name}.json"
    write_run_file(path, record, "trial")
    finish(trackers, [path])
    trial.set_user_attr("command", command_line(config, search.data))
    if pruning.pruned:
        raise optuna.TrialPruned(f"pruned at epoch {history.epochs}")
    return best_value(history)


def optimize(search: Search, seed: int) -> None:
    """Run trials of the study until it holds ``search.trials`` finished ones (counted over
    every worker), or ``search.timeout`` seconds pass."""
    optuna = optuna_module()
    study = open_study(search, seed)
    callbacks = []
    if search.trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(
            search.trials, states=(optuna.trial.TrialState.COMPLETE,
                                   optuna.trial.TrialState.PRUNED)))
    study.optimize(lambda trial: run_trial(trial, search), timeout=search.timeout,
                   callbacks=callbacks, catch=())


def finished_trials(study: Any) -> int:
    """The study's trials that ended (completed or pruned)."""
    optuna = optuna_module()
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(1 for trial in study.trials if trial.state in done)


def fail_interrupted_trials(search: Search) -> int:
    """Mark the study's trials still "running" failed (a killed tune leaves them so; call
    only while no other process runs the study's trials); returns how many."""
    optuna = optuna_module()
    storage = optuna.storages.get_storage(search.storage)
    study_id = storage.get_study_id_from_name(search.study)
    running = optuna.trial.TrialState.RUNNING
    stale = storage.get_all_trials(study_id, deepcopy=False, states=(running,))
    for trial in stale:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    return len(stale)
