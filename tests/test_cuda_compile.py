"""The kernel sources compile with NVRTC exactly as ``cupy.RawModule`` compiles them (no GPU
needed: the ``cuda-check`` extra's pip packages), load from a checkout or an installed wheel,
and ship inside the wheel."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fastnn.cuda import (
    CUPY_ADDED_OPTIONS,
    RAWMODULE_OPTIONS,
    kernel_dir,
    kernel_files,
    kernel_names,
    module_args,
    nvrtc,
    read_source,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def nvrtc_ready() -> None:
    """Skip (or fail, when $FASTNN_REQUIRE_BACKENDS names nvrtc) without NVRTC and headers."""
    try:
        nvrtc.load_nvrtc()
        nvrtc.runtime_include_dir()
    except nvrtc.NvrtcUnavailable as exc:
        if "nvrtc" in os.environ.get("FASTNN_REQUIRE_BACKENDS", ""):
            pytest.fail(f"FASTNN_REQUIRE_BACKENDS names nvrtc, but {exc}")
        pytest.skip(str(exc))


@pytest.mark.nvrtc
@pytest.mark.parametrize("arch", nvrtc.ARCHES)
@pytest.mark.parametrize("name", kernel_files())
def test_kernel_file_compiles_with_nvrtc(nvrtc_ready: None, name: str, arch: str) -> None:
    try:
        result = nvrtc.check_kernel_file(name, arch)
    except nvrtc.NvrtcCompileError as exc:
        pytest.fail(f"{name}.cu does not compile for {arch}:\n{exc}")
    names = kernel_names(read_source(name))
    assert names and result.lowered_names == {n: n for n in names}  # extern "C": unmangled
    assert result.binary_size > 0
    assert "warning" not in result.log.lower(), f"{name}.cu ({arch}):\n{result.log}"
    assert result.options[: len(RAWMODULE_OPTIONS)] == RAWMODULE_OPTIONS
    for option in (*CUPY_ADDED_OPTIONS, f"-arch={arch}", f"-I{nvrtc.runtime_include_dir()}"):
        assert option in result.options


@pytest.mark.nvrtc
def test_compile_errors_carry_the_nvrtc_log(nvrtc_ready: None) -> None:
    broken = 'extern "C" __global__ void broken(float* x) { x[0] = not_declared; }'
    with pytest.raises(nvrtc.NvrtcCompileError, match="not_declared") as info:
        nvrtc.compile_source(broken, "sm_80", name_expressions=["broken"], filename="broken.cu")
    assert "broken.cu" in info.value.log and "error" in info.value.log
    assert nvrtc.version() >= (12, 0)


def test_the_backend_gets_one_set_of_options() -> None:
    for name in kernel_files():
        code, options, names = module_args(name)
        assert options == RAWMODULE_OPTIONS
        assert names == kernel_names(code)
        assert code == read_source(name)


def test_sources_come_from_the_checkout_with_headers_pasted_in() -> None:
    assert kernel_dir() == ROOT / "kernels"
    assert set(kernel_files()) >= {
        "masks", "hidden_forward", "hidden_backward", "output_loss", "eval_output",
        "colstats", "running_stats", "sgd", "reduce", "gemm",
    }  # fmt: skip
    code = read_source("hidden_forward")
    # self-contained: CuPy's cache key (the source text) covers the header
    assert not [line for line in code.splitlines() if line.lstrip().startswith("#include")]
    assert code.count("#define FASTNN_COMMON_CUH") == 1
    assert '#line 1 "fastnn_common.cuh"' in code and '#line 1 "hidden_forward.cu"' in code
    with pytest.raises(FileNotFoundError, match="no kernel source"):
        read_source("no_such_kernel")


def _build_wheel(target: Path) -> Path:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(target)]
    if importlib.util.find_spec("hatchling") is not None:
        command.append("--no-build-isolation")  # fast, offline
    result = subprocess.run([*command, str(ROOT)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        if importlib.util.find_spec("hatchling") is None:
            pytest.skip(f"no hatchling here and pip could not fetch it:\n{result.stderr[-2000:]}")
        pytest.fail(f"building the wheel failed:\n{result.stdout}\n{result.stderr}")
    (wheel,) = target.glob("fastnn-*.whl")
    return wheel


def test_wheel_ships_the_kernels_and_the_shim_header(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in kernel_files():
        assert f"fastnn/kernels/{name}.cu" in names
    assert "fastnn/kernels/fastnn_common.cuh" in names
    assert "fastnn/cuda/cpu_shim.h" in names
    # installed (unpacked) away from the checkout, the loader finds the packaged copies
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "from fastnn.cuda import kernel_dir, read_source, kernel_names;"
        "print(kernel_dir()); print(','.join(kernel_names(read_source('masks'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    folder, kernels = result.stdout.split()
    assert Path(folder) == site / "fastnn" / "kernels"
    assert "article_mask_f64" in kernels.split(",")
