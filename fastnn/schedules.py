"""Learning-rate schedules: the factor each training step multiplies the plan's rates by.

The factors of an epoch are computed on the host before it starts (one float64 per step) and
given to the backend with the epoch, so a schedule never recompiles a kernel or reads the
device. Step s of epoch e (1-based) is update g = (e - 1) * S + s of the run, S steps an epoch:

- ``constant``: 1;
- ``step``: gamma ** floor((e - 1) / step_size);
- ``exponential``: gamma ** (e - 1);
- ``cosine``: r + (1 - r) * (1 + cos(pi * p)) / 2 with p = (g - W) / (T - W) the share of the
  steps after warm-up done (T = epochs * S) and r = min_rate / eta;
- ``plateau``: the factor of a `Plateau` watcher, which multiplies it by gamma (never below
  min_rate / eta) after ``patience`` epochs without a loss lower by more than ``tol``;

and during the first W = warmup_epochs * S updates the factor is multiplied by (g + 1) / W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .plan import ScheduleSpec


def epoch_factors(spec: ScheduleSpec, epoch: int, n_steps: int, eta: float,
                  plateau_factor: float = 1.0) -> np.ndarray | None:
    """The rate factor of each of the ``n_steps`` steps of ``epoch``; None when every factor
    is 1 (a constant rate without warm-up: the plan's rates as they are)."""
    if spec.kind == "constant" and spec.warmup_epochs == 0:
        return None
    first = (epoch - 1) * n_steps
    updates = np.arange(first, first + n_steps, dtype=np.float64)
    if spec.kind == "step":
        factors = np.full(n_steps, spec.gamma ** ((epoch - 1) // spec.step_size))
    elif spec.kind == "exponential":
        factors = np.full(n_steps, spec.gamma ** (epoch - 1))
    elif spec.kind == "cosine":
        warm = spec.warmup_epochs * n_steps
        total = max(spec.epochs * n_steps - warm, 1)
        progress = np.clip((updates - warm) / total, 0.0, 1.0)
        floor = spec.min_rate / eta
        factors = floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(math.pi * progress))
    elif spec.kind == "plateau":
        factors = np.full(n_steps, plateau_factor)
    else:
        factors = np.ones(n_steps)
    warm = spec.warmup_epochs * n_steps
    if warm:
        factors = factors * np.minimum((updates + 1.0) / warm, 1.0)
    return factors


@dataclass
class Plateau:
    """Reduce-on-plateau: the factor, the best loss seen and the epochs since it."""

    factor: float = 1.0
    best: float = math.inf
    waited: int = 0

    def observe(self, spec: ScheduleSpec, loss: float, tol: float, eta: float) -> None:
        """Take one epoch's loss; decay the factor after ``patience`` epochs without gain."""
        if loss < self.best - tol:
            self.best, self.waited = loss, 0
            return
        self.waited += 1
        if self.waited >= spec.patience:
            self.factor = max(self.factor * spec.gamma, spec.min_rate / eta)
            self.waited = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (a checkpoint's); infinity as None."""
        return {"factor": self.factor, "best": None if math.isinf(self.best) else self.best,
                "waited": self.waited}

    @classmethod
    def from_dict(cls, data: Any) -> Plateau:
        """Inverse of `to_dict`; ValueError for anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"schedule state must be a dict; got {data!r}")
        factor, best, waited = data.get("factor", 1.0), data.get("best"), data.get("waited", 0)
        if (not isinstance(factor, (int, float)) or isinstance(factor, bool)
                or not 0 < factor <= 1 or isinstance(waited, bool) or not isinstance(waited, int)
                or waited < 0 or (best is not None and not isinstance(best, (int, float)))):
            raise ValueError(f"invalid schedule state {data!r}")
        return cls(float(factor), math.inf if best is None else float(best), waited)
