"""A second process that compiles part of a plan's kernels while this one compiles the rest.

numba compiles on one core: a first run of a plan compiled its ~70 kernels one after another.
On a machine with two cores or more, `NumbaOps.warm_up` of a plan this machine has not
compiled yet starts ``python -m fastnn.backends.numba.compile_helper`` with the plan. The
helper builds the same throw-away probe as the warm-up, compiles the epoch loop's
`backward_step` (the backward pass and updates, with every kernel it calls) and then the
evaluation kernels, into the same disk cache (`kernels.shared_cache` locks its index files),
and prints each stage's name once it is saved. Meanwhile this process compiles the epoch
loop's forward pass; when it reaches `backward_step` it waits for the helper's first stage and
loads it from the cache, and it waits for the second before the probe's evaluation.

The helper never changes the result: if it cannot start, fails, ends early or takes longer
than `WAIT_SECONDS` for a stage, this process compiles what is missing itself, and the code is
the same. ``FASTNN_NUMBA_COMPILE_HELPER=0`` turns it off; it never runs without a writable
disk cache, on one core, without `fcntl` (Windows), or where ``sys.executable`` is not a
Python interpreter (an application that embeds one).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numba

from ...errors import ConfigError
from ...threads import default_threads, usable_cpus

#: what the helper compiles, in order (each name is printed once it is in the cache)
STAGES = ("backward", "evaluation")
#: the longest wait for one stage before compiling it here
WAIT_SECONDS = 180.0
#: how long a helper that finished its stages is given to exit before it is killed
EXIT_SECONDS = 5.0
#: the environment switch ("0": no helper)
SWITCH = "FASTNN_NUMBA_COMPILE_HELPER"

#: kernels whose compile waits for a helper's stage: id -> (kernel, helper, stage)
_AWAITED: dict[int, tuple[Any, Helper, str]] = {}
_LOCK = threading.Lock()


class Helper:
    """A running compile helper: its process and the stages it has finished."""

    def __init__(self, process: subprocess.Popen[bytes], loop: Any = None) -> None:
        self._process = process
        self._loop, self._loop_loaded = loop, _loaded(loop)
        self._done = {stage: threading.Event() for stage in STAGES}
        self._reader = threading.Thread(target=self._read, name="fastnn-compile-helper",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Mark each stage the helper prints; at its end, all (nobody waits on a dead one)."""
        try:
            assert self._process.stdout is not None
            for line in self._process.stdout:
                event = self._done.get(line.decode(errors="replace").strip())
                if event is not None:
                    event.set()
        except (OSError, ValueError):
            pass
        finally:
            for event in self._done.values():
                event.set()

    def wait(self, stage: str) -> bool:
        """Wait until the helper has saved ``stage`` (or ended); False after `WAIT_SECONDS`."""
        return self._done[stage].wait(WAIT_SECONDS)

    def before_evaluation(self) -> None:
        """Between the run's training probe and its evaluation: wait for the evaluation stage,
        unless the probe loaded the epoch loop from the cache since this helper started. Then
        this machine had compiled the plan (its records were lost), the evaluation will load
        at once too, and the helper is stopped instead."""
        if _loaded(self._loop) > self._loop_loaded:
            self.close()
        else:
            self.wait(STAGES[1])

    @property
    def returncode(self) -> int | None:
        """The helper's exit status (None while it runs)."""
        return self._process.poll()

    def close(self) -> None:
        """End the helper and forget its kernels: one that finished every stage is given
        `EXIT_SECONDS` to exit, one that did not (too slow to wait for) is killed."""
        with _LOCK:
            for key in [key for key, (_, helper, _) in _AWAITED.items() if helper is self]:
                del _AWAITED[key]
        finished = all(event.is_set() for event in self._done.values())
        try:
            self._process.wait(timeout=EXIT_SECONDS if finished else 0)
        except subprocess.TimeoutExpired:
            # killed, not asked: it may have inherited ignored SIGTERM (a sweep's worker);
            # its saves are whole files, and its locks go with it
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()


def _loaded(kernel: Any) -> int:
    """How many times ``kernel`` (a dispatcher, or None) was loaded from the cache."""
    return 0 if kernel is None else sum(kernel.stats.cache_hits.values())


def _cores() -> int:
    """The cores this process may use (its affinity set and cgroup quota), or fewer where
    ``FASTNN_THREADS`` asks for fewer threads (a sweep's workers share the machine)."""
    try:
        return min(usable_cpus(), default_threads())
    except ConfigError:  # a bad FASTNN_THREADS: the run itself says so
        return usable_cpus()


def enabled(cache_enabled: bool) -> bool:
    """Whether a helper may run here: asked for, a writable cache, two cores (`_cores`),
    locked saves, and a Python interpreter to start (not an application that embeds one)."""
    from .kernels import shared_cache

    return (os.environ.get(SWITCH, "1") != "0" and cache_enabled and shared_cache.LOCKS
            and _cores() >= 2
            and Path(sys.executable or "-").name.lower().startswith("python"))


def start(plan: Any, weighted: bool, loop: Any, backward: Any) -> Helper | None:
    """Start a helper for ``plan`` (its rows weighted or not, trained by the epoch loop
    ``loop``) whose first stage compiles ``backward`` (the loop's `backward_step`): until
    then, compiling it here waits. None when no helper could start, or one is compiling it
    already (another thread's run)."""
    sibling = backward.from_kernels
    root = str(Path(__file__).resolve().parents[3])  # the folder that holds the package
    paths = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, SWITCH: "0", "PYTHONPATH": os.pathsep.join(paths)}
    if numba.config.CACHE_DIR:  # set here in code (or the fallback folder): the same cache
        env["NUMBA_CACHE_DIR"] = str(numba.config.CACHE_DIR)
    # -P (3.11+): not the current folder first on its path, where a stray fastnn could be
    command = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", __name__]
    with _LOCK:  # held while it starts: one helper per kernel
        if id(sibling) in _AWAITED:
            return None
        try:
            request = pickle.dumps((plan, weighted))
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        except (OSError, ValueError, pickle.PicklingError):
            return None
        try:
            assert process.stdin is not None
            process.stdin.write(request)
            process.stdin.close()
        except OSError:  # it died at once
            process.kill()
            process.wait()
            return None
        helper = Helper(process, loop)
        _AWAITED[id(sibling)] = (sibling, helper, STAGES[0])
    return helper


def wait_for(kernel: Any) -> None:
    """Before ``kernel`` compiles here: wait for the helper stage that compiles it, if any."""
    with _LOCK:
        entry = _AWAITED.get(id(kernel))
    if entry is not None and entry[0] is kernel:
        entry[1].wait(entry[2])


def _say(stage: str) -> None:
    sys.stdout.write(stage + "\n")
    sys.stdout.flush()


def _compile_backward(ops: Any, training: tuple[Any, ...], extras: dict[str, Any]) -> None:
    """Compile the `backward_step` the probe's epoch loop calls, for the types it calls with."""
    from . import training as training_module

    call = training_module.epoch_call(ops.kernels, ops._blas, *training, **extras)
    if call is None:
        return
    _, arguments, _ = call
    epoch = ops.kernels.epoch
    backward = epoch.backward_loop(epoch.epoch_variant(arguments[4]))
    backward.from_kernels.compile(
        epoch.backward_signature(ops.kernels.sync.new_barrier(), arguments))


def heed_stop_signals() -> None:
    """Restore SIGINT (KeyboardInterrupt) and SIGTERM (exit), which a helper inherits ignored
    from a sweep's worker: stopping a sweep stops its helpers too."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main() -> int:
    """The helper: read the pickled (plan, weighted) from stdin, compile each stage."""
    import numpy as np

    from .. import get_backend

    heed_stop_signals()
    plan, weighted = pickle.loads(sys.stdin.buffer.read())
    ops = get_backend("numba")
    training, extras, evaluation = ops.probe_arguments(plan, np.dtype(plan.dtype),
                                                       weighted=weighted)
    with np.errstate(all="ignore"):
        _compile_backward(ops, training, extras)
        _say(STAGES[0])
        ops.loss_and_classes(*evaluation)
        _say(STAGES[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
