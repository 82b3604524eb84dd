"""``fastnn plot --kind ...``: the charts' contents (through the returned Figures) and the files
the command writes, on small runs and models trained here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_blobs

from fastnn import Config, DataError, Trainer
from fastnn.cli import main
from fastnn.history import History

pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402
from matplotlib.patches import Polygon, Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fastnn import plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


# ---- small runs and models, trained once ----


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run files (plain, decay, bn, node: 3 epochs) and models (plain.npz, decay.npz)."""
    folder = tmp_path_factory.mktemp("runs")
    x, t = make_blobs(300, 20, 3, seed=1)
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "decay": {"weight_decay": ("l2", 1e-2)},
        "bn": {"batch_norm": "bn"},
        "node": {"batch_norm": "node"},
    }
    out: dict[str, Path] = {}
    for name, options in variants.items():
        cfg = Config(n_inputs=20, n_outputs=3, hidden=(8, 6), epochs=3, backend="numpy",
                     **options)
        trainer = Trainer(cfg)
        history = trainer.fit(x[:200], t[:200], x[200:], t[200:])
        out[name] = folder / f"{name}.json"
        out[name].write_text(json.dumps({"config": cfg.to_dict(), "history": history.to_dict()}))
        if name in ("plain", "decay"):
            out[f"{name}.npz"] = folder / f"{name}.npz"
            trainer.save(out[f"{name}.npz"])
    return out


def _history(test_acc: list[float], test_loss: list[float], **extra: Any) -> History:
    """A synthetic history: train figures a little better than the test ones."""
    history = History(
        train_acc=[min(1.0, a + 0.01) for a in test_acc],
        train_loss=[v * 0.9 for v in test_loss],
        test_acc=list(test_acc),
        test_loss=list(test_loss),
        epoch_seconds=[0.0] + [1.0] * (len(test_acc) - 1),
    )
    for key, value in extra.items():
        setattr(history, key, value)
    return history


def _line(ax: Any, label: str) -> Any:
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return line


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG, read back."""
    assert path.read_bytes()[:8] == PNG
    height, width = imread(path).shape[:2]
    return width, height


# ---- the command, every kind ----


@pytest.mark.parametrize(
    "kind,inputs,size",
    [
        ("curves", ["plain", "decay"], (1320, 495)),  # 12 x 4.5 inches at 110 dpi
        ("loss-direction", ["plain", "decay"], (990, 396)),  # 2 panels of 4.5 x 3.6
        ("weights", ["plain.npz", "decay.npz"], (1485, 396)),  # W1, W2, W3
        ("gamma-beta", ["node", "bn"], (990, 792)),  # 2 layers x (gamma, beta)
        ("gamma-beta-hist", ["node"], (990, 792)),
    ],
)
def test_each_kind_writes_the_chart(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str,
    inputs: list[str], size: tuple[int, int],
) -> None:
    chart = tmp_path / "new" / f"{kind}.png"
    args = ["plot", "--kind", kind, *(str(files[name]) for name in inputs), "--out", str(chart)]
    assert main([*args, "--title", "a title"]) == 0
    assert capsys.readouterr().out == f"wrote {chart}\n"
    assert _png_size(chart) == size


def test_curves_is_the_default_kind_and_full_range_is_accepted(
    files: dict[str, Path], tmp_path: Path
) -> None:
    chart = tmp_path / "c.svg"
    assert main(["plot", str(files["plain"]), "--full-range", "--out", str(chart)]) == 0
    assert b"<svg" in chart.read_bytes()[:1000]


def test_weights_refuses_a_file_that_is_not_a_model(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chart = tmp_path / "w.png"
    argv = ["plot", "--kind", "weights", str(files["plain.npz"]), str(files["plain"]),
            "--out", str(chart)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"fastnn: error: {files['plain']}: not a fastnn model file "
                   "(write one with fastnn train --save-model FILE.npz)\n")
    assert not chart.exists()


@pytest.mark.parametrize("kind", ["gamma-beta", "gamma-beta-hist"])
def test_gamma_beta_needs_learnable_batch_norm(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    chart = tmp_path / "g.png"
    argv = ["plot", "--kind", kind, str(files["node"]), str(files["plain"]), "--out", str(chart)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastnn: error: {files['plain']}: ")
    assert "--batch-norm bn or node" in err and err.count("\n") == 1
    assert not chart.exists()


def test_every_kind_refuses_an_out_without_an_image_extension(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "noext"
    assert main(["plot", "--kind", "weights", str(files["plain.npz"]), "--out", str(out)]) == 2
    assert "give a chart file name ending in an image extension" in capsys.readouterr().err
    assert not out.exists()


def test_an_unknown_kind_is_a_usage_error(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plot", "--kind", "pie", str(files["plain"])]) == 2
    assert "argument --kind: invalid choice: 'pie'" in capsys.readouterr().err


# ---- curves ----


def test_curves_draw_train_and_test_accuracy_and_loss_of_every_run() -> None:
    a = _history([0.1, 0.9, 0.95, 0.96], [2.3, 0.4, 0.2, 0.15])
    b = _history([0.1, 0.8, 0.93, 0.97], [2.3, 0.6, 0.25, 0.1])
    fig = plots.curves_figure([("a", a), ("b", b)], title="two runs")
    acc_ax, loss_ax = fig.axes
    assert fig._suptitle.get_text() == "two runs"
    for label, history in (("a", a), ("b", b)):
        for split in ("train", "test"):
            acc, loss = _line(acc_ax, f"{label} {split}"), _line(loss_ax, f"{label} {split}")
            assert list(acc.get_xdata()) == [0, 1, 2, 3]
            assert list(acc.get_ydata()) == getattr(history, f"{split}_acc")
            assert list(loss.get_ydata()) == getattr(history, f"{split}_loss")
            assert acc.get_linestyle() == ("--" if split == "train" else "-")
        assert _line(acc_ax, f"{label} test").get_color() == _line(loss_ax, f"{label} train") \
            .get_color()
    for ax in (acc_ax, loss_ax):
        assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
        assert all(float(tick).is_integer() for tick in ax.get_xticks())
    legend = acc_ax.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["a", "b", "test", "train"]
    assert not fig.legends


def test_curves_focus_the_y_range_unless_full_range() -> None:
    a = _history([0.1, 0.9, 0.95, 0.96], [2.3, 0.4, 0.2, 0.15])
    b = _history([0.1, 0.8, 0.93, 0.97], [2.3, 0.6, 0.25, 0.1])
    acc_ax, loss_ax = plots.curves_figure([("a", a), ("b", b)]).axes
    bottom, top = acc_ax.get_ylim()
    assert top == 1.0 and 0.1 < bottom < 0.8  # epoch 0 (0.1) is off the chart
    series = [s for h in (a, b) for s in (h.test_acc, h.train_acc)]
    assert bottom == pytest.approx(plots.accuracy_range(series)[0])
    low, high = loss_ax.get_ylim()
    assert low < 0.1 * 0.9 and 0.5 < high < 2.3  # the lowest loss shown, epoch 0 clipped
    acc_ax, loss_ax = plots.curves_figure([("a", a), ("b", b)], full_range=True).axes
    assert acc_ax.get_ylim()[0] < 0.1 and loss_ax.get_ylim()[1] > 2.3


def test_curves_of_many_runs_put_the_legend_outside() -> None:
    runs = [(f"run{k}", _history([0.1, 0.5 + k / 20], [2.3, 1.0 - k / 20])) for k in range(5)]
    fig = plots.curves_figure(runs)
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    assert [text.get_text() for text in legend.get_texts()][:5] == [r for r, _ in runs]


def test_curves_of_a_run_file_read_by_the_command(files: dict[str, Path]) -> None:
    history = History.from_dict(json.loads(files["plain"].read_text())["history"])
    fig = plots.curves_figure([("plain", history)])
    assert list(_line(fig.axes[1], "plain test").get_ydata()) == history.test_loss


# ---- loss direction ----


def test_loss_direction_marks_each_epoch_as_fell_or_rose() -> None:
    loss = [2.0, 1.0, 1.2, 0.9, 0.95, 0.8]
    assert plots.loss_direction(loss) == ([1, 3, 5], [2, 4])
    runs = [("a", _history([0.1] * 6, loss)), ("b", _history([0.1] * 3, [2.0, 1.5, 1.0]))]
    fig = plots.loss_direction_figure(runs, title="t")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["a", "b"]
    fell, rose = _line(visible[0], "fell (3)"), _line(visible[0], "rose (2)")
    assert (fell.get_marker(), fell.get_color()) == ("v", "tab:green")
    assert (rose.get_marker(), rose.get_color()) == ("^", "tab:red")
    assert list(fell.get_xdata()) == [1, 3, 5] and list(fell.get_ydata()) == [1.0, 0.9, 0.8]
    assert list(rose.get_xdata()) == [2, 4] and list(rose.get_ydata()) == [1.2, 0.95]
    assert list(_line(visible[1], "fell (2)").get_xdata()) == [1, 2]
    assert list(_line(visible[1], "rose (0)").get_xdata()) == []
    low, high = visible[0].get_ylim()
    assert low < 0.8 and 1.2 < high < 2.0  # every marked epoch in view, epoch 0 not
    low, high = plots.loss_direction_figure(runs, full_range=True).axes[0].get_ylim()
    assert high > 2.0


def test_loss_direction_uses_one_panel_per_run_in_rows_of_three() -> None:
    runs = [(f"r{k}", _history([0.1, 0.2], [2.0, 1.0])) for k in range(4)]
    fig = plots.loss_direction_figure(runs)
    assert len(fig.axes) == 6 and sum(ax.get_visible() for ax in fig.axes) == 4


# ---- weights ----


def test_weights_overlay_one_histogram_per_layer() -> None:
    rs = np.random.default_rng(0)
    big = {"W1": rs.normal(0, 1, (20, 10)), "W2": rs.normal(0, 1, (10, 3)), "b1": np.zeros(10)}
    small = {name: value * 0.1 for name, value in big.items()}
    fig = plots.weights_figure([("big", big), ("small", small)], bins=12, title="decay")
    assert [ax.get_title() for ax in fig.axes] == ["W1 (20 x 10)", "W2 (10 x 3)"]
    for ax, name in zip(fig.axes, ("W1", "W2"), strict=True):
        bars = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert len(bars) == 2 * 12
        assert sum(bar.get_height() for bar in bars[:12]) == big[name].size
        assert all(bar.get_alpha() == 0.5 for bar in bars)
        edges = sorted({round(bar.get_x(), 9) for bar in bars})
        assert len(edges) == 12  # shared bins
        texts = [text.get_text() for text in ax.get_legend().get_texts()]
        assert texts == [f"big (sd {big[name].std():.3g})", f"small (sd {small[name].std():.3g})"]


def test_weights_of_saved_models(files: dict[str, Path]) -> None:
    weights = plots.read_weights(files["decay.npz"])
    assert {name: w.shape for name, w in weights.items()} == {
        "W1": (20, 8), "W2": (8, 6), "W3": (6, 3)
    }
    labels = plots.labels_for([files["plain.npz"], files["decay.npz"]])
    assert labels == ["plain", "decay"]
    fig = plots.weights_figure([(labels[0], plots.read_weights(files["plain.npz"])),
                                (labels[1], weights)])
    assert [ax.get_title() for ax in fig.axes] == ["W1 (20 x 8)", "W2 (8 x 6)", "W3 (6 x 3)"]
    with pytest.raises(DataError, match="not a fastnn model file"):
        plots.read_weights(files["plain"])


def test_labels_are_file_stems_made_unique() -> None:
    assert plots.labels_for(["a/run.json", "b/run.json", "c/x.json", "c/x.json"]) == [
        "a/run.json", "b/run.json", "c/x.json", "c/x.json #2"
    ]


# ---- gamma and beta ----


def _bn_history(bn_params: dict[str, list[list[float]]], **extra: Any) -> History:
    epochs = len(next(iter(bn_params.values())))
    return _history([0.5] * epochs, [1.0] * epochs, bn_params=bn_params, **extra)


def test_gamma_beta_per_epoch_lines_and_node_spread() -> None:
    bn = _bn_history({"gamma1": [[1.0], [1.1], [1.3]], "beta1": [[0.0], [0.1], [0.2]]})
    node = _bn_history({
        "gamma1": [[1, 1, 1], [0.9, 1.0, 1.4], [0.8, 1.0, 1.5]],
        "beta1": [[0, 0, 0], [-0.1, 0.0, 0.4], [-0.2, 0.1, 0.4]],
        "gamma2": [[1, 1], [1.2, 1.0], [1.4, 1.0]],
        "beta2": [[0, 0], [0.1, 0.0], [0.2, 0.0]],
    })
    fig = plots.gamma_beta_figure([("bn", bn), ("node", node)], title="t")
    assert [ax.get_title() for ax in fig.axes] == ["gamma1", "beta1", "gamma2", "beta2"]
    gamma1, beta1, gamma2, _ = fig.axes
    assert list(_line(gamma1, "bn").get_ydata()) == [1.0, 1.1, 1.3]
    assert list(_line(beta1, "bn").get_ydata()) == [0.0, 0.1, 0.2]
    assert list(_line(gamma1, "bn").get_xdata()) == [0, 1, 2]
    np.testing.assert_allclose(_line(gamma1, "node").get_ydata(), [1.0, 1.1, 1.1])
    assert len(gamma1.collections) == 2  # the node run's 25-75 % and min-max bands
    assert [line.get_label() for line in gamma2.get_lines()] == ["node"]  # bn has no layer 2
    assert all(float(tick).is_integer() for tick in gamma1.get_xticks())
    assert "min-max" in fig._supxlabel.get_text()


def test_gamma_beta_of_a_trained_node_run(files: dict[str, Path]) -> None:
    history = History.from_dict(json.loads(files["node"].read_text())["history"])
    fig = plots.gamma_beta_figure([("node", history)])
    assert len(fig.axes) == 4
    for ax in fig.axes:
        values = np.array(history.bn_params[ax.get_title()])
        assert values.shape == (4, 8 if ax.get_title().endswith("1") else 6)
        np.testing.assert_allclose(_line(ax, "node").get_ydata(), values.mean(axis=1))


def test_gamma_beta_histograms_at_the_final_and_first_epochs() -> None:
    rows = [[1.0] * 4, [0.9, 1.0, 1.1, 1.2], [0.5, 1.0, 1.5, 2.0], [0.0, 1.0, 2.0, 3.0]]
    node = _bn_history({"gamma1": rows, "beta1": [[0.0] * 4] * 4})
    fig = plots.gamma_beta_hist_figure([("node", node)], bins=5, title="t")
    gamma1, beta1 = fig.axes
    assert [gamma1.get_title(), beta1.get_title()] == ["gamma1", "beta1"]
    bars = [p for p in gamma1.patches if isinstance(p, Rectangle)]
    outlines = [p for p in gamma1.patches if isinstance(p, Polygon)]
    assert len(bars) == 5 and len(outlines) == 1  # epoch 3 filled, epoch 1 outlined
    assert [bar.get_height() for bar in bars] == [1, 1, 0, 1, 1]  # 0, 1, 2, 3 over [0, 3]
    assert [t.get_text() for t in gamma1.get_legend().get_texts()] == [
        "node epoch 3", "node epoch 1"
    ]
    # the kept model of an early-stopped run: its restored epoch
    kept = _bn_history({"gamma1": rows, "beta1": rows}, events={"restored_best_epoch": 2})
    ax = plots.gamma_beta_hist_figure([("kept", kept)], bins=3, first_epoch=False).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["kept epoch 2"]
    assert [bar.get_height() for bar in ax.patches] == [1, 1, 2]  # 0.5 | 1.0 | 1.5, 2.0


def test_gamma_beta_kinds_refuse_runs_without_learnable_batch_norm() -> None:
    plain = _history([0.1, 0.5], [2.0, 1.0])
    for draw in (plots.gamma_beta_figure, plots.gamma_beta_hist_figure):
        with pytest.raises(DataError, match="plain: no batch-norm gamma/beta.*bn or node"):
            draw([("plain", plain)])


def test_focused_ranges_leave_out_epoch_0_and_non_finite_values() -> None:
    assert plots.accuracy_range([[0.1]]) is None and plots.loss_range([[2.3]]) is None
    low, high = plots.accuracy_range([[0.1, 0.9, float("nan"), 0.95]])
    assert high == 1.0 and 0.85 < low < 0.9
    low, high = plots.loss_range([[2.3, 0.5, float("inf"), 0.3]], percentile=100)
    assert low == pytest.approx(0.3 - 0.01) and high == pytest.approx(0.5 + 0.01)


def test_bn_scalars_are_points_and_no_loss_line_is_cut_after_epoch_0() -> None:
    scalar = _bn_history({"gamma1": [[1.0], [1.1], [1.2], [1.3]],
                          "beta1": [[0.0], [0.1], [0.2], [0.3]]})
    node = _bn_history({"gamma1": [[1.0] * 4, [0.9, 1.0, 1.1, 1.2]] * 2,
                        "beta1": [[0.0] * 4] * 4})
    gamma1 = plots.gamma_beta_hist_figure([("bn", scalar)]).axes[0]
    assert gamma1.get_title() == "gamma1"
    assert not gamma1.patches  # no count-1 bar
    points = [line for line in gamma1.get_lines() if line.get_marker() == "o"]
    assert [tuple(p.get_xdata()) for p in points] == [(1.3,), (1.1,)]  # final, epoch 1
    assert {t.get_text() for t in gamma1.texts} == {"1.3", "1.1"}
    assert plots.gamma_beta_hist_figure([("node", node)]).axes[0].patches  # per node: bars
    mixed = plots.gamma_beta_hist_figure([("bn", scalar), ("node", node)]).axes[0]
    bars = [p.get_height() for p in mixed.patches if hasattr(p, "get_height")]
    assert sum(bars) == 4  # node's four final values (epoch 1: an outline); bn's: no bar
    across = [line for line in mixed.get_lines() if tuple(line.get_xdata()) in {(1.3, 1.3),
                                                                              (1.1, 1.1)}]
    assert len(across) == 2 and "1.3 (one value)" in across[0].get_label()
    spiky = _history([0.1, 0.9, 0.95, 0.96], [2.3, 1.9, 0.2, 0.15])  # one high epoch-1 loss
    acc_ax, loss_ax = plots.curves_figure([("a", spiky)]).axes
    assert loss_ax.get_ylim()[1] >= 1.9 and loss_ax.get_ylim()[1] < 2.3
    assert loss_ax.get_title() == "loss" and acc_ax.get_title() == "accuracy"
