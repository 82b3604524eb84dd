"""The PyTorch peer of the article's epoch, shared by `compare.py` (CPU) and `gpu_bench.py` (GPU).

The same network (Linear, optional BatchNorm1d, ReLU per hidden layer, then Linear), plain SGD at
eta 0.1, cross-entropy, and the same evaluation work: the whole training set and the test set,
in training-mode batch norm (the statistics of the evaluated set), as the article evaluates.
PyTorch is imported only when these are called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def epoch_order(epoch: int, n: int) -> np.ndarray:
    """The row order of one epoch, the same for every implementation timed."""
    return np.random.default_rng(1000 + epoch).permutation(n)


def build_model(n_inputs: int, hidden: tuple[int, ...], n_classes: int, batch_norm: str) -> Any:
    """``nn.Sequential`` of the article's network; ``batch_norm`` "off" leaves BN out."""
    from torch import nn

    layers: list[nn.Module] = []
    sizes = (n_inputs, *hidden)
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers.append(nn.Linear(fan_in, fan_out))
        if batch_norm != "off":
            layers.append(nn.BatchNorm1d(fan_out))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(sizes[-1], n_classes))
    return nn.Sequential(*layers)


def epoch_runner(model: Any, x: Any, labels: Any, x_test: Any, labels_test: Any,
                 batch_size: int, synchronize: Callable[[], None] = lambda: None,
                 ) -> Callable[[Any], None]:
    """A function that runs one epoch for a given row order (a torch tensor on x's device):
    SGD over the rows in that order, then the evaluation of both sets, then ``synchronize``."""
    import torch
    from torch import nn

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()

    def evaluate(inputs: Any, targets: Any) -> tuple[float, float]:
        with torch.no_grad():
            outputs = model(inputs)
            accuracy = (outputs.argmax(1) == targets).double().mean()
            return float(loss_fn(outputs, targets)), float(accuracy)

    def run(order: Any) -> None:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[index]), labels[index]).backward()
            optimizer.step()
        evaluate(x, labels)
        evaluate(x_test, labels_test)
        synchronize()

    return run
