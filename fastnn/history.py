"""`History`: per-epoch metrics of a run and the article's summary columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

THRESHOLDS = (0.95, 0.97, 0.98)


@dataclass
class History:
    """Arrays of length epochs + 1 (index 0 is before training); losses include the penalty.

    ``epoch_seconds[k]`` is the time of epoch k, its evaluation included; ``epoch_seconds[0]``
    is the initial evaluation, which ``total_seconds`` leaves out.
    """

    train_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    #: notes on how the run ended: "diverged_at", "stopped_early_at", "best_val_epoch", ...
    events: dict[str, Any] = field(default_factory=dict)
    #: learnable batch-norm parameters per epoch: "gamma1" -> one list of values per epoch
    bn_params: dict[str, list[list[float]]] = field(default_factory=dict)

    def record_bn_params(self, params: dict[str, Any]) -> None:
        """Append one epoch's gamma/beta values (host arrays or lists), by parameter name."""
        for name, values in params.items():
            self.bn_params.setdefault(name, []).append([float(v) for v in values])

    def record(
        self,
        train: tuple[float, float],
        test: tuple[float, float] | None,
        seconds: float,
        val: tuple[float, float] | None = None,
    ) -> None:
        """Append one epoch's (accuracy, loss) pairs and its time (no test pair: a run
        without a test set)."""
        self.train_acc.append(train[0])
        self.train_loss.append(train[1])
        if test is not None:
            self.test_acc.append(test[0])
            self.test_loss.append(test[1])
        self.epoch_seconds.append(seconds)
        if val is not None:
            self.val_acc.append(val[0])
            self.val_loss.append(val[1])

    def copy(self) -> History:
        """A copy that later records leave as it is (each list copied; values are numbers)."""
        return History(
            *(list(getattr(self, name)) for name in _FIGURES),
            events=dict(self.events),
            bn_params={name: list(rows) for name, rows in self.bn_params.items()},
        )

    @property
    def epochs(self) -> int:
        """Epochs trained (entries minus the initial one)."""
        return max(len(self.train_acc) - 1, 0)

    @property
    def total_seconds(self) -> float:
        """Time of the epochs, evaluation included, epoch 0 excluded."""
        return float(sum(self.epoch_seconds[1:]))

    @property
    def final_epoch(self) -> int:
        """The epoch whose model the run kept: the restored best epoch after early stopping,
        else the last one."""
        restored = self.events.get("restored_best_epoch")
        if isinstance(restored, int) and 0 <= restored < len(self.train_acc):
            return restored
        return max(len(self.train_acc) - 1, 0)

    def summary(self) -> dict[str, Any]:
        """Final train/test accuracy (of the kept model: `final_epoch`), first epoch reaching
        95/97/98 % test accuracy (None when never), best test accuracy and its epoch (the first
        on ties), lowest test loss."""
        if not self.train_acc:
            raise ValueError("empty history")
        final = self.final_epoch
        out: dict[str, Any] = {
            "final_epoch": final,
            "train_acc": self.train_acc[final],
            "train_loss": self.train_loss[final],
        }
        if not self.test_acc:  # a run without a test set
            out.update(dict.fromkeys(
                ("test_acc", "test_loss", *(f"epoch_{round(t * 100)}" for t in THRESHOLDS),
                 "best_test_acc", "best_epoch", "lowest_test_loss", "lowest_loss_epoch")))
            out.update(epochs=self.epochs, total_seconds=self.total_seconds)
            return out
        best = max(range(len(self.test_acc)), key=lambda k: (self.test_acc[k], -k))
        low = min(range(len(self.test_loss)), key=lambda k: (self.test_loss[k], k))
        out.update(test_acc=self.test_acc[final], test_loss=self.test_loss[final])
        for threshold in THRESHOLDS:
            reached = [k for k, acc in enumerate(self.test_acc) if acc >= threshold]
            out[f"epoch_{round(threshold * 100)}"] = reached[0] if reached else None
        out.update(
            best_test_acc=self.test_acc[best],
            best_epoch=best,
            lowest_test_loss=self.test_loss[low],
            lowest_loss_epoch=low,
            epochs=self.epochs,
            total_seconds=self.total_seconds,
        )
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready arrays and events (non-finite values are written as null by the CLI)."""
        data: dict[str, Any] = {
            "train_acc": self.train_acc,
            "train_loss": self.train_loss,
            "test_acc": self.test_acc,
            "test_loss": self.test_loss,
            "epoch_seconds": self.epoch_seconds,
        }
        if self.val_acc:
            data.update(val_acc=self.val_acc, val_loss=self.val_loss)
        data["events"] = self.events
        if self.bn_params:
            data["bn_params"] = self.bn_params
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """Inverse of `to_dict`; a `ValueError` naming the first thing that is not as
        `to_dict` writes it (a list of numbers or nulls per figure, one entry per evaluation,
        test and validation figures all there or all absent)."""
        if not isinstance(data, dict):
            raise ValueError(f"the history is a {type(data).__name__}, not an object")
        history = cls(**{key: _numbers(data.get(key, []), key) for key in _FIGURES})
        entries = len(history.train_acc)
        for group, optional in ((("train_loss",), False), (("test_acc", "test_loss"), True),
                                (("epoch_seconds",), True)):
            lengths = {key: len(getattr(history, key)) for key in group}
            if set(lengths.values()) != {entries} and not (
                    optional and set(lengths.values()) == {0}):
                key = next(k for k, n in lengths.items() if n != entries)
                raise ValueError(f"history {key} has {lengths[key]} entries, train_acc "
                                 f"{entries}")
        # validation: from epoch 0 on, for as long as it ran (partial_fit goes on without)
        if len(history.val_acc) != len(history.val_loss) or len(history.val_acc) > entries:
            raise ValueError(f"history val_acc and val_loss have {len(history.val_acc)} and "
                             f"{len(history.val_loss)} entries, train_acc {entries}")
        events = data.get("events", {})
        if not isinstance(events, dict):
            raise ValueError(f"history events is a {type(events).__name__}, not an object")
        history.events = dict(events)
        bn_params = data.get("bn_params") or {}
        if not isinstance(bn_params, dict):
            raise ValueError(f"history bn_params is a {type(bn_params).__name__}, not an object")
        for name, rows in bn_params.items():
            if not isinstance(rows, list) or len(rows) != entries:
                raise ValueError(f"history bn_params {name}: expected {entries} lists of values")
            history.bn_params[str(name)] = [_numbers(row, f"bn_params {name}") for row in rows]
        return history


#: the per-evaluation figures of a `History`, as `to_dict` names them (constructor order)
_FIGURES = ("train_acc", "train_loss", "test_acc", "test_loss", "epoch_seconds", "val_acc",
            "val_loss")


def _numbers(values: Any, name: str) -> list[float]:
    """A list of numbers (null: NaN) of a history; `ValueError` naming it otherwise."""
    if not isinstance(values, list):
        raise ValueError(f"history {name} is a {type(values).__name__}, not a list")
    out = []
    for value in values:
        if value is None:
            out.append(float("nan"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(float(value))
        else:
            raise ValueError(f"history {name} holds a {type(value).__name__}, not a number")
    return out


def format_table(rows: Sequence[tuple[str | Mapping[str, str], Mapping[str, Any]]]) -> str:
    """The article's result table: each row's label columns, then train %, test % (of the kept
    model), the first epochs reaching 95/97/98 %, best test % and its epoch, and the epoch of
    the kept model ("kept": the last, or the restored best after early stopping).

    A row's label is a mapping of column name to text (e.g. the grid values of a sweep point)
    or a plain string, shown in a column "run". Columns are as wide as their longest text.
    """
    labels = [{"run": label} if isinstance(label, str) else dict(label) for label, _ in rows]
    columns = list(dict.fromkeys(column for label in labels for column in label)) or ["run"]
    widths = {
        column: max([len(column), *(len(label.get(column, "")) for label in labels)])
        for column in columns
    }
    header = " ".join(f"{column:<{widths[column]}}" for column in columns) + (
        f" {'train':>7} {'test':>7} {'95':>4} {'97':>4} {'98':>4} {'best':>7} {'ep':>4} "
        f"{'kept':>4}"
    )
    lines = [header, "-" * len(header)]
    for label, (_, s) in zip(labels, rows, strict=True):
        ep = {k: "-" if s[k] is None else str(s[k]) for k in ("epoch_95", "epoch_97", "epoch_98")}
        lines.append(
            " ".join(f"{label.get(column, ''):<{widths[column]}}" for column in columns)
            + f" {_percent(s['train_acc'])} {_percent(s['test_acc'])} "
            f"{ep['epoch_95']:>4} {ep['epoch_97']:>4} {ep['epoch_98']:>4} "
            f"{_percent(s['best_test_acc'])} {_text(s['best_epoch']):>4} "
            f"{_text(s.get('final_epoch', s.get('epochs'))):>4}"
        )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return f"{'-':>7}" if value is None else f"{100 * value:7.2f}"


def _text(value: Any) -> str:
    return "-" if value is None else str(value)
