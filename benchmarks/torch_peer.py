"""The PyTorch peer of the article's epoch, shared by `compare.py` (CPU) and `gpu_bench.py` (GPU).

The same network (Linear, optional BatchNorm1d, ReLU per hidden layer, then Linear), plain SGD at
eta 0.1, cross-entropy, and the same evaluation work: the whole training set and the test set,
in training-mode batch norm (the statistics of the evaluated set), as the article evaluates.
PyTorch is imported only when these are called.

Three ways to run the training steps (``mode``): "eager" (each op launched from Python);
"graph", what a PyTorch user who cares about launch cost writes on a GPU: the step (the gather
of the batch by an index tensor, forward, backward, SGD update) captured once with
``torch.cuda.graph`` after warm-up steps on a side stream, each step copying its indices into
the captured index tensor and replaying (a short last batch runs eager); "compile", the
batch gathered eagerly, then forward, backward and update as
``torch.compile(mode="reduce-overhead")`` (Inductor kernels replayed as CUDA graphs;
`cudagraph_skips` says whether it fell back).
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
                 mode: str = "eager") -> Callable[[Any], None]:
    """A function that runs one epoch for a given row order (a torch tensor on x's device):
    SGD over the rows in that order (the steps run as ``mode`` says: "eager", "graph" or
    "compile"), then the evaluation of both sets, then ``synchronize``. "graph" and
    "compile" capture or compile here, with warm-up steps that train the model a little."""
    import torch
    from torch import nn

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()

    def train_on(inputs: Any, targets: Any) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        optimizer.step()

    def step(index: Any) -> None:
        train_on(x[index], labels[index])

    full_step: Callable[[Any], None] = step
    if mode == "graph":
        full_step = _graphed_step(step, x.device, batch_size)
    elif mode == "compile":
        full_step = _compiled_step(train_on, x, labels, batch_size)
    elif mode != "eager":
        raise ValueError(f"mode must be eager, graph or compile; got {mode!r}")

    def evaluate(inputs: Any, targets: Any) -> tuple[float, float]:
        with torch.no_grad():
            outputs = model(inputs)
            accuracy = (outputs.argmax(1) == targets).double().mean()
            return float(loss_fn(outputs, targets)), float(accuracy)

    def run(order: Any) -> None:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            (full_step if len(index) == batch_size else step)(index)
        evaluate(x, labels)
        evaluate(x_test, labels_test)
        synchronize()

    return run


def _graphed_step(step: Callable[[Any], None], device: Any, batch_size: int
                  ) -> Callable[[Any], None]:
    """``step`` on a full batch, captured once as a CUDA graph over a static index tensor."""
    import torch

    static_index = torch.zeros(batch_size, dtype=torch.int64, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture (allocations, autograd state)
            step(static_index)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static_index)

    def replay(index: Any) -> None:
        static_index.copy_(index)
        graph.replay()

    return replay


def _compiled_step(train_on: Callable[[Any, Any], None], x: Any, labels: Any,
                   batch_size: int) -> Callable[[Any], None]:
    """A full batch's step: the rows gathered eagerly (so that the compiled graph's inputs
    are the batch, not the whole set, which CUDA-graph replay would copy at every step),
    then forward, backward and update as ``torch.compile(mode="reduce-overhead")``, warmed
    up."""
    import torch

    compiled = torch.compile(train_on, mode="reduce-overhead")
    warm = torch.zeros(batch_size, dtype=torch.int64, device=x.device)
    for _ in range(3):
        compiled(x[warm], labels[warm])

    def run(index: Any) -> None:
        compiled(x[index], labels[index])

    return run


def cudagraph_skips() -> int:
    """How often torch.compile's "reduce-overhead" mode fell back from CUDA graphs in this
    process (0 when none did, or the counter is not there)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters.get("inductor", {}).get("cudagraph_skips", 0))
