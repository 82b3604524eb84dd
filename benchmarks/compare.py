"""Side-by-side time of one article epoch: NumPy vs Numba backends vs PyTorch and JAX CPU peers.

One "article epoch" = SGD over 60 000 training rows at batch size 100 with hidden (100, 50),
then evaluating the whole training set and the 10 000-row test set (what `Trainer` times).
Every configuration runs in its own fresh process (no thread pool left spinning by another
library), compiles first (not timed), then times ``--epochs-repeat`` epochs; the table shows
medians.

    python benchmarks/compare.py [--epochs-repeat N] [--data synthetic,mnist] [--rounds R]
        [--loop trainer|ops] [--hidden 100,50;1024,512] [--batch-sizes 100,1000]
        [--jax-python PATH]

``--hidden`` and ``--batch-sizes`` make a scaling table (the article's network is 100,50 at
batch 100; the article/numba column is shown for it alone).

``--loop trainer`` (default) times `Trainer.fit`'s epochs, what a user gets (the numba backend
shares each training step between two threads, then evaluation's blocks); ``--loop ops`` times
the backend's ops in turn (one epoch's training, then its evaluations). ``--impls`` also takes
``numba-overlap``: numba with FASTNN_NUMBA_PARALLEL=overlap (each epoch trains on one thread
while the previous one is evaluated on the other), shown in extra columns.

``--data`` takes one kind or a comma-separated list (one table each). MNIST's inputs are ~81%
exact zeros after min-max scaling, so the numba backend takes its sparse (CSR) first layer
there; the table header says which first-layer path numba used (FASTNN_NUMBA_SPARSE=0/1/auto
in the environment forces it). PyTorch and JAX are optional: when one cannot be imported its
column says so. The JAX peer (`jax_peer.py`) jits the whole epoch as one ``lax.scan`` over the
batches plus the evaluations, the strongest CPU peer measured; JAX is best kept in its own
environment: ``--jax-python /path/to/venv/bin/python`` runs its worker with that interpreter
(it needs numpy and jax; fastnn comes from this checkout for ``--data mnist``).
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from the workers' environment unless
``--keep-openblas-env``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch_peer import build_model, epoch_order, epoch_runner

ARTICLE_SECONDS_PER_EPOCH = {"off": 229.0 / 50, "bn": 299.0 / 50}  # 3:49 and 4:59 for 50 epochs
IMPLEMENTATIONS = ("numpy", "numba", "torch", "jax")
#: also accepted by --impls: the numba backend with FASTNN_NUMBA_PARALLEL=overlap (training on
#: one thread while the previous epoch is evaluated on the other), for a before/after column
OVERLAP = "numba-overlap"
#: one measured configuration: (hidden sizes as "100,50", batch size, dtype, batch norm)
Setup = tuple[str, int, str, str]
N_TRAIN, N_TEST, N_INPUTS, N_CLASSES = 60_000, 10_000, 784, 10


# ---- data ----

def load_data(kind: str, dtype: str) -> tuple[np.ndarray, ...]:
    """(x_train, t_train, labels_train, x_test, t_test, labels_test), inputs min-max scaled."""
    if kind == "mnist":
        import fastnn

        x_train, labels_train, x_test, labels_test = fastnn.load_mnist()
        x_train = np.asarray(x_train, np.float64).reshape(len(x_train), -1)
        x_test = np.asarray(x_test, np.float64).reshape(len(x_test), -1)
        low, high = x_train.min(), x_train.max()
        x_train, x_test = (x_train - low) / (high - low), (x_test - low) / (high - low)
        labels_train, labels_test = np.asarray(labels_train), np.asarray(labels_test)
        if labels_train.ndim == 2:
            labels_train, labels_test = labels_train.argmax(1), labels_test.argmax(1)
    else:  # random data of MNIST's shape: the same arithmetic, no download
        gen = np.random.default_rng(0)
        x_train = gen.random((N_TRAIN, N_INPUTS))
        x_test = gen.random((N_TEST, N_INPUTS))
        labels_train = gen.integers(0, N_CLASSES, N_TRAIN)
        labels_test = gen.integers(0, N_CLASSES, N_TEST)
    eye = np.eye(N_CLASSES, dtype=dtype)
    return (np.ascontiguousarray(x_train, dtype), eye[labels_train], labels_train,
            np.ascontiguousarray(x_test, dtype), eye[labels_test], labels_test)


# ---- workers (one configuration per process) ----

def time_fastnn(
    backend: str, dtype: str, batch_norm: str, data: str, repeats: int, loop: str = "trainer",
    hidden: tuple[int, ...] = (100, 50), batch_size: int = 100,
) -> tuple[list[float], str]:
    """(seconds of each timed epoch: training + evaluate(train) + evaluate(test), the
    first-layer path the backend took: "sparse", "dense" or "" when it does not say).

    ``loop`` "trainer": `Trainer.fit`'s own epochs (what a user gets: numba evaluates an epoch
    beside the next one's training); "ops": one epoch's training, then its two evaluations,
    in turn on this thread (the backend's ops alone).
    """
    from fastnn import Config, Network, Trainer

    x, t, labels, x_test, t_test, labels_test = load_data(data, dtype)
    config = Config(backend=backend, dtype=dtype, batch_norm=batch_norm, hidden=hidden,
                    batch_size=batch_size)
    if loop == "trainer":  # inputs are scaled already: "none" keeps them as they are
        trainer = Trainer(config.replace(epochs=repeats, normalize="none"))
        history = trainer.fit(x, labels, x_test, labels_test)
        used = sorted({name.split("_")[-1] for name, count in trainer.counters.items()
                       if count and name.split("_")[-1] in ("sparse", "dense")})
        return history.epoch_seconds[1:], "+".join(used)
    net = Network(config)
    ops = net.ops
    workspace = ops.workspace()  # one run's: the CSR form of sparse inputs, counters, threads
    for inputs in (x, x_test):
        ops.prepare_inputs(inputs, workspace)
    seconds = []
    with ops.activate(workspace):
        ops.warm_up(net.plan)  # compilation, not timed (its probe has its own workspace)
        for epoch in range(1, repeats + 1):
            order = epoch_order(epoch, len(x))
            start = time.perf_counter()
            net.train_epoch(x, t, order, epoch, workspace)
            net.scores(x, t, labels, workspace)
            net.scores(x_test, t_test, labels_test, workspace)
            seconds.append(time.perf_counter() - start)
    used = sorted({name.split("_")[-1] for name, count in workspace.counters.items()
                   if count and name.split("_")[-1] in ("sparse", "dense")})
    return seconds, "+".join(used)


def time_torch(dtype: str, batch_norm: str, data: str, repeats: int,
               hidden: tuple[int, ...] = (100, 50), batch_size: int = 100) -> list[float]:
    """The same network, batch size, plain SGD and evaluation work in PyTorch on the CPU."""
    import torch

    torch.manual_seed(0)
    x, _, labels, x_test, _, labels_test = load_data(data, dtype)
    x, x_test = torch.from_numpy(x), torch.from_numpy(x_test)
    labels, labels_test = torch.from_numpy(labels), torch.from_numpy(labels_test)
    model = build_model(N_INPUTS, hidden, N_CLASSES, batch_norm).to(getattr(torch, dtype))
    run_epoch = epoch_runner(model, x, labels, x_test, labels_test, batch_size)
    run_epoch(torch.from_numpy(epoch_order(0, len(x))))  # warm-up (allocator, threads), untimed
    seconds = []
    for number in range(1, repeats + 1):
        order = torch.from_numpy(epoch_order(number, len(x)))
        start = time.perf_counter()
        run_epoch(order)
        seconds.append(time.perf_counter() - start)
    return seconds


def time_jax(dtype: str, batch_norm: str, data: str, repeats: int,
             hidden: tuple[int, ...] = (100, 50), batch_size: int = 100) -> list[float]:
    """The same network, batch size, plain SGD and evaluation work in JAX, the epoch jitted."""
    from jax_peer import time_jax as run

    x, _, labels, x_test, _, labels_test = load_data(data, dtype)
    orders = [epoch_order(number, len(x)) for number in range(repeats + 1)]
    return run(x, labels, x_test, labels_test, hidden, N_CLASSES, batch_norm, batch_size,
               repeats, orders)


def blas_description() -> str:
    """Which BLAS NumPy uses, its core type and threads (threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_info

        return "; ".join(
            f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} "
            f"threads={i.get('num_threads')} ({Path(i.get('filepath', '')).name})"
            for i in threadpool_info() if i.get("user_api") == "blas"
        )
    except ImportError:
        pass
    import ctypes

    root = Path(np.__file__).resolve().parent
    for path in [*root.parent.glob("numpy.libs/*openblas*"), *root.glob(".dylibs/*openblas*")]:
        try:
            library = ctypes.CDLL(str(path))
            core = library.scipy_openblas_get_corename64_
            core.restype = ctypes.c_char_p
            threads = library.scipy_openblas_get_num_threads64_()
            return f"NumPy's OpenBLAS core={core().decode()} threads={threads} ({path.name})"
        except (OSError, AttributeError):
            continue
    return "unknown"


def worker(arguments: argparse.Namespace) -> None:
    implementation, dtype, batch_norm, hidden_text, batch_text = arguments.worker
    hidden, batch_size = parse_hidden(hidden_text), int(batch_text)
    path = ""
    if implementation == "jax":
        seconds = time_jax(dtype, batch_norm, arguments.data, arguments.epochs_repeat, hidden,
                           batch_size)
    elif implementation == "torch":
        seconds = time_torch(dtype, batch_norm, arguments.data, arguments.epochs_repeat, hidden,
                             batch_size)
    else:
        backend = "numba" if implementation == OVERLAP else implementation
        seconds, path = time_fastnn(backend, dtype, batch_norm, arguments.data,
                                    arguments.epochs_repeat, arguments.loop, hidden, batch_size)
    print(json.dumps({"seconds": seconds, "blas": blas_description(), "first_layer": path}))


# ---- the driver ----

def parse_hidden(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def run_worker(implementation: str, config: Setup, data: str,
               arguments: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    if not arguments.keep_openblas_env:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    if implementation == OVERLAP:
        env["FASTNN_NUMBA_PARALLEL"] = "overlap"
    hidden, batch, dtype, batch_norm = config
    python = sys.executable
    if implementation == "jax":
        python = arguments.jax_python or python
        root = str(Path(__file__).resolve().parents[1])  # fastnn's loader, for --data mnist
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [python, __file__, "--worker", implementation, dtype, batch_norm, hidden,
               str(batch), "--epochs-repeat", str(arguments.epochs_repeat), "--data", data,
               "--loop", arguments.loop]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": last}
    return json.loads(done.stdout.strip().splitlines()[-1])


def importable(module: str, python: str | None = None) -> str | None:
    """None when ``module`` imports in a fresh process of ``python``, else why not."""
    try:
        done = subprocess.run([python or sys.executable, "-c", f"import {module}"],
                              capture_output=True, text=True)
    except OSError as error:
        return str(error)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or ["import failed"])[-1]


def format_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator / denominator:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs-repeat", type=int, default=5, help="timed epochs per config")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole sweep, interleaving configs (medians over all)")
    parser.add_argument("--data", default="synthetic",
                        help="synthetic and/or mnist, comma-separated (a table each)")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--batch-norm", default="off,bn", help="off and/or bn (the BN variant)")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--keep-openblas-env", action="store_true")
    parser.add_argument("--loop", choices=("trainer", "ops"), default="trainer",
                        help="trainer: Trainer.fit's epochs (default); ops: train, then "
                             "evaluate, in turn")
    parser.add_argument("--hidden", default="100,50",
                        help="hidden sizes; several networks separated by ';' (100,50;1024,512)")
    parser.add_argument("--batch-sizes", default="100", help="comma-separated (100,1000)")
    parser.add_argument("--jax-python", help="the interpreter of an environment with jax "
                        "(default: this one)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        worker(arguments)
        return

    kinds = [kind for kind in arguments.data.split(",") if kind]
    unknown = sorted(set(kinds) - {"synthetic", "mnist"})
    if unknown or not kinds:
        parser.error(f"--data: synthetic and/or mnist, not {','.join(unknown) or 'nothing'}")
    implementations = [i for i in arguments.impls.split(",") if i]
    missing = {peer: importable(peer, arguments.jax_python if peer == "jax" else None)
               for peer in ("torch", "jax") if peer in implementations}
    missing = {peer: why for peer, why in missing.items() if why}
    for peer in missing:
        implementations.remove(peer)
    configs = [(hidden, int(batch), dtype, bn)
               for hidden in arguments.hidden.split(";") if hidden
               for batch in arguments.batch_sizes.split(",") if batch
               for dtype in arguments.dtypes.split(",")
               for bn in arguments.batch_norm.split(",")]
    seconds: dict[tuple[Any, ...], list[float]] = {}
    errors: dict[tuple[Any, ...], str] = {}
    paths: dict[str, set[str]] = {kind: set() for kind in kinds}
    blas = ""
    for _ in range(arguments.rounds):
        for kind in kinds:
            for config in configs:
                for implementation in implementations:
                    key = (kind, implementation, *config)
                    result = run_worker(implementation, config, kind, arguments)
                    if "error" in result:
                        errors[key] = result["error"]
                        continue
                    seconds.setdefault(key, []).extend(result["seconds"])
                    if implementation == "numba":
                        blas = result["blas"]
                        paths[kind].add(result.get("first_layer") or "unknown")
    for kind in kinds:
        print_table(kind, configs, seconds, paths[kind], blas, arguments)
    for peer, why in missing.items():
        print(f"{peer}: skipped, not importable ({why})")
    for (kind, implementation, *config), message in errors.items():
        print(f"{kind} {implementation} {' '.join(map(str, config))}: failed: {message}")


def print_table(kind: str, configs: list[Setup], seconds: dict[tuple[Any, ...], list[float]],
                paths: set[str], blas: str, arguments: argparse.Namespace) -> None:
    """The medians of one data kind, numba/torch, numba/jax, numba/numpy and article/numba
    ratios."""
    def median(implementation: str, config: Setup) -> float | None:
        values = seconds.get((kind, implementation, *config))
        return statistics.median(values) if values else None

    print(f"one epoch (train 60k, then evaluate 60k + 10k); data {kind}; median of "
          f"{arguments.epochs_repeat * arguments.rounds} epochs; fastnn loop: {arguments.loop}")
    print(f"BLAS: {blas or 'unknown'}; cpus: {os.cpu_count()}; numba: "
          f"FASTNN_NUMBA_PARALLEL={os.environ.get('FASTNN_NUMBA_PARALLEL', 'split')}; first layer: "
          f"{'/'.join(sorted(paths)) or '-'} (FASTNN_NUMBA_SPARSE="
          f"{os.environ.get('FASTNN_NUMBA_SPARSE', 'auto')})")
    overlap = any(key[:2] == (kind, OVERLAP) for key in seconds)
    header = (f"{'hidden':<9} {'batch':>5} {'dtype':<8} {'BN':<4} {'numpy s':>8} {'numba s':>8} "
              f"{'torch s':>8} {'jax s':>8} {'numba/torch':>11} {'numba/jax':>9} "
              f"{'numba/numpy':>11} {'article/numba':>13}")
    if overlap:
        header += f" {'overlap s':>9} {'overlap/torch':>13}"
    print(header)
    print("-" * len(header))
    for config in configs:
        hidden, batch, dtype, bn = config
        numpy_s, numba_s, torch_s, jax_s = (median(i, config) for i in IMPLEMENTATIONS)
        article = ARTICLE_SECONDS_PER_EPOCH["bn" if bn != "off" else "off"]
        is_article = hidden == "100,50" and batch == 100
        print(f"{hidden:<9} {batch:>5} {dtype:<8} {bn:<4} {format_seconds(numpy_s):>8} "
              f"{format_seconds(numba_s):>8} {format_seconds(torch_s):>8} "
              f"{format_seconds(jax_s):>8} {format_ratio(numba_s, torch_s):>11} "
              f"{format_ratio(numba_s, jax_s):>9} {format_ratio(numba_s, numpy_s):>11} "
              f"{format_ratio(article, numba_s) if is_article else '-':>13}"
              + (f" {format_seconds(median(OVERLAP, config)):>9} "
                 f"{format_ratio(median(OVERLAP, config), torch_s):>13}" if overlap else ""))
    print(f"article: {ARTICLE_SECONDS_PER_EPOCH['off']:.2f} s/epoch without BN (229 s / 50), "
          f"{ARTICLE_SECONDS_PER_EPOCH['bn']:.2f} s/epoch with BN (299 s / 50), 2018 desktop "
          "(hidden 100,50, batch 100)")
    print()


if __name__ == "__main__":
    main()
