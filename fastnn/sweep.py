"""Grids of runs: parse ``OPTION=V1,V2`` grids, train every point locally or on Dask.

Every point gets its share of the CPUs: local worker processes split the usable CPUs among
themselves (through ``FASTNN_THREADS`` and the BLAS/Numba thread variables, set before the
worker imports NumPy), and runs on a Dask worker split that worker's share of its host.

Local runs can checkpoint every epoch into a folder of their own (``checkpoints``), and a run
that finds a checkpoint of its own config and data there continues from it
(`fastnn.runs.run_point`), so a sweep that was stopped (SIGTERM, Ctrl-C, ``kill -9``) loses at
most an epoch of each running point.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import OPTIONS, Config, sweepable
from .errors import ConfigError, MissingDependency
from .runs import run_point
from .threads import THREADS_ENV, default_threads, usable_cpus

#: the variables that cap a worker process's threads (fastnn's own, OpenBLAS, Numba, OpenMP, MKL)
THREAD_VARIABLES = (
    THREADS_ENV,
    "OPENBLAS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
#: seconds to wait for a Dask scheduler before calling its address unreachable
DASK_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its file name, its config and its grid values as text."""

    name: str
    config: Config
    values: dict[str, str]


def grid_option(key: str) -> str:
    """The option a grid key names: a field name (``batch_size``, ``batch-size``) or the
    option's flag without dashes (``alpha``, ``init-param``)."""
    word = key.strip().lstrip("-").replace("-", "_")
    aliases = {
        option.flag.lstrip("-").replace("-", "_"): name
        for name, option in OPTIONS.items()
        if option.flag and not option.switch
    }
    name = word if word in OPTIONS else aliases.get(word, word)
    if name not in sweepable():
        raise ConfigError(f"cannot sweep {key.strip()!r}; sweepable: {', '.join(sweepable())}")
    return name


def parse_grid_values(name: str, text: str) -> list[Any]:
    """The values of one grid option, each read and checked as the option's rule says."""
    rule = OPTIONS[name].rule
    values: list[Any] = []
    for part in text.split(","):
        try:
            parsed = rule.read(part)
        except ValueError as exc:
            raise ConfigError(f"grid {name}: cannot read value, {exc}") from None
        value = rule.check(f"grid {name}", parsed)
        if value in values:
            raise ConfigError(f"grid {name}: the value {rule.format(value)} is given twice")
        values.append(value)
    return values


def parse_grid(items: list[str], base: Config) -> list[Point]:
    """Every point of the product of the grids, with validated configs."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not text.strip() or not key.strip():
            raise ConfigError(f"grid must look like OPTION=V1,V2; got {item!r}")
        name = grid_option(key)
        if name in axes:
            raise ConfigError(f"grid {name!r} given twice")
        axes[name] = parse_grid_values(name, text)
    points = []
    for combination in itertools.product(*axes.values()):
        changes = dict(zip(axes, combination, strict=True))
        values = {name: OPTIONS[name].rule.format(value) for name, value in changes.items()}
        try:
            config = base.replace(**changes)
        except ConfigError as exc:
            where = " ".join(f"{name}={text}" for name, text in values.items())
            raise ConfigError(f"grid point {where}: {exc}") from None
        points.append(Point(_file_name(values), config, values))
    return points


def _file_name(values: dict[str, str]) -> str:
    text = "_".join(f"{name}={value}" for name, value in values.items()) or "run"
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", text)


def threads_per_run(requested: int | None, workers: int) -> int:
    """Threads of each run of ``workers`` local processes: ``requested``, else
    ``FASTNN_THREADS``, else the usable CPUs split among the workers."""
    if requested is not None:
        return requested
    if os.environ.get(THREADS_ENV, "").strip():
        return default_threads()
    return max(1, usable_cpus() // workers)


def worker_environment(threads: int) -> dict[str, str]:
    """The environment variables that give a worker process ``threads`` threads."""
    return {variable: str(threads) for variable in THREAD_VARIABLES}


def run_sweep(
    points: Sequence[Point | tuple[str, Config]],
    data_path: str | None,
    *,
    workers: int = 1,
    dask: str | None = None,
    client: Any = None,
    threads: int | None = None,
    checkpoints: str | Path | None = None,
    tracking: Any = None,
) -> Iterator[tuple[str, dict]]:
    """Run every point (a `Point` or a (name, Config) pair), yielding (name, record): on Dask
    (a ``client``, or the scheduler at address ``dask``) when given, in grid order; else in
    ``workers`` local processes, as each finishes (in grid order with one worker).
    ``threads``: per run (None: see `threads_per_run`; on Dask, each worker's share of its
    host's CPUs). ``checkpoints``: a folder where each local run checkpoints every epoch, into
    the subfolder of its name, and continues from an earlier checkpoint there (see
    `run_point`); Dask runs do not checkpoint.

    Closing the iterator (``close()``), or an exception raised while it waits (Ctrl-C),
    stops the local worker processes at once; their checkpoints stay. ``tracking``: a
    `fastnn.tracking.Tracking` every run logs to (each point its own run, named by it).
    """
    pairs = [(p.name, p.config) if isinstance(p, Point) else p for p in points]
    jobs = [(name, config.to_dict(), data_path) for name, config in pairs]
    if not jobs:
        return
    if client is None and dask:
        with dask_client(dask) as own_client:
            yield from _on_dask(own_client, jobs, threads, tracking)
    elif client is not None:
        yield from _on_dask(client, jobs, threads, tracking)
    else:
        folder = None if checkpoints is None else Path(checkpoints)
        local = [(*job, None if folder is None else str(folder / job[0]), tracking)
                 for job in jobs]
        if workers > 1:
            yield from _in_processes(local, workers, threads_per_run(threads, workers))
        else:
            per_run = threads_per_run(threads, 1)
            for name, config, path, checkpoint_dir, track in local:
                yield run_point(name, config, path, per_run, checkpoint_dir, track)


#: seconds between a worker's looks at whether the sweep that started it still runs
PARENT_CHECK_SECONDS = 0.5


def _start_worker(parent: int) -> None:
    """Worker-process initializer: Ctrl-C, SIGTERM and SIGHUP sent to the whole process group
    reach the parent, which stops the workers; a worker never dies half-way on its own, except
    when the sweep that started it (process ``parent``) is gone (``kill -9``): then it exits
    within `PARENT_CHECK_SECONDS`, instead of training on for nobody."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="fastnn-parent-watch").start()


def _in_processes(
    jobs: list[tuple], workers: int, threads: int
) -> Iterator[tuple[str, dict]]:
    """Run the jobs in fresh ("spawn") processes that start with the thread variables set,
    so NumPy, OpenBLAS and Numba come up with ``threads`` threads; each run reads its count
    from ``FASTNN_THREADS``. Yields each result as it finishes; any exception or ``close()``
    kills the workers (a long point is not waited for)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_start_worker,
        initargs=(os.getpid(),),
    )
    try:
        with _environment(worker_environment(threads)):  # the workers start as jobs are given
            pending = [pool.submit(run_point, *job[:3], None, *job[3:]) for job in jobs]
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in [future for future in pending if future in done]:  # in grid order
                pending.remove(future)
                yield future.result()
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def tune_in_processes(search: Any, seed: int, workers: int) -> None:
    """`fastnn.tune.optimize` in ``workers`` fresh processes sharing the search's study (each
    its own sampler seed), as sweep workers start; any exception or interrupt kills them."""
    from concurrent.futures import ProcessPoolExecutor

    from .tune import optimize

    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                               initializer=_start_worker, initargs=(os.getpid(),))
    try:
        with _environment(worker_environment(search.threads)):
            futures = [pool.submit(optimize, search, seed + k) for k in range(workers)]
        for future in futures:
            future.result()
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def tune_on_dask(client: Any, search: Any, seed: int) -> None:
    """`fastnn.tune.optimize` on every thread of a Dask cluster's workers (each its own
    sampler seed), sharing the search's study; each trial takes ``search.threads``, else its
    worker's share of the host's CPUs."""
    threads_by_worker = {} if search.threads is not None else _dask_threads(client)
    slots = sum(int(w["nthreads"]) for w in client.scheduler_info()["workers"].values())
    futures = [client.submit(_tune_on_dask_worker, search, seed + k, threads_by_worker,
                             pure=False) for k in range(max(1, slots))]
    for future in futures:
        future.result()


def _tune_on_dask_worker(search: Any, seed: int, threads_by_worker: dict[str, int]) -> None:
    import dataclasses

    from .tune import optimize

    if search.threads is None:
        from dask.distributed import get_worker

        worker = get_worker()
        threads = threads_by_worker.get(worker.address) or max(
            1, usable_cpus() // max(1, worker.state.nthreads))
        search = dataclasses.replace(search, threads=threads)
    optimize(search, seed)


def _stop_workers(pool: Any) -> None:
    """Cancel what has not started and kill the worker processes of a process pool now; then
    wait (10 s at most) for the pool's manager thread to wind up. Left running, it can close
    its wake-up pipe while the interpreter's exit hook writes to it (CPython 3.11 takes no
    lock there), which prints an OSError traceback after the one-line message."""
    manager = getattr(pool, "_executor_manager_thread", None)  # shutdown forgets it
    if hasattr(pool, "kill_workers"):  # Python 3.14+
        pool.kill_workers()
    else:
        processes = list((getattr(pool, "_processes", None) or {}).values())  # before 3.14
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
        for process in processes:
            process.join(timeout=10)
    if manager is not None and manager is not threading.current_thread():
        manager.join(timeout=10)


@contextmanager
def _environment(changes: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (the processes it starts inherit them)."""
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---- Dask ----


def _dask() -> tuple[Any, Any]:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise MissingDependency(
            'sweeping on Dask needs dask: pip install "dask[distributed]"'
        ) from None
    return Client, LocalCluster


@contextmanager
def dask_client(address: str) -> Iterator[Any]:
    """A client of the scheduler at ``address`` (``local``: a new local cluster); a
    `ConfigError` naming the address when no scheduler answers within
    `DASK_CONNECT_TIMEOUT_S`."""
    client_class, cluster_class = _dask()
    if address == "local":
        with cluster_class(processes=True) as cluster, client_class(cluster) as client:
            yield client
        return
    try:
        client = client_class(address, timeout=DASK_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(
            f"--dask {address}: no Dask scheduler answered within "
            f"{DASK_CONNECT_TIMEOUT_S:g} s ({exc.__class__.__name__})"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"--dask {address}: not a scheduler address ({exc})") from None
    with client:
        yield client


def threads_for_workers(workers: Mapping[str, tuple[str, int, int]]) -> dict[str, int]:
    """Threads per run on each Dask worker, from ``address -> (host, nthreads, host_cpus)``:
    the worker's share of its host's CPUs (hosts shared by several workers split them),
    divided among the worker's threads, each of which runs one point at a time."""
    per_host = Counter(host for host, _, _ in workers.values())
    return {
        address: max(1, (cpus // per_host[host]) // max(1, nthreads))
        for address, (host, nthreads, cpus) in workers.items()
    }


def _dask_threads(client: Any) -> dict[str, int]:
    info = client.scheduler_info()["workers"]
    cpus = client.run(usable_cpus)
    return threads_for_workers(
        {
            address: (worker["host"], int(worker["nthreads"]), int(cpus.get(address, 1)))
            for address, worker in info.items()
        }
    )


def _run_on_dask_worker(
    name: str,
    config: dict[str, Any],
    data_path: str | None,
    threads: int | None,
    threads_by_worker: dict[str, int],
    tracking: Any = None,
) -> tuple[str, dict]:
    """`run_point` on a Dask worker, with ``threads`` or this worker's share of the CPUs."""
    if threads is None:
        from dask.distributed import get_worker

        worker = get_worker()
        threads = threads_by_worker.get(worker.address) or max(
            1, usable_cpus() // max(1, worker.state.nthreads)
        )
    return run_point(name, config, data_path, threads, None, tracking)


def _on_dask(client: Any, jobs: list[tuple], threads: int | None, tracking: Any = None
             ) -> Iterator[tuple[str, dict]]:
    threads_by_worker = {} if threads is not None else _dask_threads(client)
    names, configs, paths = zip(*jobs, strict=True)
    futures = client.map(
        _run_on_dask_worker,
        names,
        configs,
        paths,
        [threads] * len(jobs),
        [threads_by_worker] * len(jobs),
        [tracking] * len(jobs),
        pure=False,
    )
    for future in futures:
        yield future.result()
