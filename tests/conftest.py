"""Shared fixtures: small generated data sets and IDX folders."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from fastnn import DataError, load_mnist
from fastnn.datasets import MNIST_FILES, cache_dir

# the command line's default backend is the fastest one installed; the tests' command lines
# run on the reference unless they ask (test_the_command_line_defaults_to_the_fastest_backend)
os.environ.setdefault("FASTNN_BACKEND", "numpy")


def make_blobs(
    n: int, n_inputs: int, n_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Learnable uint8 'images': each class lights up its own band of pixels, plus noise."""
    rs = np.random.default_rng(seed)
    labels = rs.integers(0, n_classes, n)
    x = rs.integers(0, 60, (n, n_inputs)).astype(np.float64)
    band = max(n_inputs // n_classes, 1)
    for c in range(n_classes):
        rows = labels == c
        x[np.ix_(rows, np.arange(c * band, min((c + 1) * band, n_inputs)))] += 150
    return np.clip(x, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write a uint8 array as an IDX file (3-D images: magic 2051; 1-D labels: 2049)."""
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_idx_folder(
    folder: Path,
    n_train: int = 600,
    n_test: int = 200,
    side: int = 28,
    compress: bool = False,
    seed: int = 0,
) -> Path:
    """A folder with the four standard MNIST file names holding generated data."""
    folder.mkdir(parents=True, exist_ok=True)
    x, t = make_blobs(n_train + n_test, side * side, 10, seed)
    images = x.reshape(-1, side, side)
    write_idx(folder / "train-images-idx3-ubyte", images[:n_train], compress)
    write_idx(folder / "train-labels-idx1-ubyte", t[:n_train], compress)
    write_idx(folder / "t10k-images-idx3-ubyte", images[n_train:], compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", t[n_train:], compress)
    return folder


def run_history(path: Path) -> dict:
    """The metric histories of a run file, without timings and events (what must repeat)."""
    import json

    record = json.loads(path.read_text())
    return {k: v for k, v in record["history"].items() if k not in ("epoch_seconds", "events")}


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    return make_idx_folder(tmp_path / "data")


@pytest.fixture
def blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, t = make_blobs(500, 20, 3, seed=1)
    return x[:400], t[:400], x[400:], t[400:]


@pytest.fixture
def forbid_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty MNIST cache, and a failure if anything tries to fetch MNIST (modules that run
    the command line use it for every test: ``pytestmark = usefixtures("forbid_downloads")``)."""
    import fastnn.datasets as datasets

    attempts = []

    class Forbidden:
        name = "no downloads in tests"

        def fetch(self, names):
            attempts.append(list(names))
            raise RuntimeError("a test tried to download MNIST")

    monkeypatch.setenv("FASTNN_DATA", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(datasets, "DEFAULT_SOURCES", (Forbidden(),))
    yield
    assert attempts == [], "a test tried to download MNIST"


#: the one failure that means "not here" rather than "broken": no source could be reached
UNREACHABLE = "could not fetch MNIST from any source"


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST; skipped only when it is not cached and cannot be fetched here (offline,
    or no source reachable). A damaged cache or a checksum bug fails."""
    offline = os.environ.get("FASTNN_OFFLINE") == "1"
    folder = cache_dir()
    cached = all((folder / name).is_file() or (folder / f"{name}.gz").is_file()
                 for name in MNIST_FILES)
    if offline and not cached:
        pytest.skip(f"FASTNN_OFFLINE=1 and MNIST is not cached in {folder}")
    try:
        return load_mnist(fetch=not offline, progress=lambda line: None)
    except DataError as exc:
        if not cached and str(exc).startswith(UNREACHABLE):
            pytest.skip(f"real MNIST cannot be fetched here: {exc}")
        raise


@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    """An IDX folder of 200 training and 50 test rows (command-line tests)."""
    return make_idx_folder(tmp_path / "data", n_train=200, n_test=50)
