"""Where the kernel path runs: the `KernelDevice` (array module, module loader, read-back), the
CPU shim's device (`shim_device`), and `KernelBase`, what every part of `KernelOps` stands on:
kernels loaded on first use, launches built by name, the run's buffers, what the kernels take.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...cuda import module_args
from ..base import Ops
from ..codes import ACTIVATION_CODES, BATCH_NORM_CODES, OUTPUT_CODES
from ..workspace import Workspace
from .launches import KERNEL_FILES, SUFFIX, Launch, Launches

if TYPE_CHECKING:
    from ...plan import Plan

Array = Any

#: the dtypes the kernels are compiled for
FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class KernelDevice:
    """Where `KernelOps` runs: array module, module loader and the way back to the host.

    ``load_module(code, options, name_expressions)`` returns an object with
    ``get_function(name)``, whose functions launch as ``function(grid, block, args)``
    (``cupy.RawModule`` or `fastnn.cuda.shim.Module`); ``to_host`` copies a device array into a
    NumPy array (waiting for the device); ``synchronize`` waits for every launch so far.
    ``capture(record)`` calls ``record`` (which launches kernels) while the device captures,
    and returns a graph whose ``launch()`` replays those launches on the current stream
    (``cupy.cuda.Graph``, `fastnn.cuda.shim.Graph`); None: the device cannot, and the epoch
    launches each kernel itself.
    """

    name: str
    xp: Any
    load_module: Callable[[str, tuple[str, ...], tuple[str, ...]], Any]
    to_host: Callable[[Any], np.ndarray]
    synchronize: Callable[[], None]
    capture: Callable[[Callable[[], None]], Any] | None = None


def shim_device(thread_order: str = "forward", guard_bytes: int = 256) -> KernelDevice:
    """NumPy arrays and the CPU shim's modules (launches run synchronously on the CPU; a
    capture records them, its graph replays them)."""
    from ...cuda import shim

    def load(code: str, options: tuple[str, ...], names: tuple[str, ...]) -> Any:
        return shim.Module(code, options, names, thread_order=thread_order,
                           guard_bytes=guard_bytes)

    def capture(record: Callable[[], None]) -> Any:
        shim.begin_capture()
        try:
            record()
        finally:
            graph = shim.end_capture()
        return graph

    return KernelDevice(f"shim-{thread_order}", np, load, np.asarray, lambda: None, capture)


def _address(array: Any) -> int:
    """Where an array's first element lies (a CuPy array's device pointer, a NumPy array's
    host address)."""
    pointer = getattr(getattr(array, "data", None), "ptr", None)
    return int(pointer) if pointer is not None else int(array.__array_interface__["data"][0])


def _same_argument(a: Any, b: Any) -> bool:
    """The same object, or a view of the same memory (same type, dtype, shape, strides and
    address: the kept launch holds its view, so that memory is alive and nobody else's), or
    an equal scalar of the same type, or an equal tuple."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, np.generic | tuple):
        return bool(a == b)
    if hasattr(a, "strides") and hasattr(a, "dtype"):
        return (a.dtype == b.dtype and a.shape == b.shape and a.strides == b.strides
                and _address(a) == _address(b))
    return False


@dataclass
class Program:
    """Launches to run as one: a training step, an evaluation. ``graph``: their captured
    graph (None: not captured); ``made``: whether they were captured, then every launch's
    function, grid, block and arguments (what `KernelBase.program` compares)."""

    made: tuple[Any, ...]
    launches: list[Launch]
    graph: Any
    counted: bool = False  # in the workspace's "graphs" counter

    def launch(self) -> None:
        """Run them: the graph, or the launches one by one."""
        if self.graph is not None:
            self.graph.launch()
            return
        for each in self.launches:
            each.run()


class KernelBase(Ops):
    """The reference ops on a `KernelDevice`, with its kernels at hand: ``launch(stem, dtype,
    grid, block, **arguments)`` builds a launch (`launches.Launches`)."""

    def __init__(self, device: KernelDevice) -> None:
        self.device = device
        self.xp = device.xp
        self._lock = threading.Lock()
        self._modules: dict[str, Any] = {}
        self._functions: dict[tuple[str, np.dtype], Any] = {}
        self._warmed: set[tuple[Any, ...]] = set()
        self.launch = Launches(self.kernel)

    def workspace(self, threads: int | None = None) -> Workspace:
        """A new workspace for one run; its option ``graphs`` (default: True unless
        FASTNN_CUDA_GRAPHS is 0) captures each training step once as a graph of the device
        and replays it, where the device can capture (`KernelDevice.capture`)."""
        workspace = super().workspace(threads)
        workspace.options["graphs"] = os.environ.get("FASTNN_CUDA_GRAPHS", "1") != "0"
        return workspace

    def evaluation_bytes(self, plan: Plan, rows: int) -> int:
        """An evaluation's arrays live on the device: none on the host."""
        return 0

    # ---- kernels ----
    def kernel(self, stem: str, dtype: Any) -> Any:
        """The ``<stem>_f32``/``_f64`` function of its module (loaded and compiled on first
        use)."""
        dtype = np.dtype(dtype)
        found = self._functions.get((stem, dtype))
        if found is None:
            with self._lock:
                file = KERNEL_FILES[stem]
                module = self._modules.get(file)
                if module is None:
                    code, options, names = module_args(file)
                    module = self._modules[file] = self.device.load_module(code, options, names)
                found = module.get_function(f"{stem}_{SUFFIX[dtype.name]}")
                self._functions[(stem, dtype)] = found
        return found

    def warm_up(self, plan: Plan, *, weighted: bool = False) -> None:
        """Load (compile) every kernel the plan uses and run each once: a 3-row epoch and an
        evaluation on throw-away arrays."""
        dtype = np.dtype(plan.dtype)
        key = (dtype.name, plan.n_layers, plan.batch_norm, plan.dropout_mode, plan.output,
               plan.tracks_running, plan.plain_sgd, weighted)
        if dtype not in FLOATS or key in self._warmed:
            return
        self.run_probe(plan, dtype, weighted=weighted)
        self.device.synchronize()
        with self._lock:
            self._warmed.add(key)

    def program(self, workspace: Workspace, name: Hashable, launches: list[Launch],
                capture: Callable[[Callable[[], None]], Any] | None) -> Program:
        """``launches`` to run as one, captured as one graph when ``capture`` is given; kept in
        the workspace under ``name`` and reused while the same launches come back (the same
        kernels, grids and blocks, every array the same or a view of the same memory, every
        scalar equal), captured again otherwise (a graph holds its arrays' addresses, never
        stale ones)."""
        made = (capture is not None,
                *(item for each in launches
                  for item in (each.function, each.grid, each.block, *each.args)))

        def same(program: Program) -> bool:
            return (len(program.made) == len(made)
                    and all(map(_same_argument, program.made, made)))

        def make() -> Program:
            graph = None if capture is None else capture(
                lambda: [each.run() for each in launches])
            return Program(made, launches, graph)

        program = workspace.buffer(("cuda-kernels", self.device.name, "program", name), make,
                                   same)
        if program.graph is not None and not program.counted:
            program.counted = True
            workspace.count("graphs")  # graphs captured (outside the workspace's lock)
        return program

    def capture_for(self, workspace: Workspace) -> Callable[[Callable[[], None]], Any] | None:
        """The device's capture when the run's ``graphs`` option is on, else None."""
        return self.device.capture if workspace.options.get("graphs", True) else None

    # ---- arrays ----
    def to_numpy(self, array: Array) -> Any:
        return self.device.to_host(array)

    def _empty(self, shape: Any, dtype: Any) -> Array:
        return self.xp.empty(shape, dtype=dtype)

    def _buffer(self, workspace: Workspace, name: Any, shape: tuple[int, ...], dtype: Any
                ) -> Array:
        """A buffer of the run's workspace, kept for the next epoch or evaluation."""
        dtype = np.dtype(dtype)
        key = ("cuda-kernels", self.device.name, name, dtype.name, shape)
        return workspace.buffer(key, lambda: self._empty(shape, dtype),
                                lambda b: tuple(b.shape) == shape and b.dtype == dtype)

    # ---- what the kernels take ----
    def _fits(self, *arrays: Any) -> bool:
        """True when every array is a C-contiguous device array of one float32/64 dtype."""
        first = arrays[0]
        kind = self.xp.ndarray
        if not isinstance(first, kind) or first.dtype not in FLOATS:
            return False
        return all(isinstance(a, kind) and a.dtype == first.dtype and a.flags.c_contiguous
                   for a in arrays)

    def _writable(self, *arrays: Any) -> bool:
        return all(getattr(a.flags, "writeable", True) for a in arrays)

    def _plan_fits(self, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any],
                   x: Array, t: Array, with_running: bool) -> bool:
        """True when the kernels take this plan, its live arrays and the data set."""
        dtype = np.dtype(plan.dtype)
        if (dtype not in FLOATS or plan.output not in OUTPUT_CODES
                or plan.batch_norm not in BATCH_NORM_CODES
                or any(spec.activation not in ACTIVATION_CODES for spec in plan.hidden)
                or any(spec.active and spec.keep <= 0 for spec in plan.dropout)):
            return False
        if not (self._fits(x, t) and x.dtype == dtype and x.ndim == 2 and t.ndim == 2
                and len(x) > 0 and x.shape == (len(x), plan.sizes[0])
                and t.shape == (len(x), plan.sizes[-1])):
            return False
        shapes = plan.param_shapes()
        if set(shapes) - set(params):
            return False
        arrays = [params[name] for name in shapes]
        if not (self._fits(x, *arrays) and self._writable(*arrays)
                and all(tuple(params[name].shape) == shape for name, shape in shapes.items())):
            return False
        if with_running:
            for k in range(1, plan.n_layers):
                if k not in running:
                    return False
                mean, var = running[k]
                if not (self._fits(x, mean, var) and self._writable(mean, var)
                        and mean.shape == var.shape == (plan.sizes[k],)):
                    return False
        return True
