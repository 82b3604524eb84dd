"""The numba backend's training epoch: a compiled loop around the per-op kernels.

`train_epoch` runs the steps of `fastnn.backends.steps.train_step` in the same order, each op
by the kernel that the backend's override of that op runs: the mask from its key
(`masks.dropout_multiplier`), `layers.affine`, `layers.hidden_forward`,
`layers.output_grad_from_u`, `layers.affine_backward_update`, `layers.hidden_backward`,
`layers.layer_parameter_grads` + `layers.sgd_vector`, `layers.update_running`. It re-derives
nothing: what an op means lives in its kernel. With a CSR form of x, layer 1's product and
update skip x's zeros (`sparse`).
"""

from __future__ import annotations

import numpy as np

from .common import BN_OFF, jit, jit_nogil
from .layers import (
    affine,
    affine_backward_update,
    hidden_backward,
    hidden_forward,
    layer_parameter_grads,
    multiplier_row,
    output_grad_from_u,
    sgd_vector,
    update_running,
)
from .masks import dropout_multiplier, fold_counter
from .sparse import (
    SparseBatch,
    all_finite,
    gather_targets,
    sparse_affine_rows,
    sparse_backward_update,
    sparse_batch,
)


@jit
def gather_batch(x, t, order, start, multiplier, z0, t_batch):
    """z0 = x[order[start:start+n]] * input multiplier, t_batch = the matching targets."""
    n, d = z0.shape
    masked = multiplier.shape[0] > 1 or multiplier.shape[1] > 1
    expanded = np.empty(d, z0.dtype)
    for i in range(n):
        source, target = x[order[start + i]], z0[i]
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


@jit_nogil
def train_epoch(x, t, order, layers, plan, blas, csr):
    """Every SGD step of one epoch over the rows of x in ``order``, updating ``layers`` in place.

    ``layers``: a `Layers` record (gammas/betas/running_* have dummies where a layer has none);
    ``plan``: a `StepPlan`; ``blas``: a `Blas`; ``csr``: x in CSR form (a `Csr`). Returns how
    many steps took the sparse first layer.
    """
    weights, biases, gammas, betas = layers.weights, layers.biases, layers.gammas, layers.betas
    n_layers = len(weights)
    n_rows = order.shape[0]
    batch_size = plan.batch_size
    dtype = x.dtype
    zero = dtype.type(0.0)
    sizes = np.empty(n_layers + 1, np.int64)
    sizes[0] = weights[0].shape[0]
    for k in range(n_layers):
        sizes[k + 1] = weights[k].shape[1]
    rows = min(batch_size, n_rows)
    widest = sizes.max()
    bn, has_gamma = plan.bn, plan.has_gamma

    # buffers; index k = layer k (0: the input)
    z_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    u_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    u_hat_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    y_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    du_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    dz_buf = [np.empty((rows, sizes[k]), dtype) for k in range(n_layers + 1)]
    mean_buf = [np.zeros(sizes[k], dtype) for k in range(n_layers + 1)]
    var_buf = [np.ones(sizes[k], dtype) for k in range(n_layers + 1)]
    std_buf = [np.ones(sizes[k], dtype) for k in range(n_layers + 1)]
    dw_buf = [np.empty((sizes[k], sizes[k + 1]), dtype) for k in range(n_layers)]
    db = np.empty(widest, dtype)
    dgamma_nodes = np.empty(widest, dtype)
    dbeta_nodes = np.empty(widest, dtype)
    dgamma = np.empty(widest, dtype)
    dbeta = np.empty(widest, dtype)
    multiplier = [np.ones((1, 1), dtype) for _ in range(n_layers)]
    for k in range(n_layers):
        if plan.keep_ratios[k] < 1.0:
            multiplier[k] = np.empty((rows if plan.inverted else 1, sizes[k]), dtype)
    scratch = np.empty(widest, np.uint64)
    t_batch = np.empty((rows, t.shape[1]), dtype)
    # the sparse first layer: a batch's CSR rows, its columns, a row of x^T du
    capacity = rows * sizes[0] if csr.sparse else 0
    batch = SparseBatch(
        np.zeros(rows + 1, np.int64), np.empty(capacity, np.int32), np.empty(capacity, dtype),
        np.empty(sizes[0] + 1, np.int64), np.empty(capacity, np.int64),
        np.empty(capacity, dtype), np.empty(sizes[1], dtype),
    )
    w1_finite = csr.sparse and all_finite(weights[0])
    sparse_steps = 0

    for step in range((n_rows + batch_size - 1) // batch_size):
        start = step * batch_size
        n = min(batch_size, n_rows - start)
        # the dropout multipliers, from the keys of (epoch, step, layer)
        step_key = fold_counter(plan.epoch_key, step)
        for k in range(n_layers):
            if plan.keep_ratios[k] < 1.0:
                dropout_multiplier(fold_counter(step_key, k), plan.keep_ratios[k],
                                   plan.keep_counts[k], plan.inverted, scratch[: sizes[k]],
                                   multiplier[k][:n] if plan.inverted else multiplier[k])
        use_sparse = csr.sparse and w1_finite
        if use_sparse:
            sparse_batch(csr.indptr, csr.indices, csr.values, order, start, multiplier[0],
                         batch.ptr[: n + 1], batch.idx, batch.val)
            gather_targets(t, order, start, t_batch[:n])
            sparse_steps += 1
        else:
            gather_batch(x, t, order, start, multiplier[0], z_buf[0][:n], t_batch[:n])
        # forward
        for k in range(1, n_layers + 1):
            u = u_buf[k][:n]
            if k == 1 and use_sparse:
                sparse_affine_rows(batch.ptr[: n + 1], batch.idx, batch.val, weights[0],
                                   biases[0], u)
            else:
                affine(blas, z_buf[k - 1][:n], weights[k - 1], biases[k - 1], u)
            if k < n_layers:
                y = y_buf[k][:n] if has_gamma else u_hat_buf[k][:n]
                hidden_forward(u, plan.act, plan.alpha, bn, gammas[k - 1], betas[k - 1],
                               has_gamma, True, mean_buf[k], var_buf[k], std_buf[k], True,
                               u_hat_buf[k][:n], y, multiplier[k], z_buf[k][:n])
        du = du_buf[n_layers][:n]
        output_grad_from_u(u_buf[n_layers][:n], t_batch[:n], plan.output, du)
        # backward, each layer updated as soon as its gradients exist
        for k in range(n_layers, 0, -1):
            dz = dz_buf[k - 1][:n]
            if k == 1 and use_sparse and all_finite(du):
                w1_finite = sparse_backward_update(batch, du, weights[0], biases[0], plan.eta,
                                                   plan.decay, plan.lam, dw_buf[0], db[: sizes[1]])
            else:
                if k == 1 and use_sparse:  # the dense way needs x's batch rows
                    gather_batch(x, t, order, start, multiplier[0], z_buf[0][:n], t_batch[:n])
                affine_backward_update(blas, z_buf[k - 1][:n], weights[k - 1], biases[k - 1],
                                       du, plan.eta, plan.decay, plan.lam, k > 1, dz,
                                       dw_buf[k - 1], db[: sizes[k]])
                if k == 1 and csr.sparse:
                    w1_finite = all_finite(weights[0])
            if k > 1:
                h = k - 1
                if bn == BN_OFF:
                    y_h = u_buf[h][:n]
                elif has_gamma:
                    y_h = y_buf[h][:n]
                else:
                    y_h = u_hat_buf[h][:n]
                du_hidden = du_buf[h][:n]
                hidden_backward(dz, multiplier[h], plan.act, plan.alpha, bn, False, u_buf[h][:n],
                                mean_buf[h], std_buf[h], gammas[h - 1], betas[h - 1],
                                u_hat_buf[h][:n], y_h, gammas[h - 1], has_gamma, du_hidden,
                                dgamma_nodes[: sizes[h]], dbeta_nodes[: sizes[h]])
                if has_gamma and plan.bn_rate != zero:
                    size = gammas[h - 1].shape[0]
                    layer_parameter_grads(bn, dgamma_nodes[: sizes[h]], dbeta_nodes[: sizes[h]],
                                          dgamma[:size], dbeta[:size])
                    sgd_vector(gammas[h - 1], dgamma[:size], plan.bn_rate)
                    sgd_vector(betas[h - 1], dbeta[:size], plan.bn_rate)
                du = du_hidden
        if plan.update_running and bn != BN_OFF:
            for k in range(1, n_layers):
                update_running(layers.running_means[k - 1], layers.running_vars[k - 1],
                               mean_buf[k], var_buf[k], plan.momentum, plan.momentum_rest)
    return sparse_steps
