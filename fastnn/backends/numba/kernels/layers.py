"""Layer kernels, one per reference op: activations, the fused hidden layer (batch norm +
activation + multiplier) forward and backward, affine products, output and loss, the update.

Every kernel follows the reference op of ``base.Ops`` it stands for, operation by operation, in
the array's dtype (constants cast the way NumPy casts a Python scalar), and reduces over the
batch row by row as NumPy's axis-0 reductions do: results match the reference to rounding and
are bit-identical from run to run. The per-op overrides of the numba backend and its compiled
epoch call these same kernels.
"""

from __future__ import annotations

import numpy as np

from ...codes import (
    ACT_IDENTITY,
    ACT_LEAKY_RELU,
    ACT_RELU,
    ACT_SIGMOID,
    ACT_SOFTPLUS,
    ACT_SOFTSIGN,
    ACT_TANH,
    BN_OFF,
    BN_SCALAR,
    DECAY_L1,
    DECAY_L2,
    DECAY_NONE,
    OPT_ADAMW,
    OPT_MOMENTUM,
    OPT_NESTEROV,
    OPT_SGD,
    OUTPUT_IDENTITY,
)
from .blas import gemm
from .common import BN_STD_FLOOR, LOG_FLOOR, ColumnMeans, copy_into, jit
from .elementary import exp

# ---- activations, a row at a time (the branch sits outside the loop, so loops vectorise) ----


@jit
def activate_row(values, code, alpha, multiplier, out):
    """out[j] = act(values[j]) * multiplier[j]: the activation ``code`` (see ACTIVATION_CODES)."""
    one = values.dtype.type(1.0)
    zero = one - one
    d = values.shape[0]
    if code == ACT_RELU:  # NaN stays NaN, like np.maximum
        for j in range(d):
            v = values[j]
            out[j] = (zero if v < zero else v) * multiplier[j]
    elif code == ACT_SIGMOID:
        for j in range(d):
            out[j] = one / (one + exp(-values[j])) * multiplier[j]
    elif code == ACT_TANH:
        for j in range(d):
            out[j] = np.tanh(values[j]) * multiplier[j]
    elif code == ACT_LEAKY_RELU:
        for j in range(d):
            v = values[j]
            out[j] = (v if v > zero else alpha * v) * multiplier[j]
    elif code == ACT_IDENTITY:
        for j in range(d):
            out[j] = values[j] * multiplier[j]
    elif code == ACT_SOFTPLUS:
        for j in range(d):
            out[j] = np.log(one + exp(values[j])) * multiplier[j]
    elif code == ACT_SOFTSIGN:
        for j in range(d):
            v = values[j]
            out[j] = v / (one + np.abs(v)) * multiplier[j]
    else:  # step
        for j in range(d):
            out[j] = (one if values[j] > zero else zero) * multiplier[j]


@jit
def derivative_row(grad, values, code, alpha, multiplier, out):
    """out[j] = (grad[j] * multiplier[j]) * act'(values[j])."""
    one = values.dtype.type(1.0)
    zero = one - one
    d = values.shape[0]
    if code == ACT_RELU:
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * (one if values[j] > zero else zero)
    elif code == ACT_SIGMOID or code == ACT_SOFTPLUS:  # softplus' is the sigmoid
        for j in range(d):
            s = one / (one + exp(-values[j]))
            out[j] = grad[j] * multiplier[j] * (s * (one - s) if code == ACT_SIGMOID else s)
    elif code == ACT_TANH:
        for j in range(d):
            th = np.tanh(values[j])
            out[j] = grad[j] * multiplier[j] * (one - th * th)
    elif code == ACT_LEAKY_RELU:
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * (one if values[j] > zero else alpha)
    elif code == ACT_IDENTITY:
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * one
    elif code == ACT_SOFTSIGN:
        for j in range(d):
            r = one + np.abs(values[j])
            out[j] = grad[j] * multiplier[j] * (one / (r * r))
    else:  # step: derivative 0
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * zero


@jit
def multiplier_row(multiplier, i, expanded):
    """Row i of a (1 or n, 1 or d) multiplier as a full (d,) row (``expanded`` is scratch)."""
    return multiplier_columns(multiplier, i, 0, expanded.shape[0], expanded)


@jit
def multiplier_columns(multiplier, i, low, high, expanded):
    """Columns low..high-1 of row i of a (1 or n, 1 or d) multiplier, as a (high - low,) row
    (``expanded``, of that size, is scratch)."""
    row = multiplier[i if multiplier.shape[0] > 1 else 0]
    if multiplier.shape[1] > 1:
        return row[low:high]
    expanded[:] = row[0]
    return expanded


@jit
def parameter_columns(values, low, high):
    """A (high - low,) copy of entries low..high-1 of a (1,) or (d,) batch-norm parameter
    ((1,): one value for every node)."""
    out = np.empty(high - low, values.dtype)
    if values.shape[0] == 1:
        out[:] = values[0]
    else:
        copy_into(values[low:high], out)
    return out


# ---- fused hidden layer ----


@jit
def batch_statistics(u, stats):
    """Per-node batch mean and population variance (into the `Statistics` ``stats``), summed
    row by row (two passes)."""
    batch_statistics_columns(u, stats, 0, u.shape[1])


@jit
def batch_statistics_columns(u, stats, low, high):
    """`batch_statistics` of columns low..high-1 (into their entries of stats.mean and
    stats.var)."""
    n = u.shape[0]
    count = u.dtype.type(n)
    mean_part, var_part = stats.mean[low:high], stats.var[low:high]
    d = high - low
    mean_part[:] = u.dtype.type(0.0)
    for i in range(n):
        row = u[i, low:high]
        for j in range(d):
            mean_part[j] += row[j]
    for j in range(d):
        mean_part[j] = mean_part[j] / count
    var_part[:] = u.dtype.type(0.0)
    for i in range(n):
        row = u[i, low:high]
        for j in range(d):
            deviation = row[j] - mean_part[j]
            var_part[j] += deviation * deviation
    for j in range(d):
        var_part[j] = var_part[j] / count


@jit
def normalise_row(u_row, mean, std, gamma, beta, has_gamma, u_hat_row, y_row):
    """u_hat = (u - mean) / std; y = gamma * u_hat + beta (y is u_hat without gamma).

    Called once per row from the loops below: it takes arrays, not records (see the speed
    rules in CONTRIBUTING.md)."""
    d = u_row.shape[0]
    for j in range(d):
        u_hat_row[j] = (u_row[j] - mean[j]) / std[j]
    if has_gamma:
        for j in range(d):
            y_row[j] = gamma[j] * u_hat_row[j] + beta[j]


@jit
def expand_parameter(values, d):
    """A (d,) copy of a (1,) or (d,) batch-norm parameter."""
    return parameter_columns(values, 0, d)


@jit
def hidden_forward(u, activation, norm, batch_stats, stats, normalised, multiplier, z):
    """z = act(BN(u)) * multiplier, row by row.

    ``activation``: an `Activation`; ``norm``: a `BatchNorm`; ``stats``: a `Statistics`: with
    BN and ``batch_stats`` the batch mean and population variance are written to it, else read
    from it; its std receives max(sqrt(var), 1e-7). ``normalised``: a `Normalised` (its u_hat
    and y receive the normalised values when its ``store``; else they are not touched).
    ``multiplier`` is (1 or n, 1 or d): a scalar, a per-node mask or a per-element mask.
    """
    d = u.shape[1]
    if norm.bn == BN_OFF:
        activate_rows(u, activation, multiplier, z)
        return
    if batch_stats:
        batch_statistics(u, stats)
    std_columns(stats, 0, d)
    normalise_activate(u, activation, norm, stats, normalised, multiplier, z, 0, d)


@jit
def activate_rows(u, activation, multiplier, z):
    """z = act(u) * multiplier, row by row (`hidden_forward` without batch norm; the
    `Activation` ``activation``, a (1 or n, 1 or d) ``multiplier``)."""
    act, alpha = activation.code, activation.alpha
    expanded = np.empty(u.shape[1], u.dtype)
    for i in range(u.shape[0]):
        activate_row(u[i], act, alpha, multiplier_row(multiplier, i, expanded), z[i])


@jit
def std_columns(stats, low, high):
    """stats.std = max(sqrt(stats.var), 1e-7) for entries low..high-1 (NaN stays NaN, like
    np.maximum)."""
    var, std = stats.var, stats.std
    floor = var.dtype.type(BN_STD_FLOOR)
    for j in range(low, high):
        root = np.sqrt(var[j])
        std[j] = floor if root < floor else root


@jit
def normalise_activate(u, activation, norm, stats, normalised, multiplier, z, low, high):
    """z = act(gamma * (u - mean) / std + beta) * multiplier for columns low..high-1 of every
    row of u (the `Normalised` ``normalised`` receives the normalised values when its
    ``store``). Rows need no other row: threads may share them out."""
    n = u.shape[0]
    d = high - low
    act, alpha = activation.code, activation.alpha
    has_gamma = norm.has_gamma
    store, u_hat, y = normalised.store, normalised.u_hat, normalised.y
    expanded = np.empty(d, u.dtype)
    mean_part, std_part = stats.mean[low:high], stats.std[low:high]
    gamma_row = parameter_columns(norm.gamma, low, high)
    beta_row = parameter_columns(norm.beta, low, high)
    u_hat_scratch, y_scratch = np.empty(d, u.dtype), np.empty(d, u.dtype)
    for i in range(n):
        u_hat_row = u_hat[i, low:high] if store else u_hat_scratch
        y_row = y[i, low:high] if store else y_scratch
        normalise_row(u[i, low:high], mean_part, std_part, gamma_row, beta_row, has_gamma,
                      u_hat_row, y_row)
        activate_row(y_row if has_gamma else u_hat_row, act, alpha,
                     multiplier_columns(multiplier, i, low, high, expanded), z[i, low:high])


@jit
def normalise(u, stats, norm, normalised):
    """u_hat = (u - mean) / std and y = gamma * u_hat + beta for every row (into the
    `Normalised` ``normalised``, whatever its ``store``)."""
    d = u.shape[1]
    mean, std, has_gamma = stats.mean, stats.std, norm.has_gamma
    u_hat, y = normalised.u_hat, normalised.y
    gamma_row, beta_row = expand_parameter(norm.gamma, d), expand_parameter(norm.beta, d)
    for i in range(u.shape[0]):
        normalise_row(u[i], mean, std, gamma_row, beta_row, has_gamma, u_hat[i], y[i])


@jit
def hidden_backward(dz, multiplier, activation, norm, forward, du, node_sums):
    """du from dz through mask, activation derivative and BN (two passes with BN).

    ``forward`` (a `ForwardValues`): u_hat and the activation's input come from its u_hat and
    y (y is u_hat without gamma, u itself without BN) or, with its ``recompute``, are rebuilt
    from its u, mean, std, gamma and beta exactly as the forward pass built them. ``norm`` (a
    `BatchNorm`): the layer's gamma now, g = gamma * dy. With BN and gamma, ``node_sums`` (a
    `GammaBeta`) receives the per-node sums of u_hat*dy and dy.
    """
    d = dz.shape[1]
    if norm.bn == BN_OFF:
        derivative_rows(dz, multiplier, activation, forward.y, du)
        return
    column_means = ColumnMeans(np.empty(d, dz.dtype), np.empty(d, dz.dtype))
    batch_norm_backward_sums(dz, multiplier, activation, norm, forward, False, du, node_sums,
                             column_means, 0, d)
    batch_norm_backward_finish(norm, forward, du, column_means, 0, d)


@jit
def derivative_rows(dz, multiplier, activation, y, du):
    """du = (dz * multiplier) * act'(y), row by row (`hidden_backward` without batch norm:
    ``y`` is the activation's input)."""
    act, alpha = activation.code, activation.alpha
    expanded = np.empty(dz.shape[1], dz.dtype)
    for i in range(dz.shape[0]):
        derivative_row(dz[i], y[i], act, alpha, multiplier_row(multiplier, i, expanded), du[i])


@jit
def batch_norm_backward_sums(dz, multiplier, activation, norm, forward, activated, du,
                             node_sums, column_means, low, high):
    """The first pass of `hidden_backward` with BN, columns low..high-1: du = dy (through mask
    and activation; with ``activated`` du holds dy already), the column means of
    g = gamma * dy and of g * u_hat into the `ColumnMeans` ``column_means``, and the node sums
    of gamma's and beta's gradients into the `GammaBeta` ``node_sums``. Each column's sums run
    over its own column only."""
    n = dz.shape[0]
    d = high - low
    act, alpha = activation.code, activation.alpha
    has_gamma, recompute = norm.has_gamma, forward.recompute
    u, u_hat, y = forward.u, forward.u_hat, forward.y
    expanded = np.empty(d, dz.dtype)
    gamma_row = parameter_columns(norm.gamma, low, high)
    forward_gamma_row = parameter_columns(forward.gamma, low, high)
    forward_beta_row = parameter_columns(forward.beta, low, high)
    mean_part, std_part = forward.mean[low:high], forward.std[low:high]
    sum_g, sum_gu = column_means.g[low:high], column_means.gu[low:high]
    dgamma_part, dbeta_part = node_sums.gamma[low:high], node_sums.beta[low:high]
    u_hat_scratch, y_scratch = np.empty(d, dz.dtype), np.empty(d, dz.dtype)
    zero = dz.dtype.type(0.0)
    sum_g[:] = zero
    sum_gu[:] = zero
    dgamma_part[:] = zero
    dbeta_part[:] = zero
    for i in range(n):
        if recompute:
            normalise_row(u[i, low:high], mean_part, std_part, forward_gamma_row,
                          forward_beta_row, has_gamma, u_hat_scratch, y_scratch)
            u_hat_row = u_hat_scratch
            y_row = y_scratch if has_gamma else u_hat_scratch
        else:
            u_hat_row, y_row = u_hat[i, low:high], y[i, low:high]
        du_row = du[i, low:high]
        if not activated:
            derivative_row(dz[i, low:high], y_row, act, alpha,
                           multiplier_columns(multiplier, i, low, high, expanded), du_row)
        for j in range(d):
            dy = du_row[j]
            g = gamma_row[j] * dy if has_gamma else dy
            sum_g[j] += g
            sum_gu[j] += g * u_hat_row[j]
        if has_gamma:
            for j in range(d):
                dgamma_part[j] += u_hat_row[j] * du_row[j]
                dbeta_part[j] += du_row[j]
    count = dz.dtype.type(n)
    for j in range(d):
        sum_g[j] = sum_g[j] / count
        sum_gu[j] = sum_gu[j] / count


@jit
def batch_norm_backward_finish(norm, forward, du, column_means, low, high):
    """The second pass of `hidden_backward` with BN, columns low..high-1 of the rows given
    (``forward``'s u or u_hat has the same rows as du):
    du = (g - mean(g) - u_hat * mean(g * u_hat)) / std. Rows need no other row."""
    n = du.shape[0]
    d = high - low
    has_gamma, recompute = norm.has_gamma, forward.recompute
    u, u_hat = forward.u, forward.u_hat
    gamma_row = parameter_columns(norm.gamma, low, high)
    forward_gamma_row = parameter_columns(forward.gamma, low, high)
    forward_beta_row = parameter_columns(forward.beta, low, high)
    mean_part, std_part = forward.mean[low:high], forward.std[low:high]
    mean_g_part, mean_gu_part = column_means.g[low:high], column_means.gu[low:high]
    u_hat_scratch, y_scratch = np.empty(d, du.dtype), np.empty(d, du.dtype)
    for i in range(n):
        if recompute:
            normalise_row(u[i, low:high], mean_part, std_part, forward_gamma_row,
                          forward_beta_row, False, u_hat_scratch, y_scratch)
            u_hat_row = u_hat_scratch
        else:
            u_hat_row = u_hat[i, low:high]
        du_row = du[i, low:high]
        for j in range(d):
            dy = du_row[j]
            g = gamma_row[j] * dy if has_gamma else dy
            du_row[j] = (g - mean_g_part[j] - u_hat_row[j] * mean_gu_part[j]) / std_part[j]


@jit
def layer_parameter_grads(bn, node_sums, grads):
    """The `GammaBeta` ``grads`` (dgamma, dbeta) from the `GammaBeta` ``node_sums``: as they
    are (BN(n)) or averaged over the nodes (BN)."""
    dgamma_nodes, dbeta_nodes = node_sums.gamma, node_sums.beta
    dgamma, dbeta = grads.gamma, grads.beta
    if bn == BN_SCALAR:
        d = dgamma_nodes.shape[0]
        total_gamma = dgamma_nodes.dtype.type(0.0)
        total_beta = dgamma_nodes.dtype.type(0.0)
        for j in range(d):
            total_gamma += dgamma_nodes[j]
            total_beta += dbeta_nodes[j]
        count = dgamma_nodes.dtype.type(d)
        dgamma[0] = total_gamma / count
        dbeta[0] = total_beta / count
    else:
        copy_into(dgamma_nodes, dgamma)
        copy_into(dbeta_nodes, dbeta)


# ---- affine, output, loss ----


@jit
def fill_rows(out, row):
    """Every row of out = row."""
    for i in range(out.shape[0]):
        copy_into(row, out[i])


@jit
def affine(blas, x, w, b, u):
    """u = x W + b (u starts as the bias rows; BLAS adds the product to it)."""
    fill_rows(u, b)
    one = u.dtype.type(1.0)
    gemm(blas, False, False, one, x, w, one, u)


@jit
def column_sums(a, out):
    """out[j] = sum over rows of a[:, j], row by row."""
    column_sums_range(a, out, 0, a.shape[1])


@jit
def column_sums_range(a, out, low, high):
    """out[j] = sum over rows of a[:, j] for j in low..high-1 (the same sums as `column_sums`)."""
    part = out[low:high]
    part[:] = a.dtype.type(0.0)
    for i in range(a.shape[0]):
        row = a[i, low:high]
        for j in range(high - low):
            part[j] += row[j]


@jit
def affine_backward(blas, x, w, du, need_dx, dw, db, dx):
    """dW = x^T du, db = column sums of du, dx = du W^T when ``need_dx``."""
    one, zero = du.dtype.type(1.0), du.dtype.type(0.0)
    gemm(blas, True, False, one, x, du, zero, dw)
    column_sums(du, db)
    if need_dx:
        gemm(blas, False, True, one, du, w, zero, dx)


@jit
def affine_backward_update(blas, x, w, b, du, update, need_dx, dx, dw, db):
    """A layer's last use in a step: dx = du W^T (the old W) when ``need_dx``, then, by the
    `Update` ``update``, W -= rate * (x^T du + weight-decay gradient) and
    b -= rate * column sums of du.

    Without weight decay BLAS adds -rate x^T du to W directly (``dw`` is not touched).
    """
    affine_backward_update_rows(blas, x, w, du, update, need_dx, dx, dw, 0, w.shape[0])
    column_sums(du, db)
    sgd_vector(b, db, update.rate)


@jit
def affine_backward_rows(blas, x, w, du, need_dx, dx, dw, low, high):
    """Rows low..high-1 of `affine_backward`'s dW, and the columns of dx they give (no bias):
    dx[:, low:high] = du W[low:high]^T when ``need_dx``, dW[low:high] = x[:, low:high]^T du."""
    one, zero = du.dtype.type(1.0), du.dtype.type(0.0)
    if need_dx:
        gemm(blas, False, True, one, du, w[low:high], zero, dx[:, low:high])
    gemm(blas, True, False, one, x[:, low:high], du, zero, dw[low:high])


@jit
def affine_backward_update_rows(blas, x, w, du, update, need_dx, dx, dw, low, high):
    """Rows low..high-1 of `affine_backward_update`'s weight update, and the columns of dx
    they give (no bias): dx[:, low:high] = du W[low:high]^T, then W[low:high] is updated.
    Each row of W and column of dx depends on no other: threads may share the rows out."""
    one, zero = du.dtype.type(1.0), du.dtype.type(0.0)
    w_rows = w[low:high]
    if need_dx:
        gemm(blas, False, True, one, du, w_rows, zero, dx[:, low:high])
    if update.decay == DECAY_NONE:
        gemm(blas, True, False, -update.rate, x[:, low:high], du, one, w_rows)
    else:
        gemm(blas, True, False, one, x[:, low:high], du, zero, dw[low:high])
        sgd_weights(w_rows, dw[low:high], update)


@jit
def output_forward(u, output, y):
    """Row softmax with the row maximum subtracted, or identity."""
    n, d = u.shape
    for i in range(n):
        if output == OUTPUT_IDENTITY:
            copy_into(u[i], y[i])
            continue
        top = u[i, 0]
        for j in range(1, d):
            top = max(top, u[i, j])
        total = u.dtype.type(0.0)
        for j in range(d):
            e = np.exp(u[i, j] - top)  # (an in-order sum: this loop stays scalar)
            y[i, j] = e
            total += e
        for j in range(d):
            y[i, j] = y[i, j] / total


@jit
def loss(y, t, output):
    """Cross-entropy or MSE of a batch, summed in float64 (returned as float64)."""
    n, d = y.shape
    floor = y.dtype.type(LOG_FLOOR)
    total = 0.0
    for i in range(n):
        for j in range(d):
            if output == OUTPUT_IDENTITY:
                diff = y[i, j] - t[i, j]
                total += diff * diff
            elif t[i, j] != 0 or not np.isfinite(y[i, j]):  # 0 * log(...) is 0 unless NaN
                value = floor if y[i, j] < floor else y[i, j]
                total += t[i, j] * np.log(value)
    if output == OUTPUT_IDENTITY:
        return 0.5 * total / n
    return -total / n


@jit
def argmax_row(row):
    """Index of the row's first maximum (the first NaN when there is one), like np.argmax."""
    best, top = 0, row[0]
    if np.isnan(top):
        return 0
    for j in range(1, row.shape[0]):
        value = row[j]
        if np.isnan(value):
            return j
        if value > top:
            best, top = j, value
    return best


@jit
def tally_rows(y, t, output, row_tally):
    """row_tally[i] = (row i's `loss`, 1 when argmax y_i is argmax t_i else 0), as
    `Ops.batch_tally` computes them; nothing when ``row_tally`` has no rows."""
    if row_tally.shape[0] == 0:
        return
    for i in range(y.shape[0]):
        row_tally[i, 0] = loss(y[i : i + 1], t[i : i + 1], output)
        row_tally[i, 1] = 1.0 if argmax_row(y[i]) == argmax_row(t[i]) else 0.0


@jit
def output_grad_from_u(u, t, output, du):
    """du = (output(u) - t) / N, row by row (y itself is not kept)."""
    output_grad_rows(u, t, output, u.dtype.type(u.shape[0]), du, np.empty((0, 2), np.float64))


@jit
def output_grad_rows(u, t, output, count, du, row_tally):
    """`output_grad_from_u` for some rows of a batch of ``count`` rows (their `tally_rows`
    into ``row_tally`` when it has rows)."""
    n, d = u.shape
    output_forward(u, output, du)
    tally_rows(du, t, output, row_tally)
    for i in range(n):
        for j in range(d):
            du[i, j] = (du[i, j] - t[i, j]) / count


@jit
def row_weight_scales(row_weights, order, start, scales, low, high):
    """scales[i] = w_i / (sum of the batch's weights, or 1 when it is not > 0) for rows
    low..high-1 of the batch of ``scales.shape[0]`` rows at ``order[start:]`` (the sum in
    row order, in the dtype)."""
    total = row_weights.dtype.type(0.0)
    for i in range(scales.shape[0]):
        total += row_weights[order[start + i]]
    if not total > 0:
        total = row_weights.dtype.type(1.0)
    for i in range(low, high):
        scales[i] = row_weights[order[start + i]] / total


@jit
def weighted_output_grad_rows(u, t, output, scales, du, row_tally):
    """du = (output(u) - t) * each row's scale (`row_weight_scales`), row by row (and their
    `tally_rows`, unweighted, when ``row_tally`` has rows)."""
    n, d = u.shape
    output_forward(u, output, du)
    tally_rows(du, t, output, row_tally)
    for i in range(n):
        for j in range(d):
            du[i, j] = (du[i, j] - t[i, j]) * scales[i]


@jit
def output_grad(y, t, du):
    """du = (y - t) / N."""
    n, d = y.shape
    count = y.dtype.type(n)
    for i in range(n):
        for j in range(d):
            du[i, j] = (y[i, j] - t[i, j]) / count


# ---- parameter update ----


@jit
def sgd_weights(w, dw, update):
    """w -= rate * (dW + weight-decay gradient) (L1: lam * sign(W), L2: lam * W), by the
    `Update` ``update``."""
    rate, decay, lam = update.rate, update.decay, update.lam
    flat_w, flat_dw = w.reshape(-1), dw.reshape(-1)
    zero = w.dtype.type(0.0)
    if decay == DECAY_L1:
        for i in range(flat_w.shape[0]):
            value = flat_w[i]
            sign = lam if value > zero else (-lam if value < zero else lam * value)
            flat_w[i] -= rate * (flat_dw[i] + sign)
    elif decay == DECAY_L2:
        for i in range(flat_w.shape[0]):
            flat_w[i] -= rate * (flat_dw[i] + lam * flat_w[i])
    else:
        for i in range(flat_w.shape[0]):
            flat_w[i] -= rate * flat_dw[i]


@jit
def sgd_vector(p, grad, rate):
    """p -= rate * grad."""
    for j in range(p.shape[0]):
        p[j] -= rate * grad[j]


@jit
def optimizer_update(p, grad, first, second, rule, update, corrections):
    """In place: one update of p (any shape) by the `Rule` ``rule`` at the `Update` ``update``
    (rate, decay, lam) with Adam's `Corrections` of this update; ``first``/``second``: p's
    slots (velocity, or the moments; unused ones may be dummies). Operation by operation
    `Ops.optimizer_update`: the decay gradient (at the old p) is added to the gradient,
    except for adamw (added to the step); rate 0 changes nothing."""
    rate, decay, lam = update.rate, update.decay, update.lam
    if rate == 0:
        return
    code = rule.code
    flat_p, flat_g = p.reshape(-1), grad.reshape(-1)
    flat_first, flat_second = first.reshape(-1), second.reshape(-1)
    zero = p.dtype.type(0.0)
    for i in range(flat_p.shape[0]):
        old = flat_p[i]
        g = flat_g[i]
        decay_grad = zero
        if decay == DECAY_L1:
            decay_grad = lam if old > zero else (-lam if old < zero else lam * old)
        elif decay == DECAY_L2:
            decay_grad = lam * old
        if decay != DECAY_NONE and code != OPT_ADAMW:
            g = g + decay_grad
        if code == OPT_SGD:
            flat_p[i] = old - rate * g
        elif code == OPT_MOMENTUM or code == OPT_NESTEROV:
            velocity = rule.momentum * flat_first[i] + g
            flat_first[i] = velocity
            if code == OPT_NESTEROV:
                flat_p[i] = old - rate * (g + rule.momentum * velocity)
            else:
                flat_p[i] = old - rate * velocity
        else:
            moment = rule.beta1 * flat_first[i] + rule.beta1_rest * g
            square = rule.beta2 * flat_second[i] + rule.beta2_rest * (g * g)
            flat_first[i], flat_second[i] = moment, square
            direction = (moment / corrections.first) / (
                np.sqrt(square / corrections.second) + rule.eps)
            if decay != DECAY_NONE and code == OPT_ADAMW:
                direction = direction + decay_grad
            flat_p[i] = old - rate * direction


@jit
def update_running(running, batch, momentum, momentum_rest):
    """In place: running = momentum * running + (1 - momentum) * batch statistic, for the mean
    and var of the `Moments` ``running`` from those of the `Moments` ``batch``;
    ``momentum_rest`` is 1 - momentum in the dtype."""
    running_mean, running_var = running.mean, running.var
    batch_mean, batch_var = batch.mean, batch.var
    for j in range(running_mean.shape[0]):
        running_mean[j] = momentum * running_mean[j] + momentum_rest * batch_mean[j]
        running_var[j] = momentum * running_var[j] + momentum_rest * batch_var[j]
