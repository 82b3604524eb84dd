"""The whole epoch on the kernels: one training step as a fixed list of launches, captured
once as a graph of the device and replayed at every step.

The list is built per epoch and batch size (`KernelTraining._step`), the same kernels in the
same order as the per-op overrides and the reference executor (`steps.train_step`), and every
one of its launches takes the same arguments at every step: what changes from step to step is
made on the device from a step counter kept there (kernels/step.cu). The step's first launch,
step_begin, reads the counter (set by the host before the epoch: the epoch's dropout key and
step 0), writes that step's mask keys (`Plan.mask_key`, bit for bit) and its per-step rates and
Adam's corrections (a table the host uploads once per epoch, computed as the reference computes
them: `step_values`) to device memory, and counts the step; gather_batch copies the step's rows
of the epoch's order (uploaded once per epoch); the mask kernels read their layer's key
(``key_at``), optimizer_update its rate and corrections (``rate_at``, ``corrections_at``). Each
layer is updated as soon as its gradients exist; loss and accuracy are never read; nothing
inside an epoch waits for the device.

Where the device can capture (`KernelDevice.capture`) and the run's ``graphs`` option is on,
a step's list is captured once as a graph (``cupy.cuda.Graph``; on the CPU shim a recorded
list) and each step launches the graph; the short last batch has a graph of its own. A graph
is kept in the run's workspace and replayed while the epoch builds the same launches (the same
arrays, or views of the same memory, and equal scalars: `KernelBase.program`), captured again
when one differs (a new parameter array, another data set, another rate). Without graphs the
same launches run one by one: the same kernels, arguments and order, the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...cuda import COLUMN_BLOCK, GEMM_TILE, LINEAR_BLOCK
from ..codes import ACTIVATION_CODES, BATCH_NORM_CODES, DROPOUT_CODES, STATS_CODES
from ..workspace import Workspace
from .device import KernelBase
from .launches import GRID_Y_MAX, Launch, cdiv, linear_grid

if TYPE_CHECKING:
    from ...plan import Plan
    from ..optimizers import OptimizerState

Array = Any

#: the per-step values of a stepwise epoch, in the order of a table row (kernels/step.cu)
STEP_VALUES = ("rate", "batch-norm rate", "correction first", "correction second")


def step_values(plan: Plan, factor: float, update: int) -> tuple[float, float, float, float]:
    """One step's `STEP_VALUES`: the rates times the schedule's factor and Adam's bias
    corrections 1 - beta^t of update ``update``, in Python floats as `steps.train_step` and
    `Ops.optimizer_update` compute them."""
    spec = plan.optimizer
    return (plan.eta * factor, plan.bn_rate * factor, 1 - spec.beta1**update,
            1 - spec.beta2**update)


@dataclass
class _StepState:
    """The device memory the step's launches read what changes from step to step from."""

    counter: Array  # (2,) uint64: the epoch's dropout key, the index of the next step
    current: Array  # (1,) int64: the index of the step running
    keys: Array  # (len(plan.dropout),) uint64: the step's mask key of each layer
    values: Array  # (4,) float64: the step's STEP_VALUES
    table: Array | None  # (steps * 4,) float64: every step's STEP_VALUES; None: plain SGD
    order: Array  # (rows,) int64: the epoch's order


@dataclass
class _Batch:
    """The buffers of a training step: the gathered batch, the input mask, every layer's."""

    x: Array
    t: Array
    mask0: Array
    layers: list[_Layer]


@dataclass
class _Layer:
    """The per-step buffers of one layer (rows = the batch size); views of them per step."""

    u: Array
    z: Array | None = None
    y: Array | None = None
    u_hat: Array | None = None
    mean: Array | None = None
    var: Array | None = None
    std: Array | None = None
    du: Array | None = None
    dz: Array | None = None  # the gradient at z (hidden layers)
    dw: Array | None = None
    db: Array | None = None
    dgamma_nodes: Array | None = None
    dbeta_nodes: Array | None = None
    dgamma: Array | None = None
    dbeta: Array | None = None


class KernelTraining(KernelBase):
    """`train_epoch` as kernel launches (the reference's epoch when the kernels do not take
    the plan or its arrays)."""

    def _train_buffers(self, plan: Plan, workspace: Workspace) -> _Batch:
        """The step's buffers, for batches of up to plan.batch_size rows."""
        dtype, rows, sizes = np.dtype(plan.dtype), plan.batch_size, plan.sizes
        buffer = lambda name, shape: self._buffer(workspace, ("train", name), shape, dtype)  # noqa: E731
        x = buffer("x", (rows, sizes[0]))
        t = buffer("t", (rows, sizes[-1]))
        mask0 = buffer("mask0", (sizes[0],))
        layers = [_Layer(u=x)]  # layer 0: the (dropped) input batch
        normalised = plan.batch_norm != "off"
        for k in range(1, plan.n_layers + 1):
            d, d_in = sizes[k], sizes[k - 1]
            layer = _Layer(u=buffer(("u", k), (rows, d)), du=buffer(("du", k), (rows, d)),
                           dw=buffer(("dw", k), (d_in, d)), db=buffer(("db", k), (d,)))
            if k < plan.n_layers:
                layer.z = buffer(("z", k), (rows, d))
                layer.dz = buffer(("dz", k), (rows, d))
                if normalised:
                    layer.u_hat = buffer(("u_hat", k), (rows, d))
                    layer.y = (buffer(("y", k), (rows, d)) if plan.learnable_bn
                               else layer.u_hat)
                    for name in ("mean", "var", "std"):
                        setattr(layer, name, buffer((name, k), (d,)))
                if plan.learnable_bn:
                    layer.dgamma_nodes = buffer(("dgamma_nodes", k), (d,))
                    layer.dbeta_nodes = buffer(("dbeta_nodes", k), (d,))
                    layer.dgamma = buffer(("dgamma", k), (1,))
                    layer.dbeta = buffer(("dbeta", k), (1,))
            layers.append(layer)
        return _Batch(x, t, mask0, layers)

    def _step_state(self, plan: Plan, workspace: Workspace, rows: int, steps: int,
                    stepwise: bool) -> _StepState:
        """The step counter, keys, values, table and order buffers of an epoch of ``rows``
        rows in ``steps`` steps."""
        def buffer(name: str, shape: tuple[int, ...], dtype: Any) -> Array:
            return self._buffer(workspace, ("step", name), shape, dtype)

        width = len(STEP_VALUES)
        return _StepState(
            counter=buffer("counter", (2,), np.uint64), current=buffer("current", (1,), np.int64),
            keys=buffer("keys", (len(plan.dropout),), np.uint64),
            values=buffer("values", (width,), np.float64),
            table=buffer("table", (steps * width,), np.float64) if stepwise else None,
            order=buffer("order", (rows,), np.int64))

    def _step(self, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any],
              x: Array, t: Array, batch: _Batch, state: _StepState, n: int,
              slots: Mapping[str, tuple[Array, ...]] | None = None) -> list[Launch]:
        """Every launch of one training step on a batch of n rows, in the reference's order
        (`steps.train_step`), after step_begin and gather_batch; each launch's arguments are
        the same at every step (`_StepState`). ``slots``: each parameter's optimiser slots,
        updated by optimizer_update launches at the step's rates (``state.values``); None:
        plain SGD at the plan's rates."""
        dtype, sizes, n_layers = np.dtype(plan.dtype), plan.sizes, plan.n_layers
        launch = self.launch
        drop = DROPOUT_CODES["inverted" if plan.dropout_mode == "inverted" else "article"]
        bn = BATCH_NORM_CODES[plan.batch_norm]
        article = drop == DROPOUT_CODES["article"]
        values = state.values
        n_values = 0 if state.table is None else len(STEP_VALUES)
        launches: list[Launch] = [
            launch("step_begin", dtype, (1, 1, 1), (1, 1, 1), counter=state.counter,
                   table=state.table, n_values=n_values, current=state.current,
                   keys=state.keys, n_keys=len(state.keys), values=values),
            launch("gather_batch", dtype, linear_grid(n * (sizes[0] + sizes[-1])),
                   LINEAR_BLOCK, x=x, t=t, order=state.order, current=state.current,
                   batch_size=plan.batch_size, n=n, d=sizes[0], c=sizes[-1],
                   x_out=batch.x[:n], t_out=batch.t[:n]),
        ]

        def key_at(layer: int) -> Array:
            return state.keys[layer : layer + 1]

        def update(name: str, grad: Array, bn: bool = False, decay: bool = False) -> Launch:
            param = params[name]
            if slots is None:
                return launch.sgd(param, grad, plan.bn_rate if bn else plan.eta,
                                  plan.decay if decay else None, plan.lam)
            rate_at = values[1:2] if bn else values[0:1]
            return launch.optimizer(param, grad, slots.get(name, ()), plan.optimizer, 0.0,
                                    plan.decay if decay else None, plan.lam,
                                    rate_at=rate_at, corrections_at=values[2:4])

        layers, mask0 = batch.layers, batch.mask0
        rows_in = batch.x[:n]  # the gathered batch, dropped in place
        spec0 = plan.dropout[0]
        if spec0.active:  # the input layer's dropout, in place
            d0 = sizes[0]
            if article:
                launches.append(launch(
                    "article_mask", dtype, (cdiv(d0, LINEAR_BLOCK[0]), 1, 1), LINEAR_BLOCK,
                    key=0, key_at=key_at(0), d=d0, keep_count=spec0.keep_count, mask=mask0))
            launches.append(launch(
                "dropout_input", dtype, linear_grid(n * d0), LINEAR_BLOCK, x=rows_in, n=n, d=d0,
                drop=drop, key=0, key_at=key_at(0), keep=spec0.keep,
                mask=mask0 if article else None, out=rows_in))
        inputs = [rows_in]
        # forward
        for k in range(1, n_layers + 1):
            layer, d = layers[k], sizes[k]
            u = layer.u[:n]
            launches.append(launch.gemm("nn", inputs[-1], params[f"W{k}"], u, params[f"b{k}"],
                                        n, d, sizes[k - 1]))
            if k == n_layers:
                break
            spec, dropout = plan.hidden[k - 1], plan.dropout[k]
            z = layer.z[:n]
            launches.append(launch(
                "hidden_forward", dtype, (cdiv(d, 32), 1, 1), COLUMN_BLOCK, u=u, n=n, d=d,
                act=ACTIVATION_CODES[spec.activation], alpha=spec.alpha, bn=bn,
                gamma=params.get(f"gamma{k}"), beta=params.get(f"beta{k}"),
                stats=STATS_CODES["batch"], mean=layer.mean,
                var=layer.var, std_dev=layer.std,
                drop=drop if dropout.active else DROPOUT_CODES["none"],
                key=0, key_at=key_at(k) if dropout.active else None,
                keep_count=dropout.keep_count, keep=dropout.keep, mask_out=None,
                y_out=None if layer.y is None else layer.y[:n],
                u_hat_out=None if layer.u_hat is None else layer.u_hat[:n], z=z))
            inputs.append(z)
        # the output's gradient
        last = layers[n_layers]
        launches.append(launch.output_loss(last.u[:n], batch.t[:n], plan.output, None,
                                           last.du[:n], None))
        # backward, each layer updated as soon as its gradients exist
        du = last.du[:n]
        for k in range(n_layers, 0, -1):
            layer, d, d_in = layers[k], sizes[k], sizes[k - 1]
            w = params[f"W{k}"]
            below = layers[k - 1]
            if k > 1:  # dz of the layer below, with the old W
                launches.append(launch.gemm("nt", du, w, below.dz[:n], None, n, d_in, d))
            launches.append(launch.gemm("tn", inputs[k - 1], du, layer.dw, None, d_in, d, n))
            launches.append(launch.column_sums(du, n, d, layer.db))
            if plan.eta:
                launches.append(update(f"W{k}", layer.dw, decay=True))
                launches.append(update(f"b{k}", layer.db))
            if k == 1:
                break
            j, spec, dropout = k - 1, plan.hidden[k - 2], plan.dropout[k - 1]
            gamma = params.get(f"gamma{j}")
            nodes = plan.learnable_bn and bool(plan.bn_rate)
            launches.append(launch(
                "hidden_backward", dtype, (cdiv(d_in, 32), 1, 1), COLUMN_BLOCK,
                dz=below.dz[:n], n=n, d=d_in, act=ACTIVATION_CODES[spec.activation],
                alpha=spec.alpha,
                y=below.u[:n] if below.y is None else below.y[:n], bn=bn, gamma=gamma,
                u_hat=None if below.u_hat is None else below.u_hat[:n], std_dev=below.std,
                drop=drop if dropout.active else DROPOUT_CODES["none"],
                key=0, key_at=key_at(j) if dropout.active else None,
                keep_count=dropout.keep_count, keep=dropout.keep, du=below.du[:n],
                dgamma_nodes=below.dgamma_nodes if nodes else None,
                dbeta_nodes=below.dbeta_nodes if nodes else None))
            if nodes:
                dgamma, dbeta = below.dgamma_nodes, below.dbeta_nodes
                if plan.batch_norm == "bn":
                    launches.append(launch.node_mean(dgamma, d_in, below.dgamma))
                    launches.append(launch.node_mean(dbeta, d_in, below.dbeta))
                    dgamma, dbeta = below.dgamma, below.dbeta
                launches.append(update(f"gamma{j}", dgamma, bn=True))
                launches.append(update(f"beta{j}", dbeta, bn=True))
            du = below.du[:n]
        if plan.tracks_running:
            for k in range(1, n_layers):
                mean, var = running[k]
                launches.append(launch.update_running(mean, var, layers[k].mean, layers[k].var,
                                                      plan.bn_momentum))
        return launches

    def train_epoch(
        self, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any],
        x: Array, t: Array, order: Any, epoch: int, workspace: Workspace,
        optimizer: OptimizerState | None = None, rate_factors: Any = None,
        weights: Array | None = None, tally: Any = None,
    ) -> None:
        """The reference epoch as kernel launches: the order, the step counter and (past
        plain SGD) every step's rates and Adam's corrections uploaded once, then per step
        the step's graph (or its launches). Nothing is read back. Row weights, a ``tally``,
        or arrays the kernels do not take: the reference epoch."""
        stepwise = not plan.plain_sgd or rate_factors is not None
        n_steps = cdiv(len(order), plan.batch_size)
        if (weights is not None or tally is not None
                or (stepwise and not self._slots_fit(plan, params, optimizer))
                or not (rate_factors is None or np.shape(rate_factors) == (n_steps,))):
            super().train_epoch(plan, params, running, x, t, order, epoch, workspace,
                                optimizer, rate_factors, weights, tally)
            return
        # a host order as it is; a device one is read once, before the epoch
        host_order = order if isinstance(order, np.ndarray) else np.asarray(self.to_numpy(order))
        fits = (self._plan_fits(plan, params, running, x, t, plan.tracks_running)
                and host_order.ndim == 1 and np.issubdtype(host_order.dtype, np.integer)
                and cdiv(plan.batch_size, GEMM_TILE) <= GRID_Y_MAX)
        if fits and host_order.size:
            fits = 0 <= int(host_order.min()) and int(host_order.max()) < len(x)
        if not fits:
            super().train_epoch(plan, params, running, x, t, order, epoch, workspace,
                                optimizer, rate_factors)
            return
        total = len(host_order)
        if total == 0:
            return
        xp = self.xp
        adaptive = plan.optimizer.kind != "sgd"
        state = self._step_state(plan, workspace, total, n_steps, stepwise)
        # the epoch's uploads: its order, its dropout key and step 0, its per-step values
        state.order[...] = xp.asarray(np.ascontiguousarray(host_order, dtype=np.int64))
        state.counter[...] = xp.asarray(np.array([plan.epoch_key(epoch), 0], dtype=np.uint64))
        if state.table is not None:
            first_update = optimizer.steps + 1 if adaptive and optimizer is not None else 1
            factors = np.ones(n_steps) if rate_factors is None else rate_factors
            table = [step_values(plan, float(factors[step]), first_update + step)
                     for step in range(n_steps)]
            state.table[...] = xp.asarray(np.array(table, dtype=np.float64).reshape(-1))
        buffers = self._train_buffers(plan, workspace)
        slots = (optimizer.slots if optimizer is not None else {}) if stepwise else None
        capture = self.capture_for(workspace)
        full, last = plan.batch_size, total - (n_steps - 1) * plan.batch_size
        programs = {rows: self.program(workspace, ("train", rows),
                                       self._step(plan, params, running, x, t, buffers, state,
                                                  rows, slots), capture)
                    for rows in {min(full, total), last}}
        for start in range(0, total, full):
            programs[min(full, total - start)].launch()
        if adaptive and optimizer is not None:
            optimizer.steps += n_steps
        workspace.count("train_kernels")

    def _slots_fit(self, plan: Plan, params: Mapping[str, Array],
                   optimizer: OptimizerState | None) -> bool:
        """True when every parameter's optimiser slots are arrays the kernels update in place
        (plain sgd under a schedule needs none)."""
        names = plan.optimizer.slots
        if not names:
            return True
        if optimizer is None:
            return False
        for name in plan.param_shapes():
            slots = optimizer.slots.get(name)
            if slots is None or len(slots) != len(names) or name not in params:
                return False
            param = params[name]
            if not (self._fits(param, *slots) and self._writable(*slots)
                    and all(slot.shape == param.shape for slot in slots)):
                return False
        return True
