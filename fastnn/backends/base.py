"""The reference backend: every op the training core needs, written in plain ``self.xp``.

This file is the specification in code. A fast backend subclasses `Ops`, sets ``xp`` and
overrides only the hot ops it has kernels for (falling back to ``super()`` for the rest);
the parity tests hold every override to these definitions. How the ops compose into a
training step and an evaluation is `steps` (the reference executor of a `Plan`).

An `Ops` object is shared by every network in the process: it holds no per-run state. What
one run needs (prepared inputs, buffers, counters, threads) lives in its `Workspace`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import rng
from ..functions import ACTIVATIONS
from ..plan import DropoutSpec, HiddenSpec
from ..threads import blas_threads
from . import steps
from .optimizers import OptimizerState
from .workspace import Workspace

if TYPE_CHECKING:
    from ..plan import OptimizerSpec, Plan
    from ..preprocessing import Normalizer

Array = Any

#: floor on the batch-norm standard deviation (article semantics: no epsilon inside the root)
BN_STD_FLOOR = 1e-7
#: floor inside the cross-entropy logarithm
LOG_FLOOR = 1e-7


@dataclass
class HiddenCache:
    """What the backward pass of a hidden layer needs from its forward pass."""

    pre_activation: Array  # y: the activation's input (normalised when batch norm is on)
    mask: Array | None  # what z was multiplied by (keep mask, its scaled form, or None)
    u_hat: Array | None = None  # normalised u (batch norm only)
    std: Array | None = None  # per-node s (batch norm only)
    mean: Array | None = None  # per-node batch mean (batch norm only)
    var: Array | None = None  # per-node population variance (batch norm only)


class Ops:
    """Reference implementation of every op; ``xp`` is the array module."""

    name = "reference"
    xp: Any = None

    def overlaps_evaluation(self, workspace: Workspace) -> bool:
        """True when a trainer should evaluate epoch e on one thread while e + 1 trains on
        another (same results): the ops release the GIL and the run's threads are better
        spent so. The reference: never."""
        return False

    # ---- arrays ----
    def asarray(self, array: Any, dtype: str | None = None) -> Array:
        """Move a host array to this backend (copying), optionally casting."""
        return self.xp.array(array, dtype=dtype)

    def adopt(self, array: Any, dtype: str) -> Array:
        """A host array the caller hands over and no longer uses, on this backend in
        ``dtype``: the very array where it already is one there, else a copy."""
        return self.xp.asarray(array, dtype=dtype)

    def to_numpy(self, array: Array) -> Any:
        """A host NumPy array of a backend array."""
        import numpy

        return numpy.asarray(array)

    def to_float(self, value: Array) -> float:
        """A Python float of a 0-d backend array."""
        return float(value)

    # ---- random masks (counter-based: the same bits on every backend) ----
    def article_mask(self, key: int, d: int, keep: float, dtype: str) -> Array:
        """(d,) mask with exactly round(keep * d) ones chosen without replacement."""
        xp = self.xp
        values = rng.uint64_stream(xp, key, d)
        chosen = xp.argsort(values)[: rng.keep_count(keep, d)]
        mask = xp.zeros(d, dtype=dtype)
        mask[chosen] = 1.0
        return mask

    def bernoulli_mask(self, key: int, shape: tuple[int, int], keep: float, dtype: str) -> Array:
        """Per-element keep mask (1 with probability keep), the inverted-dropout draw."""
        xp = self.xp
        uniforms = rng.uniform01(xp, key, shape[0] * shape[1]).reshape(shape)
        return (uniforms < keep).astype(dtype)

    def dropout_multiplier(
        self, key: int, spec: DropoutSpec, rows: int, mode: str, dtype: str
    ) -> Array:
        """What a layer's nodes are multiplied by in one training step, made from the mask's
        key: article mode the (d,) 0/1 mask of exactly ``spec.keep_count`` nodes; inverted
        mode a (rows, d) Bernoulli mask divided by the keep ratio."""
        if mode == "article":
            return self.article_mask(key, spec.size, spec.keep, dtype)
        return self.bernoulli_mask(key, (rows, spec.size), spec.keep, dtype) / spec.keep

    # ---- layers ----
    def affine(self, x: Array, w: Array, b: Array) -> Array:
        """u = x W + b."""
        return x @ w + b

    def affine_backward(
        self, x: Array, w: Array, du: Array, need_dx: bool = True
    ) -> tuple[Array, Array, Array | None]:
        """dW = x^T du, db = column sums of du, dx = du W^T (None when not needed)."""
        dx = du @ w.T if need_dx else None
        return x.T @ du, du.sum(axis=0), dx

    def affine_backward_update(
        self, x: Array, w: Array, b: Array, du: Array, rate: float, decay: str | None,
        lam: float, need_dx: bool = True,
    ) -> Array | None:
        """A layer's last use in a training step: dx = du W^T (with the old W, None when not
        needed), then W -= rate * (x^T du + weight-decay gradient), b -= rate * sums of du."""
        dw, db, dx = self.affine_backward(x, w, du, need_dx)
        self.sgd_update(w, dw, rate, decay, lam)
        self.sgd_update(b, db, rate)
        return dx

    def apply_mask(self, x: Array, mask: Array | None) -> Array:
        """x multiplied by a keep mask or an evaluation scale (None: unchanged)."""
        return x if mask is None else x * mask

    def hidden_forward(
        self,
        u: Array,
        spec: HiddenSpec,
        gamma: Array | None,
        beta: Array | None,
        mask: Array | None,
        stats: tuple[Array, Array] | None = None,
    ) -> tuple[Array, HiddenCache]:
        """Batch norm (if on) + activation + mask: z = act(gamma * u_hat + beta) * mask.

        ``stats`` is (mean, var) to normalise with fixed statistics; None uses the batch's own.
        """
        xp = self.xp
        cache = HiddenCache(pre_activation=u, mask=mask)
        y = u
        if spec.batch_norm != "off":
            if stats is None:
                mean = u.mean(axis=0)
                var = ((u - mean) ** 2).mean(axis=0)
            else:
                mean, var = stats
            std = xp.maximum(xp.sqrt(var), BN_STD_FLOOR)
            u_hat = (u - mean) / std
            y = u_hat if gamma is None else gamma * u_hat + beta
            cache = HiddenCache(y, mask, u_hat=u_hat, std=std, mean=mean, var=var)
        forward, _ = ACTIVATIONS[spec.activation]
        z = self.apply_mask(forward(xp, y, spec.params), mask)
        return z, cache

    def hidden_backward(
        self, dz: Array, cache: HiddenCache, spec: HiddenSpec, gamma: Array | None
    ) -> tuple[Array, Array | None, Array | None]:
        """(du, dgamma, dbeta) from the gradient at z; dgamma/dbeta None without parameters."""
        _, derivative = ACTIVATIONS[spec.activation]
        da = self.apply_mask(dz, cache.mask)
        dy = da * derivative(self.xp, cache.pre_activation, spec.params)
        if spec.batch_norm == "off":
            return dy, None, None
        return self.batch_norm_backward(dy, cache, spec.batch_norm, gamma)

    def batch_norm_backward(
        self, dy: Array, cache: HiddenCache, variant: str, gamma: Array | None
    ) -> tuple[Array, Array | None, Array | None]:
        """Exact derivative of the article's batch norm; dgamma/dbeta per the variant."""
        u_hat, std = cache.u_hat, cache.std
        g = dy if gamma is None else gamma * dy
        du = (g - g.mean(axis=0) - u_hat * (g * u_hat).mean(axis=0)) / std
        if gamma is None:
            return du, None, None
        dgamma_nodes = (u_hat * dy).sum(axis=0)
        dbeta_nodes = dy.sum(axis=0)
        if variant == "bn":  # one scalar per layer: node gradients averaged over the nodes
            d = dy.shape[1]
            return du, (dgamma_nodes.sum() / d).reshape(1), (dbeta_nodes.sum() / d).reshape(1)
        return du, dgamma_nodes, dbeta_nodes

    # ---- output and loss ----
    def output_forward(self, u: Array, output: str) -> Array:
        """Softmax (max subtracted) or identity."""
        if output == "identity_mse":
            return u
        xp = self.xp
        e = xp.exp(u - u.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def loss(self, y: Array, t: Array, output: str) -> Array:
        """Cross-entropy -sum(t log max(y, 1e-7)) / N or MSE 0.5 sum((y - t)^2) / N (0-d)."""
        n = y.shape[0]
        if output == "identity_mse":
            return 0.5 * ((y - t) ** 2).sum() / n
        return -(t * self.xp.log(self.xp.maximum(y, LOG_FLOOR))).sum() / n

    def output_loss_grad(self, u: Array, t: Array, output: str) -> tuple[Array, Array, Array]:
        """(y, loss, du) with du = (y - t) / N for both output/loss pairs."""
        y = self.output_forward(u, output)
        return y, self.loss(y, t, output), (y - t) / y.shape[0]

    def output_grad(self, u: Array, t: Array, output: str) -> Array:
        """du = (output(u) - t) / N (the loss itself is not computed)."""
        y = self.output_forward(u, output)
        return (y - t) / y.shape[0]

    def weighted_output_grad(self, u: Array, t: Array, weights: Array, output: str) -> Array:
        """du = w_i (output(u)_i - t_i) / sum(w): the gradient of the batch's weighted mean
        loss sum(w_i l_i) / sum(w) (scikit-learn's ``sample_weight``)."""
        y = self.output_forward(u, output)
        total = weights.sum()
        return (y - t) * (weights / (total if total > 0 else 1.0))[:, None]

    def batch_tally(self, y: Array, t: Array, output: str) -> tuple[float, float]:
        """(sum of the rows' losses: `loss` times N, unweighted; rows whose argmax of y is
        that of t) of a batch's outputs y."""
        correct = (y.argmax(axis=1) == t.argmax(axis=1)).sum()
        return y.shape[0] * self.to_float(self.loss(y, t, output)), self.to_float(correct)

    def predicted_classes(self, y: Array) -> Any:
        """Host array of each row's argmax (the predicted class)."""
        return self.to_numpy(y.argmax(axis=1))

    # ---- weight decay and the update ----
    def weight_decay(self, w: Array, kind: str, lam: float) -> tuple[Array, Array]:
        """(penalty, gradient) of one weight matrix: L1 lam*sum|W|, L2 lam/2*sum W^2."""
        if kind == "l1":
            return lam * self.xp.abs(w).sum(), lam * self.xp.sign(w)
        return 0.5 * lam * (w * w).sum(), lam * w

    def sgd_update(
        self, param: Array, grad: Array, rate: float, decay: str | None = None, lam: float = 0.0
    ) -> None:
        """In place: param -= rate * (grad + weight-decay gradient of param); rate 0: no-op."""
        if not rate:
            return
        if decay is not None:
            grad = grad + self.weight_decay(param, decay, lam)[1]
        param -= rate * grad

    def optimizer_update(
        self, param: Array, grad: Array, slots: tuple[Array, ...], rate: float,
        spec: OptimizerSpec, step: int, decay: str | None = None, lam: float = 0.0,
    ) -> None:
        """In place: update ``step`` (1, 2, ...) of ``param`` by the rule of ``spec`` (see
        `fastnn.plan.OptimizerSpec`), its ``slots`` (velocity, or m and v) updated with it.

        Weight decay's gradient is added to ``grad`` (coupled), except for adamw, where
        ``rate`` times it is taken from ``param`` beside the step (decoupled); both use the
        parameter's value before this update. Rate 0: nothing changes.
        """
        if not rate:
            return
        xp = self.xp
        decay_grad = None if decay is None else self.weight_decay(param, decay, lam)[1]
        if decay_grad is not None and not spec.decoupled:
            grad = grad + decay_grad
        if spec.kind == "sgd":
            param -= rate * grad
        elif spec.kind in ("momentum", "nesterov"):
            (velocity,) = slots
            velocity[...] = spec.momentum * velocity + grad
            nesterov = spec.kind == "nesterov"
            param -= rate * (grad + spec.momentum * velocity if nesterov else velocity)
        else:
            first, second = slots
            first[...] = spec.beta1 * first + (1 - spec.beta1) * grad
            second[...] = spec.beta2 * second + (1 - spec.beta2) * (grad * grad)
            first_hat = first / (1 - spec.beta1**step)
            second_hat = second / (1 - spec.beta2**step)
            direction = first_hat / (xp.sqrt(second_hat) + spec.eps)
            if decay_grad is not None and spec.decoupled:
                direction = direction + decay_grad
            param -= rate * direction

    def update_running(
        self, running: tuple[Array, Array], cache: HiddenCache, momentum: float
    ) -> None:
        """In place: running (mean, var) = momentum * running + (1 - momentum) * the batch's."""
        mean, var = running
        mean[...] = momentum * mean + (1 - momentum) * cache.mean
        var[...] = momentum * var + (1 - momentum) * cache.var

    # ---- what one run owns ----
    def workspace(self, threads: int | None = None) -> Workspace:
        """A new workspace for one run (its own buffers, prepared inputs and counters)."""
        return Workspace(threads)

    def blas_thread_count(self, threads: int) -> int:
        """How many BLAS threads a run given ``threads`` CPU threads should use."""
        return threads

    @contextmanager
    def activate(self, workspace: Workspace) -> Iterator[None]:
        """Run a block of a run's work with its thread settings (set once, restored after)."""
        with blas_threads(self.blas_thread_count(workspace.threads)):
            yield

    def prepare_inputs(self, x: Array, workspace: Workspace) -> None:
        """Build whatever form of a run's input array the backend's kernels want (the
        reference: nothing). Called once per data set, where the data is known."""

    def inputs(self, x: Any, normalizer: Normalizer, dtype: str, what: str,
               workspace: Workspace | None) -> Array:
        """A data set's raw inputs ``x`` normalised into ``dtype`` on the backend, in the form
        its epochs and evaluations take (the reference: one array, `prepare_inputs` done in
        ``workspace`` when there is one). A backend may hold another form (numba: only the
        CSR form of sparse inputs); `dense_inputs` gives the array back."""
        array = self.adopt(normalizer.transform_to(x, dtype, what), dtype)
        if workspace is not None:
            self.prepare_inputs(array, workspace)
        return array

    def dense_inputs(self, x: Array) -> Array:
        """What `inputs` returned, as one array (the reference: x itself)."""
        return x

    def input_affine(self, x: Any, multiplier: Any, w: Array, b: Array) -> Array:
        """The first layer's u = (x times the input layer's ``multiplier``) W + b of a whole
        set in `inputs`' form (the reference: `dense_inputs`' array, in one product)."""
        return self.affine(self.apply_mask(self.dense_inputs(x), multiplier), w, b)

    # ---- larger units (a fast backend may compile these whole) ----
    def loss_and_classes(
        self, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any],
        x: Array, t: Array, workspace: Workspace,
    ) -> tuple[float, Any]:
        """(data loss, host array of predicted classes) of a whole set in evaluation mode.

        Article batch norm normalises with the statistics of all of ``x`` at once.
        """
        y = steps.forward_eval(self, plan, params, running, x)
        return self.to_float(self.loss(y, t, plan.output)), self.predicted_classes(y)

    def inputs_bytes(self, plan: Plan, rows: int) -> int:
        """Host bytes `inputs` holds for a set of ``rows`` rows, as far as is known before it
        looks at them (what `fit` counts before it starts). The reference: one array."""
        return rows * plan.sizes[0] * plan.itemsize

    def evaluation_bytes(self, plan: Plan, rows: int) -> int:
        """Host bytes an evaluation of ``rows`` rows holds at once (what `fit` counts before
        it starts). The reference: a layer of the whole set at a time, its input beside its
        u and z (with batch norm u_hat and y too), the output's u, y and the loss's
        temporary; with input dropout the scaled inputs as well."""
        sizes, per_hidden = plan.sizes, 2 if plan.batch_norm == "off" else 4
        layers = [(sizes[k - 1] if k > 1 else 0) + per_hidden * sizes[k]
                  for k in range(1, len(sizes) - 1)]
        widest = max([*layers, sizes[-2] + 3 * sizes[-1]])
        scaled = sizes[0] if plan.dropout[0].active else 0
        return rows * (widest + scaled) * plan.itemsize

    def warm_up(self, plan: Plan, *, weighted: bool = False) -> None:
        """Compile whatever the backend compiles for ``plan`` (its training rows weighted or
        not), before any timing starts (reference: nothing)."""

    def run_probe(self, plan: Plan, dtype: Any, *, weighted: bool = False,
                  before_evaluation: Callable[[], object] | None = None) -> None:
        """A 3-row epoch and evaluation of ``plan`` on throw-away arrays (what a compiling
        backend's `warm_up` runs so that every kernel of the plan is built), its rows weighted
        when asked; ``before_evaluation`` runs between the two."""
        import numpy

        training, extras, evaluation = self.probe_arguments(plan, dtype, weighted=weighted)
        with numpy.errstate(all="ignore"):
            self.train_epoch(*training, **extras)
            if before_evaluation is not None:
                before_evaluation()
            self.loss_and_classes(*evaluation)

    def probe_arguments(self, plan: Plan, dtype: Any, *, weighted: bool = False
                        ) -> tuple[tuple[Any, ...], dict[str, Any], tuple[Any, ...]]:
        """`run_probe`'s throw-away arrays: the positional and keyword arguments of its
        `train_epoch`, and the arguments of its `loss_and_classes`."""
        import numpy

        xp, rows = self.xp, 3
        params = {
            name: xp.full(shape, 0.5, dtype) if name.startswith(("W", "gamma"))
            else xp.zeros(shape, dtype)
            for name, shape in plan.param_shapes().items()
        }
        running = {
            k: (xp.zeros(plan.sizes[k], dtype), xp.ones(plan.sizes[k], dtype))
            for k in range(1, plan.n_layers)
        } if plan.batch_norm != "off" else {}
        x = numpy.linspace(-1.0, 1.0, rows * plan.sizes[0]).reshape(rows, -1).astype(dtype)
        t = numpy.eye(plan.sizes[-1], dtype=dtype)[numpy.arange(rows) % plan.sizes[-1]]
        x, t = self.asarray(x), self.asarray(t)
        workspace = self.workspace(threads=1)
        training = (plan, params, running, x, t, numpy.arange(rows), 0, workspace)
        extras: dict[str, Any] = {}
        if not plan.plain_sgd:  # the optimiser's state and a scheduled rate
            state = OptimizerState.zeros(plan.optimizer.slots, plan.param_shapes(), self, dtype)
            extras.update(optimizer=state, rate_factors=numpy.ones(1))
        if weighted:
            extras["weights"] = xp.ones(rows, dtype)
        return training, extras, (plan, params, running, x, t, workspace)

    def train_epoch(
        self, plan: Plan, params: Mapping[str, Array], running: Mapping[int, Any],
        x: Array, t: Array, order: Any, epoch: int, workspace: Workspace,
        optimizer: OptimizerState | None = None, rate_factors: Any = None,
        weights: Array | None = None, tally: Any = None,
    ) -> None:
        """One epoch of mini-batch training over the rows of x in ``order`` (a host index
        array).

        Step s trains on ``order[s*B:(s+1)*B]`` (a short last batch when B does not divide N)
        with the dropout masks of (epoch, s), at the plan's rates times ``rate_factors[s]``
        (a host float64 array of one factor per step from the schedule; None: 1); parameters,
        running statistics and ``optimizer``'s state (needed by every optimiser but plain sgd)
        change in place. ``weights`` (one per row of x, or None) weight each row's loss.
        ``tally`` (a host float64 array of (steps, 2), or None): row s gets step s's
        `batch_tally` (the sum of its rows' losses and its correct rows, in training mode,
        before its update).
        """
        batch_size = plan.batch_size
        for step, start in enumerate(range(0, len(order), batch_size)):
            index = self.asarray(order[start : start + batch_size])
            factor = 1.0 if rate_factors is None else float(rate_factors[step])
            steps.train_step(self, plan, params, running, x[index], t[index], epoch, step,
                             optimizer, factor, None if weights is None else weights[index],
                             None if tally is None else tally[step])
