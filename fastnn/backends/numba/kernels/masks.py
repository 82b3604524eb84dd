"""Dropout masks from their keys, bit-identical to `fastnn.rng` and the reference ops.

A mask is a pure function of its 64-bit key (see `fastnn.plan.Plan.mask_key`): element i draws
``mix64(key + i * GOLDEN)``. Article masks keep exactly ``keep_count`` nodes (the smallest
draws); inverted masks keep each element where its uniform draw is below the keep ratio.
"""

from __future__ import annotations

import numpy as np

from .... import rng
from .common import jit

_GOLDEN = np.uint64(rng.GOLDEN)
_MUL1 = np.uint64(rng.MUL1)
_MUL2 = np.uint64(rng.MUL2)
_SHIFT30, _SHIFT27, _SHIFT31, _SHIFT11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_UNIT53 = 1.0 / 9007199254740992.0


@jit
def mix64(value):
    """SplitMix64 finaliser of one uint64 (wrapping arithmetic)."""
    value = value ^ (value >> _SHIFT30)
    value = value * _MUL1
    value = value ^ (value >> _SHIFT27)
    value = value * _MUL2
    return value ^ (value >> _SHIFT31)


@jit
def fold_counter(key, counter):
    """One step of `rng.fold_key`: the key after folding in a non-negative counter."""
    return mix64((key ^ np.uint64(counter)) + _GOLDEN)


@jit
def fill_stream(key, values):
    """values[i] = the i-th value of `rng.uint64_stream(key, len(values))`."""
    for i in range(values.shape[0]):
        values[i] = mix64(np.uint64(i) * _GOLDEN + key)


@jit
def kth_smallest(values, rank):
    """The value of 0-based ``rank`` among distinct ``values`` (quickselect; reorders them)."""
    low, high = 0, values.shape[0] - 1
    while low < high:
        pivot = values[(low + high) // 2]
        i, j = low, high
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if rank <= j:
            high = j
        elif rank >= i:
            low = i
        else:
            break
    return values[rank]


@jit
def fill_article_mask(key, keep_count, scratch, mask):
    """mask = 1 at the keep_count smallest stream values of ``key``, else 0 (article mode)."""
    d = mask.shape[0]
    one, zero = mask.dtype.type(1.0), mask.dtype.type(0.0)
    if keep_count <= 0 or keep_count >= d:
        mask[:] = one if keep_count > 0 else zero
        return
    fill_stream(key, scratch)
    threshold = kth_smallest(scratch, keep_count - 1)
    fill_stream(key, scratch)  # kth_smallest reordered it
    for i in range(d):
        mask[i] = one if scratch[i] <= threshold else zero


@jit
def fill_bernoulli_rows(key, keep, on_value, multiplier, low, high):
    """Rows low..high-1 of `fill_bernoulli_multiplier` (element (i, j) draws the same value
    whichever rows are filled together)."""
    cols = multiplier.shape[1]
    zero = multiplier.dtype.type(0.0)
    for i in range(low, high):
        for j in range(cols):
            bits = mix64(np.uint64(i * cols + j) * _GOLDEN + key) >> _SHIFT11
            uniform = np.float64(bits) * _UNIT53
            multiplier[i, j] = on_value if uniform < keep else zero


@jit
def fill_bernoulli_multiplier(key, keep, on_value, multiplier):
    """multiplier[i, j] = on_value where uniform01 < keep, else 0 (the inverted-dropout draw)."""
    fill_bernoulli_rows(key, keep, on_value, multiplier, 0, multiplier.shape[0])


@jit
def article_mask(key, keep_count, mask):
    """Fill the (d,) article mask of ``key``."""
    fill_article_mask(key, keep_count, np.empty(mask.shape[0], np.uint64), mask)


@jit
def dropout_multiplier(key, keep, keep_count, inverted, scratch, multiplier):
    """What one layer's nodes are multiplied by in a training step, made from the mask's key.

    Inverted: every element of the (n, d) ``multiplier`` is 1/keep or 0 (a Bernoulli draw).
    Article: row 0 of the (1, d) ``multiplier`` is the 0/1 mask keeping ``keep_count`` nodes
    (``scratch``: (d,) uint64).
    """
    if inverted:
        on_value = multiplier.dtype.type(1.0) / multiplier.dtype.type(keep)
        fill_bernoulli_multiplier(key, keep, on_value, multiplier)
    else:
        fill_article_mask(key, keep_count, scratch, multiplier[0])
