"""Every Python snippet of the README runs as it stands (on small generated data instead of
the real MNIST, so that no test downloads)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_blobs

import fastnn

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def small_mnist(*args: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
    """MNIST's shapes and types (uint8 28x28 images, uint8 labels), 300 + 100 rows."""
    x, labels = make_blobs(400, 784, 10, seed=3)
    images = x.reshape(-1, 28, 28)
    return images[:300], labels[:300], images[300:], labels[300:]


def test_the_readme_has_python_snippets() -> None:
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs_as_written(snippet: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    monkeypatch.setattr(fastnn, "load_mnist", small_mnist)
    monkeypatch.setattr(fastnn.datasets, "load_mnist", small_mnist)
    if "backend=\"numba\"" in snippet:
        pytest.importorskip("numba")
    if "onnxruntime" in snippet:
        pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)  # files a snippet writes
    exec(compile(snippet, str(README), "exec"), {"__name__": "readme"})  # noqa: S102
