"""`fastnn reproduce`: every preset on small data, the table beside the article's figures, a
re-run that keeps finished points."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import make_idx_folder

from fastnn import Config, reproduce
from fastnn.cli import main
from fastnn.reproduce import PRESETS, Cell, Preset, Stat


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_idx_folder(tmp_path_factory.mktemp("data"), n_train=100, n_test=50, side=8)


def test_presets_are_the_article_tables() -> None:
    sizes = {name: len(preset.cells) for name, preset in PRESETS.items()}
    assert sizes == {"baseline": 1, "l1": 6, "l2": 6, "dropout": 36, "input-dropout": 5,
                     "batch-norm": 12, "lr-sweep": 36, "bn-eta": 9}
    for preset in PRESETS.values():
        points = preset.points(Config(), seeds=2)
        assert len({p.name for p in points}) == len(points) == 2 * len(preset.cells)
        for cell in preset.cells:
            assert cell.article is None or len(cell.article) == len(preset.columns)
    dropout = PRESETS["dropout"]
    assert sum(cell.article is not None for cell in dropout.cells) == 9
    assert PRESETS["input-dropout"].epochs == 100
    point = PRESETS["batch-norm"].points(Config(), 1)[5]  # BN(n)? no: N at eta 0.5
    assert (point.config.batch_norm, point.config.eta, point.config.epochs) == ("n", 0.5, 50)


def test_statistics_and_the_outside_mark() -> None:
    preset = Preset("t", "t", ("test", "98"), (Cell((("run", "a"),), (), (97.0, 10.0)),))
    summaries = [{"test_acc": 0.97, "epoch_98": None}, {"test_acc": 0.99, "epoch_98": 12}]
    stats = reproduce.cell_stats(preset, preset.cells[0], summaries)
    assert stats["test"].mean == pytest.approx(98.0) and stats["test"].sd == pytest.approx(
        1.41421356, rel=1e-6)
    assert not stats["test"].outside  # 97 lies within 98 +- 2.83
    assert stats["98"].present == 1 and stats["98"].mean == 12.0 and not stats["98"].outside
    assert Stat(98.0, 0.1, 3, 3, 97.0).outside and not Stat(98.0, 0.6, 3, 3, 97.0).outside
    assert Stat(None, None, 0, 3, 12.0).outside  # the article reached it, we never did
    assert not Stat(98.0, 0.0, 1, 1, 90.0).outside  # one seed: no spread to judge by


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_on_small_data(name: str, small_data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["reproduce", name, "--data", str(small_data), "--out-dir", str(out),
                 "--backend", "numpy", "--quiet", "--threads", "1"])
    assert code == 0
    preset = PRESETS[name]
    runs = sorted(out.glob("*seed=0.json"))
    assert len(runs) == len(preset.cells)
    record = json.loads(runs[0].read_text())
    assert len(record["history"]["test_acc"]) == preset.epochs + 1
    table = (out / f"{name}.md").read_text()
    assert table in capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(preset.cells)
    with open(out / f"{name}.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(preset.cells)


def test_a_rerun_keeps_finished_points_and_adds_seeds(small_data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["reproduce", "l2", "--data", str(small_data), "--out-dir", str(out),
            "--backend", "numpy", "--quiet", "--threads", "1"]
    assert main([*args, "--seeds", "1"]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    capsys.readouterr()
    assert main([*args, "--seeds", "2"]) == 0
    output = capsys.readouterr().out
    assert "6 already there, kept" in output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*seed=0.json")} == first
    assert len(list(out.glob("*seed=1.json"))) == 6
    rows = list(csv.DictReader(io.StringIO((out / "l2.csv").read_text())))
    assert {row["test_n"] for row in rows} == {"2"}
    assert all(row["test_sd"] != "" for row in rows)


def test_list_and_mistakes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "dropout" in listing and "36 runs per seed" in listing
    assert main(["reproduce", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["reproduce", "baseline", "--seeds", "0"]) == 2
    assert main(["reproduce"]) == 2


def test_epochs_gives_a_quick_look_and_the_table_says_so(
        small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["reproduce", "l2", "--data", str(small_data), "--out-dir", str(out),
                 "--backend", "numpy", "--quiet", "--threads", "1", "--epochs", "2"]) == 0
    runs = sorted(out.glob("*seed=0.json"))
    assert runs and all(len(json.loads(run.read_text())["history"]["test_acc"]) == 3
                        for run in runs)
    table = (out / "l2.md").read_text()
    assert "(2 epochs, 1 seed" in table and "**2 epochs, not the article's 50**" in table
    capsys.readouterr()
    assert main(["reproduce", "l2", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1; got 0" in capsys.readouterr().err
