"""Find, read and parse the CUDA C kernel sources, and the arguments of `cupy.RawModule`.

The ``.cu`` files live in the top-level ``kernels/`` folder of a source checkout; the wheel
ships them as ``fastnn/kernels/`` (hatch ``force-include``). `read_source` pastes local
``#include "..."`` files in, so a source is self-contained: CuPy keys its compile cache on the
source text, which must therefore change whenever a header does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: the options the CuPy backend passes to ``cupy.RawModule`` (``--std`` given, so CuPy adds none)
RAWMODULE_OPTIONS: tuple[str, ...] = ("--std=c++17",)

#: what CuPy itself adds to every NVRTC compile of a RawModule (besides ``-arch`` and its ``-I``
#: include paths): see cupy/cuda/compiler.py, ``_compile_with_cache_cuda`` and
#: ``compile_using_nvrtc``
CUPY_ADDED_OPTIONS: tuple[str, ...] = ("-ftz=true", "--device-as-default-execution-space")

#: C type -> NumPy dtype of a kernel's scalars and pointees (x86-64 / aarch64 Linux, and CUDA
#: on them): what a launch casts a scalar to, and what the CPU shim checks
C_TYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "float": np.float32,
        "double": np.float64,
        "char": np.int8,
        "signed char": np.int8,
        "unsigned char": np.uint8,
        "short": np.int16,
        "unsigned short": np.uint16,
        "int": np.int32,
        "unsigned int": np.uint32,
        "long": np.int64,
        "unsigned long": np.uint64,
        "long long": np.int64,
        "unsigned long long": np.uint64,
        "size_t": np.uint64,
        "bool": np.bool_,
    }.items()
}

_PACKAGE = Path(__file__).resolve().parent.parent  # .../fastnn
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$')
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_KERNEL = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
    r"([A-Za-z_]\w*)\s*\(([^)]*)\)"
)
_QUALIFIERS = {"const", "volatile", "__restrict__", "__restrict", "restrict"}


def kernel_dir() -> Path:
    """The folder of the ``.cu`` files: ``fastnn/kernels`` when installed, else ``kernels/``."""
    for candidate in (_PACKAGE / "kernels", _PACKAGE.parent / "kernels"):
        if any(candidate.glob("*.cu")):
            return candidate
    raise FileNotFoundError(
        f"no CUDA kernel sources (*.cu) in {_PACKAGE / 'kernels'} or {_PACKAGE.parent / 'kernels'}"
    )


def kernel_files() -> tuple[str, ...]:
    """The names (stems) of every ``.cu`` file, sorted."""
    return tuple(sorted(path.stem for path in kernel_dir().glob("*.cu")))


def _expand(path: Path, seen: set[Path]) -> list[str]:
    lines = [f'#line 1 "{path.name}"']
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = _INCLUDE.match(line)
        if match is None:
            lines.append(line)
            continue
        target = (path.parent / match.group(1)).resolve()
        if not target.is_file():
            raise FileNotFoundError(f"{path.name}:{number}: no such include {match.group(1)!r}")
        if target not in seen:
            seen.add(target)
            lines.extend(_expand(target, seen))
        lines.append(f'#line {number + 1} "{path.name}"')
    return lines


def read_source(name: str) -> str:
    """The text of ``<name>.cu`` with its local includes pasted in (each once, with #line)."""
    path = (kernel_dir() / f"{name}.cu").resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no kernel source {name}.cu in {kernel_dir()}")
    return "\n".join(_expand(path, {path})) + "\n"


@dataclass(frozen=True)
class Param:
    """One kernel parameter: a scalar or a pointer to ``ctype``."""

    name: str
    ctype: str  # normalised base type: "double", "int", "unsigned long long", ...
    pointer: bool
    const: bool

    def __str__(self) -> str:
        const = "const " if self.const else ""
        return f"{const}{self.ctype}{'*' if self.pointer else ''} {self.name}"


@dataclass(frozen=True)
class Signature:
    """The name and parameters of one ``extern "C" __global__`` kernel."""

    name: str
    params: tuple[Param, ...]

    def __str__(self) -> str:
        return f"{self.name}({', '.join(str(p) for p in self.params)})"


_SYNONYMS = {
    "unsigned": "unsigned int",
    "signed": "int",
    "signed int": "int",
    "long int": "long",
    "long long int": "long long",
    "signed long long": "long long",
    "unsigned long int": "unsigned long",
    "unsigned long long int": "unsigned long long",
    "short int": "short",
    "unsigned short int": "unsigned short",
}


def _parse_param(kernel: str, text: str) -> Param:
    tokens = re.findall(r"[A-Za-z_]\w*|\*|&|\[", text)
    if "&" in tokens or "[" in tokens:
        raise ValueError(f"kernel {kernel}: unsupported parameter {text.strip()!r}")
    stars = tokens.count("*")
    words = [t for t in tokens if t != "*"]
    const = "const" in words
    words = [w for w in words if w not in _QUALIFIERS]
    if len(words) < 2 or stars > 1:
        raise ValueError(f"kernel {kernel}: cannot parse parameter {text.strip()!r}")
    ctype = " ".join(words[:-1])
    return Param(words[-1], _SYNONYMS.get(ctype, ctype), stars == 1, const)


def kernel_signatures(code: str) -> dict[str, Signature]:
    """Every ``extern "C" __global__ void name(...)`` of a source (comments ignored)."""
    text = _COMMENTS.sub(" ", code)
    found: dict[str, Signature] = {}
    for match in _KERNEL.finditer(text):
        name, body = match.group(1), match.group(2).strip()
        parts = [] if body in ("", "void") else body.split(",")
        if name in found:
            raise ValueError(f"kernel {name} is defined twice")
        found[name] = Signature(name, tuple(_parse_param(name, part) for part in parts))
    return found


def kernel_names(code: str) -> tuple[str, ...]:
    """The ``extern "C"`` kernel names of a source, in source order."""
    return tuple(kernel_signatures(code))


def module_args(name: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(code, options, name_expressions) for ``cupy.RawModule`` of ``kernels/<name>.cu``.

    ``cupy.RawModule(code=code, options=options, name_expressions=names)``; the kernels are
    then ``module.get_function("<kernel>_f32")`` and so on.
    """
    code = read_source(name)
    return code, RAWMODULE_OPTIONS, kernel_names(code)
