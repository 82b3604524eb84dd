#!/usr/bin/env bash
# gpu_check.sh - everything that needs an NVIDIA GPU, in one command, from a source tree.
#
#   bash benchmarks/gpu_check.sh MNIST_DIR
#
# MNIST_DIR holds the four MNIST IDX files (raw or .gz). Needs Python with NumPy, CuPy (for
# the machine's CUDA) and pytest; PyTorch with CUDA for the timing comparison. No network, no
# install: fastnn runs from this tree (PYTHONPATH). $PYTHON picks the interpreter.
#
#   (a) the kernel tests, the kernel-path tests and the backend parity tests on CuPy
#       (FASTNN_REQUIRE_BACKENDS=cupy: a skipped GPU test is a failure);
#   (b) 3-epoch whole runs of the cupy backend against numpy on 10 000 MNIST rows, float64,
#       1e-10 relative (benchmarks/gpu_bench.py parity);
#   (c) one article epoch (train 60k at batch 100, evaluate 60k + 10k), 784-100-50-10,
#       float32, BN off and on: the cupy backend (each step replayed from its CUDA graph,
#       and launched kernel by kernel) against PyTorch eager, with the step captured as a
#       CUDA graph, and as torch.compile(mode="reduce-overhead"), one table
#       (benchmarks/gpu_bench.py bench);
#   (d) the products of one training step and of the evaluation's first layer: gemm.cu
#       against cuBLAS through CuPy (benchmarks/gpu_bench.py gemm).
#
# Each step runs even when an earlier one failed; the exit status is 0 only when all passed
# (2: bad arguments or an environment that cannot run the checks). Took 2-5 minutes on an
# H100 (the first CuPy compile of the kernels included) before (c) gained the CUDA-graph and
# torch.compile peers, whose capture and compiling add to (c); every step has a time limit.
#
# --dry-run (after MNIST_DIR) runs the same four steps on the CPU, to check this script:
# (a) the shim's whole-run tests, (b), (c) and (d) with gpu_bench.py --dry-run (the CPU shim
# standing in for the cupy backend, NumPy's BLAS for cuBLAS, tiny sizes); its figures mean
# nothing.
set -euo pipefail

usage="usage: bash benchmarks/gpu_check.sh MNIST_DIR [--dry-run]  (the four MNIST IDX files,"
usage+=" raw or .gz)"
dry_run=""
if [[ $# -eq 2 && "$2" == "--dry-run" ]]; then
    dry_run="--dry-run"
elif [[ $# -ne 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    echo "$usage" >&2
    exit 2
fi
if [[ ! -d "$1" ]]; then
    echo "gpu_check: $1: no such folder; $usage" >&2
    exit 2
fi
MNIST_DIR="$(cd "$1" && pwd)"
missing=()
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
            t10k-labels-idx1-ubyte; do
    if [[ ! -f "$MNIST_DIR/$name" && ! -f "$MNIST_DIR/$name.gz" ]]; then
        missing+=("$name")
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "gpu_check: $MNIST_DIR lacks ${missing[*]} (raw or .gz)" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [[ -z "$PYTHON" ]]; then
    echo "gpu_check: no python on the PATH (set PYTHON=/path/to/python)" >&2
    exit 2
fi

# ---- the environment ----
if [[ -n "$dry_run" ]]; then
    echo "gpu_check: DRY RUN on the CPU (the CPU shim stands in for the GPU; no GPU figure)"
    if ! "$PYTHON" -c "import numpy, fastnn, fastnn.cuda.shim as s; assert s.find_compiler()"
    then
        echo "gpu_check: the dry run needs NumPy and a C++ compiler (g++)" >&2
        exit 2
    fi
elif ! "$PYTHON" - <<'EOF'
import sys
try:
    import numpy
    import cupy
except ImportError as exc:
    sys.exit(f"gpu_check: {exc}: this check needs NumPy and CuPy "
             "(pip install cupy-cuda12x, or cupy-cuda13x for CUDA 13)")
try:
    count = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # noqa: BLE001
    sys.exit(f"gpu_check: CuPy finds no usable CUDA device ({exc})")
if count < 1:
    sys.exit("gpu_check: CuPy finds no CUDA device")
import fastnn
name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
name = name.decode() if isinstance(name, bytes) else name
print(f"python {sys.version.split()[0]}, numpy {numpy.__version__}, cupy {cupy.__version__} "
      f"(CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}), device 0: {name}; "
      f"fastnn {fastnn.__version__} from {fastnn.__file__}")
EOF
then
    exit 2
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'available' if torch.cuda.is_available() else 'NOT available')" 2>/dev/null \
    || echo "gpu_check: torch is not importable: (c) will time the cupy backend alone"

if command -v timeout >/dev/null; then
    limit() { timeout --kill-after=10 "$@"; }
else
    limit() { shift; "$@"; }
fi

failed=()
run_step() {  # run_step NAME SECONDS COMMAND...: run it, note a failure, go on
    local name="$1" seconds="$2" start status
    shift 2
    echo
    echo "==== $name (limit ${seconds} s) ===="
    start=$SECONDS
    set +e
    limit "$seconds" "$@"
    status=$?
    set -e
    if [[ $status -eq 124 || $status -eq 137 ]]; then
        echo "---- $name: TIMED OUT after $((SECONDS - start)) s"
        failed+=("$name (timed out)")
    elif [[ $status -ne 0 ]]; then
        echo "---- $name: FAILED (exit $status) after $((SECONDS - start)) s"
        failed+=("$name")
    else
        echo "---- $name: ok ($((SECONDS - start)) s)"
    fi
}

# (a) the tests on CuPy
engine="cupy" selection="cupy"
if [[ -n "$dry_run" ]]; then
    engine="shim" selection="shim and whole_run"
fi
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    run_step "(a) kernel and parity tests on $engine" 240 \
        env FASTNN_REQUIRE_BACKENDS="$engine" FASTNN_OFFLINE=1 "$PYTHON" -m pytest -q \
        -p no:cacheprovider --maxfail=20 --tb=short -m "cuda_cpu or not cuda_cpu" \
        -k "$selection" \
        tests/test_cuda_kernels.py tests/test_cuda_backend.py tests/test_backend_parity.py
else
    echo
    echo "==== (a) kernel and parity tests on CuPy: FAILED: pytest is not installed for $PYTHON"
    failed+=("(a) (no pytest)")
fi

# (b) whole-run parity on MNIST
run_step "(b) 3-epoch parity of cupy against numpy on MNIST (float64)" 90 \
    "$PYTHON" benchmarks/gpu_bench.py parity "$MNIST_DIR" --rows 10000 --epochs 3 $dry_run

# (c) the epoch timing
table="$(mktemp)"
trap 'rm -f "$table"' EXIT
run_step "(c) epoch time: cupy backend against PyTorch (eager, CUDA graph, compiled)" 240 \
    bash -c 'set -o pipefail; "$0" benchmarks/gpu_bench.py bench "$1" --epochs 5 $3 | tee "$2"' \
    "$PYTHON" "$MNIST_DIR" "$table" "$dry_run"

# (d) the step's products: gemm.cu against cuBLAS
run_step "(d) products: gemm.cu against cuBLAS" 60 \
    "$PYTHON" benchmarks/gpu_bench.py gemm "$MNIST_DIR" $dry_run

echo
echo "==== summary ===="
if [[ -s "$table" ]]; then
    cat "$table"
fi
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "gpu_check: FAILED:"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: all passed"
