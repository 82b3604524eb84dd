"""Counter-based random numbers for dropout masks, identical on every backend.

Every draw is a pure function of (seed, stream, epoch, step, layer, index): a 64-bit key is folded
from the counters on the host, then element i gets ``mix64(key + i * GOLDEN)``. ``mix64`` (the
SplitMix64 finaliser) is a bijection of 64-bit integers and GOLDEN is odd, so the d values of one
mask are all distinct: "the k smallest" is a unique set, whatever sort a backend uses.
Written against an array module ``xp`` so NumPy, CuPy and Numba kernels produce the same bits.
"""

from __future__ import annotations

import operator
from typing import Any

MASK64 = (1 << 64) - 1
#: the largest seed (and counter) `fold_key` takes: larger ones would wrap onto smaller ones
SEED_MAX = MASK64
GOLDEN = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB

#: stream identifiers (what the random numbers are for)
STREAM_INIT = 1
STREAM_SHUFFLE = 2
STREAM_DROPOUT = 3
STREAM_SPLIT = 4


def mix64_int(x: int) -> int:
    """SplitMix64 finaliser on a Python int (host side)."""
    x &= MASK64
    x ^= x >> 30
    x = (x * MUL1) & MASK64
    x ^= x >> 27
    x = (x * MUL2) & MASK64
    x ^= x >> 31
    return x


def fold_key(*counters: int) -> int:
    """Fold counters (seed, stream, epoch, ...), each in 0..2**64 - 1, into one 64-bit key.

    A counter outside that range is a ValueError, not wrapped: seed 2**64 + s (or -1) would
    otherwise draw exactly the numbers of seed s (or 2**64 - 1)."""
    key = 0
    for counter in map(operator.index, counters):
        if not 0 <= counter <= MASK64:
            raise ValueError(f"random-stream counter {counter!r} is outside 0..2**64 - 1 (a "
                             "seed must be an integer in [0, 2**64 - 1])")
        key = mix64_int((key ^ counter) + GOLDEN)
    return key


def mix64(xp: Any, x: Any) -> Any:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> xp.uint64(30))
    x = x * xp.uint64(MUL1)
    x = x ^ (x >> xp.uint64(27))
    x = x * xp.uint64(MUL2)
    return x ^ (x >> xp.uint64(31))


def uint64_stream(xp: Any, key: int, n: int) -> Any:
    """n distinct pseudo-random uint64 values for a key."""
    counters = xp.arange(n, dtype=xp.uint64) * xp.uint64(GOLDEN) + xp.uint64(key)
    return mix64(xp, counters)


def uniform01(xp: Any, key: int, n: int) -> Any:
    """n float64 uniforms in [0, 1) from the top 53 bits."""
    bits = uint64_stream(xp, key, n) >> xp.uint64(11)
    return bits.astype(xp.float64) * (1.0 / 9007199254740992.0)


def keep_count(keep: float, d: int) -> int:
    """The article's exact number of kept nodes: round(keep * d)."""
    return int(round(keep * d))


def dropout_key(seed: int, epoch: int, step: int, layer: int) -> int:
    """Key of the dropout mask of one layer at one training step."""
    return fold_key(seed, STREAM_DROPOUT, epoch, step, layer)
