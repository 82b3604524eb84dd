"""Evaluation of a whole set by the numba backend, a block of rows at a time.

Without batch norm (or with running statistics) no (N, d) activation is ever built; with
whole-set statistics the hidden pre-activations go to (N, d_k) buffers of the run's workspace,
layer by layer (`kernels.evaluate`). Blocks are independent: `run_blocks` shares them out among
threads, and the loss is summed in block order, so every run gives the same number.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ...threads import check_threads
from ..codes import BATCH_NORM_CODES, OUTPUT_CODES
from ..workspace import Workspace
from .fit import hidden_activations, layers_record, live_arrays, plan_fits, remembered
from .inputs import first_layer, kernel_inputs
from .kernels.common import BN_STD_FLOOR, Data, EvalPlan, EvalRows, Layers

if TYPE_CHECKING:
    from ...plan import Plan


def loss_and_classes(
    kernels: Any, blas_for: Callable[[Any], Any], plan: Plan, params: Mapping[str, Any],
    running: Mapping[int, Any], x: Any, t: Any, workspace: Workspace,
) -> tuple[float, Any] | None:
    """Loss and predicted classes of the set (x, t); None, having done nothing, when the plan
    or the arrays do not fit. ``kernels``: the `kernels.evaluate` module; ``blas_for(dtype)``:
    the `Blas` of a dtype."""
    batch_stats = plan.bn_eval == "batch" or not running
    array = kernel_inputs(x)  # a `CsrRows`: dense rows, where needed, from its CSR form
    if not (plan_fits(plan, array, t, len(x)) and array.flags.writeable and len(x) > 0):
        return None
    with_running = plan.batch_norm != "off" and not batch_stats
    layers = remembered(
        workspace, "evaluate", (plan, x.dtype, with_running, *live_arrays(params, running, None)),
        lambda: layers_record(plan, params, running, x.dtype, with_running))
    if layers is None:
        return None
    dtype = x.dtype
    n_rows, n_layers, sizes = len(x), plan.n_layers, plan.sizes
    acts, alphas = hidden_activations(plan, dtype)
    eval_plan = EvalPlan(
        acts=acts,
        alphas=alphas,
        bn=BATCH_NORM_CODES[plan.batch_norm],
        has_gamma=plan.learnable_bn,
        output=OUTPUT_CODES[plan.output],
        batch_stats=batch_stats,
    )
    rows = eval_rows(layers, with_running, np.array(plan.eval_scales(), dtype), max(sizes[1:]))
    whole_set = plan.batch_norm != "off" and batch_stats
    placeholder = np.ones((1, 1), dtype)
    full = tuple(
        workspace.buffer(("evaluate", dtype.name, k, sizes[k]),  # one per layer
                         lambda k=k: np.empty((n_rows, sizes[k]), dtype),
                         lambda buffer: len(buffer) >= n_rows)
        if whole_set and k < n_layers else placeholder
        for k in range(1, n_layers + 1)
    )
    blas = blas_for(dtype)
    data = Data(array, t, first_layer(x, layers.weights[0], "evaluate", workspace),
                np.ones(1, x.dtype))
    block = int(workspace.options.get("eval_block", 2048))
    threads = min(int(workspace.options.get("eval_threads", workspace.threads)),
                  workspace.free_threads)
    n_blocks = -(-n_rows // block)
    predicted = np.empty(n_rows, np.intp)
    first = 1
    if whole_set:  # the statistics of every row, layer by layer
        first = n_layers
        for k in range(1, n_layers):
            def pre_activations(index: int, k: int = k) -> None:
                start = index * block
                kernels.pre_activation_block(data, start, min(block, n_rows - start), k, layers,
                                             full, eval_plan, rows, blas)

            run_blocks(n_blocks, threads, pre_activations)
            kernels.whole_set_statistics(full[k - 1][:n_rows], rows, k - 1)
    totals = np.zeros(n_blocks)

    def outputs(index: int) -> None:
        start = index * block
        totals[index] = kernels.evaluate_block(data, start, min(block, n_rows - start), layers,
                                               first, full, eval_plan, rows, blas, predicted)

    run_blocks(n_blocks, threads, outputs)
    total = 0.0
    for value in totals.tolist():  # in block order: the same sum on every run
        total += value
    identity = eval_plan.output == OUTPUT_CODES["identity_mse"]
    loss = 0.5 * total / n_rows if identity else -total / n_rows
    return float(dtype.type(loss)), predicted


def eval_rows(layers: Layers, with_running: bool, scales: np.ndarray, widest: int) -> EvalRows:
    """The per-layer rows `kernels.evaluate.evaluate_block` reads, all (L, widest) in the
    dtype of ``scales``: scales[0, 0] the input's scale and scales[k] hidden layer k's (1
    elsewhere), the expanded gammas and betas, and (``with_running``) the running means and
    floored stds, max(sqrt(var), 1e-7) (else means 0 and stds 1). Once per evaluation, so in
    NumPy: a kernel would only add to a first run's compile."""
    n_layers, dtype = len(layers.weights), scales.dtype
    rows = EvalRows(*(np.empty((n_layers, widest), dtype) for _ in range(5)))
    rows.scales[:] = 1
    rows.means[:] = 0
    rows.stds[:] = 1
    rows.scales[0, 0] = scales[0]
    rows.scales[1:] = scales[1:n_layers, None]
    for k in range(n_layers):
        d = layers.weights[k].shape[1]
        rows.gammas[k, :d] = layers.gammas[k]
        rows.betas[k, :d] = layers.betas[k]
    if with_running:
        floor = dtype.type(BN_STD_FLOOR)
        for k in range(n_layers - 1):
            d = layers.weights[k].shape[1]
            rows.means[k, :d] = layers.running_means[k]
            root = np.sqrt(layers.running_vars[k])
            rows.stds[k, :d] = np.where(root < floor, floor, root)  # NaN stays NaN
    return rows


def run_blocks(n_blocks: int, threads: int, run: Any) -> None:
    """run(0..n_blocks-1), shared out among up to ``threads`` threads as each frees up (the
    kernels release the GIL); in this thread alone when there is one block or thread."""
    workers = min(n_blocks, check_threads(threads))
    if workers <= 1:
        for block in range(n_blocks):
            run(block)
        return
    blocks = iter(range(n_blocks))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while not errors:
            with lock:
                block = next(blocks, None)
            if block is None:
                return
            try:
                run(block)
            except BaseException as exc:  # re-raised in the calling thread
                errors.append(exc)

    helpers = [threading.Thread(target=work, daemon=True) for _ in range(workers - 1)]
    for helper in helpers:
        helper.start()
    work()
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]
