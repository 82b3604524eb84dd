"""Two processes compiling into one numba cache: the locked saves of the shared disk cache, and
the cache keys every process must agree on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

from fastnn.backends.numba.kernels import shared_cache  # noqa: E402

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


# ---- locked saves ----

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
