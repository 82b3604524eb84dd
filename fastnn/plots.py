"""Charts of runs (needs matplotlib: ``pip install matplotlib``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError, MissingDependency
from .fileio import write_atomically
from .history import History


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependency("plotting needs matplotlib: pip install matplotlib") from None
    return plt


def image_format(path: str | Path) -> str:
    """The image format named by path's extension; `ConfigError` listing the formats
    matplotlib can write when it names none of them."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ConfigError(
            f"{path}: give a chart file name ending in an image extension "
            f"({', '.join('.' + name for name in formats)})"
        )
    return suffix


def plot_runs(runs: list[tuple[str, History]], path: str | Path) -> Path:
    """Accuracy and loss per epoch of several runs on one chart, written atomically to exactly
    ``path`` in the format its extension names; test loss marked by whether it went down
    (filled) or up (hollow), as in the article."""
    plt = _pyplot()
    path = Path(path)
    fmt = image_format(path)
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, history in runs:
        epochs = range(len(history.test_acc))
        line = acc_ax.plot(epochs, history.test_acc, label=f"{label} test")[0]
        acc_ax.plot(epochs, history.train_acc, "--", color=line.get_color(), label=f"{label} train")
        loss_ax.plot(epochs, history.test_loss, color=line.get_color(), label=f"{label} test")
        for k in range(1, len(history.test_loss)):
            down = history.test_loss[k] < history.test_loss[k - 1]
            loss_ax.plot(
                k,
                history.test_loss[k],
                "o",
                color=line.get_color(),
                fillstyle="full" if down else "none",
                markersize=4,
            )
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss (hollow: test loss went up)")
    acc_ax.legend(fontsize=7)
    loss_ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        write_atomically(path, lambda handle: fig.savefig(handle, format=fmt, dpi=110))
    finally:
        plt.close(fig)
    return path
