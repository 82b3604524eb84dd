"""A spin barrier for the threads that share one training step (`epoch.train_epoch_part`).

The threads are Python threads, each running a ``nogil`` kernel on its own part of every step;
they meet here between the step's phases. The barrier's state is a small int64 array the
caller makes with `new_barrier` (one per training, never shared between trainings), updated by
LLVM atomic instructions: ``[0]`` counts the arrivals of the current round, ``[8]`` (its own
cache line) is the round number, ``[16]`` is set (`abandon`) when a thread will not come, so
that the others return instead of waiting for ever. A waiting thread spins on the round
number, then yields its core to the OS (``sched_yield``) after `SPINS_BEFORE_YIELD` reads, so
that a busy machine does not starve the thread it waits for.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import jit

COUNT, ROUND, ABANDONED = 0, 8, 16  # int64 slots 64 bytes apart
SPINS_BEFORE_YIELD = 4096


def new_barrier() -> np.ndarray:
    """The state of one barrier (zeros)."""
    return np.zeros(ABANDONED + 8, np.int64)


def abandon(state: np.ndarray) -> None:
    """Release every thread waiting at the barrier ``state`` (their `wait_for_all` returns
    False): called when one of the threads failed before it could arrive."""
    state[ABANDONED] = 1


def _is_state(state: Any) -> bool:
    """Whether a kernel argument's type is a barrier state (an int64 array)."""
    return isinstance(state, types.Array) and state.dtype == types.int64


def _slot(context: Any, builder: Any, array_type: Any, array: Any, index: Any) -> Any:
    native = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, native, [index])


@intrinsic
def atomic_add(typingctx: Any, state: Any, index: Any, value: Any) -> Any:
    """state[index] += value atomically (sequentially consistent); returns the old value."""
    if not _is_state(state):
        return None
    signature = types.int64(state, types.intp, types.int64)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        pointer = _slot(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", pointer, args[2], "seq_cst")

    return signature, codegen


@intrinsic
def atomic_read(typingctx: Any, state: Any, index: Any) -> Any:
    """state[index], read atomically with acquire ordering (never hoisted out of a loop)."""
    if not _is_state(state):
        return None
    signature = types.int64(state, types.intp)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        pointer = _slot(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(pointer, "acquire", 8)

    return signature, codegen


@intrinsic
def atomic_write(typingctx: Any, state: Any, index: Any, value: Any) -> Any:
    """state[index] = value atomically with release ordering."""
    if not _is_state(state):
        return None
    signature = types.void(state, types.intp, types.int64)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        pointer = _slot(context, builder, sig.args[0], args[0], args[1])
        builder.store_atomic(args[2], pointer, "release", 8)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def yield_core(typingctx: Any) -> Any:
    """Give the core to another runnable thread (POSIX ``sched_yield``)."""
    signature = types.void()

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        function_type = ir.FunctionType(ir.IntType(32), [])
        function = cgutils.get_or_insert_function(builder.module, function_type, "sched_yield")
        builder.call(function, [])
        return context.get_dummy_value()

    return signature, codegen


@jit
def wait_for_all(state, threads):
    """Block until ``threads`` threads have called this for the same round (1: no wait).
    False when the barrier was abandoned: the caller must stop."""
    if threads <= 1:
        return True
    round_number = atomic_read(state, ROUND)
    if atomic_add(state, COUNT, 1) == threads - 1:  # the last to arrive opens the next round
        atomic_write(state, COUNT, 0)
        atomic_add(state, ROUND, 1)
        return atomic_read(state, ABANDONED) == 0
    spins = 0
    while atomic_read(state, ROUND) == round_number:
        if atomic_read(state, ABANDONED) != 0:
            return False
        spins += 1
        if spins >= SPINS_BEFORE_YIELD:
            yield_core()
            spins = 0
    return atomic_read(state, ABANDONED) == 0
