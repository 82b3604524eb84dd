"""`OptimizerState`: what an optimiser keeps between steps, one fit's, beside the parameters.

The update rules themselves are ops (`Ops.optimizer_update`, the reference in ``xp``); the
rule's choice and coefficients are data in the `Plan` (`fastnn.plan.OptimizerSpec`). The state
is never held by a backend object: a `Network` owns it, its arrays are written with the
parameters (``optimizer_<slot>_<param>`` and ``optimizer_steps``) in checkpoints, so a resumed
run continues exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Array = Any
#: the state-array name of the update count
STEPS_KEY = "optimizer_steps"


def slot_key(slot: str, param: str) -> str:
    """The state-array name of one slot of one parameter (``optimizer_m_W1``)."""
    return f"optimizer_{slot}_{param}"


@dataclass
class OptimizerState:
    """Per parameter the arrays its optimiser keeps (velocity, or first and second moments),
    and ``steps``: the updates made so far (Adam's t is ``steps`` after the increment)."""

    slots: dict[str, tuple[Array, ...]] = field(default_factory=dict)
    steps: int = 0

    @classmethod
    def zeros(cls, slot_names: tuple[str, ...], shapes: Mapping[str, tuple[int, ...]],
              ops: Any, dtype: str) -> OptimizerState:
        """Fresh state: zero slots of every parameter's shape on ``ops``'s backend."""
        xp = ops.xp
        return cls({name: tuple(xp.zeros(shape, dtype=dtype) for _ in slot_names)
                    for name, shape in shapes.items()}, 0)

    def arrays(self, slot_names: tuple[str, ...], ops: Any) -> dict[str, np.ndarray]:
        """Host copies of every slot and the step count, by state-array name."""
        out: dict[str, np.ndarray] = {}
        for param, values in self.slots.items():
            for slot, value in zip(slot_names, values, strict=True):
                out[slot_key(slot, param)] = np.array(ops.to_numpy(value))
        if slot_names:
            out[STEPS_KEY] = np.array(self.steps, dtype=np.int64)
        return out

    def load(self, slot_names: tuple[str, ...], arrays: Mapping[str, Any], ops: Any,
             dtype: str) -> None:
        """Take the slots and step count from state arrays (zeros where a file has none: a
        model file keeps no optimiser state)."""
        for param, values in self.slots.items():
            self.slots[param] = tuple(
                ops.asarray(arrays[slot_key(slot, param)], dtype)
                if slot_key(slot, param) in arrays else ops.xp.zeros_like(value)
                for slot, value in zip(slot_names, values, strict=True)
            )
        self.steps = int(np.asarray(arrays[STEPS_KEY])) if STEPS_KEY in arrays else 0

    def copy(self, ops: Any, dtype: str) -> OptimizerState:
        """A copy with its own arrays."""
        return OptimizerState(
            {name: tuple(ops.asarray(value, dtype) for value in values)
             for name, values in self.slots.items()}, self.steps)
