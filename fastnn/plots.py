"""Charts of runs and saved models (needs matplotlib: ``pip install matplotlib``).

Each ``*_figure`` function returns a matplotlib `Figure` drawn on the Agg canvas (no pyplot,
so no global state is touched); `save_figure` writes one to a file. `KINDS` names the charts
of ``fastnn plot --kind``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError, FastnnError, MissingDependency
from .fileio import write_atomically
from .history import History

#: the charts of ``fastnn plot --kind`` (the first is the default)
KINDS = ("curves", "loss-direction", "weights", "gamma-beta", "gamma-beta-hist", "tune")
#: more runs than this put the legend outside the axes
LEGEND_INSIDE_MAX = 4
#: focused y-ranges: accuracy from this low percentile, loss up to this high one
ACC_PERCENTILE, LOSS_PERCENTILE = 5.0, 95.0

Runs = Sequence[tuple[str, History]]


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401 - first, so that a blocked matplotlib fails here
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise MissingDependency("plotting needs matplotlib: pip install matplotlib") from None


def _figure(ncols: int = 1, nrows: int = 1, width: float = 4.5, height: float = 3.6) -> Any:
    """A constrained-layout Figure of nrows x ncols panels on an Agg canvas, and its axes."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def image_format(path: str | Path) -> str:
    """The image format named by path's extension; `ConfigError` listing the formats
    matplotlib can write when it names none of them."""
    _require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ConfigError(
            f"{path}: give a chart file name ending in an image extension "
            f"({', '.join('.' + name for name in formats)})"
        )
    return suffix


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` atomically to exactly ``path``, in the format its extension names."""
    path = Path(path)
    fmt = image_format(path)
    write_atomically(path, lambda handle: fig.savefig(handle, format=fmt, dpi=dpi))
    return path


def labels_for(paths: Sequence[str | Path]) -> list[str]:
    """Short labels of files: the file stems, the paths as given where stems repeat, and a
    ``#2``, ``#3`` ... where even those do."""
    stems = [Path(p).stem for p in paths]
    labels = [
        stem if stems.count(stem) == 1 else str(p) for stem, p in zip(stems, paths, strict=True)
    ]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return unique


def _colors(n: int) -> list[str]:
    """n colors of the default cycle (repeating after ten)."""
    palette = [f"C{k}" for k in range(10)]
    return [palette[k % len(palette)] for k in range(n)]


def _integer_ticks(ax: Any, axis: str = "x") -> None:
    from matplotlib.ticker import MaxNLocator

    getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))


def _legend(fig: Any, ax: Any, handles: list[Any], n_runs: int, loc: str = "best") -> None:
    """The legend in ``ax``, or outside the axes (right of the figure) for many runs."""
    if not handles:
        return
    if n_runs > LEGEND_INSIDE_MAX:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    else:
        ax.legend(handles=handles, loc=loc, fontsize=8)


def _finite_after_epoch_0(series: Sequence[Sequence[float]]) -> np.ndarray:
    values = np.concatenate([np.asarray(s[1:], float) for s in series] or [np.zeros(0)])
    return values[np.isfinite(values)]


def accuracy_range(series: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """The focused accuracy range: from a low percentile of the values after epoch 0 (less a
    margin) to 1; None when there are none."""
    values = _finite_after_epoch_0(series)
    if values.size == 0:
        return None
    low = float(np.percentile(values, ACC_PERCENTILE))
    low = max(0.0, low - 0.05 * max(1.0 - low, 0.02))
    return (min(low, 0.98), 1.0)


def loss_range(
    series: Sequence[Sequence[float]], percentile: float = LOSS_PERCENTILE
) -> tuple[float, float] | None:
    """The focused loss range: the lowest value after epoch 0 to a high percentile of them,
    with margins; None when there are none."""
    values = _finite_after_epoch_0(series)
    if values.size == 0:
        return None
    low, high = float(values.min()), float(np.percentile(values, percentile))
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return (low - pad, high + pad)


def _set_ylim(ax: Any, limits: tuple[float, float] | None) -> None:
    if limits is not None:
        ax.set_ylim(*limits)


def curves_figure(runs: Runs, *, full_range: bool = False, title: str | None = None) -> Any:
    """Accuracy and loss per epoch of several runs (test solid, train dashed, validation
    dotted; one color per run). Unless ``full_range`` the y-ranges focus on where the runs
    differ: accuracy from a low percentile up (`accuracy_range`), loss over every value after
    epoch 0 (`loss_range` at percentile 100), so no loss line is cut off after epoch 0."""
    from matplotlib.lines import Line2D

    fig, axes = _figure(2, width=6.0, height=4.5)
    acc_ax, loss_ax = axes[0]
    styles = (("test", "-"), ("train", "--"), ("val", ":"))
    used: set[str] = set()
    accuracies: list[list[float]] = []
    losses: list[list[float]] = []
    handles = []
    for (label, history), color in zip(runs, _colors(len(runs)), strict=True):
        for split, style in styles:
            acc, loss = getattr(history, f"{split}_acc"), getattr(history, f"{split}_loss")
            if not acc:
                continue
            used.add(split)
            acc_ax.plot(range(len(acc)), acc, style, color=color, label=f"{label} {split}")
            loss_ax.plot(range(len(loss)), loss, style, color=color, label=f"{label} {split}")
            accuracies.append(acc)
            losses.append(loss)
        handles.append(Line2D([], [], color=color, label=label))
    names = {"test": "test", "train": "train", "val": "validation"}
    handles += [
        Line2D([], [], color="0.3", linestyle=style, label=names[split])
        for split, style in styles
        if split in used
    ]
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    if not full_range:  # every line whole after epoch 0 (the untrained loss is off the top)
        _set_ylim(acc_ax, accuracy_range(accuracies))
        _set_ylim(loss_ax, loss_range(losses, percentile=100))
    for ax in (acc_ax, loss_ax):
        _integer_ticks(ax)
        ax.grid(alpha=0.3)
    _legend(fig, acc_ax, handles, len(runs), loc="lower right")
    if title:
        fig.suptitle(title)
    return fig


def loss_direction(loss: Sequence[float]) -> tuple[list[int], list[int]]:
    """The epochs whose loss fell, and those whose loss rose, from the epoch before."""
    fell = [k for k in range(1, len(loss)) if loss[k] < loss[k - 1]]
    rose = [k for k in range(1, len(loss)) if loss[k] > loss[k - 1]]
    return fell, rose


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    ncols = max(1, min(n, max_cols))
    return ncols, max(1, math.ceil(n / ncols))


def loss_direction_figure(
    runs: Runs, *, full_range: bool = False, title: str | None = None
) -> Any:
    """One panel per run: test loss per epoch (train loss for a run without a test set), each
    epoch marked by whether it fell (green down-triangle) or rose (red up-triangle). Unless
    ``full_range`` the y-axis spans the epochs after 0 (the untrained loss is off the top)."""
    ncols, nrows = _grid(len(runs))
    fig, axes = _figure(ncols, nrows)
    flat = list(axes.flat)
    for ax, (label, history) in zip(flat, runs, strict=False):
        which, loss = ("test", history.test_loss) if history.test_loss else (
            "train", history.train_loss)
        fell, rose = loss_direction(loss)
        ax.plot(range(len(loss)), loss, "-", color="0.6", linewidth=1, label=f"{which} loss")
        ax.plot(fell, [loss[k] for k in fell], "v", color="tab:green", linestyle="none",
                label=f"fell ({len(fell)})")
        ax.plot(rose, [loss[k] for k in rose], "^", color="tab:red", linestyle="none",
                label=f"rose ({len(rose)})")
        if not full_range:
            _set_ylim(ax, loss_range([loss], percentile=100))
        ax.set(title=label, xlabel="epoch", ylabel=f"{which} loss")
        _integer_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in flat[len(runs):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The weight matrices (W1, W2, ...) of a model file written by ``fastnn train
    --save-model`` (`Trainer.save`); `DataError` naming the file if it is not one."""
    from .model import Model

    try:
        params = Model.load(path, backend="numpy").network.numpy_params()
    except (FastnnError, KeyError, TypeError, ValueError, AttributeError):
        raise DataError(
            f"{path}: not a fastnn model file (write one with fastnn train --save-model FILE.npz)"
        ) from None
    return {name: value for name, value in params.items() if re.fullmatch(r"W\d+", name)}


def _numbered(names: Sequence[str], prefix: str) -> list[str]:
    """The names ``prefix<k>`` among names, by k."""
    found = {int(m.group(1)) for name in names if (m := re.fullmatch(prefix + r"(\d+)", name))}
    return [f"{prefix}{k}" for k in sorted(found)]


def weights_figure(
    models: Sequence[tuple[str, Mapping[str, np.ndarray]]], *, bins: int | None = None,
    title: str | None = None,
) -> Any:
    """One histogram per layer (W1, W2, ...) of several models' weights, overlaid with
    transparency on shared bins (default: sqrt of the layer's size, 10 to 60); the legend
    gives each model's weight standard deviation."""
    from matplotlib.patches import Patch

    layers = _numbered([name for _, weights in models for name in weights], "W")
    if not layers:
        raise DataError("no weight matrices to plot")
    ncols, nrows = _grid(len(layers))
    fig, axes = _figure(ncols, nrows)
    flat = list(axes.flat)
    colors = _colors(len(models))
    for ax, layer in zip(flat, layers, strict=False):
        present = [
            (label, np.asarray(weights[layer], float).ravel(), color)
            for (label, weights), color in zip(models, colors, strict=True)
            if layer in weights
        ]
        values = np.concatenate([w for _, w, _ in present])
        count = bins or min(60, max(10, round(math.sqrt(max(w.size for _, w, _ in present)))))
        edges = np.histogram_bin_edges(values[np.isfinite(values)], bins=count)
        handles = []
        for label, w, color in present:
            ax.hist(w, bins=edges, color=color, alpha=0.5, label=label)
            handles.append(Patch(color=color, alpha=0.5, label=f"{label} (sd {np.std(w):.3g})"))
        shapes = {np.shape(weights[layer]) for _, weights in models if layer in weights}
        shape = f" ({' x '.join(map(str, shapes.pop()))})" if len(shapes) == 1 else ""
        ax.set(title=layer + shape, xlabel="weight", ylabel="count")
        _integer_ticks(ax, "y")
        ax.grid(alpha=0.3)
        if len(models) <= LEGEND_INSIDE_MAX:
            ax.legend(handles=handles, fontsize=8)
        elif ax is flat[0]:
            _legend(fig, ax, handles, len(models))
    for ax in flat[len(layers):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def _bn_layers(runs: Runs) -> list[int]:
    """The hidden layers with gamma/beta in any run; `DataError` naming a run without."""
    for label, history in runs:
        if not history.bn_params:
            raise DataError(
                f"{label}: no batch-norm gamma/beta in its history; train it with "
                "--batch-norm bn or node"
            )
    names = [name for _, history in runs for name in history.bn_params]
    layers = {int(n[len(kind):]) for kind in ("gamma", "beta") for n in _numbered(names, kind)}
    if not layers:
        raise DataError("no gamma/beta parameters in the runs' batch-norm history")
    return sorted(layers)


def _bn_values(history: History, name: str) -> np.ndarray:
    """Epochs x values of one parameter (NaN where missing)."""
    rows = history.bn_params[name]
    width = max((len(row) for row in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for k, row in enumerate(rows):
        out[k, : len(row)] = row
    return out


def gamma_beta_figure(runs: Runs, *, title: str | None = None) -> Any:
    """Gamma and beta of every hidden layer per epoch, one panel per parameter (rows: layers):
    a line per run for BN (one value per layer); for BN(n) the mean over the nodes with bands
    from the 25th to the 75th percentile and from the minimum to the maximum."""
    from matplotlib.lines import Line2D

    layers = _bn_layers(runs)
    fig, axes = _figure(2, len(layers))
    colors = _colors(len(runs))
    per_node = False
    for row, layer in zip(axes, layers, strict=True):
        for ax, kind in zip(row, ("gamma", "beta"), strict=True):
            name = f"{kind}{layer}"
            for (label, history), color in zip(runs, colors, strict=True):
                if name not in history.bn_params:
                    continue
                values = _bn_values(history, name)
                epochs = np.arange(len(values))
                if values.shape[1] == 1:
                    ax.plot(epochs, values[:, 0], color=color, label=label)
                    continue
                per_node = True
                with warnings.catch_warnings():  # all-NaN epochs (a diverged run)
                    warnings.simplefilter("ignore", RuntimeWarning)
                    low, q25, mean, q75, high = (
                        np.nanmin(values, 1), np.nanpercentile(values, 25, 1),
                        np.nanmean(values, 1), np.nanpercentile(values, 75, 1),
                        np.nanmax(values, 1),
                    )
                ax.fill_between(epochs, low, high, color=color, alpha=0.12, linewidth=0)
                ax.fill_between(epochs, q25, q75, color=color, alpha=0.3, linewidth=0)
                ax.plot(epochs, mean, color=color, label=label)
            ax.set(title=name, ylabel=kind)
            _integer_ticks(ax)
            ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=color, label=label)
        for (label, _), color in zip(runs, colors, strict=True)
    ]
    _legend(fig, axes[0][0], handles, len(runs))
    fig.supxlabel(
        "epoch" + ("  (per-node runs: mean, 25-75 % and min-max bands)" if per_node else "")
    )
    if title:
        fig.suptitle(title)
    return fig


def gamma_beta_hist_figure(
    runs: Runs, *, bins: int = 20, first_epoch: bool = True, title: str | None = None
) -> Any:
    """Histograms of the per-node gamma and beta values at each run's final epoch (the kept
    model's), one panel per parameter (rows: layers); with ``first_epoch`` also epoch 1's
    values as a dashed outline, for contrast."""
    layers = _bn_layers(runs)
    fig, axes = _figure(2, len(layers))
    colors = _colors(len(runs))
    for row, layer in zip(axes, layers, strict=True):
        for ax, kind in zip(row, ("gamma", "beta"), strict=True):
            name = f"{kind}{layer}"
            drawn = []  # (label, color, epoch, finite values, outline)
            for (label, history), color in zip(runs, colors, strict=True):
                if name not in history.bn_params:
                    continue
                values = _bn_values(history, name)
                final = min(history.final_epoch, len(values) - 1)
                epochs = [final, 1] if first_epoch and final > 1 else [final]
                for epoch in epochs:
                    v = values[epoch][np.isfinite(values[epoch])]
                    drawn.append((label, color, epoch, v, epoch != final))
            everything = np.concatenate([d[3] for d in drawn] or [np.zeros(0)])
            if everything.size == 0:
                ax.set(title=name)
                continue
            if all(d[3].size <= 1 for d in drawn):  # BN: one value per layer, as points
                _scalar_points(ax, drawn, kind)
                ax.set(title=name)
                continue
            edges = np.histogram_bin_edges(everything, bins=bins)
            for label, color, epoch, v, outline in drawn:
                if v.size == 1:  # a BN layer's one value beside per-node ones: a line across
                    ax.axvline(float(v[0]), color=color, linewidth=2,
                               linestyle="--" if outline else "-",
                               label=f"{label} epoch {epoch}: {float(v[0]):.4g} (one value)")
                    continue
                style = (
                    {"histtype": "step", "linestyle": "--"} if outline else {"alpha": 0.5}
                )
                ax.hist(v, bins=edges, color=color, label=f"{label} epoch {epoch}", **style)
            ax.set(title=name, xlabel=kind, ylabel="nodes")
            _integer_ticks(ax, "y")
            ax.grid(alpha=0.3)
            if len(runs) <= LEGEND_INSIDE_MAX:
                ax.legend(fontsize=8)
            elif ax is axes[0][0]:
                fig.legend(handles=ax.get_legend_handles_labels()[0],
                           loc="outside right upper", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def _scalar_points(ax: Any, drawn: list[tuple[Any, ...]], kind: str) -> None:
    """One value per run and epoch (the BN variant's scalar gamma or beta) as a point on its
    own row, labelled with its value: a count-1 bar would hide beside per-node histograms.
    The final epoch is a filled point, epoch 1 a hollow one."""
    labels = list(dict.fromkeys(label for label, *_ in drawn))
    for label, color, epoch, v, outline in drawn:
        if v.size == 0:
            continue
        row = labels.index(label)
        ax.plot(v, [row], "o", markersize=8, color=color,
                markerfacecolor="none" if outline else color,
                label=f"{label} epoch {epoch}")
        ax.annotate(f"{float(v[0]):.4g}", (float(v[0]), row), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.margins(x=0.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))  # long tick labels must not run together
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.set(xlabel=kind)
    ax.grid(alpha=0.3, axis="x")
    if len(labels) <= LEGEND_INSIDE_MAX:
        ax.legend(fontsize=8)


def tune_figure(study: Any, *, title: str | None = None) -> Any:
    """A `fastnn tune` study: each trial's score by trial number (completed points, pruned
    crosses at their last reported value) with the best so far as a line, and the searched
    options' importances (Optuna's fANOVA) as bars."""
    from optuna.importance import get_param_importances
    from optuna.trial import TrialState

    fig, axes = _figure(2, width=6.0, height=4.0)
    history_ax, importance_ax = axes[0]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if done:
        numbers = [t.number for t in done]
        values = [t.value for t in done]
        history_ax.plot(numbers, values, "o", color="C0", label="completed")
        best, running = [], math.inf
        for value in values:
            running = min(running, value)
            best.append(running)
        history_ax.step(numbers, best, where="post", color="C1", label="best so far")
    if pruned:
        history_ax.plot([t.number for t in pruned],
                        [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                        "x", color="0.5", label="pruned (last report)")
    history_ax.set(xlabel="trial", ylabel="validation loss", title="search history")
    _integer_ticks(history_ax)
    history_ax.grid(alpha=0.3)
    if done or pruned:
        history_ax.legend(fontsize=8)
    importances = get_param_importances(study) if len(done) >= 2 else {}
    if importances:
        names = list(importances)[::-1]
        importance_ax.barh(names, [importances[n] for n in names], color="C0")
    else:
        importance_ax.text(0.5, 0.5, "needs two completed trials", ha="center",
                           transform=importance_ax.transAxes)
    importance_ax.set(xlabel="importance (fANOVA)", title="option importance")
    importance_ax.grid(alpha=0.3, axis="x")
    if title:
        fig.suptitle(title)
    return fig


def read_study(path: str | Path) -> Any:
    """The study of a `fastnn tune` output folder (or its ``study.db``); `DataError`
    naming the path when there is none."""
    from .tune import optuna_module

    optuna = optuna_module()
    path = Path(path)
    database = path / "study.db" if path.is_dir() else path
    if not database.is_file():
        raise DataError(f"{path}: no tune study (give a fastnn tune --out-dir or its study.db)")
    storage = f"sqlite:///{database.resolve()}"
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # noqa: BLE001 - Optuna raises many kinds for a foreign file
        raise DataError(f"{database}: not an Optuna study database ({exc})") from None
    if len(names) != 1:
        raise DataError(f"{database}: {len(names)} studies; this chart draws one")
    return optuna.load_study(study_name=names[0], storage=storage)


def plot_runs(
    runs: Runs, path: str | Path, *, full_range: bool = False, title: str | None = None
) -> Path:
    """`curves_figure` of the runs written to ``path`` (see `save_figure`)."""
    return save_figure(curves_figure(runs, full_range=full_range, title=title), path)

