"""The whole training epoch of the numba backend: the plan as a `StepPlan`, the epoch's shared
buffers, the first layer's path, and the parts of `kernels.epoch.train_epoch_part` on one
thread or two.

Each step is computed in `PARTS` parts (rows of the batch forward, rows of each W backward)
that two threads run at once, meeting at a spin barrier (`kernels.sync`), or one thread runs
in turn: no number is summed across parts, so both give the same bits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..codes import BATCH_NORM_CODES, DECAY_CODES, OPTIMIZER_CODES, OUTPUT_CODES
from ..optimizers import OptimizerState
from ..workspace import Workspace
from .fit import (
    hidden_activations,
    layers_record,
    live_arrays,
    plan_fits,
    remembered,
    slots_record,
)
from .inputs import first_layer, kernel_inputs
from .kernels.common import (
    PARTS,
    Data,
    Rule,
    SparseBatch,
    StepBuffers,
    StepPlan,
    StepRates,
)

if TYPE_CHECKING:
    from ...plan import OptimizerSpec, Plan


def optimizer_rule(spec: OptimizerSpec, dtype: Any) -> Rule:
    """The `Rule` of an optimiser: its code and coefficients cast to the dtype as the
    reference's Python numbers are (1 - beta computed first, in float64)."""
    cast = np.dtype(dtype).type
    return Rule(OPTIMIZER_CODES[spec.kind], cast(spec.momentum), cast(spec.beta1),
                cast(1 - spec.beta1), cast(spec.beta2), cast(1 - spec.beta2), cast(spec.eps))


def step_rates(plan: Plan, n_steps: int, rate_factors: Any, first_update: int) -> StepRates:
    """Each step's rate and batch-norm rate (the plan's times the schedule's factor) and
    Adam's bias corrections 1 - beta^t of its update t = first_update + step, computed with
    Python floats as `steps.train_step` and `Ops.optimizer_update` compute them."""
    spec = plan.optimizer
    if rate_factors is None:  # x 1.0 changes no bits
        rates = np.full(n_steps, plan.eta, np.float64)
        bn_rates = np.full(n_steps, plan.bn_rate, np.float64)
    else:
        factors = [float(f) for f in rate_factors]
        rates = np.array([plan.eta * f for f in factors], np.float64)
        bn_rates = np.array([plan.bn_rate * f for f in factors], np.float64)
    if spec.adaptive:
        updates = range(first_update, first_update + n_steps)
        first = np.array([1 - spec.beta1**t for t in updates], np.float64)
        second = np.array([1 - spec.beta2**t for t in updates], np.float64)
    else:  # the rule reads no correction
        first = second = np.ones(n_steps, np.float64)
    return StepRates(rates, bn_rates, first, second)


def no_rates() -> StepRates:
    """Per-step rates of no steps: a `StepPlan`'s stand-in until an epoch brings its own."""
    return StepRates(*(np.zeros(0, np.float64) for _ in StepRates._fields))


def step_plan(plan: Plan, epoch: int, dtype: Any, update_running: bool, rates: StepRates,
              weighted: bool, tally: np.ndarray | None = None) -> StepPlan:
    """What every step of ``epoch`` does, as codes and scalars of the dtype (``tally``: where
    each step's sums of losses and correct rows go, or None)."""
    cast = np.dtype(dtype).type
    acts, alphas = hidden_activations(plan, dtype)
    return StepPlan(
        batch_size=plan.batch_size,
        acts=acts,
        alphas=alphas,
        bn=BATCH_NORM_CODES[plan.batch_norm],
        has_gamma=plan.learnable_bn,
        output=OUTPUT_CODES[plan.output],
        decay=DECAY_CODES[plan.decay],
        lam=cast(plan.lam),
        rule=optimizer_rule(plan.optimizer, dtype),
        rates=rates,
        weighted=weighted,
        inverted=plan.dropout_mode == "inverted",
        keep_ratios=np.array([spec.keep for spec in plan.dropout], np.float64),
        keep_counts=np.array([spec.keep_count for spec in plan.dropout], np.int64),
        epoch_key=np.uint64(plan.epoch_key(epoch)),
        update_running=update_running,
        momentum=cast(plan.bn_momentum),
        momentum_rest=cast(1 - plan.bn_momentum),
        tally=tally is not None,
        tallies=np.zeros((1, 2)) if tally is None else tally,
    )


class RunRecord(NamedTuple):
    """What every epoch of a run passes the kernel alike, built in its first epoch."""

    plan: StepPlan  # rates, epoch key and tally are each epoch's own (``_replace``)
    keep_ratios: tuple[float, ...]
    sparse_allowed: bool
    row_weights: np.ndarray
    blas: Any


def run_record(plan: Plan, x: np.ndarray, weights: np.ndarray | None, update_running: bool,
               workspace: Workspace, blas_for: Callable[[Any], Any]) -> RunRecord:
    """The `RunRecord` of a run of ``plan`` on x (``weights``: each row's, or None)."""
    options = workspace.options
    sparse_allowed = not (options.get("sparse_mode") == "auto"
                          and x.dtype.name not in options.get("sparse_train_dtypes", ()))
    record = step_plan(plan, 0, x.dtype, update_running, no_rates(), weights is not None)
    return RunRecord(record, tuple(record.keep_ratios), sparse_allowed,
                     np.ones(1, x.dtype) if weights is None else weights, blas_for(x.dtype))


def step_buffers(sizes: tuple[int, ...], rows: int, classes: int, dtype: Any,
                 keep_ratios: np.ndarray, inverted: bool, sparse: bool,
                 ) -> tuple[StepBuffers, tuple[SparseBatch, ...]]:
    """The shared buffers of an epoch of batches of up to ``rows`` rows, and each part's
    `SparseBatch` (of no size when the input is dense)."""
    n_layers = len(sizes) - 1
    widest = max(sizes)

    def per_layer(shape: Any, fill: float | None = None) -> tuple[np.ndarray, ...]:
        made = tuple(np.empty(shape(k), dtype) for k in range(n_layers + 1))
        if fill is not None:
            for array in made:
                array.fill(fill)
        return made

    multiplier = tuple(
        np.empty((rows if inverted else 1, sizes[k]), dtype) if keep_ratios[k] < 1.0
        else np.ones((1, 1), dtype)
        for k in range(n_layers)
    )
    buffers = StepBuffers(
        *(per_layer(lambda k: (rows, sizes[k])) for _ in range(6)),
        per_layer(lambda k: sizes[k], 0.0), per_layer(lambda k: sizes[k], 1.0),
        per_layer(lambda k: sizes[k], 1.0),
        tuple(np.empty((sizes[k], sizes[k + 1]), dtype) for k in range(n_layers)),
        multiplier, np.empty((rows, classes), dtype), np.empty(widest, dtype),
        per_layer(lambda k: sizes[k]), per_layer(lambda k: sizes[k]),
        np.empty(widest, dtype), np.empty(widest, dtype), per_layer(lambda k: sizes[k]),
        per_layer(lambda k: sizes[k]), np.ones(PARTS, np.int64), np.empty(rows, dtype),
        np.zeros((rows, 2)),
    )
    capacity = rows * sizes[0] if sparse else 0  # one thread keeps every row in part 0's
    parts = tuple(
        SparseBatch(np.zeros(2, np.int64), np.zeros(rows + 1, np.int64),
                    np.empty(capacity, np.int32), np.empty(capacity, dtype),
                    np.zeros(sizes[0] + 1, np.int64), np.empty(sizes[0], np.int64),
                    np.empty(capacity, np.int64), np.empty(capacity, dtype),
                    np.empty(rows, np.int64), np.empty(rows, dtype), np.empty(sizes[1], dtype))
        for _ in range(PARTS)
    )
    return buffers, parts


def train_epoch(kernels: Any, blas_for: Callable[[Any], Any], plan: Plan, params: Mapping[str, Any],
                running: Mapping[int, Any], x: Any, t: Any, order: np.ndarray, epoch: int,
                workspace: Workspace, *, threads: int, optimizer: OptimizerState | None = None,
                rate_factors: Any = None, weights: Any = None, tally: Any = None) -> bool:
    """One epoch of ``plan`` over the rows of x in ``order`` (int64, C-contiguous), updating
    the parameters, running statistics and the optimiser's state in place, its steps shared
    by ``threads`` (1, or `PARTS`) threads, at the plan's rates times ``rate_factors`` (one
    per step, or None), each row's loss weighted by ``weights`` (or None), each step's
    `Ops.batch_tally` written to its row of ``tally`` (or None); False, having done nothing,
    when the plan or the arrays do not fit.

    ``kernels``: the backend's kernel modules; ``blas_for(dtype)``: the `Blas` of a dtype.
    Counted in the workspace: ``sparse_steps``, ``train_threads_<threads>`` and the first
    layer's path (training runs sparse only for the ``sparse_train_dtypes`` when
    ``sparse_mode`` is "auto")."""
    call = epoch_call(kernels, blas_for, plan, params, running, x, t, order, epoch, workspace,
                      optimizer=optimizer, rate_factors=rate_factors, weights=weights,
                      tally=tally)
    if call is None:
        return False
    loop, arguments, n_steps = call
    sparse_steps = run_parts(loop, kernels.sync, threads, arguments)
    if optimizer is not None and plan.optimizer.slots:
        optimizer.steps += n_steps
    workspace.count("sparse_steps", sparse_steps)
    workspace.count(f"train_threads_{threads}")
    return True


def epoch_call(kernels: Any, blas_for: Callable[[Any], Any], plan: Plan,
               params: Mapping[str, Any], running: Mapping[int, Any], x: Any, t: Any,
               order: np.ndarray, epoch: int, workspace: Workspace, *,
               optimizer: OptimizerState | None = None, rate_factors: Any = None,
               weights: Any = None, tally: Any = None,
               ) -> tuple[Any, tuple[Any, ...], int] | None:
    """What `train_epoch` runs (its arguments as there): the epoch loop, the arguments that
    follow (me, threads, barrier) in its call, and the epoch's step count; None when the
    plan or the arrays do not fit."""
    update_running = plan.tracks_running and bool(running)
    array = kernel_inputs(x)  # a `CsrRows`: rows are gathered from its CSR form
    if not (plan_fits(plan, array, t, len(x)) and order.ndim == 1 and order.size
            and 0 <= order.min() and order.max() < len(x)):  # else the reference raises
        return None
    n_steps = -(-len(order) // plan.batch_size)
    if not (rate_factors is None or np.shape(rate_factors) == (n_steps,)):
        return None
    if not (tally is None or (isinstance(tally, np.ndarray) and tally.dtype == np.float64
                              and tally.shape == (n_steps, 2) and tally.flags.c_contiguous
                              and tally.flags.writeable)):
        return None
    if not (weights is None or (isinstance(weights, np.ndarray) and weights.dtype == x.dtype
                                and weights.shape == (len(x),) and weights.flags.c_contiguous)):
        return None
    layers, slots = remembered(
        workspace, "train", (plan, x.dtype, update_running, *live_arrays(params, running,
                                                                         optimizer)),
        lambda: (layers_record(plan, params, running, x.dtype, update_running),
                 slots_record(plan, optimizer, x.dtype)))
    if layers is None or slots is None:
        return None
    run = remembered(workspace, "train run", (plan, x, weights, update_running),
                     lambda: run_record(plan, x, weights, update_running, workspace, blas_for))
    csr = first_layer(x, layers.weights[0], "train", workspace, run.sparse_allowed)
    first_update = 1 if optimizer is None else optimizer.steps + 1
    plan_record = run.plan._replace(
        rates=step_rates(plan, n_steps, rate_factors, first_update),
        epoch_key=np.uint64(plan.epoch_key(epoch)), tally=tally is not None,
        tallies=run.plan.tallies if tally is None else tally)
    shape = (plan.sizes, min(plan.batch_size, len(order)), t.shape[1], x.dtype,
             run.keep_ratios, plan_record.inverted, csr.sparse)
    buffers, parts = workspace.buffer(  # every epoch of the run fills them anew
        ("numba step buffers", *shape),
        lambda: step_buffers(*shape[:4], plan_record.keep_ratios, *shape[5:]), lambda _: True)
    arguments = (Data(array, t, csr, run.row_weights), order, layers, slots, plan_record,
                 run.blas, buffers, parts)
    loop = kernels.epoch.epoch_loop(kernels.epoch.epoch_variant(plan_record))
    return loop, arguments, n_steps


def run_parts(kernel: Any, sync: Any, threads: int, arguments: tuple[Any, ...]) -> int:
    """``kernel`` (`train_epoch_part`) with its parts on ``threads`` threads: this one and, for
    2, a helper. A thread that fails abandons the barrier, so the other returns; the error is
    raised here. Returns the kernel's count of sparse steps."""
    barrier = sync.new_barrier()
    if threads < 2:
        return int(kernel(0, 1, barrier, *arguments))
    errors: list[BaseException] = []

    def helper() -> None:
        try:
            kernel(1, threads, barrier, *arguments)
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)
            sync.abandon(barrier)

    thread = threading.Thread(target=helper, daemon=True, name="fastnn-step-part")
    try:
        thread.start()
    except RuntimeError:  # no thread to be had: the parts run one after the other
        return int(kernel(0, 1, barrier, *arguments))
    try:
        steps = int(kernel(0, threads, barrier, *arguments))
    except BaseException:
        sync.abandon(barrier)
        raise
    finally:
        thread.join()
    if errors:
        raise errors[0]
    if steps < 0:
        raise RuntimeError("a training thread stopped before the epoch's end")
    return steps
