"""The numba backend's training epoch: a compiled loop around the per-op kernels, in parts.

`train_epoch_part` runs the steps of `fastnn.backends.steps.train_step` in the same order, each
op by the kernel that the backend's override of that op runs: the mask from its key
(`masks`), `layers.affine`, `layers.activate_rows` (with batch norm
`layers.normalise_activate`), `layers.output_grad_rows`, `layers.affine_backward_update_rows`,
`layers.derivative_rows` (with batch norm `layers.batch_norm_backward_sums` and ``_finish``),
`layers.layer_parameter_grads` + `layers.sgd_vector`, `layers.update_running`; with another
optimiser than plain SGD the
gradients are formed apart (`layers.affine_backward_rows`, `sparse.sparse_weight_grad`) and
every parameter goes through `layers.optimizer_update` with its slots (`Slots`), at the rates
and bias corrections of each step (`StepRates`, from the host). It re-derives nothing: what
an op means lives in its kernel. With a CSR form of x, layer 1's product and update skip x's
zeros (`sparse`). Each hidden layer has its own activation code and alpha
(`StepPlan.acts`/``alphas``); the kernels take their arrays in records (`common`), built once
per layer and step outside the row loops. Rows weighted by ``Data.row_weights`` scale their
output gradients (`layers.row_weight_scales`).

Every step is computed in `PARTS` parts, so that two threads can share it:

- forward, by rows of the batch: a row's pre-activations, activations and output gradient
  need no other row (with batch norm, the statistics and normalisation go by columns, between
  two barriers);
- backward, by rows of each W (the layer's inputs): dx[:, rows] = du W[rows]^T and the update
  of W[rows] need no other rows, and neither does the hidden layer's batch-norm backward of
  those columns (without batch norm it goes by rows of the batch); the bias by columns of du;
- one thread per part, meeting at a spin barrier (`sync`) between the phases; with one thread
  the BLAS products still go part by part, one after the other, and the rest (where a row or
  column's numbers never depend on which others are computed with it) over everything at once.

No number is summed across parts, and BLAS always sees the same blocks, so a run gives the same
bits with one thread or two.

The loop is compiled once per `EpochVariant` (`epoch_loop`): the plan's choices that decide
which kernels it calls are constants of its code, so a plain-SGD run without batch norm or
dropout compiles none of the kernels of those (about a third of a first run's compile time).
Each variant's backward pass and updates are a driver of their own, `backward_step` (named
after the variant, so that the symbol a cached loop calls means the same code in every
process), which `train_epoch_part` calls once per step: a first run's compile helper
(`fastnn.backends.numba.compile_helper`) compiles it in a second process while this one
compiles the rest of the loop.
"""

from __future__ import annotations

import threading
from collections import namedtuple
from typing import Any

import numpy as np
from numba import typeof, types

from ...codes import BN_OFF, DECAY_NONE, OPT_SGD
from .common import (
    PARTS,
    Activation,
    BatchNorm,
    ColumnMeans,
    Corrections,
    ForwardValues,
    GammaBeta,
    Moments,
    Normalised,
    Statistics,
    Update,
    jit,
    jit_driver,
)
from .layers import (
    activate_rows,
    affine,
    affine_backward_rows,
    affine_backward_update_rows,
    batch_norm_backward_finish,
    batch_norm_backward_sums,
    batch_statistics_columns,
    column_sums_range,
    derivative_rows,
    layer_parameter_grads,
    multiplier_row,
    normalise_activate,
    optimizer_update,
    output_grad_rows,
    row_weight_scales,
    sgd_vector,
    std_columns,
    update_running,
    weighted_output_grad_rows,
)
from .masks import fill_article_mask, fill_bernoulli_rows, fold_counter
from .sparse import (
    all_finite,
    csr_row,
    gather_targets,
    sparse_affine_rows,
    sparse_batch,
    sparse_weight_grad,
    sparse_weight_update,
    transpose_part,
)
from .sync import wait_for_all


@jit
def part_range(size, part):
    """The slice of 0..size-1 that part ``part`` of `PARTS` computes."""
    return size * part // PARTS, size * (part + 1) // PARTS


@jit
def owned(size, first, last):
    """The slice of 0..size-1 that parts first..last-1 compute together (contiguous)."""
    return part_range(size, first)[0], part_range(size, last - 1)[1]


@jit
def mark_finite(finite, first, last, value):
    """Record whether the rows of W1 that parts first..last-1 own are finite (in ``first``'s
    entry; the others say yes)."""
    finite[first] = 1 if value else 0
    for part in range(first + 1, last):
        finite[part] = 1


@jit
def all_set(flags):
    """Whether every entry of ``flags`` is 1 (a loop: ``flags.min()`` compiles NumPy's whole
    reduction machinery)."""
    for flag in flags:
        if flag != 1:
            return False
    return True


@jit
def sum_tally(row_tally, into):
    """into = the column sums of a batch's `layers.tally_rows`, in row order."""
    into[0] = 0.0
    into[1] = 0.0
    for i in range(row_tally.shape[0]):
        into[0] += row_tally[i, 0]
        into[1] += row_tally[i, 1]


@jit
def rows_of(multiplier, low, high):
    """Rows low..high-1 of a (1 or n, 1 or d) multiplier (a broadcast row stays as it is)."""
    return multiplier[low:high] if multiplier.shape[0] > 1 else multiplier[:]


@jit
def gather_batch(x, csr, t, order, start, masked, multiplier, z0, t_batch):
    """z0 = x[order[start:start+n]] * input multiplier (when ``masked``: a (1 or n, 1 or d)
    multiplier), t_batch = the matching targets. An x of no rows (a run that keeps only the
    CSR form of its inputs) has its rows made from ``csr``: its nonzeros, zeros elsewhere."""
    n, d = z0.shape
    expanded = np.empty(d, z0.dtype)
    from_csr = x.shape[0] == 0
    row = np.zeros(d if from_csr else 0, z0.dtype)
    for i in range(n):
        index, target = order[start + i], z0[i]
        source = csr_row(csr, index, row) if from_csr else x[index]
        if masked:
            mask_row = multiplier_row(multiplier, i, expanded)
            for j in range(d):
                target[j] = source[j] * mask_row[j]
        else:
            for j in range(d):
                target[j] = source[j]
        source, target = t[order[start + i]], t_batch[i]
        for j in range(target.shape[0]):
            target[j] = source[j]


#: the choices of a `StepPlan` an epoch loop is compiled for, each of which decides whether
#: the loop calls kernels that take a second or more to compile: batch norm, plain SGD (no
#: optimiser state), any dropout, weighted rows. The plan's other choices are read at run
#: time (their kernels compile quickly)
EpochVariant = namedtuple("EpochVariant", "batch_norm plain_sgd dropout weighted")

_LOOPS: dict[EpochVariant, Any] = {}
#: the `backward_step` each loop calls, by variant (made with the loop)
_BACKWARDS: dict[EpochVariant, Any] = {}
_LOOPS_LOCK = threading.Lock()


def epoch_variant(plan: Any) -> EpochVariant:
    """The `EpochVariant` of a `StepPlan`."""
    return EpochVariant(
        batch_norm=bool(plan.bn != BN_OFF), plain_sgd=bool(plan.rule.code == OPT_SGD),
        dropout=bool((np.asarray(plan.keep_ratios) < 1.0).any()), weighted=bool(plan.weighted))


def epoch_loop(variant: EpochVariant) -> Any:
    """The compiled `train_epoch_part` of ``variant`` (made on first use and shared by every
    run; it compiles on its first call)."""
    with _LOOPS_LOCK:
        loop = _LOOPS.get(variant)
        if loop is None:
            loop = _LOOPS[variant] = _epoch_loop(variant)
        return loop


def backward_loop(variant: EpochVariant) -> Any:
    """The compiled `backward_step` that the loop of ``variant`` calls for each step."""
    epoch_loop(variant)
    with _LOOPS_LOCK:
        return _BACKWARDS[variant]


def backward_signature(barrier: Any, arguments: tuple[Any, ...]) -> tuple[Any, ...]:
    """The argument types `train_epoch_part` calls its `backward_step` with, given the
    loop's ``barrier`` and the ``arguments`` that follow it (what `training.train_epoch`
    passes): the loop's own, each layer's width, the step and whether it went sparse."""
    return (types.int64, types.int64, typeof(barrier), *map(typeof, arguments),
            types.int64[::1], types.int64, types.boolean)


def epoch_loops() -> dict[EpochVariant, Any]:
    """The epoch loops made so far, by variant."""
    with _LOOPS_LOCK:
        return dict(_LOOPS)


def _epoch_loop(variant: EpochVariant) -> Any:
    """`train_epoch_part` with the variant's choices as constants: numba drops the branches
    they rule out before typing, so the kernels only those branches call are never compiled
    (the choices are part of the kernel's cache key)."""
    BATCH_NORM, PLAIN_SGD, DROPOUT, WEIGHTED = (bool(choice) for choice in variant)  # noqa: N806

    def backward_step(me, threads, barrier, data, order, layers, slots, plan, blas, buffers,
                      parts, sizes, step, use_sparse):
        """The backward pass and updates of step ``step`` of `train_epoch_part` (its arguments,
        ``sizes``: each layer's width, and whether the step took the sparse first layer): this
        thread's parts, by rows of each W. Returns 0, or -1 when the barrier was abandoned."""
        x, t, csr = data.x, data.t, data.csr
        weights, biases, gammas, betas = layers.weights, layers.biases, layers.gammas, layers.betas
        z, u, u_hat, y = buffers.z, buffers.u, buffers.u_hat, buffers.y
        du, dz = buffers.du, buffers.dz
        mean, var, std, multiplier = buffers.mean, buffers.var, buffers.std, buffers.multiplier
        t_batch, db, finite = buffers.t_batch, buffers.db, buffers.finite
        n_layers = len(weights)
        batch_size = plan.batch_size
        dtype = x.dtype
        zero = dtype.type(0.0)
        bn, has_gamma = plan.bn, plan.has_gamma
        rule, rates = plan.rule, plan.rates
        unused = np.ones(1, dtype)  # the forward gamma/beta of a backward that does not recompute
        first, last = (me, me + 1) if threads > 1 else (0, PARTS)
        input_masked = plan.keep_ratios[0] < 1.0
        start = step * batch_size
        n = min(batch_size, order.shape[0] - start)
        r0, r1 = owned(n, first, last)
        update = Update(dtype.type(rates.rates[step]), plan.decay, plan.lam)
        bias_update = Update(update.rate, DECAY_NONE, plan.lam)
        bn_update = Update(dtype.type(rates.bn_rates[step]), DECAY_NONE, plan.lam)
        corrections = Corrections(dtype.type(rates.corrections_first[step]),
                                  dtype.type(rates.corrections_second[step]))
        # each layer updated as soon as its gradients exist
        for k in range(n_layers, 0, -1):
            grad = du[k][:n]
            sparse_update = k == 1 and use_sparse and all_finite(grad)
            if k == 1 and use_sparse and not sparse_update:  # the dense way needs x's rows
                gather_batch(x, csr, t, order, start + r0, input_masked,
                             rows_of(multiplier[0], r0, r1), z[0][r0:r1], t_batch[r0:r1])
                if not wait_for_all(barrier, threads):
                    return -1
            h = k - 1
            i0, i1 = owned(sizes[h], first, last)
            dw = buffers.dw[h]
            if sparse_update:
                if PLAIN_SGD:
                    mark_finite(finite, first, last, sparse_weight_update(
                        parts, first, i0, i1, grad, weights[0], update.rate, update.decay,
                        update.lam, dw))
                else:
                    sparse_weight_grad(parts, first, i0, i1, grad, dw)
                    optimizer_update(weights[0][i0:i1], dw[i0:i1],
                                     slots.weights_first[0][i0:i1],
                                     slots.weights_second[0][i0:i1], rule, update,
                                     corrections)
                    mark_finite(finite, first, last, all_finite(weights[0][i0:i1]))
            else:
                for part in range(first, last):  # BLAS: always by parts (same sums)
                    p0, p1 = part_range(sizes[h], part)
                    if PLAIN_SGD:
                        affine_backward_update_rows(blas, z[h][:n], weights[h], grad, update,
                                                    k > 1, dz[h][:n], dw, p0, p1)
                    else:
                        affine_backward_rows(blas, z[h][:n], weights[h], grad, k > 1, dz[h][:n],
                                             dw, p0, p1)
                        optimizer_update(weights[h][p0:p1], dw[p0:p1],
                                         slots.weights_first[h][p0:p1],
                                         slots.weights_second[h][p0:p1], rule, update,
                                         corrections)
                if k == 1 and csr.sparse:
                    mark_finite(finite, first, last, all_finite(weights[0][i0:i1]))
            j0, j1 = owned(sizes[k], first, last)
            column_sums_range(grad, db, j0, j1)
            if PLAIN_SGD:
                sgd_vector(biases[h][j0:j1], db[j0:j1], update.rate)
            else:
                optimizer_update(biases[h][j0:j1], db[j0:j1], slots.biases_first[h][j0:j1],
                                 slots.biases_second[h][j0:j1], rule, bias_update, corrections)
            if not wait_for_all(barrier, threads):
                return -1
            if k > 1:  # hidden layer h's backward
                # through mask and activation, by rows (whole rows: the same bits whatever the
                # split, vectorised exp/tanh included); without batch norm that is all
                activated = y[h] if BATCH_NORM and has_gamma else (
                    u_hat[h] if BATCH_NORM else u[h])
                activation = Activation(plan.acts[h - 1], plan.alphas[h - 1])
                derivative_rows(dz[h][r0:r1], rows_of(multiplier[h], r0, r1), activation,
                                activated[r0:r1], du[h][r0:r1])
                if not wait_for_all(barrier, threads):
                    return -1
                if BATCH_NORM:  # batch norm: its sums by columns, its second pass by rows
                    norm = BatchNorm(bn, gammas[h - 1], betas[h - 1], has_gamma)
                    node_sums = GammaBeta(buffers.dgamma_nodes[h], buffers.dbeta_nodes[h])
                    # what the forward pass stored, for these rows and for the whole batch
                    own_rows = ForwardValues(False, u[h][r0:r1], mean[h], std[h], unused,
                                             unused, u_hat[h][r0:r1], activated[r0:r1])
                    column_means = ColumnMeans(buffers.mean_g[h], buffers.mean_gu[h])
                    batch = ForwardValues(False, u[h][:n], mean[h], std[h], unused, unused,
                                          u_hat[h][:n], activated[:n])
                    batch_norm_backward_sums(dz[h][:n], rows_of(multiplier[h], 0, n),
                                             activation, norm, batch, True, du[h][:n],
                                             node_sums, column_means, i0, i1)
                    if not wait_for_all(barrier, threads):
                        return -1
                    batch_norm_backward_finish(norm, own_rows, du[h][r0:r1], column_means, 0,
                                               sizes[h])
                    if not wait_for_all(barrier, threads):
                        return -1
            if BATCH_NORM and has_gamma and k > 1 and bn_update.rate != zero and first == 0:
                size = gammas[h - 1].shape[0]
                dgamma, dbeta = buffers.dgamma[:size], buffers.dbeta[:size]
                layer_parameter_grads(bn, GammaBeta(buffers.dgamma_nodes[h],
                                                    buffers.dbeta_nodes[h]),
                                      GammaBeta(dgamma, dbeta))
                if PLAIN_SGD:
                    sgd_vector(gammas[h - 1], dgamma, bn_update.rate)
                    sgd_vector(betas[h - 1], dbeta, bn_update.rate)
                else:
                    optimizer_update(gammas[h - 1], dgamma, slots.gammas_first[h - 1],
                                     slots.gammas_second[h - 1], rule, bn_update, corrections)
                    optimizer_update(betas[h - 1], dbeta, slots.betas_first[h - 1],
                                     slots.betas_second[h - 1], rule, bn_update, corrections)
        if BATCH_NORM and plan.update_running and first == 0:
            for k in range(1, n_layers):
                update_running(Moments(layers.running_means[k - 1], layers.running_vars[k - 1]),
                               Moments(mean[k], var[k]), plan.momentum, plan.momentum_rest)
        return 0

    # its name is its variant's: the loops of two variants call two functions, and their
    # symbols (the same in the code of every process) must differ with their code
    backward_step.__name__ = backward_step.__qualname__ = "backward_step_" + "_".join(
        f"{field}{int(choice)}" for field, choice in zip(variant._fields, variant, strict=True))
    backward_step = _BACKWARDS[variant] = jit_driver(backward_step)

    def train_epoch_part(me, threads, barrier, data, order, layers, slots, plan, blas, buffers,
                         parts):
        """This thread's parts of every step of one epoch over the rows of x in ``order``,
        updating ``layers`` (and the optimiser's ``slots``, a `Slots` record) in place.

        ``me``: this thread's number of ``threads`` (1: it runs every part; `PARTS`: part ``me``);
        ``barrier``: the threads' `sync` state; ``data``: a `Data` (x, t and x in CSR form);
        ``layers``: a `Layers` record (gammas/betas/running_* have dummies where a layer has none);
        ``plan``: a `StepPlan`; ``blas``: a `Blas`; ``buffers`` (a `StepBuffers`) and ``parts``
        (one `SparseBatch` per part): from `fastnn.backends.numba.training.step_buffers`, shared by
        the threads. Returns how many steps took the sparse first layer (-1: the barrier was
        abandoned).
        """
        x, t, csr = data.x, data.t, data.csr
        weights, biases, gammas, betas = layers.weights, layers.biases, layers.gammas, layers.betas
        z, u, u_hat, y = buffers.z, buffers.u, buffers.u_hat, buffers.y
        du = buffers.du
        mean, var, std, multiplier = buffers.mean, buffers.var, buffers.std, buffers.multiplier
        t_batch, finite = buffers.t_batch, buffers.finite
        row_tally = buffers.row_tally if plan.tally else buffers.row_tally[:0]
        n_layers = len(weights)
        n_rows = order.shape[0]
        batch_size = plan.batch_size
        dtype = x.dtype
        bn, has_gamma = plan.bn, plan.has_gamma
        # this thread's parts; what no BLAS call computes goes by their union (`owned`) in one go
        first, last = (me, me + 1) if threads > 1 else (0, PARTS)
        rows = parts[first]  # the CSR rows of the batch this thread owns (the others' stay empty)
        for part in range(first + 1, last):
            parts[part].span[1] = 0
        sizes = np.empty(n_layers + 1, np.int64)
        sizes[0] = weights[0].shape[0]
        widest = sizes[0]
        shared_masks = False  # article masks: one row for the whole batch, made by part 0
        for k in range(n_layers):
            sizes[k + 1] = weights[k].shape[1]
            widest = max(widest, sizes[k + 1])
            shared_masks |= plan.keep_ratios[k] < 1.0 and not plan.inverted
        scratch = np.empty(widest, np.uint64)
        input_masked = plan.keep_ratios[0] < 1.0
        low, high = owned(sizes[0], first, last)
        mark_finite(finite, first, last, csr.sparse and all_finite(weights[0][low:high]))
        if not wait_for_all(barrier, threads):
            return -1
        sparse_steps = 0

        for step in range((n_rows + batch_size - 1) // batch_size):
            start = step * batch_size
            n = min(batch_size, n_rows - start)
            count = dtype.type(n)
            use_sparse = csr.sparse and all_set(finite)
            r0, r1 = owned(n, first, last)
            # the dropout multipliers, from the keys of (epoch, step, layer)
            step_key = fold_counter(plan.epoch_key, step)
            for k in range(n_layers):
                keep = plan.keep_ratios[k]
                if not DROPOUT or keep >= 1.0:
                    continue
                key = fold_counter(step_key, k)
                if plan.inverted:
                    fill_bernoulli_rows(key, keep, dtype.type(1.0) / dtype.type(keep),
                                        multiplier[k][:n], r0, r1)
                elif first == 0:
                    fill_article_mask(key, plan.keep_counts[k], scratch[: sizes[k]],
                                      multiplier[k][0])
            if shared_masks and not wait_for_all(barrier, threads):
                return -1
            # forward: by rows (batch norm's statistics by columns)
            if use_sparse:
                rows.span[0], rows.span[1] = r0, r1 - r0
                sparse_batch(csr, order, start + r0, rows_of(multiplier[0], r0, r1),
                             rows.ptr[: r1 - r0 + 1], rows.idx, rows.val)
                transpose_part(rows)
                gather_targets(t, order, start + r0, t_batch[r0:r1])
            else:
                gather_batch(x, csr, t, order, start + r0, input_masked,
                             rows_of(multiplier[0], r0, r1), z[0][r0:r1], t_batch[r0:r1])
            for k in range(1, n_layers + 1):
                if k == 1 and use_sparse:
                    sparse_affine_rows(rows.ptr, rows.idx, rows.val, weights[0], biases[0],
                                       u[1][r0:r1])
                else:
                    for part in range(first, last):  # BLAS: always by parts (same sums)
                        p0, p1 = part_range(n, part)
                        affine(blas, z[k - 1][p0:p1], weights[k - 1], biases[k - 1], u[k][p0:p1])
                if k == n_layers:
                    if WEIGHTED:
                        scales = buffers.row_scales[:n]
                        row_weight_scales(data.row_weights, order, start, scales, r0, r1)
                        weighted_output_grad_rows(u[k][r0:r1], t_batch[r0:r1], plan.output,
                                                  scales[r0:r1], du[k][r0:r1], row_tally[r0:r1])
                    else:
                        output_grad_rows(u[k][r0:r1], t_batch[r0:r1], plan.output, count,
                                         du[k][r0:r1], row_tally[r0:r1])
                    continue
                # hidden layer k (its own activation; batch norm as the plan says)
                activation = Activation(plan.acts[k - 1], plan.alphas[k - 1])
                if not BATCH_NORM:
                    activate_rows(u[k][r0:r1], activation, rows_of(multiplier[k], r0, r1),
                                  z[k][r0:r1])
                else:
                    norm = BatchNorm(bn, gammas[k - 1], betas[k - 1], has_gamma)
                    stats = Statistics(mean[k], var[k], std[k])
                    if not wait_for_all(barrier, threads):
                        return -1
                    c0, c1 = owned(sizes[k], first, last)  # the statistics, by columns
                    batch_statistics_columns(u[k][:n], stats, c0, c1)
                    std_columns(stats, c0, c1)
                    if not wait_for_all(barrier, threads):
                        return -1
                    normalised = Normalised(True, u_hat[k][r0:r1],
                                            y[k][r0:r1] if has_gamma else u_hat[k][r0:r1])
                    normalise_activate(u[k][r0:r1], activation, norm, stats, normalised,
                                       rows_of(multiplier[k], r0, r1), z[k][r0:r1], 0, sizes[k])
            if not wait_for_all(barrier, threads):
                return -1
            if use_sparse and first == 0:
                sparse_steps += 1
            if plan.tally and first == 0:  # every part's rows are in: summed in row order
                sum_tally(row_tally[:n], plan.tallies[step])
            # backward (its own driver: `backward_loop`)
            if backward_step(me, threads, barrier, data, order, layers, slots, plan, blas,
                             buffers, parts, sizes, step, use_sparse) < 0:
                return -1
        return sparse_steps

    train_epoch_part.__qualname__ = train_epoch_part.__name__
    return jit_driver(train_epoch_part)
