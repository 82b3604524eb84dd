"""`Trainer`: normalisation, shuffling, epochs, evaluation, early stopping, timing."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import rng
from .backends.workspace import Workspace
from .callbacks import Callback, EpochMetrics, call
from .config import Config
from .errors import DataError
from .history import History
from .memory import RunMemory, check_memory, memory_advice
from .model import Model
from .network import Network
from .plan import Plan
from .preprocessing import Normalizer, as_inputs, labels_and_one_hot
from .schedules import Plateau, epoch_factors
from .threads import check_threads

Array = Any


class DivergenceWarning(RuntimeWarning):
    """The run diverged: non-finite loss or a network that predicts one class."""


@dataclass
class Split:
    """One data set on the backend: normalised inputs (an array, or the numba backend's
    `CsrRows`: ``Ops.dense_inputs`` or ``numpy.asarray`` gives the array), one-hot targets,
    host labels."""

    x: Array
    t: Array
    labels: np.ndarray
    #: each row's loss weight on the backend (training only; None: equal weights)
    weights: Array | None = None

    @property
    def size(self) -> int:
        return len(self.labels)


@dataclass
class TrainState:
    """Everything needed to continue a run after its last completed epoch."""

    epoch: int
    history: History
    arrays: dict[str, np.ndarray]  # parameters and running statistics (host copies)
    best_arrays: dict[str, np.ndarray] | None = None
    best_val_loss: float | None = None
    epochs_without_gain: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: convergence (n_iter_no_change): the lowest training loss and the epochs since it
    best_train_loss: float | None = None
    epochs_without_train_gain: int = 0
    #: the plateau schedule's state (`fastnn.schedules.Plateau.to_dict`); None: not started
    plateau: dict[str, Any] | None = None


EpochCallback = Callable[["Trainer", int], None]
#: history events that end a run before its last epoch
STOP_EVENTS = (
    "stopped_early_at", "stopped_on_divergence_at", "stopped_by_callback_at", "converged_at",
)


class Trainer:
    """Trains a `Network` on raw inputs; ``fit`` returns the `History`."""

    def __init__(
        self, config: Config, on_epoch: EpochCallback | None = None, threads: int | None = None,
        keep_splits: bool = False,
    ) -> None:
        config.validate()
        self.config = config
        self.on_epoch = on_epoch
        #: CPU threads each fit may use (None: FASTNN_THREADS, else the CPUs this process may use)
        self.threads = None if threads is None else check_threads(threads)
        self.network: Network | None = None
        self.history = History()
        self.state: TrainState | None = None  # snapshot after the last completed epoch
        self.normalizer: Normalizer | None = None
        self.callbacks: list[Callback] = []
        #: how often each backend code path ran in the last ``fit`` (e.g. "train_sparse")
        self.counters: dict[str, int] = {}
        #: (train, test, validation) as the last ``fit`` prepared them, kept after it only
        #: with ``keep_splits`` (they hold a normalised copy of every input); else None
        self.splits: tuple[Split, Split, Split | None] | None = None
        self.keep_splits = keep_splits

    # ---- data ----
    def prepare(
        self, x_train: Any, t_train: Any, x_test: Any = None, t_test: Any = None,
        workspace: Workspace | None = None, sample_weight: Any = None,
    ) -> tuple[Split, Split | None, Split | None]:
        """Normalise with training statistics, one-hot the targets, carve the validation split.

        The splits are the trainer's own on the backend (the caller's arrays are not kept):
        each split's inputs in the form `Ops.inputs` gives (with a ``workspace``, the numba
        backend keeps sparse inputs in CSR form only: a `CsrRows`, which ``numpy.asarray``
        makes an array). ``sample_weight`` (one per training row) goes with the training rows.
        """
        cfg = self.config
        if (x_test is None) != (t_test is None):
            raise DataError("give both x_test and t_test, or neither")
        xs = [as_inputs(x_train, cfg.n_inputs, "x_train")]
        ts = [labels_and_one_hot(t_train, cfg.n_outputs, "t_train", cfg.output, cfg.dtype)]
        weights = None if sample_weight is None else sample_weights(sample_weight, len(xs[0]))
        if x_test is not None:
            xs.append(as_inputs(x_test, cfg.n_inputs, "x_test"))
            ts.append(labels_and_one_hot(t_test, cfg.n_outputs, "t_test", cfg.output,
                                         cfg.dtype))
        for name, x, (labels, _) in zip(("train", "test")[: len(xs)], xs, ts, strict=True):
            if len(x) != len(labels):
                raise DataError(f"{name}: {len(x)} inputs but {len(labels)} targets")
            if len(x) == 0:
                raise DataError(f"{name}: the data set is empty")
        self._check_memory(xs)
        val_parts = None
        if cfg.early_stopping is not None:
            n = len(xs[0])
            n_val = int(round(cfg.validation_fraction * n))
            if not 1 <= n_val < n:
                raise DataError(f"validation split of {n_val} rows out of {n} is not usable")
            order = np.random.default_rng(rng.fold_key(cfg.seed, rng.STREAM_SPLIT)).permutation(n)
            val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
            val_parts = (xs[0][val_idx], (ts[0][0][val_idx], ts[0][1][val_idx]))
            xs[0] = xs[0][train_idx]
            ts[0] = (ts[0][0][train_idx], ts[0][1][train_idx])
            if weights is not None:
                weights = weights[train_idx]
                if not weights.sum() > 0:
                    raise DataError("sample_weight: every training row outside the validation "
                                    "split has weight 0")
        self.normalizer = Normalizer(cfg.normalize, cfg.normalize_axis).fit(xs[0], "x_train")
        ops = self._ops()
        train = self._split(ops, xs[0], ts[0], "x_train", workspace)
        if weights is not None:
            train.weights = ops.asarray(weights, cfg.dtype)
        test = self._split(ops, xs[1], ts[1], "x_test", workspace) if len(xs) > 1 else None
        val = self._split(ops, *val_parts, "x_train", workspace) if val_parts else None
        return train, test, val

    def run_memory(self, xs: Sequence[np.ndarray]) -> RunMemory:
        """What a fit on the inputs ``xs`` (x_train, then x_test) holds beside them and the
        network, as far as is known before it starts: the normalised inputs
        (`Ops.inputs_bytes`), the targets, the validation split's copy of x_train, the
        shuffled order and the largest evaluation (`Ops.evaluation_bytes`)."""
        cfg = self.config
        net = self.network
        plan = net.plan if net is not None else Plan.from_config(cfg)
        rows = [len(x) for x in xs]
        ops = self._ops()
        parts = {
            f"inputs normalised to {cfg.dtype}": sum(ops.inputs_bytes(plan, n) for n in rows),
            "targets": sum(rows) * cfg.n_outputs * plan.itemsize,
            "shuffled order": 2 * rows[0] * 8,
            "evaluation": ops.evaluation_bytes(plan, max(rows)),
        }
        if cfg.early_stopping is not None:
            parts["the validation split's copy of x_train"] = xs[0].nbytes
        if cfg.normalize == "z_score" and cfg.normalize_axis is None:
            parts["z_score's float64 copy of x_train"] = xs[0].size * 8  # a pairwise sum
        return RunMemory(parts)

    def _check_memory(self, xs: Sequence[np.ndarray]) -> None:
        """`DataError` before any work when the run would need more memory than the
        machine has free (the figure and its largest parts said)."""
        memory = self.run_memory(xs)
        check_memory(memory.total, f"this run ({memory.describe()})", DataError,
                     memory_advice(self.config.dtype))

    def _split(
        self, ops: Any, x: np.ndarray, target: tuple[np.ndarray, np.ndarray], what: str,
        workspace: Workspace | None,
    ) -> Split:
        dtype = self.config.dtype
        inputs = ops.inputs(x, self.normalizer, dtype, what, workspace)  # no float64 copy
        return Split(inputs, ops.asarray(target[1], dtype), target[0])

    def _ops(self) -> Any:
        """The ops the splits live on: the network's (a fit builds it first), else those of
        the configured backend."""
        if self.network is not None:
            return self.network.ops
        from .backends import get_backend

        return get_backend(self.config.backend)

    # ---- the loop ----
    def fit(
        self,
        x_train: Any,
        t_train: Any,
        x_test: Any = None,
        t_test: Any = None,
        *,
        network: Network | None = None,
        resume: TrainState | None = None,
        callbacks: Sequence[Callback] = (),
        sample_weight: Any = None,
    ) -> History:
        """Train for ``config.epochs`` epochs (continuing ``resume`` when given).

        Without a test set the history records the training (and validation) figures only.
        ``callbacks`` see every epoch's figures (epoch 0 included) and may stop the run (see
        `fastnn.callbacks`). ``sample_weight`` (one number >= 0 per training row) weights each
        row's loss in training (each batch descends its weighted mean loss); the recorded
        figures stay unweighted.
        """
        self.callbacks = list(callbacks)
        cfg = self.config
        net = network if network is not None else Network(cfg)
        self.network = net
        workspace = net.ops.workspace(self.threads)
        train, test, val = self.splits = self.prepare(
            x_train, t_train, x_test, t_test, workspace, sample_weight
        )
        try:
            with net.ops.activate(workspace), np.errstate(all="ignore"):
                net.ops.warm_up(net.plan, weighted=train.weights is not None)
                if resume is None:
                    self.history = History()
                    start = time.perf_counter()
                    elapsed = time.perf_counter() - start
                    self._evaluate_and_record(net, workspace, train, test, val, elapsed, start)
                    self._call_back(0)
                    self.state = self._snapshot(0, None)
                else:
                    self.history = resume.history.copy()
                    net.load_state_arrays(resume.arrays)
                    self.state = resume
                self._loop(net, workspace, train, test, val)
        finally:
            self.counters = dict(workspace.counters)
            workspace.clear()
            if not self.keep_splits:
                self.splits = None
            for callback in self.callbacks:  # loggers: close their files (reopened on resume)
                close = getattr(callback, "close", None)
                if callable(close):
                    close()
        return self.history

    def _loop(
        self, net: Network, workspace: Workspace, train: Split, test: Split | None,
        val: Split | None,
    ) -> None:
        history = self.history
        if not self._stopped():
            if net.ops.overlaps_evaluation(workspace):
                self._overlapped_epochs(net, workspace, train, test, val)
            else:
                self._epochs_in_turn(net, workspace, train, test, val)
        if self.state.best_arrays is not None:  # early stopping: keep the best validation epoch
            net.load_state_arrays(self.state.best_arrays)
            history.events["restored_best_epoch"] = history.events.get("best_val_epoch")
        net.fit_population(train.x)

    def _stopped(self) -> bool:
        events = self.history.events
        return any(events.get(name) is not None for name in STOP_EVENTS)

    def _call_back(self, epoch: int) -> None:
        """Give every callback the figures just recorded; note a request to stop."""
        if not self.callbacks:
            return
        history = self.history

        def last(values: list[float]) -> float | None:
            return values[-1] if values else None

        metrics = EpochMetrics(
            epoch, history.train_acc[-1], history.train_loss[-1], last(history.test_acc),
            last(history.test_loss), last(history.val_acc), last(history.val_loss),
            history.epoch_seconds[-1],
        )
        wants_stop = [call(callback, metrics) for callback in self.callbacks]
        if any(wants_stop) and "stopped_by_callback_at" not in history.events:
            history.events["stopped_by_callback_at"] = epoch

    def _epochs_in_turn(
        self, net: Network, workspace: Workspace, train: Split, test: Split | None,
        val: Split | None,
    ) -> None:
        """Train an epoch, evaluate it, decide, then the next epoch."""
        for epoch in range(self.state.epoch + 1, self.config.epochs + 1):
            start = time.perf_counter()
            tally = self._tally(train.size)
            net.train_epoch(train.x, train.t, self.epoch_order(epoch, train.size), epoch,
                            workspace, self.rate_factors(epoch, train.size), train.weights,
                            tally)
            self._evaluate_and_record(net, workspace, train, test, val, None, start, tally)
            self._call_back(epoch)
            self._after_epoch(net, epoch)
            if self.on_epoch is not None:
                self.on_epoch(self, epoch)
            if self._stopped():
                break

    def _overlapped_epochs(
        self, net: Network, workspace: Workspace, train: Split, test: Split | None,
        val: Split | None,
    ) -> None:
        """The same epochs with both cores busy: a copy of epoch e's parameters is evaluated on
        one thread while epoch e + 1 trains on another. Every figure, decision and snapshot is
        epoch e's, as in turn; when evaluating e stops the run, epoch e + 1's training is
        discarded (the network goes back to epoch e's copy)."""
        from concurrent.futures import ThreadPoolExecutor

        workspace.reserved_threads = 1  # the training thread's
        pending: tuple[int, Network, Any] | None = None
        mark = time.perf_counter()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastnn-evaluate")

        def finish(epoch: int, copy: Network, results: Any) -> bool:
            nonlocal mark
            measured = results.result()
            now = time.perf_counter()
            self._record(measured, now - mark)
            mark = now
            self._call_back(epoch)
            self._after_epoch(copy, epoch)
            if self.on_epoch is not None:
                self.on_epoch(self, epoch)
            return self._stopped()

        try:
            for epoch in range(self.state.epoch + 1, self.config.epochs + 1):
                if pending is not None and self.config.lr_schedule == "plateau":
                    if finish(*pending):  # the factor of this epoch needs the last one's loss
                        pending = None
                        break
                    pending = None
                tally = self._tally(train.size)
                net.train_epoch(train.x, train.t, self.epoch_order(epoch, train.size), epoch,
                                workspace, self.rate_factors(epoch, train.size), train.weights,
                                tally)
                if pending is not None and finish(*pending):
                    net.load_state_arrays(pending[1].state_arrays())  # undo this epoch
                    pending = None
                    break
                copy = net.copy()
                pending = (epoch, copy, executor.submit(
                    self._measure, copy, workspace, train, test, val, tally))
            if pending is not None:
                finish(*pending)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            workspace.reserved_threads = 0

    # ---- using the trained network on raw inputs ----
    def _raw_inputs(self, x: Any) -> Any:
        if self.network is None or self.normalizer is None:
            raise DataError("the trainer has not been fitted: call fit first")
        inputs = self.normalizer.transform(as_inputs(x, self.config.n_inputs, "x"), "x")
        return self.network.ops.asarray(inputs, self.config.dtype)

    def outputs(self, x: Any) -> np.ndarray:
        """The fitted network's outputs (class probabilities, or regression values) for raw
        inputs, normalised as the training set was; each row's independent of the others
        (batch norm uses the population statistics, `Network.forward_inference`)."""
        inputs = self._raw_inputs(x)
        net = self.network
        return np.asarray(net.ops.to_numpy(net.forward_inference(inputs)))

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities of raw inputs (a classifier: softmax output)."""
        if self.config.output != "softmax_cross_entropy":
            raise DataError("predict_proba needs a classifier (output softmax_cross_entropy)")
        return self.outputs(x)

    def predict(self, x: Any) -> np.ndarray:
        """Predicted class indices (0..k-1) of raw inputs, or regression values."""
        outputs = self.outputs(x)
        if self.config.output != "softmax_cross_entropy":
            return outputs
        return outputs.argmax(axis=1)

    def accuracy_and_loss(self, x: Any, t: Any) -> tuple[float, float]:
        """(accuracy, loss with the weight-decay penalty) of raw inputs and their targets
        (integer labels or one-hot rows), in evaluation mode."""
        labels, one_hot = labels_and_one_hot(t, self.config.n_outputs, "t",
                                             self.config.output)
        inputs = self._raw_inputs(x)
        if len(labels) != len(inputs):
            raise DataError(f"{len(inputs)} inputs but {len(labels)} targets")
        net = self.network
        targets = net.ops.asarray(one_hot, self.config.dtype)
        accuracy, loss, _ = net.scores(inputs, targets, labels)
        return accuracy, loss

    def model(self, classes: Sequence[Any] | None = None) -> Model:
        """The fitted network with its input normaliser (and class labels) as a `Model`."""
        if self.network is None or self.normalizer is None:
            raise DataError("the trainer has not been fitted: call fit first")
        return Model(self.network, self.normalizer, classes)

    def save(self, path: str | Path, classes: Sequence[Any] | None = None) -> None:
        """Save the fitted model (network, input normaliser, class labels) to one .npz file;
        ``fastnn.Model.load(path).predict(raw_x)`` predicts as this trainer does."""
        self.model(classes).save(path)

    def rate_factors(self, epoch: int, n: int) -> np.ndarray | None:
        """The schedule's rate factor of each step of ``epoch`` over ``n`` training rows (None:
        a constant rate)."""
        cfg = self.config
        plateau = Plateau.from_dict(self.state.plateau) if self.state.plateau else Plateau()
        n_steps = -(-n // cfg.batch_size)
        return epoch_factors(self.network.plan.schedule, epoch, n_steps, cfg.eta, plateau.factor)

    def epoch_order(self, epoch: int, n: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the training rows (its own random stream)."""
        if not self.config.shuffle:
            return np.arange(n)
        key = rng.fold_key(self.config.seed, rng.STREAM_SHUFFLE, epoch)
        return np.random.default_rng(key).permutation(n)

    def _tally(self, rows: int) -> np.ndarray | None:
        """Where an epoch's steps put their sums of losses and correct rows (``train_figures``
        running), else None."""
        if self.config.train_figures != "running":
            return None
        return np.zeros((-(-rows // self.config.batch_size), 2))

    def _evaluate_and_record(
        self,
        net: Network,
        workspace: Workspace,
        train: Split,
        test: Split | None,
        val: Split | None,
        seconds: float | None,
        start: float,
        tally: np.ndarray | None = None,
    ) -> None:
        measured = self._measure(net, workspace, train, test, val, tally)
        self._record(measured, time.perf_counter() - start if seconds is None else seconds)

    @staticmethod
    def _measure(
        net: Network, workspace: Workspace, train: Split, test: Split | None, val: Split | None,
        tally: np.ndarray | None = None,
    ) -> tuple[Any, ...]:
        """Evaluate a network on every split (any thread): the figures `_record` takes. With
        the epoch's ``tally`` the training figures are its running means (no evaluation of
        the training set; no predicted classes)."""
        if tally is None:
            train_acc, train_loss, predicted = net.scores(train.x, train.t, train.labels,
                                                          workspace)
        else:
            loss_sum, correct = tally.sum(axis=0)
            train_acc = float(correct) / train.size
            train_loss = float(loss_sum) / train.size + net.penalty()
            predicted = np.empty(0, np.int64)
        test_result = (
            net.scores(test.x, test.t, test.labels, workspace)[:2] if test is not None else None
        )
        val_result = (
            net.scores(val.x, val.t, val.labels, workspace)[:2] if val is not None else None
        )
        bn_params = {
            name: net.ops.to_numpy(value).tolist()
            for name, value in net.params.items() if name.startswith(("gamma", "beta"))
        }
        return (train_acc, train_loss), test_result, val_result, predicted, bn_params

    def _record(self, measured: tuple[Any, ...], seconds: float) -> None:
        """Append one evaluation's figures to the history; check for divergence."""
        train_result, test_result, val_result, predicted, bn_params = measured
        self.history.record(train_result, test_result, seconds, val_result)
        if bn_params:
            self.history.record_bn_params(bn_params)
        self._check_divergence(train_result[1], predicted)

    def _check_divergence(self, train_loss: float, predicted: np.ndarray) -> None:
        history = self.history
        epoch = len(history.train_loss) - 1
        if epoch == 0 or "diverged_at" in history.events:
            return
        # collapsed: one class predicted for every row, with the loss no better than at the start
        # (a classifier only: a regression's argmax says nothing, one output always "agrees")
        # or no better than guessing (cross-entropy of a uniform guess: ln of the class count)
        chance = math.log(self.config.n_outputs)
        collapsed = (
            self.config.output == "softmax_cross_entropy"
            and predicted.size > 1
            and bool(np.all(predicted == predicted[0]))
            and train_loss >= min(0.9 * history.train_loss[0], 0.95 * chance)
        )
        if np.isfinite(train_loss) and not collapsed:
            return
        reason = "non-finite loss" if not np.isfinite(train_loss) else "it predicts one class"
        history.events["diverged_at"] = epoch
        history.events["divergence"] = reason
        if reason == "non-finite loss" or train_loss > 1.5 * chance:
            message = f"training diverged at epoch {epoch} ({reason}); try a smaller eta or " \
                "batch norm"
        else:
            message = (
                f"training is stuck at chance at epoch {epoch} (it predicts one class for every "
                f"row, loss {train_loss:.3g}); try a smaller eta, batch norm, normalised inputs "
                "or another initialisation"
            )
        if self.config.stop_on_divergence:
            history.events["stopped_on_divergence_at"] = epoch
            message += "; stopping (--stop-on-divergence)"
        warnings.warn(message, DivergenceWarning, stacklevel=_caller_outside_fastnn())

    def _after_epoch(self, net: Network, epoch: int) -> None:
        """The decisions after an epoch's figures: early stopping (validation loss),
        convergence (n_iter_no_change on the training loss), the plateau schedule's factor."""
        cfg, state, history = self.config, self.state, self.history
        best_arrays, best_loss, waited = (
            state.best_arrays,
            state.best_val_loss,
            state.epochs_without_gain,
        )
        if cfg.early_stopping is not None:
            loss = history.val_loss[-1]
            if best_loss is None or loss < best_loss - cfg.tol:
                best_loss, waited, best_arrays = loss, 0, net.state_arrays()
                history.events["best_val_epoch"] = epoch
            else:
                waited += 1
                if waited >= cfg.early_stopping:
                    history.events["stopped_early_at"] = epoch
        best_train, train_waited = state.best_train_loss, state.epochs_without_train_gain
        if cfg.n_iter_no_change is not None:  # scikit-learn's rule for its MLPs
            loss = history.train_loss[-1]
            if best_train is not None and loss > best_train - cfg.tol:
                train_waited += 1
                if train_waited >= cfg.n_iter_no_change:
                    history.events["converged_at"] = epoch
            else:
                train_waited = 0
            if best_train is None or loss < best_train:  # any gain lowers the bar
                best_train = loss
        plateau = state.plateau
        if cfg.lr_schedule == "plateau":
            watcher = Plateau.from_dict(plateau) if plateau else Plateau()
            watched = history.val_loss if cfg.plateau_loss == "validation" else history.train_loss
            watcher.observe(net.plan.schedule, watched[-1], cfg.tol, cfg.eta)
            plateau = watcher.to_dict()
        self.state = self._snapshot(epoch, best_arrays, best_loss, waited, net)
        self.state.best_train_loss = best_train
        self.state.epochs_without_train_gain = train_waited
        self.state.plateau = plateau

    def _snapshot(
        self, epoch: int, best_arrays: dict | None, best_loss: float | None = None, waited: int = 0,
        net: Network | None = None,
    ) -> TrainState:
        """The state after ``epoch`` (``net``: the network as it was then; default the live one)."""
        history = self.history.copy()  # frozen
        source = self.network if net is None else net
        return TrainState(epoch, history, source.state_arrays(), best_arrays, best_loss, waited)


def sample_weights(values: Any, rows: int) -> np.ndarray:
    """``sample_weight`` as float64 (rows,), checked: finite, >= 0, not all 0."""
    weights = np.asarray(values)
    if weights.ndim == 0:
        weights = np.full(rows, weights)
    if weights.shape != (rows,):
        raise DataError(f"sample_weight: expected one weight per training row ({rows},); got "
                        f"shape {weights.shape}")
    if not (np.issubdtype(weights.dtype, np.number) or weights.dtype == np.bool_) or (
            np.iscomplexobj(weights)):
        raise DataError(f"sample_weight: real numbers expected; got dtype {weights.dtype}")
    weights = weights.astype(np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise DataError("sample_weight: weights must be finite and >= 0")
    if not weights.sum() > 0:
        raise DataError("sample_weight: every weight is zero; at least one must be > 0")
    return weights


def _caller_outside_fastnn() -> int:
    """The ``stacklevel`` (for a warning raised by this function's caller) of the first frame
    outside the fastnn package: a warning points at the user's code that called fastnn."""
    package = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level
