"""Run the CUDA C kernels on the CPU: g++ plus ``cpu_shim.h``, behind a CuPy-like interface.

``Module(code, options, name_expressions).get_function(name)(grid, block, args)`` works like
``cupy.RawModule``, with NumPy arrays for device pointers and NumPy scalars for scalars. The
source is compiled unchanged (``cpu_shim.h`` is force-included) into a shared library, built
on first use and cached by a hash of everything that goes into it.

Checks that a GPU would not make: every scalar must be a NumPy scalar of exactly the C
parameter's type (CuPy passes a Python int as 8 bytes: an ``int`` parameter then reads garbage
or half a value), every pointer a C-contiguous array of the pointee's type (writeable unless
``const``) or None. ``thread_order="reverse"`` runs the blocks and the threads of each block
in reverse order, so a missing barrier changes the result; ``guard_bytes`` surrounds every
array with canary bytes (0xFF: reading them gives NaN) and fails the launch when a kernel
wrote to them.

``begin_capture()`` / ``end_capture()`` stand for a CUDA stream capture: between them a
thread's launches are checked and recorded, not run, and `end_capture` returns a `Graph`
whose ``launch()`` runs them in the recorded order, with the arrays and scalars they were
given (an array's contents as they are when the graph runs, as a CUDA graph reads its
pointers).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .sources import C_TYPES, Signature, kernel_signatures

HEADER = Path(__file__).resolve().parent / "cpu_shim.h"
_CANARY = 0xFF
_ALIGN = 64
_BUILD_LOCK = threading.Lock()
_LIBRARIES: dict[str, ctypes.CDLL] = {}
_COMPILER_IDS: dict[str, str] = {}
_CAPTURE = threading.local()  # .launches: the list a capturing thread records into


class ShimCompileError(RuntimeError):
    """The C++ compiler rejected a source; ``log`` holds its output."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}\n{log}")
        self.log = log


class KernelLaunchError(RuntimeError):
    """A launch failed on the CPU (barrier divergence, deadlock, a bad shuffle, __trap...)."""


class GuardError(KernelLaunchError):
    """A kernel wrote to the guard bytes around an array: an out-of-bounds write."""


def find_compiler() -> str | None:
    """The C++ compiler to use: $CXX, else g++ or c++ on the PATH (None when there is none)."""
    for candidate in (os.environ.get("CXX"), "g++", "c++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def cache_dir() -> Path:
    """Where built libraries are kept: $FASTNN_SHIM_CACHE, else a per-user temporary folder."""
    configured = os.environ.get("FASTNN_SHIM_CACHE")
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"fastnn-cpu-shim-{os.getuid()}"


def _compiler_id(compiler: str) -> str:
    if compiler not in _COMPILER_IDS:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True)
        _COMPILER_IDS[compiler] = result.stdout.strip()
    return _COMPILER_IDS[compiler]


def _translate_options(options: Sequence[str]) -> list[str]:
    """The NVRTC options g++ understands too (-D, -U, -I, the C++ standard); the rest drop."""
    flags = []
    for option in options:
        if option.startswith(("-D", "-U", "-I")):
            flags.append(option)
        elif option.startswith(("--std=", "-std=")):
            flags.append("-std=" + option.split("=", 1)[1])
    return flags


def _launch_entry(signature: Signature) -> str:
    args = []
    for i, param in enumerate(signature.params):
        if param.pointer:
            const = "const " if param.const else ""
            args.append(f"static_cast<{const}{param.ctype}*>(*static_cast<void**>(args[{i}]))")
        else:
            args.append(f"*static_cast<{param.ctype}*>(args[{i}])")
    call = f"{signature.name}({', '.join(args)});"
    return (
        f'extern "C" __attribute__((visibility("default"))) int fastnn_launch_{signature.name}(\n'
        "    void** args, const unsigned* grid, const unsigned* block, int reverse,\n"
        "    char* error, int error_size) {\n"
        "    (void)args;\n"
        "    std::string message;\n"
        "    const int status = fastnn_shim::launch(grid, block, reverse != 0,\n"
        f"        [&]() {{ {call} }}, message);\n"
        '    if (status) snprintf(error, error_size, "%s", message.c_str());\n'
        "    return status;\n"
        "}\n"
    )


class Module:
    """A CUDA C source built for the CPU; the interface of ``cupy.RawModule``.

    ``thread_order`` is "forward" or "reverse"; ``guard_bytes`` (0 to turn off) is the size of
    the canary zone on each side of every array.
    """

    def __init__(
        self,
        code: str,
        options: Sequence[str] = (),
        name_expressions: Sequence[str] | None = None,
        *,
        thread_order: str = "forward",
        guard_bytes: int = 256,
        compiler: str | None = None,
    ) -> None:
        if thread_order not in ("forward", "reverse"):
            raise ValueError(f"thread_order must be 'forward' or 'reverse'; got {thread_order!r}")
        if guard_bytes < 0:
            raise ValueError("guard_bytes must be >= 0")
        self.code = code
        self.options = tuple(options)
        self.signatures = kernel_signatures(code)
        for name in name_expressions or ():
            if name not in self.signatures:
                raise ValueError(f'name expression {name!r} is no extern "C" __global__ kernel')
        self.thread_order = thread_order
        self.guard_bytes = -(-guard_bytes // _ALIGN) * _ALIGN
        self._compiler = compiler
        self._library: ctypes.CDLL | None = None
        self.library_path: Path | None = None

    def get_function(self, name: str) -> Function:
        """The kernel ``name`` (building the library on first use)."""
        if name not in self.signatures:
            raise KeyError(f"no kernel {name!r}; this source has: {', '.join(self.signatures)}")
        library = self._load()
        return Function(self, self.signatures[name], getattr(library, f"fastnn_launch_{name}"))

    # ---- building ----
    def _source(self) -> str:
        entries = "\n".join(_launch_entry(sig) for sig in self.signatures.values())
        return f"{self.code}\n\n// ---- launch entries (fastnn.cuda.shim) ----\n{entries}"

    def _command(self, compiler: str, source: Path, output: Path) -> list[str]:
        return [
            compiler,
            "-std=c++17",
            "-O2",
            "-fPIC",
            "-shared",
            "-fvisibility=hidden",
            "-Wall",
            *_translate_options(self.options),
            "-include",
            str(HEADER),
            "-x",
            "c++",
            str(source),
            "-o",
            str(output),
        ]

    def _load(self) -> ctypes.CDLL:
        if self._library is not None:
            return self._library
        compiler = self._compiler or find_compiler()
        if compiler is None:
            raise ShimCompileError("no C++ compiler found (set CXX or install g++)", "")
        source = self._source()
        probe = self._command(compiler, Path("SRC"), Path("OUT"))
        digest = hashlib.sha256(
            "\0".join([source, HEADER.read_text(), *probe, _compiler_id(compiler)]).encode()
        ).hexdigest()[:32]
        folder = cache_dir()
        library_path = folder / f"{digest}.so"
        with _BUILD_LOCK:
            if digest not in _LIBRARIES:
                if not library_path.exists():
                    folder.mkdir(parents=True, exist_ok=True)
                    # per-process names, renamed into place: parallel builds never collide
                    stem = folder / f"{digest}.{os.getpid()}"
                    source_path, temporary = stem.with_suffix(".cpp"), stem.with_suffix(".so")
                    source_path.write_text(source)
                    result = subprocess.run(
                        self._command(compiler, source_path, temporary),
                        capture_output=True,
                        text=True,
                    )
                    log = result.stdout + result.stderr
                    if result.returncode != 0:
                        temporary.unlink(missing_ok=True)
                        raise ShimCompileError(
                            f"compiling for the CPU shim failed ({source_path})", log
                        )
                    (folder / f"{digest}.log").write_text(log)
                    os.replace(source_path, folder / f"{digest}.cpp")  # kept for reading
                    os.replace(temporary, library_path)
                _LIBRARIES[digest] = ctypes.CDLL(str(library_path))
        self._library = _LIBRARIES[digest]
        self.library_path = library_path
        return self._library

    @property
    def compile_log(self) -> str:
        """The compiler's warnings for this source (empty when it had none)."""
        self._load()
        assert self.library_path is not None
        log = self.library_path.with_suffix(".log")
        return log.read_text() if log.exists() else ""


def _dim3(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int | np.integer) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(int(v) < 1 for v in dims):
        raise ValueError(f"{what} must be 1 to 3 positive sizes; got {value!r}")
    return tuple(int(v) for v in dims) + (1,) * (3 - len(dims))  # type: ignore[return-value]


class _Buffer:
    """One array as the kernel sees it: the array itself, or a copy inside guard bytes."""

    def __init__(self, array: np.ndarray, guard: int) -> None:
        self.array = array
        self.guard = guard
        if guard == 0:
            self.pointer = array.ctypes.data
            return
        nbytes = array.nbytes
        self.raw = np.full(nbytes + 2 * guard + _ALIGN, _CANARY, dtype=np.uint8)
        self.start = (-self.raw.ctypes.data) % _ALIGN
        inner = self.raw[self.start + guard : self.start + guard + nbytes]
        inner[:] = array.reshape(-1).view(np.uint8)
        self.pointer = inner.ctypes.data

    def finish(self, kernel: str, label: str) -> None:
        """Check the canaries, then copy the kernel's writes back into the array."""
        if self.guard == 0:
            return
        begin, end = self.start + self.guard, self.start + self.guard + self.array.nbytes
        before, after = self.raw[self.start : begin], self.raw[end : end + self.guard]
        hit_before = np.flatnonzero(before != _CANARY)
        hit_after = np.flatnonzero(after != _CANARY)
        if hit_before.size or hit_after.size:
            where = []
            if hit_before.size:
                where.append(f"up to {self.guard - int(hit_before[0])} bytes before its start")
            if hit_after.size:
                where.append(
                    f"up to {int(hit_after[-1]) + 1} bytes past its end ({self.array.nbytes} bytes)"
                )
            raise GuardError(f"kernel {kernel} wrote outside {label}: {' and '.join(where)}")
        if self.array.flags.writeable:
            self.array.reshape(-1).view(np.uint8)[:] = self.raw[begin:end]


class Function:
    """One kernel of a `Module`: ``function(grid, block, args)`` launches it (synchronously)."""

    def __init__(self, module: Module, signature: Signature, entry: Any) -> None:
        self.module = module
        self.signature = signature
        self._entry = entry
        entry.restype = ctypes.c_int
        entry.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        ]

    @property
    def name(self) -> str:
        return self.signature.name

    def _check(self, args: Sequence[Any]) -> None:
        params = self.signature.params
        if len(args) != len(params):
            raise TypeError(
                f"kernel {self.signature}: takes {len(params)} arguments, got {len(args)}"
            )
        for position, (param, arg) in enumerate(zip(params, args, strict=True)):
            where = f"kernel {self.name} argument {position} ({param})"
            if param.pointer:
                self._check_pointer(where, param, arg)
            else:
                self._check_scalar(where, param, arg)

    @staticmethod
    def _check_pointer(where: str, param: Any, arg: Any) -> None:
        if arg is None:
            return
        if not isinstance(arg, np.ndarray):
            raise TypeError(f"{where}: needs a NumPy array or None; got {type(arg).__name__}")
        if param.ctype != "void":
            expected = C_TYPES.get(param.ctype)
            if expected is None:
                raise TypeError(f"{where}: the shim does not know the C type {param.ctype!r}")
            if arg.dtype != expected:
                raise TypeError(f"{where}: needs a {expected} array; got {arg.dtype}")
        if not arg.flags.c_contiguous:
            raise TypeError(f"{where}: needs a C-contiguous array")
        if not param.const and not arg.flags.writeable:
            raise TypeError(f"{where}: the kernel may write to it, but the array is read-only")

    @staticmethod
    def _check_scalar(where: str, param: Any, arg: Any) -> None:
        expected = C_TYPES.get(param.ctype)
        if expected is None:
            raise TypeError(f"{where}: the shim does not know the C type {param.ctype!r}")
        if not isinstance(arg, np.generic):
            raise TypeError(
                f"{where}: needs a numpy.{expected.name} scalar ({expected.itemsize} bytes); got "
                f"a Python {type(arg).__name__} (CuPy would pass it as 8 bytes): "
                f"wrap it as numpy.{expected.name}(...)"
            )
        if arg.dtype != expected:
            raise TypeError(
                f"{where}: needs a numpy.{expected.name} scalar ({expected.itemsize} bytes); "
                f"got numpy.{arg.dtype.name} ({arg.dtype.itemsize} bytes)"
            )

    def __call__(
        self,
        grid: int | Sequence[int],
        block: int | Sequence[int],
        args: Sequence[Any],
        *,
        shared_mem: int = 0,
        stream: Any = None,
    ) -> None:
        """Launch on the CPU and return when it has finished (``stream`` is ignored); while
        this thread captures, check the launch and record it instead (`begin_capture`)."""
        if shared_mem:
            raise NotImplementedError("the CPU shim has no dynamic shared memory")
        grid3, block3 = _dim3(grid, "grid"), _dim3(block, "block")
        args = tuple(args)
        self._check(args)
        recording = getattr(_CAPTURE, "launches", None)
        if recording is not None:
            recording.append((self, grid3, block3, args))
            return
        self._run(grid3, block3, args)

    def _run(self, grid3: tuple[int, int, int], block3: tuple[int, int, int],
             args: tuple[Any, ...]) -> None:
        guard = self.module.guard_bytes
        buffers: list[tuple[_Buffer, str]] = []
        holders: list[Any] = []
        for position, (param, arg) in enumerate(zip(self.signature.params, args, strict=True)):
            if not param.pointer:
                ctype = np.ctypeslib.as_ctypes_type(arg.dtype)
                holders.append(ctype(arg.item()))
                continue
            if arg is None:
                holders.append(ctypes.c_void_p(None))
                continue
            buffer = self._buffer_for(arg, buffers, guard, f"argument {position} ({param.name})")
            holders.append(ctypes.c_void_p(buffer.pointer))
        argv = (ctypes.c_void_p * max(len(holders), 1))(
            *[ctypes.addressof(holder) for holder in holders]
        )
        error = ctypes.create_string_buffer(1024)
        status = self._entry(
            argv,
            (ctypes.c_uint * 3)(*grid3),
            (ctypes.c_uint * 3)(*block3),
            int(self.module.thread_order == "reverse"),
            error,
            len(error),
        )
        if status != 0:
            raise KernelLaunchError(f"kernel {self.name}: {error.value.decode(errors='replace')}")
        for buffer, label in buffers:
            buffer.finish(self.name, label)

    @staticmethod
    def _buffer_for(
        array: np.ndarray, buffers: list[tuple[_Buffer, str]], guard: int, label: str
    ) -> _Buffer:
        """The buffer of ``array``: shared with an earlier argument that is the same memory."""
        for buffer, _ in buffers:
            other = buffer.array
            if other.ctypes.data == array.ctypes.data and other.nbytes == array.nbytes:
                return buffer
            if guard and np.shares_memory(other, array):
                raise ValueError(
                    f"{label} partly overlaps another argument: not supported with guard bytes "
                    "(use guard_bytes=0)"
                )
        buffer = _Buffer(array, guard)
        buffers.append((buffer, label))
        return buffer


class Graph:
    """Launches recorded between `begin_capture` and `end_capture`; ``launch()`` runs them in
    order (what ``cupy.cuda.Graph`` is to a stream capture)."""

    def __init__(self, launches: Sequence[tuple[Function, tuple[int, int, int],
                                                tuple[int, int, int], tuple[Any, ...]]]) -> None:
        self.launches = tuple(launches)

    def __len__(self) -> int:
        return len(self.launches)

    def launch(self, stream: Any = None) -> None:
        """Run every recorded launch, first to last (``stream`` is ignored)."""
        for function, grid3, block3, args in self.launches:
            function._run(grid3, block3, args)


def begin_capture() -> None:
    """Record this thread's launches from now on instead of running them."""
    if getattr(_CAPTURE, "launches", None) is not None:
        raise RuntimeError("this thread is capturing already: end_capture() first")
    _CAPTURE.launches = []


def end_capture() -> Graph:
    """Stop recording this thread's launches; the `Graph` of those recorded."""
    launches = getattr(_CAPTURE, "launches", None)
    if launches is None:
        raise RuntimeError("this thread is not capturing: begin_capture() first")
    _CAPTURE.launches = None
    return Graph(launches)
