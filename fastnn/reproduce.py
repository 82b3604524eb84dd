"""`fastnn reproduce`: the article's result tables, run over several seeds, beside its figures.

One `Preset` per table of the article (section "Reported results" of its summary in the docs):
its cells (the options each row changes from the article's defaults) and the article's figures
for them. Running a preset trains every cell once per seed (`fastnn sweep` machinery: one run
file per point, finished points kept on a re-run); `summarize` puts, per cell and figure, our
mean and standard deviation over the seeds beside the article's single-run figure and marks
the cells where the article's figure lies outside our mean +- 2 sd.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import Config
from .history import History
from .sweep import Point

#: the article's columns: final train %, final test %, first epochs reaching 95/97/98 % test
#: accuracy, best test % and its epoch
FULL = ("train", "test", "95", "97", "98", "best", "ep")
#: the columns of the tables that report only the best test accuracy and its epoch
BEST = ("best", "ep")
SUMMARY_KEYS = {
    "train": "train_acc", "test": "test_acc", "95": "epoch_95", "97": "epoch_97",
    "98": "epoch_98", "best": "best_test_acc", "ep": "best_epoch",
}
PERCENT = {"train", "test", "best"}

Figures = tuple[float | None, ...]


@dataclass(frozen=True)
class Cell:
    """One row of a table: its label columns, the options it changes, the article's figures."""

    label: tuple[tuple[str, str], ...]
    changes: tuple[tuple[str, Any], ...]
    article: Figures | None = None


@dataclass(frozen=True)
class Preset:
    """One table of the article."""

    name: str
    title: str
    columns: tuple[str, ...]
    cells: tuple[Cell, ...]
    epochs: int = 50
    #: the article's epochs when this run of the table trains fewer or more (``--epochs``)
    article_epochs: int | None = None

    def points(self, base: Config, seeds: int) -> list[Point]:
        """Every (cell, seed) run, named by the options it changes (shared names across
        presets let a table reuse another's finished runs in the same folder)."""
        points = []
        for cell in self.cells:
            for seed in range(seeds):
                changes = {**dict(cell.changes), "epochs": self.epochs}
                values = {key: _text(value) for key, value in sorted(changes.items())}
                values["seed"] = str(seed)
                name = "_".join(f"{key}={text}" for key, text in values.items())
                changes["seed"] = seed
                points.append(Point(name, base.replace(**changes), values))
        return points


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return "-".join(_text(part) for part in value)
    return "none" if value is None else str(value)


VARIANTS = {"none": "off", "N": "n", "BN": "bn", "BN(n)": "node"}


def _full(*figures: float | None) -> Figures:
    return tuple(figures)


def _presets() -> dict[str, Preset]:
    presets: list[Preset] = []
    presets.append(Preset("baseline", "No regularisation", FULL, (
        Cell((("run", "baseline"),), (), _full(100.00, 97.85, 2, 5, None, 97.88, 34)),
    )))
    l1 = {0.1: (11.24, 11.35, None, None, None, 11.35, 1),
          0.01: (84.03, 84.46, None, None, None, 85.28, 5),
          0.001: (95.61, 95.45, 27, None, None, 95.66, 39),
          1e-4: (99.16, 97.82, 2, 5, 32, 98.08, 39),
          1e-5: (100.00, 97.92, 2, 5, 45, 98.01, 45),
          1e-6: (100.00, 97.94, 2, 5, None, 97.96, 39)}
    l2 = {0.1: (78.90, 79.55, None, None, None, 82.55, 25),
          0.01: (95.26, 95.39, 19, None, None, 95.39, 50),
          0.001: (99.40, 98.02, 3, 6, 32, 98.24, 45),
          1e-4: (100.00, 98.01, 2, 5, 50, 98.01, 50),
          1e-5: (100.00, 97.89, 2, 5, None, 97.93, 34),
          1e-6: (100.00, 97.97, 2, 5, None, 97.97, 50)}
    for kind, table in (("l1", l1), ("l2", l2)):
        presets.append(Preset(kind, f"{kind.upper()} weight decay", FULL, tuple(
            Cell((("lambda", _text(lam)),), (("weight_decay", (kind, lam)),), figures)
            for lam, figures in table.items()
        )))
    sampled = {(1.0, 0.5): (98.15, 96.96, 10, 40, None, 97.09, 45),
               (1.0, 0.8): (99.64, 98.10, 3, 10, 38, 98.10, 50),
               (1.0, 1.0): (100.00, 97.89, 2, 5, 48, 98.00, 48),
               (0.9, 0.9): (99.71, 98.18, 3, 8, 26, 98.25, 42),
               (0.8, 1.0): (99.75, 98.25, 3, 6, 19, 98.38, 41),
               (0.7, 1.0): (99.56, 98.32, 3, 8, 20, 98.42, 48),
               (0.6, 1.0): (99.20, 98.15, 4, 8, 22, 98.54, 44),
               (0.5, 0.5): (96.31, 95.95, 20, None, None, 96.12, 48),
               (0.5, 1.0): (98.83, 98.09, 6, 11, 30, 98.37, 49)}
    keeps = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    presets.append(Preset("dropout", "Dropout keep ratios, input x hidden (the full 6 x 6 grid)",
                          FULL, tuple(
        Cell((("input", str(i)), ("hidden", str(h))),
             (("dropout_input", i), ("dropout_hidden", h)), sampled.get((i, h)))
        for i in keeps for h in keeps
    )))
    inputs = {0.5: (99.41, 98.47, 6, 11, 30, 98.54, 96), 0.6: (99.64, 98.37, 4, 8, 22, 98.57, 71),
              0.7: (99.83, 98.53, 3, 8, 20, 98.58, 99), 0.8: (99.93, 98.27, 3, 6, 19, 98.46, 55),
              0.9: (99.98, 98.22, 2, 6, 18, 98.34, 55)}
    presets.append(Preset("input-dropout", "Input dropout only, 100 epochs", FULL, tuple(
        Cell((("input", str(keep)),), (("dropout_input", keep),), figures)
        for keep, figures in inputs.items()
    ), epochs=100))
    bn_rows = [
        ("none", 0.1, (100.00, 97.85, 2, 5, None, 97.88, 34)),
        ("N", 0.1, (100.00, 98.12, 1, 3, 12, 98.17, 43)),
        ("BN", 0.1, (100.00, 98.09, 1, 3, 12, 98.23, 45)),
        ("BN(n)", 0.1, (100.00, 98.02, 1, 3, 18, 98.16, 35)),
        ("none", 0.5, (100.00, 98.23, 1, 3, 20, 98.32, 27)),
        ("N", 0.5, (99.99, 98.25, 1, 2, 4, 98.35, 43)),
        ("BN", 0.5, (100.00, 98.24, 1, 2, 4, 98.26, 19)),
        ("BN(n)", 0.5, (99.97, 98.15, 1, 2, 10, 98.15, 27)),
        ("none", 1.0, (98.56, 95.92, 4, None, None, 96.76, 34)),
        ("N", 1.0, (99.99, 98.16, 1, 2, 5, 98.37, 47)),
        ("BN", 1.0, (99.99, 98.11, 1, 1, 7, 98.24, 35)),
        ("BN(n)", 1.0, (99.99, 98.16, 1, 1, 7, 98.24, 45)),
    ]
    presets.append(Preset("batch-norm", "Batch norm variants at eta 0.1 / 0.5 / 1.0", FULL, tuple(
        Cell((("variant", variant), ("eta", str(eta))),
             (("batch_norm", VARIANTS[variant]), ("eta", eta)), figures)
        for variant, eta, figures in bn_rows
    )))
    best = {  # eta -> best test % (epoch) for none / N / BN / BN(n)
        0.01: ((97.17, 48), (97.73, 48), (97.75, 40), (97.74, 37)),
        0.05: ((97.78, 32), (98.08, 36), (98.12, 40), (98.00, 29)),
        0.1: ((97.88, 34), (98.17, 43), (98.23, 45), (98.16, 35)),
        0.5: ((98.32, 27), (98.35, 43), (98.26, 19), (98.15, 27)),
        1.0: ((96.76, 34), (98.37, 47), (98.24, 35), (98.24, 45)),
        5.0: ((11.35, 10), (98.26, 28), (98.30, 40), (98.19, 50)),
        10.0: ((11.35, 5), (98.25, 50), (11.35, 5), (11.35, 5)),
        50.0: ((11.35, 18), (98.06, 50), (11.35, 19), (11.35, 2)),
        100.0: ((11.35, 7), (97.80, 28), (11.35, 7), (11.35, 10)),
    }
    presets.append(Preset("lr-sweep", "Best test accuracy by learning rate", BEST, tuple(
        Cell((("variant", variant), ("eta", _text(eta))),
             (("batch_norm", VARIANTS[variant]), ("eta", eta)), figures[index])
        for eta, figures in best.items() for index, variant in enumerate(VARIANTS)
    )))
    bn_eta = {0.01: (98.17, 29), 0.05: (98.21, 36), 0.1: (98.23, 45), 0.5: (98.17, 42),
              1.0: (98.11, 37), 5.0: (98.21, 42), 10.0: (98.03, 36), 50.0: (97.96, 48),
              100.0: (98.00, 40)}
    presets.append(Preset("bn-eta", "BN with its own batch_norm_eta (eta 0.1)", BEST, tuple(
        Cell((("batch_norm_eta", _text(rate)),),
             (("batch_norm", "bn"), ("batch_norm_eta", rate)), figures)
        for rate, figures in bn_eta.items()
    )))
    return {preset.name: preset for preset in presets}


PRESETS: dict[str, Preset] = _presets()


# ---- the table ----

@dataclass(frozen=True)
class Stat:
    """One figure of one cell over the seeds."""

    mean: float | None  # over the seeds where it exists (an epoch figure may be "never")
    sd: float | None  # sample standard deviation (None with fewer than 2 values)
    present: int  # seeds where the figure exists
    seeds: int
    article: float | None

    @property
    def outside(self) -> bool:
        """The article's figure lies outside mean +- 2 sd (or exists where ours never does, or
        the other way round, for every seed)."""
        if self.seeds < 2:
            return False
        if (self.article is None) != (self.present == 0):
            return self.present in (0, self.seeds)
        if self.article is None or self.mean is None or self.sd is None:
            return False
        return abs(self.article - self.mean) > 2 * self.sd


def cell_stats(preset: Preset, cell: Cell, summaries: Sequence[Mapping[str, Any]]
               ) -> dict[str, Stat]:
    """Per figure of the preset's columns: mean, sd and the article's figure."""
    stats = {}
    for index, column in enumerate(preset.columns):
        scale = 100.0 if column in PERCENT else 1.0
        values = [float(s[SUMMARY_KEYS[column]]) * scale for s in summaries
                  if s.get(SUMMARY_KEYS[column]) is not None]
        mean = statistics.fmean(values) if values else None
        sd = statistics.stdev(values) if len(values) >= 2 else None
        article = cell.article[index] if cell.article is not None else None
        stats[column] = Stat(mean, sd, len(values), len(summaries), article)
    return stats


def summarize(preset: Preset, records: Mapping[str, Mapping[str, Any]], seeds: int,
              base: Config) -> list[tuple[Cell, dict[str, Stat]]]:
    """Each cell's statistics from the run records of its seeds (by point name)."""
    rows = []
    by_cell = {cell: [] for cell in preset.cells}
    for point, cell in zip(preset.points(base, seeds),
                           [c for c in preset.cells for _ in range(seeds)], strict=True):
        record = records.get(point.name)
        if record is not None:
            by_cell[cell].append(History.from_dict(record["history"]).summary())
    for cell in preset.cells:
        rows.append((cell, cell_stats(preset, cell, by_cell[cell])))
    return rows


def _figure(value: float | None, column: str) -> str:
    if value is None:
        return "-"
    if column in PERCENT:
        return f"{value:.2f}"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _ours(stat: Stat, column: str) -> str:
    if stat.present == 0 or stat.mean is None:
        return "-"
    digits = 2 if column in PERCENT else 1
    text = f"{stat.mean:.{digits}f}"
    if stat.sd is not None:
        text += f" ± {stat.sd:.{digits}f}"
    if stat.present < stat.seeds:
        text += f" ({stat.present}/{stat.seeds})"
    return text


def markdown(preset: Preset, rows: list[tuple[Cell, dict[str, Stat]]], seeds: int) -> str:
    """The table as Markdown: per figure "ours (mean ± sd)" and the article's; "!" marks a
    figure of the article outside our mean ± 2 sd."""
    labels = [key for key, _ in preset.cells[0].label]
    header = [*labels, *(f"{c} {who}" for c in preset.columns for who in ("ours", "article"))]
    other = preset.article_epochs not in (None, preset.epochs)
    note = (f"; **{preset.epochs} epochs, not the article's {preset.article_epochs}**: its "
            "figures are for its own length" if other else "")
    lines = [f"**{preset.title}** ({preset.epochs} epochs, {seeds} seed"
             f"{'' if seeds == 1 else 's'}; ours: mean ± sd over the seeds, (k/n): reached in k "
             f"of n; ! the article's figure lies outside our mean ± 2 sd{note})", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell, stats in rows:
        figures = []
        for column in preset.columns:
            stat = stats[column]
            article = _figure(stat.article, column) + (" !" if stat.outside else "")
            figures += [_ours(stat, column), article if cell.article is not None else ""]
        lines.append("| " + " | ".join([*(text for _, text in cell.label), *figures]) + " |")
    return "\n".join(lines) + "\n"


def csv_text(preset: Preset, rows: list[tuple[Cell, dict[str, Stat]]]) -> str:
    """The table as CSV: label columns, then mean, sd, count and article per figure."""
    out = io.StringIO()
    writer = csv.writer(out)
    labels = [key for key, _ in preset.cells[0].label]
    writer.writerow([*labels, *(f"{c}_{part}" for c in preset.columns
                                for part in ("mean", "sd", "n", "article", "outside"))])
    for cell, stats in rows:
        values: list[Any] = [text for _, text in cell.label]
        for column in preset.columns:
            stat = stats[column]
            values += ["" if stat.mean is None else _round(stat.mean),
                       "" if stat.sd is None else _round(stat.sd), stat.present,
                       "" if stat.article is None else stat.article, int(stat.outside)]
        writer.writerow(values)
    return out.getvalue()


def _round(value: float) -> float:
    return round(value, 4) if math.isfinite(value) else value


def listing() -> str:
    """One line per preset: name, runs per seed, epochs, title."""
    return "\n".join(
        f"{p.name:<14} {len(p.cells):>3} runs per seed, {p.epochs:>3} epochs  {p.title}"
        for p in PRESETS.values()
    )
