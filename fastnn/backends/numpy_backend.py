"""The NumPy backend: the reference ops with ``xp = numpy``, nothing else."""

from __future__ import annotations

import numpy

from .base import Ops


class NumpyOps(Ops):
    """Reference ops on NumPy arrays."""

    name = "numpy"
    xp = numpy
