"""tools/compare_bn_variants.py: paired differences over seeds from run files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compare_bn_variants.py"


def _tool():
    spec = importlib.util.spec_from_file_location("compare_bn_variants", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, variant: str, seed: int, best: float) -> None:
    history = {"train_acc": [0.1, 0.9], "train_loss": [2.0, 0.3], "test_acc": [0.1, best],
               "test_loss": [2.0, 0.1 + seed / 100], "epoch_seconds": [0, 1], "events": {}}
    config = {"batch_norm": variant, "eta": 0.5, "seed": seed}
    (folder / f"{variant}-{seed}.json").write_text(json.dumps({"config": config,
                                                               "history": history}))


def test_paired_differences(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed, (n_best, bn_best) in enumerate([(0.980, 0.982), (0.981, 0.982), (0.979, 0.978)]):
        _run(tmp_path, "n", seed, n_best)
        _run(tmp_path, "bn", seed, bn_best)
    tool = _tool()
    assert tool.main([str(tmp_path), "--etas", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if "BN - N | best test %" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # differences +0.2, +0.1, -0.1 percentage points: mean +0.067, sd 0.153
    assert cells[3] == "3" and cells[4] == "+0.067" and cells[5] == "0.153"
    assert cells[8] == "2 / 1 / 0"
    assert tool.main([str(tmp_path / "nothing")]) == 2
