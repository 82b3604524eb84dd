"""The JAX peer of the article's epoch for `compare.py`: the whole epoch jitted as one program.

What a JAX user who cares about speed writes: the SGD steps as one ``lax.scan`` over the
epoch's batches (each step gathers its rows from the shuffled order on the device), then the
evaluation of the training and test sets, all inside one ``jax.jit``. The same network as the
PyTorch peer (dense layers, optional batch norm with batch statistics, ReLU, softmax cross
entropy), plain SGD at eta 0.1 and the same evaluation work (batch-norm statistics of the
evaluated set, as the article evaluates). JAX is a benchmark-only dependency, imported only
when `time_jax` is called; it is best installed in its own environment
(``pip install "jax[cpu]"``) and named with ``compare.py --jax-python``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

ETA = 0.1
BN_EPS = 1e-5


def _network(jnp: Any, batch_norm: bool) -> Any:
    """The forward pass: logits of a batch, batch norm (when on) with that batch's statistics."""

    def forward(params: list[dict[str, Any]], x: Any) -> Any:
        h = x
        for layer in params[:-1]:
            h = h @ layer["w"] + layer["b"]
            if batch_norm:
                mean = h.mean(axis=0)
                var = ((h - mean) ** 2).mean(axis=0)
                h = layer["gamma"] * (h - mean) / jnp.sqrt(var + BN_EPS) + layer["beta"]
            h = jnp.maximum(h, 0)
        last = params[-1]
        return h @ last["w"] + last["b"]

    return forward


def _init(sizes: tuple[int, ...], batch_norm: bool, dtype: str, seed: int = 0
          ) -> list[dict[str, np.ndarray]]:
    gen = np.random.default_rng(seed)
    params = []
    for k, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layer = {"w": (gen.standard_normal((fan_in, fan_out)) * np.sqrt(2 / fan_in)).astype(dtype),
                 "b": np.zeros(fan_out, dtype)}
        if batch_norm and k < len(sizes) - 2:
            layer.update(gamma=np.ones(fan_out, dtype), beta=np.zeros(fan_out, dtype))
        params.append(layer)
    return params


def epoch_program(sizes: tuple[int, ...], batch_norm: bool, batch_size: int, n_rows: int
                  ) -> Any:
    """A jitted ``epoch(params, x, labels, x_test, labels_test, order)`` returning the new
    parameters and (train loss, train accuracy, test loss, test accuracy)."""
    import jax
    import jax.numpy as jnp

    forward = _network(jnp, batch_norm)

    def loss(params: Any, x: Any, labels: Any) -> Any:
        logits = forward(params, x)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)
        return -picked.mean()

    gradient = jax.grad(loss)

    def sgd(params: Any, x: Any, labels: Any) -> Any:
        grads = gradient(params, x, labels)
        return jax.tree_util.tree_map(lambda p, g: p - ETA * g, params, grads)

    n_full = n_rows // batch_size

    def epoch(params: Any, x: Any, labels: Any, x_test: Any, labels_test: Any, order: Any
              ) -> Any:
        def step(params: Any, rows: Any) -> tuple[Any, None]:
            return sgd(params, x[rows], labels[rows]), None

        batches = order[: n_full * batch_size].reshape(n_full, batch_size)
        params, _ = jax.lax.scan(step, params, batches)
        if n_rows % batch_size:  # the short last batch
            rest = order[n_full * batch_size:]
            params = sgd(params, x[rest], labels[rest])

        def scores(inputs: Any, targets: Any) -> tuple[Any, Any]:
            logits = forward(params, inputs)
            accuracy = (logits.argmax(axis=1) == targets).mean()
            return loss(params, inputs, targets), accuracy

        return params, (*scores(x, labels), *scores(x_test, labels_test))

    return jax.jit(epoch)


def time_jax(x: np.ndarray, labels: np.ndarray, x_test: np.ndarray, labels_test: np.ndarray,
             hidden: tuple[int, ...], n_classes: int, batch_norm: str, batch_size: int,
             repeats: int, orders: list[np.ndarray]) -> list[float]:
    """Seconds of each of ``repeats`` epochs (after one untimed epoch that compiles), each over
    the row order ``orders[epoch]`` (epoch 0: the warm-up's)."""
    import jax
    import jax.numpy as jnp

    dtype = x.dtype.name
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    sizes = (x.shape[1], *hidden, n_classes)
    program = epoch_program(sizes, batch_norm != "off", batch_size, len(x))
    params = jax.tree_util.tree_map(jnp.asarray, _init(sizes, batch_norm != "off", dtype))
    device = [jnp.asarray(a) for a in (x, labels.astype(np.int32), x_test,
                                       labels_test.astype(np.int32))]
    params, figures = program(params, *device, jnp.asarray(orders[0].astype(np.int32)))
    jax.block_until_ready(figures)
    seconds = []
    for epoch in range(1, repeats + 1):
        order = jnp.asarray(orders[epoch].astype(np.int32))
        start = time.perf_counter()
        params, figures = program(params, *device, order)
        jax.block_until_ready((params, figures))
        seconds.append(time.perf_counter() - start)
    return seconds
