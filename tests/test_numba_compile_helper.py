"""The numba backend's first-run compile split between two processes: the compile helper, the
locked saves of the shared disk cache, and the cache keys both processes must agree on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("numba")

from fastnn.backends.numba import compile_helper  # noqa: E402
from fastnn.backends.numba.kernels import common, shared_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **changes: str) -> dict[str, str]:
    """A child's environment: an empty numba cache of its own, this checkout importable."""
    paths = [str(tmp_path), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
            "PYTHONPATH": os.pathsep.join(paths), **changes}


def _run(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                         text=True, capture_output=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


# ---- a first run with the helper ----

_FIRST_RUN = """
    import hashlib, sys
    import numpy as np
    from fastnn import Config, Trainer
    from fastnn.backends.numba import compile_helper

    started = []
    start = compile_helper.start
    def recording_start(*args, **kwargs):
        helper = start(*args, **kwargs)
        started.append(helper)
        return helper
    compile_helper.start = recording_start

    gen = np.random.default_rng(3)
    x = gen.normal(size=(90, 6))
    t = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)
    trainer = Trainer(Config(hidden=(7, 5), n_inputs=6, n_outputs=3, seed=4, backend="numba",
                             batch_size=8, epochs=2, dtype="float64"))
    history = trainer.fit(x[:60], t[:60], x[60:], t[60:])
    digest = hashlib.sha256(repr([history.train_loss, history.test_loss]).encode())
    for name in sorted(trainer.network.params):
        digest.update(np.ascontiguousarray(trainer.network.params[name]).tobytes())

    ops = trainer.network.ops
    epoch = ops.kernels.epoch
    plan = trainer.network.plan
    backward = epoch.backward_loop(ops.epoch_variant(plan, np.dtype(plan.dtype), False))
    evaluate = ops.kernels.evaluate.evaluate_block
    def counts(kernel):
        return sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values())
    helpers = [(helper is not None and helper.returncode) for helper in started]
    print(digest.hexdigest(), *counts(backward.from_kernels), *counts(evaluate), *helpers)
"""


def test_a_first_run_loads_what_its_helper_compiled_and_learns_the_same(
        tmp_path: Path) -> None:
    """With an empty cache, the helper compiles the backward step and the evaluation; the run
    loads both from the cache (hits, no misses: the helper compiled the very signatures the
    run calls), its helper exits 0, and the run learns bit for bit what a run without a helper
    learns. A run whose kernels are cached but whose records were lost stops its helper."""
    if compile_helper._cores() < 2:
        pytest.skip("the helper runs only with two cores or more")
    with_helper = _run(_FIRST_RUN, _env(tmp_path, **{compile_helper.SWITCH: "1"}))
    digest, *counts = with_helper.stdout.split()
    assert counts == ["1", "0", "1", "0", "0"]
    warm = _run(_FIRST_RUN, _env(tmp_path, **{compile_helper.SWITCH: "1"})).stdout.split()
    # warm: no helper; the backward step comes in with the cached epoch loop that carries it
    assert warm[0] == digest and warm[1:] == ["0", "0", "1", "0"]
    for record in (tmp_path / "cache").glob(common._WARM_RECORD.format("*")):
        record.unlink()  # the kernels are cached, the records lost: a helper starts ...
    lost = _run(_FIRST_RUN, _env(tmp_path, **{compile_helper.SWITCH: "1"})).stdout.split()
    assert lost[:5] == warm and lost[5] in ("0", str(-signal.SIGKILL))  # ... and is stopped
    alone = _run(_FIRST_RUN, _env(tmp_path / "alone", **{compile_helper.SWITCH: "0"}))
    assert alone.stdout.split() == [digest, "0", "1", "0", "1"]  # compiled here


# ---- the helper process as seen from the run ----

def _helper(code: str) -> compile_helper.Helper:
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    return compile_helper.Helper(process)


def test_a_helper_that_fails_is_not_waited_for() -> None:
    """A helper that dies before a stage releases every wait at once (the run compiles what
    is missing itself) and leaves no process behind."""
    helper = _helper("import sys; sys.exit(3)")
    begun = time.monotonic()
    assert helper.wait("backward") and helper.wait("evaluation")
    assert time.monotonic() - begun < compile_helper.WAIT_SECONDS / 2
    helper.close()
    assert helper.returncode == 3


def test_a_helper_still_busy_at_close_is_stopped() -> None:
    """A helper that finished one stage and then hangs is stopped by `close`."""
    helper = _helper("import sys, time; print('backward', flush=True); time.sleep(600)")
    assert helper.wait("backward")
    helper.close()
    assert helper.returncode is not None and helper.returncode < 0  # killed


def test_a_helper_heeds_the_stop_signals_its_parent_ignores(tmp_path: Path) -> None:
    """A sweep's workers ignore SIGTERM and SIGINT, and ignored signals outlive ``exec``: the
    helper restores both before it starts, so that stopping a sweep stops its helpers too."""
    code = """
        import signal
        from fastnn.backends.numba import compile_helper
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        compile_helper.heed_stop_signals()
        print(signal.getsignal(signal.SIGINT) is signal.default_int_handler,
              signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """
    assert _run(code, _env(tmp_path)).stdout.split() == ["True", "True"]


def test_the_switch_and_a_disabled_cache_keep_the_helper_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`FASTNN_NUMBA_COMPILE_HELPER=0`, no disk cache, one usable core, one thread asked for,
    or an interpreter embedded in another program (``sys.executable`` is not a Python): no
    helper."""
    monkeypatch.setattr(compile_helper, "usable_cpus", lambda: 4)
    monkeypatch.delenv("FASTNN_THREADS", raising=False)
    monkeypatch.setenv(compile_helper.SWITCH, "1")
    assert compile_helper.enabled(True) == shared_cache.LOCKS
    assert not compile_helper.enabled(False)
    monkeypatch.setenv(compile_helper.SWITCH, "0")
    assert not compile_helper.enabled(True)
    monkeypatch.setenv(compile_helper.SWITCH, "1")
    monkeypatch.setenv("FASTNN_THREADS", "1")  # a sweep's one-thread worker
    assert not compile_helper.enabled(True)
    monkeypatch.setenv("FASTNN_THREADS", "many")  # the run itself will say what is wrong
    assert compile_helper.enabled(True) == shared_cache.LOCKS
    monkeypatch.delenv("FASTNN_THREADS")
    monkeypatch.setattr(compile_helper, "usable_cpus", lambda: 1)  # taskset, a cgroup quota
    assert not compile_helper.enabled(True)
    monkeypatch.setattr(compile_helper, "usable_cpus", lambda: 4)
    monkeypatch.setattr(sys, "executable", "/opt/app/bin/embedding-app")
    assert not compile_helper.enabled(True)


def test_a_helper_starts_with_this_processs_cache_and_not_the_current_folder(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A cache folder set in code (`numba.config.CACHE_DIR`) reaches the helper as
    ``NUMBA_CACHE_DIR``, with the package's folder on its path and, from Python 3.11, ``-P``
    (a stray ``fastnn`` in the current folder is not imported). One helper per kernel."""
    import numba

    launched: list[tuple[list[str], dict[str, str]]] = []
    popen = subprocess.Popen

    def recording_popen(command: list[str], **options: Any) -> Any:
        launched.append((command, options["env"]))
        return popen([sys.executable, "-c", "import sys; sys.stdin.buffer.read()"], **options)

    monkeypatch.setattr(compile_helper.subprocess, "Popen", recording_popen)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "chosen"))
    backward = SimpleNamespace(from_kernels=object())
    helper = compile_helper.start("plan", False, None, backward)
    assert helper is not None
    assert compile_helper.start("plan", False, None, backward) is None  # one at a time
    helper.close()
    (command, env), = launched
    assert env["NUMBA_CACHE_DIR"] == str(tmp_path / "chosen")
    assert env[compile_helper.SWITCH] == "0" and str(ROOT) in env["PYTHONPATH"].split(os.pathsep)
    assert command[-2:] == ["-m", compile_helper.__name__]
    assert ("-P" in command) == (sys.version_info >= (3, 11))
    again = compile_helper.start("plan", False, None, backward)  # the first one closed
    assert again is not None
    again.close()


# ---- locked saves ----

def test_a_save_goes_on_unlocked_where_the_lock_cannot_be_had(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A lock file that cannot be opened (another user's, a read-only folder) or a file system
    without ``flock`` (some network mounts) leaves the save to numba, unlocked, not failed."""
    if not shared_cache.LOCKS:
        pytest.skip("saves are numba's own without fcntl")
    ran = []
    with shared_cache._locked(str(tmp_path / "missing" / "index.nbi.lock")):
        ran.append("no folder")

    def no_flock(descriptor: int, operation: int) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(shared_cache.fcntl, "flock", no_flock)
    with shared_cache._locked(str(tmp_path / "index.nbi.lock")):
        ran.append("no flock")
    assert ran == ["no folder", "no flock"]


_SAVING = """
    import sys, time
    import numba
    from numba.core.caching import IndexDataCacheFile
    from fastnn.backends.numba.kernels.shared_cache import KernelCache

    save_index = IndexDataCacheFile._save_index
    def slow_save_index(self, overloads):  # widens the gap between reading and writing
        time.sleep(0.3)
        save_index(self, overloads)
    IndexDataCacheFile._save_index = slow_save_index

    import toy_sums
    toy_sums.kernel._cache = KernelCache(toy_sums.kernel.py_func)
    names = sys.argv[1].split(",")
    for name in names:
        kind = getattr(numba.types, name)
        toy_sums.kernel.compile((kind, kind))
    print(sum(toy_sums.kernel.stats.cache_hits.values()))
"""

_CHECKING = """
    import numba
    import numpy as np
    import toy_sums
    from fastnn.backends.numba.kernels.shared_cache import KernelCache

    toy_sums.kernel._cache = KernelCache(toy_sums.kernel.py_func)
    for name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "float32", "float64"):
        value = np.dtype(name).type(3)
        result = toy_sums.kernel(value, value)
        assert result == 3 * 3 + 3, (name, result)
    print(sum(toy_sums.kernel.stats.cache_hits.values()),
          sum(toy_sums.kernel.stats.cache_misses.values()))
"""


def test_two_processes_saving_one_kernel_at_once_keep_every_entry(tmp_path: Path) -> None:
    """Two processes compile different signatures of one kernel into one cache at the same
    time, each save slowed between reading the index and writing it: with the index locked
    around each save, a third process finds all eight entries, each the right code."""
    if not shared_cache.LOCKS:
        pytest.skip("saves are numba's own without fcntl")
    (tmp_path / "toy_sums.py").write_text(
        "import numba\n\n\n@numba.njit\ndef kernel(a, b):\n    return a * b + a\n")
    env = _env(tmp_path)
    code = textwrap.dedent(_SAVING)
    runs = [subprocess.Popen([sys.executable, "-c", code, names], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for names in ("int8,int16,int32,int64", "uint8,uint16,float32,float64")]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert _run(_CHECKING, env).stdout.split() == ["8", "0"]


# ---- cache keys every process agrees on ----

_KEYS = """
    from fastnn.backends.numba.kernels import call_by_symbol, epoch
    for variant in [epoch.EpochVariant(*choices) for choices in ((1, 0, 1, 0), (0, 1, 0, 0))]:
        loop = epoch.epoch_loop(variant)
        backward = epoch.backward_loop(variant)
        print(call_by_symbol.closure_digest(loop.py_func),
              call_by_symbol.closure_digest(backward.py_func))
"""


def test_the_epoch_loops_cache_keys_are_the_same_in_every_process(tmp_path: Path) -> None:
    """The digests that key a per-variant loop's cache entries (its closure holds kernels,
    which numba would pickle with ids of its process) are the same in two processes and
    differ between variants: a process never loads the code of another variant."""
    first, second = (_run(_KEYS, _env(tmp_path)).stdout.split() for _ in range(2))
    assert first == second and len(set(first)) == 4


def test_the_backward_steps_are_named_by_variant() -> None:
    """Each variant's backward step has a name of its own: the symbol a cached loop calls
    must mean the same code in every process."""
    from fastnn.backends.numba.kernels import epoch

    names = {epoch.backward_loop(epoch.EpochVariant(*choices)).py_func.__qualname__
             for choices in np.ndindex(2, 2, 2, 2)}
    assert len(names) == 16
