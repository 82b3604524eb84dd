"""A lighter LLVM pipeline for the kernels that only call other kernels (the training epoch's
loop, evaluation's blocks): their O3 passes were the largest share of a first run's compile,
and bought nothing at run time.

numba optimises a kernel's own code at O3 and then, with the kernels it calls linked in, the
whole module at O3 again. The callees arrive optimised already (each in its own library), so
for a loop whose work is in its callees this buys nothing that a run can measure, while it
took 11 of the 36 s a first run compiled for (the epoch loop's own function passes 6 s, its
linked module's 3 s, machine code 2 s; MNIST epochs as fast either way). A registered
kernel's own code and numba's wrappers of it get numba's O0 function pipeline (with its
reference-count pruning) and its linked module only instcombine,
simplifycfg, aggressive and global dead-code elimination: what removes the dead constant
addresses that would otherwise make the compiled kernel uncacheable. The code computes the
same numbers in the same order (no pass here reassociates floating-point arithmetic).

numba has no per-function option for this: `register` wraps two methods of numba's CPU code
library, acting only on a library named as a registered kernel whose module defines that
kernel (by its mangled name), and leaves every other library to numba's own pipeline. With a
numba whose code library lacks these methods, or whose pass managers differ, kernels are
compiled the usual way.
"""

from __future__ import annotations

import threading
from typing import Any

#: the module passes a registered kernel's linked module gets
MODULE_PASSES = ("instruction_combine", "simplify_cfg", "aggressive_dce",
                 "global_dead_code_eliminate")

#: registered kernels: their library's name (the qualified name) -> the mangled-name prefixes
#: of their code and of numba's wrappers around it (from Python, from C)
_REGISTERED: dict[str, tuple[str, ...]] = {}
_LOCK = threading.Lock()
_installed = False


def mangled_prefix(function: Any) -> str:
    """The start of the mangled name numba gives ``function``'s compiled code."""
    parts = (*function.__module__.split("."), *function.__qualname__.split("."))
    return "_ZN" + "".join(f"{len(part)}{part}" for part in parts)


def register(function: Any) -> None:
    """Compile ``function`` (a Python function about to become a kernel) with the light
    pipeline; installs the hooks on first use."""
    global _installed
    with _LOCK:
        prefix = mangled_prefix(function)
        _REGISTERED[function.__qualname__] = (prefix, f"_ZN7cpython{prefix[3:]}",
                                              f"cfunc.{prefix}")
        if not _installed:
            _installed = True
            _install()


def registered(function: Any) -> bool:
    """Whether ``function`` was registered."""
    with _LOCK:
        return function.__qualname__ in _REGISTERED


def is_driver(library: Any) -> bool:
    """Whether ``library`` (a code library with its own code added) is a registered kernel's."""
    module = getattr(library, "_final_module", None)
    return module is not None and _is_registered(library, module)


def _is_registered(library: Any, module: Any) -> bool:
    """Whether ``library`` is a registered kernel's and ``module`` defines that kernel."""
    prefixes = _REGISTERED.get(getattr(library, "name", None))
    return prefixes is not None and any(
        not function.is_declaration and function.name.startswith(prefixes)
        for function in module.functions)


def _light_functions(library: Any, module: Any) -> None:
    """numba's function passes at O0 (reference-count pruning included)."""
    codegen = library._codegen
    module.data_layout = codegen._data_layout
    for function in module.functions:
        manager, builder = codegen._function_pass_manager(opt=0)
        manager.run(function, builder)


def _light_module(library: Any) -> None:
    """numba's module passes at O0 with `MODULE_PASSES` added."""
    manager, builder = library._codegen._module_pass_manager(opt=0)
    for name in MODULE_PASSES:
        getattr(manager, f"add_{name}_pass")()
    manager.run(library._final_module, builder)


def _light_machine_code(library: Any) -> bytes:
    """Make ``library``'s machine code at codegen level 0 and hand it to numba's JIT as a
    compiled object (the way numba loads a cached kernel), kept for the disk cache."""
    import llvmlite.binding as ll

    codegen = library._codegen
    options: dict[str, Any] = {"opt": 0}
    codegen._customize_tm_options(options)
    machine = ll.Target.from_triple(ll.get_process_triple()).create_target_machine(**options)
    compiled = machine.emit_object(library._final_module)
    library.enable_object_caching()
    library._set_compiled_object(compiled)
    return compiled


def _install() -> None:
    """Wrap the code library's optimisation methods (nothing when numba's differ)."""
    try:
        from numba.core.codegen import CPUCodeLibrary

        optimize_functions = CPUCodeLibrary._optimize_functions
        optimize_final_module = CPUCodeLibrary._optimize_final_module
        finalize_final_module = CPUCodeLibrary._finalize_final_module
    except (ImportError, AttributeError):
        return

    def _optimize_functions(self: Any, ll_module: Any) -> None:
        if _is_registered(self, ll_module):
            try:
                _light_functions(self, ll_module)
                return
            except (AttributeError, TypeError, ValueError):
                pass  # another numba's pass managers: its own pipeline
        optimize_functions(self, ll_module)

    def _optimize_final_module(self: Any) -> None:
        if _is_registered(self, self._final_module):
            try:
                _light_module(self)
                return
            except (AttributeError, TypeError, ValueError):
                pass
        optimize_final_module(self)

    def _finalize_final_module(self: Any) -> None:
        compiled = None
        if _is_registered(self, self._final_module):  # not a cached kernel's (an empty module)
            try:
                compiled = _light_machine_code(self)
            except (AttributeError, TypeError, ValueError, RuntimeError):
                compiled = None  # another numba's code library: its own machine code
        finalize_final_module(self)
        if compiled is not None:  # the JIT took it: keep it for the disk cache
            self._compiled_object, self._compiled = compiled, True
            self._disable_inspection = False  # its module is the code, not a cached stand-in

    CPUCodeLibrary._optimize_functions = _optimize_functions
    CPUCodeLibrary._optimize_final_module = _optimize_final_module
    CPUCodeLibrary._finalize_final_module = _finalize_final_module
