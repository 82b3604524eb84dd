"""Compile the kernel sources with NVRTC through ctypes, exactly as ``cupy.RawModule`` would.

No GPU and no CuPy needed: NVRTC and the runtime headers come from the pip packages of the
``cuda-check`` extra (nvidia-cuda-nvrtc-cu12, nvidia-cuda-runtime-cu12). $FASTNN_NVRTC_LIB
may name libnvrtc explicitly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .sources import CUPY_ADDED_OPTIONS, RAWMODULE_OPTIONS, module_args

#: the architectures the compile check covers (A100, H100)
ARCHES: tuple[str, ...] = ("sm_80", "sm_90")


class NvrtcUnavailable(RuntimeError):
    """libnvrtc (or the CUDA runtime headers) could not be found or loaded."""


class NvrtcCompileError(RuntimeError):
    """NVRTC rejected a source; ``log`` holds its messages."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}\n{log}")
        self.log = log


@dataclass(frozen=True)
class CompileResult:
    """What one successful compile produced."""

    arch: str
    options: tuple[str, ...]
    log: str  # warnings, if any
    lowered_names: dict[str, str]  # name expression -> symbol in the binary
    binary_size: int  # bytes of the cubin (sm_XX) or PTX (compute_XX)


def _package_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _library_candidates() -> list[str]:
    configured = os.environ.get("FASTNN_NVRTC_LIB")
    if configured:
        return [configured]
    candidates = []
    package = _package_dir("nvidia.cuda_nvrtc")
    if package is not None:
        candidates += sorted(str(p) for p in (package / "lib").glob("libnvrtc.so*"))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    return candidates


@lru_cache(maxsize=1)
def load_nvrtc() -> ctypes.CDLL:
    """The NVRTC library (raises NvrtcUnavailable when there is none)."""
    errors = []
    for candidate in _library_candidates():
        try:
            library = ctypes.CDLL(candidate)
        except OSError as exc:
            errors.append(f"{candidate}: {exc}")
            continue
        _declare(library)
        return library
    detail = "; ".join(errors) or "not installed"
    raise NvrtcUnavailable(
        f"libnvrtc not found ({detail}): pip install nvidia-cuda-nvrtc-cu12 "
        "nvidia-cuda-runtime-cu12"
    )


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_char_p, c_size_t = ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t
    program, program_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    lib.nvrtcGetErrorString.restype = c_char_p
    lib.nvrtcGetErrorString.argtypes = [c_int]
    lib.nvrtcVersion.argtypes = [ctypes.POINTER(c_int), ctypes.POINTER(c_int)]
    lib.nvrtcCreateProgram.argtypes = [
        program_p,
        c_char_p,
        c_char_p,
        c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.nvrtcDestroyProgram.argtypes = [program_p]
    lib.nvrtcAddNameExpression.argtypes = [program, c_char_p]
    lib.nvrtcCompileProgram.argtypes = [program, c_int, ctypes.POINTER(c_char_p)]
    lib.nvrtcGetProgramLogSize.argtypes = [program, ctypes.POINTER(c_size_t)]
    lib.nvrtcGetProgramLog.argtypes = [program, c_char_p]
    lib.nvrtcGetLoweredName.argtypes = [program, c_char_p, ctypes.POINTER(c_char_p)]
    lib.nvrtcGetCUBINSize.argtypes = [program, ctypes.POINTER(c_size_t)]
    lib.nvrtcGetPTXSize.argtypes = [program, ctypes.POINTER(c_size_t)]
    for name in (
        "nvrtcVersion", "nvrtcCreateProgram", "nvrtcDestroyProgram", "nvrtcAddNameExpression",
        "nvrtcCompileProgram", "nvrtcGetProgramLogSize", "nvrtcGetProgramLog",
        "nvrtcGetLoweredName", "nvrtcGetCUBINSize", "nvrtcGetPTXSize",
    ):  # fmt: skip
        getattr(lib, name).restype = c_int


def version() -> tuple[int, int]:
    """NVRTC's (major, minor) version."""
    lib = load_nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def runtime_include_dir() -> Path:
    """The CUDA runtime headers CuPy puts on the include path (nvidia-cuda-runtime-cu12)."""
    package = _package_dir("nvidia.cuda_runtime")
    if package is None or not (package / "include" / "cuda_runtime.h").is_file():
        raise NvrtcUnavailable(
            "CUDA runtime headers not found: pip install nvidia-cuda-nvrtc-cu12 "
            "nvidia-cuda-runtime-cu12"
        )
    return package / "include"


def cupy_options(arch: str, options: Sequence[str] = RAWMODULE_OPTIONS) -> tuple[str, ...]:
    """What NVRTC receives when ``cupy.RawModule(options=options)`` compiles for ``arch``."""
    return (
        *options,
        f"-I{runtime_include_dir()}",
        CUPY_ADDED_OPTIONS[0],  # -ftz=true
        f"-arch={arch}",
        *CUPY_ADDED_OPTIONS[1:],  # --device-as-default-execution-space
    )


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        message = lib.nvrtcGetErrorString(status).decode()
        raise NvrtcCompileError(f"{what} failed: {message} ({status})", "")


def compile_source(
    code: str,
    arch: str = "sm_80",
    options: Sequence[str] | None = None,
    name_expressions: Sequence[str] = (),
    filename: str = "kern.cu",
) -> CompileResult:
    """Compile ``code`` with NVRTC; raises NvrtcCompileError (with the log) when it fails.

    ``options`` are the full NVRTC options; None means `cupy_options` for ``arch``.
    """
    lib = load_nvrtc()
    full = tuple(options) if options is not None else cupy_options(arch)
    program = ctypes.c_void_p()
    _check(
        lib,
        lib.nvrtcCreateProgram(
            ctypes.byref(program), code.encode(), filename.encode(), 0, None, None
        ),
        "nvrtcCreateProgram",
    )
    try:
        for name in name_expressions:
            _check(
                lib, lib.nvrtcAddNameExpression(program, name.encode()), "nvrtcAddNameExpression"
            )
        encoded = [option.encode() for option in full]
        argv = (ctypes.c_char_p * max(len(encoded), 1))(*encoded)
        status = lib.nvrtcCompileProgram(program, len(encoded), argv)
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)), "log size")
        buffer = ctypes.create_string_buffer(size.value + 1)
        _check(lib, lib.nvrtcGetProgramLog(program, buffer), "nvrtcGetProgramLog")
        log = buffer.value.decode(errors="replace").strip()
        if status != 0:
            message = lib.nvrtcGetErrorString(status).decode()
            raise NvrtcCompileError(
                f"NVRTC could not compile {filename} for {arch} ({message}); options: "
                + " ".join(full),
                log,
            )
        lowered = {}
        for name in name_expressions:
            symbol = ctypes.c_char_p()
            _check(
                lib,
                lib.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(symbol)),
                f"nvrtcGetLoweredName({name})",
            )
            lowered[name] = (symbol.value or b"").decode()
        binary = ctypes.c_size_t()
        getter = lib.nvrtcGetCUBINSize if arch.startswith("sm_") else lib.nvrtcGetPTXSize
        _check(lib, getter(program, ctypes.byref(binary)), "binary size")
        return CompileResult(arch, full, log, lowered, binary.value)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def check_kernel_file(name: str, arch: str = "sm_80") -> CompileResult:
    """Compile ``kernels/<name>.cu`` with the code, options and name expressions of the backend."""
    code, options, names = module_args(name)
    return compile_source(code, arch, cupy_options(arch, options), names, f"{name}.cu")
