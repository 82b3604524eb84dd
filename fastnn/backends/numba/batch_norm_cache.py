"""The cache of a batch-normalised hidden layer that the numba forward pass leaves, and what
the fused backward reads of it.

The fused forward kernel writes z only: u_hat and y (the activation's input) are built when
first read (evaluation never reads them). The fused backward either rebuilds them on the fly
from u, the statistics and the forward pass's gamma/beta ("recompute": the cache was never
read), or reads the stored arrays. `forward_values` makes that choice and says which fields
the kernel will not read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..base import HiddenCache
from ..codes import BN_OFF
from .kernels.common import BatchNorm, ForwardValues, Normalised, Statistics


class LazyBatchNormCache(HiddenCache):
    """The cache of a batch-normalised hidden layer that builds u_hat and y on first access.

    It keeps u (not copied: the network never writes to it), the statistics and a copy of the
    forward pass's gamma/beta (None without them), so what it builds equals what the forward
    pass computed. ``normalise`` is the `kernels.layers.normalise` kernel.
    """

    def __init__(
        self, normalise: Any, u: Any, mask: Any, std: Any, mean: Any, var: Any,
        forward_parameters: tuple[Any, Any] | None,
    ) -> None:
        # the dataclass __init__ would assign u_hat/pre_activation: they are properties here
        self.mask, self.std, self.mean, self.var = mask, std, mean, var
        self.u, self.forward_parameters = u, forward_parameters
        self._normalise = normalise
        self._u_hat: Any = None
        self._pre_activation: Any = None

    @property
    def built(self) -> bool:
        """Whether u_hat and y exist (were read, or set)."""
        return self._u_hat is not None

    def _build(self) -> None:
        u = self.u
        stats = Statistics(self.mean, self.var, self.std)
        self._u_hat = np.empty_like(u)
        # (normalise reads no variant code: BN_OFF stands in)
        if self.forward_parameters is None:  # y is u_hat itself
            self._pre_activation = self._u_hat
            dummy = np.ones(1, u.dtype)
            self._normalise(u, stats, BatchNorm(BN_OFF, dummy, dummy, False),
                            Normalised(True, self._u_hat, self._u_hat))
        else:
            gamma, beta = self.forward_parameters
            self._pre_activation = np.empty_like(u)
            self._normalise(u, stats, BatchNorm(BN_OFF, gamma, beta, True),
                            Normalised(True, self._u_hat, self._pre_activation))

    @property  # type: ignore[override]
    def u_hat(self) -> Any:
        if self._u_hat is None:
            self._build()
        return self._u_hat

    @u_hat.setter
    def u_hat(self, value: Any) -> None:
        if self._u_hat is None:
            self._build()
        self._u_hat = value

    @property  # type: ignore[override]
    def pre_activation(self) -> Any:
        if self._pre_activation is None:
            self._build()
        return self._pre_activation

    @pre_activation.setter
    def pre_activation(self, value: Any) -> None:
        if self._u_hat is None:
            self._build()
        self._pre_activation = value


def forward_values(
    cache: HiddenCache, has_gamma: bool, dz: np.ndarray, activation_input: Any = None,
) -> ForwardValues:
    """The `ForwardValues` the fused batch-norm backward reads of ``cache``.

    - Recompute (a `LazyBatchNormCache` never read, a hidden layer's backward, and gamma
      present in the forward pass exactly when the backward has one): u, mean, std and the
      forward pass's gamma/beta; u_hat and y are not read (``dz`` stands in for them).
    - Otherwise the stored u_hat and std, and y: the cache's pre-activation, or
      ``activation_input`` (the batch-norm op alone: its dy, through an identity); u and mean
      are not read (``dz`` and std stand in).

    Forward gamma/beta are (1,) ones when not read, or when the layer has none. Where a
    stand-in is not a float array of dz's dtype (a reference cache without statistics), the
    caller's checks send the op to the reference.
    """
    ones = np.ones(1, dz.dtype)
    recompute = (isinstance(cache, LazyBatchNormCache) and not cache.built
                 and activation_input is None
                 and (cache.forward_parameters is not None) == has_gamma)
    if recompute:
        gamma, beta = cache.forward_parameters if has_gamma else (ones, ones)
        return ForwardValues(True, cache.u, cache.mean, cache.std, gamma, beta, dz, dz)
    y = cache.pre_activation if activation_input is None else activation_input
    return ForwardValues(False, dz, cache.std, cache.std, ones, ones, cache.u_hat, y)
