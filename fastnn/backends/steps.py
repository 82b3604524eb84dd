"""The reference executor of a `Plan`: one training step and one evaluation, op by op.

Each function composes the per-op methods of an ``ops`` object (`base.Ops` or a subclass), so a
backend that overrides an op gets it used here too; a backend that compiles a whole epoch (the
numba backend) runs the same ops, in the same order, through its kernels. ``params`` maps
parameter names (W1.., b1.., gamma1.., beta1..) to live backend arrays; ``running`` maps
hidden layer k to its running (mean, var) arrays. Both are changed in place, never replaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..plan import Plan
    from .base import HiddenCache, Ops
    from .optimizers import OptimizerState

Array = Any


def step_multipliers(ops: Ops, plan: Plan, epoch: int, step: int, rows: int) -> dict[int, Array]:
    """The dropout multiplier of every layer with dropout at one training step (from keys)."""
    return {
        spec.layer: ops.dropout_multiplier(
            plan.mask_key(epoch, step, spec.layer), spec, rows, plan.dropout_mode, plan.dtype
        )
        for spec in plan.dropout
        if spec.active
    }


def eval_multipliers(plan: Plan) -> dict[int, float]:
    """What evaluation multiplies each layer's nodes by (article mode: the keep ratio)."""
    return {k: scale for k, scale in enumerate(plan.eval_scales()) if scale != 1.0}


def forward(
    ops: Ops, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any], x: Array,
    multipliers: Mapping[int, Any], batch_stats: bool, keep: bool = True,
) -> tuple[Array, list[Array], list[HiddenCache]]:
    """Output pre-activation u_L, the input of every layer, and the hidden layers' caches.

    ``batch_stats``: batch norm uses the statistics of ``x`` itself; else ``running``'s.
    ``keep`` False: no inputs or caches are kept (an evaluation of a whole set then holds one
    layer's arrays at a time; the same values).
    """
    inputs: list[Array] = []
    caches: list[HiddenCache] = []
    if keep:  # a batch: its masked inputs are kept for the backward pass
        z = ops.apply_mask(x, multipliers.get(0))
        inputs.append(z)
        u = ops.affine(z, params["W1"], params["b1"])
    else:  # a whole set, in `Ops.inputs`' form
        u = ops.input_affine(x, multipliers.get(0), params["W1"], params["b1"])
    for k in range(1, plan.n_layers):
        stats = None if batch_stats or k not in running else running[k]
        z, cache = ops.hidden_forward(
            u, plan.hidden[k - 1], params.get(f"gamma{k}"), params.get(f"beta{k}"),
            multipliers.get(k), stats,
        )
        del u  # with ``keep`` False the layer's arrays go as soon as the next one is made
        if keep:
            inputs.append(z)
            caches.append(cache)
        del cache
        u = ops.affine(z, params[f"W{k + 1}"], params[f"b{k + 1}"])
    return u, inputs, caches


def loss_and_grads(
    ops: Ops, plan: Plan, params: Mapping[str, Array], x: Array, t: Array,
    multipliers: Mapping[int, Any],
) -> tuple[Array, dict[str, Array]]:
    """(loss with the weight-decay penalty as a 0-d array, every parameter's gradient) of one
    batch, with the batch's own statistics; nothing is updated."""
    u, inputs, caches = forward(ops, plan, params, {}, x, multipliers, batch_stats=True)
    _, loss, du = ops.output_loss_grad(u, t, plan.output)
    grads: dict[str, Array] = {}
    for k in range(plan.n_layers, 0, -1):
        dw, db, dz = ops.affine_backward(inputs[k - 1], params[f"W{k}"], du, need_dx=k > 1)
        grads[f"W{k}"], grads[f"b{k}"] = dw, db
        if k > 1:
            du, dgamma, dbeta = ops.hidden_backward(
                dz, caches[k - 2], plan.hidden[k - 2], params.get(f"gamma{k - 1}")
            )
            if dgamma is not None:
                grads[f"gamma{k - 1}"], grads[f"beta{k - 1}"] = dgamma, dbeta
    if plan.decay is not None:
        for k in range(1, plan.n_layers + 1):
            penalty, decay_grad = ops.weight_decay(params[f"W{k}"], plan.decay, plan.lam)
            grads[f"W{k}"] = grads[f"W{k}"] + decay_grad
            loss = loss + penalty
    order = list(plan.param_shapes())
    return loss, {name: grads[name] for name in order}


def train_step(
    ops: Ops, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any], x: Array,
    t: Array, epoch: int, step: int, optimizer: OptimizerState | None = None,
    rate_factor: float = 1.0, weights: Array | None = None, tally: Any = None,
) -> None:
    """One training step on a batch already on the backend, with the masks of (epoch, step),
    at the plan's rates times ``rate_factor`` (the schedule's), by the plan's optimiser
    (``optimizer`` holds its state; plain sgd needs none).

    Each layer is updated as soon as its gradients exist (nothing later reads its old values):
    the same arithmetic as computing every gradient first. SGD fuses the update into the
    weight-gradient op (`Ops.affine_backward_update`); the other optimisers update each
    parameter with `Ops.optimizer_update` at update number ``optimizer.steps``. ``weights``
    (one per row, or None) make the step descend the batch's weighted mean loss. ``tally``
    (a host float64 array of 2, or None) gets the batch's `Ops.batch_tally` before the update.
    """
    rate, bn_rate = plan.eta * rate_factor, plan.bn_rate * rate_factor
    spec = plan.optimizer
    if spec.kind != "sgd":
        if optimizer is None:
            raise ValueError(f"optimizer {spec.kind} needs its state (an OptimizerState)")
        optimizer.steps += 1

    def update(name: str, grad: Array, rate: float, decay: bool = False) -> None:
        param = params[name]
        if spec.kind == "sgd":
            ops.sgd_update(param, grad, rate, plan.decay if decay else None, plan.lam)
        else:
            ops.optimizer_update(param, grad, optimizer.slots[name], rate, spec, optimizer.steps,
                                 plan.decay if decay else None, plan.lam)

    multipliers = step_multipliers(ops, plan, epoch, step, x.shape[0])
    u, inputs, caches = forward(ops, plan, params, running, x, multipliers, batch_stats=True)
    if tally is not None:
        tally[:] = ops.batch_tally(ops.output_forward(u, plan.output), t, plan.output)
    if weights is None:
        du = ops.output_grad(u, t, plan.output)
    else:
        du = ops.weighted_output_grad(u, t, weights, plan.output)
    for k in range(plan.n_layers, 0, -1):
        if spec.kind == "sgd":
            dz = ops.affine_backward_update(
                inputs[k - 1], params[f"W{k}"], params[f"b{k}"], du, rate, plan.decay, plan.lam,
                need_dx=k > 1,
            )
        else:
            dw, db, dz = ops.affine_backward(inputs[k - 1], params[f"W{k}"], du, need_dx=k > 1)
            update(f"W{k}", dw, rate, decay=True)
            update(f"b{k}", db, rate)
        if k > 1:
            gamma = params.get(f"gamma{k - 1}")
            du, dgamma, dbeta = ops.hidden_backward(dz, caches[k - 2], plan.hidden[k - 2], gamma)
            if dgamma is not None:
                update(f"gamma{k - 1}", dgamma, bn_rate)
                update(f"beta{k - 1}", dbeta, bn_rate)
    if plan.tracks_running:
        for k, cache in enumerate(caches, start=1):
            ops.update_running(running[k], cache, plan.bn_momentum)


def forward_eval(
    ops: Ops, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any], x: Array
) -> Array:
    """Outputs y of a whole set in evaluation mode (article batch norm: the set's statistics)."""
    batch_stats = plan.bn_eval == "batch" or not running
    u, _, _ = forward(ops, plan, params, running, x, eval_multipliers(plan), batch_stats,
                      keep=False)
    return ops.output_forward(u, plan.output)


def forward_inference(
    ops: Ops, plan: Plan, params: Mapping[str, Array], statistics: Mapping[int, Any], x: Array
) -> Array:
    """Outputs y in evaluation mode with batch norm normalising by the given per-layer
    (mean, var), so each row's output depends on that row alone."""
    u, _, _ = forward(ops, plan, params, statistics, x, eval_multipliers(plan), batch_stats=False,
                      keep=False)
    return ops.output_forward(u, plan.output)


def population_statistics(
    ops: Ops, plan: Plan, params: Mapping[str, Array], x: Array
) -> dict[int, tuple[Array, Array]]:
    """Each hidden layer's (mean, var) over all rows of ``x`` in evaluation mode, the layers
    below normalised with theirs: the statistics the article's whole-set evaluation of ``x``
    uses, summed in float64 (so they do not depend on how the rows lie in memory) and
    returned in the plan's dtype."""
    xp = ops.xp
    multipliers = eval_multipliers(plan)
    statistics: dict[int, tuple[Array, Array]] = {}
    if plan.n_layers == 1:
        return statistics
    u = ops.input_affine(x, multipliers.get(0), params["W1"], params["b1"])
    for k in range(1, plan.n_layers):
        wide = u.astype(xp.float64)
        mean = wide.mean(axis=0)
        var = ((wide - mean) ** 2).mean(axis=0)
        statistics[k] = (mean.astype(plan.dtype), var.astype(plan.dtype))
        z, _ = ops.hidden_forward(
            u, plan.hidden[k - 1], params.get(f"gamma{k}"), params.get(f"beta{k}"),
            multipliers.get(k), statistics[k],
        )
        if k + 1 < plan.n_layers:
            u = ops.affine(z, params[f"W{k + 1}"], params[f"b{k + 1}"])
    return statistics
