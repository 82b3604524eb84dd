"""The Python half of benchmarks/gpu_check.sh: the cupy backend on real MNIST.

    python benchmarks/gpu_bench.py parity MNIST_DIR [--rows 10000] [--epochs 3] [--dry-run]
    python benchmarks/gpu_bench.py bench MNIST_DIR [--epochs 5] [--dry-run]
    python benchmarks/gpu_bench.py gemm MNIST_DIR [--dry-run]

``parity``: whole `Trainer` runs of the cupy backend against the numpy reference on the first
``--rows`` training rows (and a fifth as many test rows), float64, one configuration without
regularisation and one with batch norm, both dropouts and L2 decay; every epoch's losses and
accuracies and the final parameters and running statistics must agree to 1e-10 relative
(normwise, on the largest reference value). Exit status 1 otherwise.

``bench``: one epoch as the article times it (train 60 000 rows at batch 100, then evaluate
60 000 + 10 000 rows), 784-100-50-10, float32, batch norm off and on ("bn"): the cupy backend
with each step replayed from its CUDA graph (the default) and launched kernel by kernel
(FASTNN_CUDA_GRAPHS=0), against the same work in PyTorch (nn.Sequential, plain SGD,
whole-set evaluation in training mode: the statistics of the evaluated set) run eager, with
the step captured as a CUDA graph, and as ``torch.compile(mode="reduce-overhead")``
(`torch_peer.epoch_runner`); one table of medians beside the article's 4.58 s / 5.98 s per
epoch and the targets of 15 ms / 25 ms. A peer that fails says so in the table; the others
stand.

``gemm``: the products of one article training step (784-100-50-10 at batch 100: forward
"nn", the weight gradients "tn", the gradients below "nt") and of the evaluation's first
layer (60 000 rows), float32: kernels/gemm.cu's launch against cuBLAS through CuPy
(``cupy.matmul`` into the same output) at each shape, microseconds per product (median of
rounds of 200 back to back) and the largest relative difference between the two; the figures
that say whether cuBLAS should replace gemm.cu at these shapes. (MNIST_DIR is not read.)

``--dry-run`` runs the same code on the CPU: the kernel path on the CPU shim stands in for
the cupy backend, PyTorch runs eager on the CPU (when installed; its graph and compile peers
need CUDA and are left out), on 120 rows with hidden layers of 16 and 8 nodes; it checks that
this script works, not any GPU figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch_peer import build_model, cudagraph_skips, epoch_order, epoch_runner

from fastnn import Config, Network, Trainer
from fastnn.datasets import load_idx_folder

ARTICLE_SECONDS_PER_EPOCH = {"off": 229.0 / 50, "bn": 299.0 / 50}  # 3:49 and 4:59 for 50 epochs
#: the epoch this backend aims at on an H100/H200, float32
TARGET_SECONDS_PER_EPOCH = {"off": 0.015, "bn": 0.025}
#: the PyTorch peers: mode of `torch_peer.epoch_runner` -> column
TORCH_MODES = {"eager": "torch eager", "graph": "torch graph", "compile": "torch compile"}
TOLERANCE = 1e-10
HIDDEN = (100, 50)
BATCH = 100
#: parity configurations: plain, and every regulariser at once
PARITY_CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "bn+dropout+l2": dict(batch_norm="bn", dropout_input=0.8, dropout_hidden=0.5,
                          weight_decay=("l2", 1e-4)),
}
#: --dry-run: rows (training, test) and hidden sizes small enough for the CPU shim
DRY_ROWS, DRY_HIDDEN = (120, 40), (16, 8)


def use_cpu_shim() -> str:
    """Serve backend "cupy" with the kernel path on the CPU shim (``--dry-run``)."""
    import fastnn.backends as backends
    from fastnn.backends.cuda import KernelOps, shim_device

    # the registry keeps one instance per name; this one stands in for the GPU's
    backends._INSTANCES["cupy"] = KernelOps(shim_device(guard_bytes=0))
    return "CPU shim (dry run)"


def gpu_name() -> str:
    import cupy

    device = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
    return f"{name.decode() if isinstance(name, bytes) else name} (cupy {cupy.__version__})"


def load(folder: str, rows: int | None, test_rows: int | None) -> tuple[np.ndarray, ...]:
    x, t, x_test, t_test = load_idx_folder(folder)
    return x[:rows], t[:rows], x_test[:test_rows], t_test[:test_rows]


# ---- parity ----

def relative(ours: Any, ref: Any, scale: float | None = None) -> float:
    """max |ours - ref| / (scale or max |ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ref.size == 0:
        return 0.0
    if scale is None:
        scale = float(np.abs(ref).max())
    return float(np.abs(ours - ref).max()) / max(scale, 1e-300)


def parity(arguments: argparse.Namespace) -> int:
    rows = DRY_ROWS[0] if arguments.dry_run else arguments.rows
    hidden = DRY_HIDDEN if arguments.dry_run else HIDDEN
    x, t, x_test, t_test = load(arguments.mnist_dir, rows, max(rows // 5, 1))
    print(f"parity: cupy against numpy, float64, {len(x)} training and {len(x_test)} test rows "
          f"of MNIST, {arguments.epochs} epochs, hidden {hidden}, batch {BATCH}, tolerance "
          f"{TOLERANCE:g}", flush=True)
    failed = False
    for name, options in PARITY_CONFIGS.items():
        results = {}
        for backend in ("numpy", "cupy"):
            config = Config(backend=backend, dtype="float64", hidden=hidden, batch_size=BATCH,
                            epochs=arguments.epochs, seed=1, **options)
            trainer = Trainer(config)
            start = time.perf_counter()
            history = trainer.fit(x, t, x_test, t_test)
            assert trainer.network is not None
            results[backend] = (history, trainer.network.state_arrays(), trainer.counters,
                                time.perf_counter() - start)
        (history, arrays, counters, seconds), (ref_history, ref_arrays, _, ref_seconds) = (
            results["cupy"], results["numpy"])
        if sorted(arrays) != sorted(ref_arrays):
            print(f"  {name}: arrays {sorted(arrays)} != {sorted(ref_arrays)}: FAILED")
            failed = True
            continue
        losses = max(relative(getattr(history, key), getattr(ref_history, key))
                     for key in ("train_loss", "test_loss"))
        scale = max(float(np.abs(a).max()) for a in ref_arrays.values())
        params = max(relative(arrays[key], ref_arrays[key], scale) for key in ref_arrays)
        accuracies = all(getattr(history, key) == getattr(ref_history, key)
                         for key in ("train_acc", "test_acc"))
        kernel_epochs = counters.get("train_kernels", 0)
        ok = (losses <= TOLERANCE and params <= TOLERANCE and accuracies
              and kernel_epochs == arguments.epochs)
        failed = failed or not ok
        print(f"  {name:<14} losses {losses:.1e}  parameters {params:.1e}  accuracies "
              f"{'equal' if accuracies else 'DIFFER'}  kernel epochs {kernel_epochs}/"
              f"{arguments.epochs}  ({seconds:.1f} s, numpy {ref_seconds:.1f} s): "
              f"{'ok' if ok else 'FAILED'}", flush=True)
        if not accuracies:
            print(f"    train_acc {history.train_acc} vs {ref_history.train_acc}\n"
                  f"    test_acc {history.test_acc} vs {ref_history.test_acc}")
    print("parity: FAILED" if failed else "parity: ok")
    return 1 if failed else 0


# ---- timing ----

def scaled(folder: str, dry_run: bool) -> tuple[np.ndarray, ...]:
    """(x, labels, x_test, labels_test): float32 inputs min-max scaled as the Trainer does."""
    rows, test_rows = DRY_ROWS if dry_run else (None, None)
    x, labels, x_test, labels_test = load(folder, rows, test_rows)
    low, high = float(x.min()), float(x.max())
    scale = (lambda a: ((a - low) / (high - low)).astype(np.float32))  # noqa: E731
    return scale(x), labels.astype(np.int64), scale(x_test), labels_test.astype(np.int64)


def time_cupy(data: tuple[np.ndarray, ...], batch_norm: str, epochs: int,
              hidden: tuple[int, ...], graphs: bool = True) -> list[float]:
    """Seconds of each timed epoch of the cupy backend (one untimed epoch first), each step
    replayed from its graph (``graphs``) or launched kernel by kernel."""
    config = Config(backend="cupy", dtype="float32", batch_norm=batch_norm, hidden=hidden,
                    batch_size=BATCH, normalize="none")
    net = Network(config)
    ops = net.ops
    x, labels, x_test, labels_test = data
    eye = np.eye(10, dtype=np.float32)
    x, t = ops.asarray(x), ops.asarray(eye[labels])
    x_test, t_test = ops.asarray(x_test), ops.asarray(eye[labels_test])
    workspace = ops.workspace()
    workspace.options["graphs"] = graphs
    seconds = []
    with ops.activate(workspace):
        ops.warm_up(net.plan)
        for epoch in range(epochs + 1):
            order = epoch_order(epoch, len(labels))
            start = time.perf_counter()
            net.train_epoch(x, t, order, epoch, workspace)
            net.scores(x, t, labels, workspace)
            net.scores(x_test, t_test, labels_test, workspace)
            ops.device.synchronize()
            seconds.append(time.perf_counter() - start)
    return seconds[1:]


def time_torch(data: tuple[np.ndarray, ...], batch_norm: str, epochs: int, device: str,
               hidden: tuple[int, ...], mode: str = "eager") -> list[float]:
    """The same network, batch size, plain SGD and evaluation in PyTorch, its steps run as
    ``mode`` ("eager", "graph", "compile") says (one untimed epoch first)."""
    import torch

    torch.manual_seed(0)
    x, labels, x_test, labels_test = (torch.from_numpy(a).to(device) for a in data)
    model = build_model(x.shape[1], hidden, 10, batch_norm).to(device)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run_epoch = epoch_runner(model, x, labels, x_test, labels_test, BATCH, synchronize, mode)
    seconds = []
    for epoch in range(epochs + 1):
        host_order = epoch_order(epoch, len(labels))
        start = time.perf_counter()
        run_epoch(torch.from_numpy(host_order).to(device))  # uploaded once per epoch, as cupy's
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def torch_device(dry_run: bool) -> tuple[str | None, str]:
    """(device, description), device None when PyTorch cannot run the comparison here."""
    try:
        import torch
    except ImportError as exc:
        return None, f"not importable ({exc})"
    if dry_run:
        return "cpu", f"torch {torch.__version__} on the CPU (dry run)"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA device (a CPU-only build?)"
    return "cuda", f"torch {torch.__version__} CUDA {torch.version.cuda}"


def bench(arguments: argparse.Namespace) -> int:
    where = use_cpu_shim() if arguments.dry_run else gpu_name()
    data = scaled(arguments.mnist_dir, arguments.dry_run)
    device, torch_text = torch_device(arguments.dry_run)
    epochs = 1 if arguments.dry_run else arguments.epochs
    hidden = DRY_HIDDEN if arguments.dry_run else HIDDEN
    modes = [] if device is None else ["eager"] if device == "cpu" else list(TORCH_MODES)
    columns = ["cupy graph", "cupy direct", *(TORCH_MODES[mode] for mode in modes)]
    rows: dict[str, dict[str, float | None]] = {}
    problems: dict[str, str] = {}
    for batch_norm in ("off", "bn"):
        row: dict[str, float | None] = {
            "cupy graph": statistics.median(time_cupy(data, batch_norm, epochs, hidden, True)),
            "cupy direct": statistics.median(time_cupy(data, batch_norm, epochs, hidden, False)),
        }
        for mode in modes:
            column = TORCH_MODES[mode]
            try:
                row[column] = statistics.median(
                    time_torch(data, batch_norm, epochs, str(device), hidden, mode))
            except Exception as exc:  # noqa: BLE001 - the other figures still stand
                problems[column] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                row[column] = None
        rows[batch_norm] = row
        print(f"  timed BN {batch_norm}: " + ", ".join(
            f"{column} {'-' if row[column] is None else f'{row[column]:.4f}'} s"
            for column in columns), file=sys.stderr, flush=True)
    n, n_test = len(data[0]), len(data[2])
    print(f"one epoch: train {n} rows (batch {BATCH}), then evaluate {n} + {n_test}; "
          f"784-{'-'.join(map(str, hidden))}-10 float32; median of {epochs} epochs after one "
          "untimed")
    print(f"cupy backend: {where}; torch: {torch_text}")
    peers = [column for column in columns if column.startswith("torch")]
    best = "best torch"
    header = (f"{'BN':<4} " + " ".join(f"{column:>13}" for column in columns)
              + f" {'cupy/' + best:>16} {'target s':>8} {'article s':>9}")
    print(header)
    print("-" * len(header))
    for batch_norm, row in rows.items():
        figures = " ".join("{:>13}".format("-" if row[c] is None else f"{row[c]:.4f}")
                           for c in columns)
        measured = [row[c] for c in peers if row[c] is not None]
        ratio = "-" if not measured else f"{row['cupy graph'] / min(measured):.2f}"
        print(f"{batch_norm:<4} {figures} {ratio:>16} "
              f"{TARGET_SECONDS_PER_EPOCH[batch_norm]:>8.3f} "
              f"{ARTICLE_SECONDS_PER_EPOCH[batch_norm]:>9.2f}")
    for column, problem in problems.items():
        print(f"{column}: failed ({problem})")
    if "compile" in modes:
        skips = cudagraph_skips()
        print(f"torch compile: {'no fallback from' if not skips else f'{skips} fallbacks from'} "
              "CUDA graphs (torch._dynamo counters: inductor cudagraph_skips)")
    print("article: 229 s / 50 epochs without BN, 299 s / 50 with BN (2018 desktop CPU); "
          "BN here is the article's 'bn' variant, torch's BatchNorm1d; cupy/best torch: the "
          "cupy graph epoch over the fastest PyTorch peer's")
    return 0


#: (op, M, N, K) of the products of an article step and of the evaluation's first layer
GEMM_SHAPES = (("nn", 100, 100, 784), ("nn", 100, 50, 100), ("nn", 100, 10, 50),
               ("tn", 784, 100, 100), ("tn", 100, 50, 100), ("tn", 50, 10, 100),
               ("nt", 100, 100, 50), ("nt", 100, 50, 10), ("nn", 60000, 100, 784))
#: --dry-run: the shapes cut down for the CPU shim
DRY_GEMM_SHAPES = (("nn", 20, 16, 40), ("tn", 40, 16, 20), ("nt", 20, 16, 8))


def gemm_operands(xp: Any, op: str, m: int, n: int, k: int) -> tuple[Any, Any, Any]:
    """A, B and C (m, n) of ``op``: "nn" A (m, k) B (k, n); "tn" A (k, m) B (k, n); "nt"
    A (m, k) B (n, k); float32, filled from a seeded generator."""
    gen = np.random.default_rng(m * 7 + n * 3 + k)
    a_shape = (k, m) if op == "tn" else (m, k)
    b_shape = (n, k) if op == "nt" else (k, n)
    a, b = (xp.asarray(gen.standard_normal(shape).astype(np.float32))
            for shape in (a_shape, b_shape))
    return a, b, xp.zeros((m, n), np.float32)


def gemm(arguments: argparse.Namespace) -> int:
    where = use_cpu_shim() if arguments.dry_run else gpu_name()
    import fastnn.backends as backends

    ops = backends.get_backend("cupy")
    xp = ops.xp
    shapes, repeats, rounds = ((DRY_GEMM_SHAPES, 3, 2) if arguments.dry_run
                               else (GEMM_SHAPES, 200, 5))

    def per_product(run: Any) -> float:
        times = []
        for _ in range(rounds):
            ops.device.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            ops.device.synchronize()
            times.append((time.perf_counter() - start) / repeats * 1e6)
        return statistics.median(times)

    print(f"products, float32, {where}: us per product (median of {rounds} rounds of "
          f"{repeats})" + ("; NumPy's BLAS stands in for cuBLAS" if arguments.dry_run else ""))
    header = f"{'op':<3} {'M':>6} {'N':>5} {'K':>5} {'gemm.cu us':>11} {'cuBLAS us':>10} " \
             f"{'gemm/cuBLAS':>11} {'max rel diff':>12}"
    print(header)
    print("-" * len(header))
    for op, m, n, k in shapes:
        a, b, c = gemm_operands(xp, op, m, n, k)
        launch = ops.launch.gemm(op, a, b, c, None, m, n, k)
        left = a.T if op == "tn" else a
        right = b.T if op == "nt" else b
        reference = xp.zeros_like(c)
        ours = per_product(launch.run)
        theirs = per_product(lambda: xp.matmul(left, right, out=reference))  # noqa: B023
        launch.run()
        ops.device.synchronize()
        got, want = ops.to_numpy(c), ops.to_numpy(reference)
        difference = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
        print(f"{op:<3} {m:>6} {n:>5} {k:>5} {ours:>11.1f} {theirs:>10.1f} "
              f"{ours / theirs:>11.2f} {difference:>12.1e}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("parity", "bench", "gemm"))
    parser.add_argument("mnist_dir", help="folder with the four MNIST IDX files (raw or .gz)")
    parser.add_argument("--rows", type=int, default=10000, help="parity: training rows")
    parser.add_argument("--epochs", type=int, default=None,
                        help="parity: epochs (default 3); bench: timed epochs (default 5)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU: the CPU shim as the cupy backend, torch on the CPU")
    arguments = parser.parse_args()
    if arguments.epochs is None:
        arguments.epochs = 3 if arguments.what == "parity" else 5
    if not Path(arguments.mnist_dir).is_dir():
        parser.error(f"{arguments.mnist_dir}: no such folder")
    if arguments.what == "parity":
        if arguments.dry_run:
            use_cpu_shim()
        return parity(arguments)
    if arguments.what == "gemm":
        return gemm(arguments)
    return bench(arguments)


if __name__ == "__main__":
    sys.exit(main())
