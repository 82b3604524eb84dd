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

from .blas import gemm
from .common import (
    BN_OFF,
    BN_SCALAR,
    BN_STD_FLOOR,
    DECAY_L1,
    DECAY_L2,
    DECAY_NONE,
    LOG_FLOOR,
    OUTPUT_IDENTITY,
    jit,
)

# ---- activations, a row at a time (the branch sits outside the loop, so loops vectorise) ----

RELU, SIGMOID, TANH, LEAKY_RELU, IDENTITY, SOFTPLUS, SOFTSIGN, STEP = 2, 0, 1, 3, 4, 5, 6, 7


@jit
def activate_row(values, code, alpha, multiplier, out):
    """out[j] = act(values[j]) * multiplier[j]: the activation ``code`` (see ACTIVATION_CODES)."""
    one = values.dtype.type(1.0)
    zero = one - one
    d = values.shape[0]
    if code == RELU:  # NaN stays NaN, like np.maximum
        for j in range(d):
            v = values[j]
            out[j] = (zero if v < zero else v) * multiplier[j]
    elif code == SIGMOID:
        for j in range(d):
            out[j] = one / (one + np.exp(-values[j])) * multiplier[j]
    elif code == TANH:
        for j in range(d):
            out[j] = np.tanh(values[j]) * multiplier[j]
    elif code == LEAKY_RELU:
        for j in range(d):
            v = values[j]
            out[j] = (v if v > zero else alpha * v) * multiplier[j]
    elif code == IDENTITY:
        for j in range(d):
            out[j] = values[j] * multiplier[j]
    elif code == SOFTPLUS:
        for j in range(d):
            out[j] = np.log(one + np.exp(values[j])) * multiplier[j]
    elif code == SOFTSIGN:
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
    if code == RELU:
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * (one if values[j] > zero else zero)
    elif code == SIGMOID or code == SOFTPLUS:  # softplus' is the sigmoid
        for j in range(d):
            s = one / (one + np.exp(-values[j]))
            out[j] = grad[j] * multiplier[j] * (s * (one - s) if code == SIGMOID else s)
    elif code == TANH:
        for j in range(d):
            th = np.tanh(values[j])
            out[j] = grad[j] * multiplier[j] * (one - th * th)
    elif code == LEAKY_RELU:
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * (one if values[j] > zero else alpha)
    elif code == IDENTITY:
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * one
    elif code == SOFTSIGN:
        for j in range(d):
            r = one + np.abs(values[j])
            out[j] = grad[j] * multiplier[j] * (one / (r * r))
    else:  # step: derivative 0
        for j in range(d):
            out[j] = grad[j] * multiplier[j] * zero


@jit
def multiplier_row(multiplier, i, expanded):
    """Row i of a (1 or n, 1 or d) multiplier as a full (d,) row (``expanded`` is scratch)."""
    row = multiplier[i if multiplier.shape[0] > 1 else 0]
    if multiplier.shape[1] == expanded.shape[0]:
        return row
    expanded[:] = row[0]
    return expanded


# ---- fused hidden layer ----


@jit
def batch_statistics(u, mean, var):
    """Per-node batch mean and population variance, summed row by row (two passes)."""
    n, d = u.shape
    count = u.dtype.type(n)
    mean[:] = u.dtype.type(0.0)
    for i in range(n):
        row = u[i]
        for j in range(d):
            mean[j] += row[j]
    for j in range(d):
        mean[j] = mean[j] / count
    var[:] = u.dtype.type(0.0)
    for i in range(n):
        row = u[i]
        for j in range(d):
            deviation = row[j] - mean[j]
            var[j] += deviation * deviation
    for j in range(d):
        var[j] = var[j] / count


@jit
def normalise_row(u_row, mean, std, gamma, beta, has_gamma, u_hat_row, y_row):
    """u_hat = (u - mean) / std; y = gamma * u_hat + beta (y is u_hat without gamma)."""
    d = u_row.shape[0]
    for j in range(d):
        u_hat_row[j] = (u_row[j] - mean[j]) / std[j]
    if has_gamma:
        for j in range(d):
            y_row[j] = gamma[j] * u_hat_row[j] + beta[j]


@jit
def expand_parameter(values, d):
    """A (d,) copy of a (1,) or (d,) batch-norm parameter."""
    out = np.empty(d, values.dtype)
    if values.shape[0] == 1:
        out[:] = values[0]
    else:
        out[:] = values
    return out


@jit
def hidden_forward(u, act, alpha, bn, gamma, beta, has_gamma, batch_stats, mean, var, std,
                   store, u_hat, y, multiplier, z):
    """z = act(BN(u)) * multiplier, row by row.

    With BN and ``batch_stats`` the batch mean and population variance are written to mean and
    var, else read from them; std receives max(sqrt(var), 1e-7). With ``store`` u_hat and y
    receive the normalised values (pass y = u_hat without gamma); else they are not touched.
    ``multiplier`` is (1 or n, 1 or d): a scalar, a per-node mask or a per-element mask.
    """
    n, d = u.shape
    expanded = np.empty(d, u.dtype)
    if bn == BN_OFF:
        for i in range(n):
            activate_row(u[i], act, alpha, multiplier_row(multiplier, i, expanded), z[i])
        return
    if batch_stats:
        batch_statistics(u, mean, var)
    floor = u.dtype.type(BN_STD_FLOOR)
    for j in range(d):
        root = np.sqrt(var[j])
        std[j] = floor if root < floor else root  # NaN stays NaN, like np.maximum
    gamma_row, beta_row = expand_parameter(gamma, d), expand_parameter(beta, d)
    u_hat_scratch, y_scratch = np.empty(d, u.dtype), np.empty(d, u.dtype)
    for i in range(n):
        u_hat_row = u_hat[i] if store else u_hat_scratch
        y_row = y[i] if store else y_scratch
        normalise_row(u[i], mean, std, gamma_row, beta_row, has_gamma, u_hat_row, y_row)
        activate_row(y_row if has_gamma else u_hat_row, act, alpha,
                     multiplier_row(multiplier, i, expanded), z[i])


@jit
def normalise(u, mean, std, gamma, beta, has_gamma, u_hat, y):
    """u_hat = (u - mean) / std and y = gamma * u_hat + beta for every row."""
    d = u.shape[1]
    gamma_row, beta_row = expand_parameter(gamma, d), expand_parameter(beta, d)
    for i in range(u.shape[0]):
        normalise_row(u[i], mean, std, gamma_row, beta_row, has_gamma, u_hat[i], y[i])


@jit
def hidden_backward(dz, multiplier, act, alpha, bn, recompute, u, mean, std, forward_gamma,
                    forward_beta, u_hat, y, gamma, has_gamma, du, dgamma_nodes, dbeta_nodes):
    """du from dz through mask, activation derivative and BN (two passes with BN).

    u_hat and the activation's input come from u_hat and y (y is u_hat without gamma, u itself
    without BN) or, with ``recompute``, are rebuilt from u, mean, std, forward_gamma and
    forward_beta exactly as the forward pass built them. g = gamma * dy. With BN and gamma,
    dgamma_nodes/dbeta_nodes receive the per-node sums of u_hat*dy and dy.
    """
    n, d = dz.shape
    expanded = np.empty(d, dz.dtype)
    if bn == BN_OFF:
        for i in range(n):
            derivative_row(dz[i], y[i], act, alpha, multiplier_row(multiplier, i, expanded),
                           du[i])
        return
    gamma_row = expand_parameter(gamma, d)
    forward_gamma_row = expand_parameter(forward_gamma, d)
    forward_beta_row = expand_parameter(forward_beta, d)
    u_hat_scratch, y_scratch = np.empty(d, dz.dtype), np.empty(d, dz.dtype)
    mean_g = np.zeros(d, dz.dtype)
    mean_gu = np.zeros(d, dz.dtype)
    dgamma_nodes[:] = dz.dtype.type(0.0)
    dbeta_nodes[:] = dz.dtype.type(0.0)
    for i in range(n):
        if recompute:
            normalise_row(u[i], mean, std, forward_gamma_row, forward_beta_row, has_gamma,
                          u_hat_scratch, y_scratch)
            u_hat_row = u_hat_scratch
            y_row = y_scratch if has_gamma else u_hat_scratch
        else:
            u_hat_row, y_row = u_hat[i], y[i]
        du_row = du[i]
        derivative_row(dz[i], y_row, act, alpha, multiplier_row(multiplier, i, expanded), du_row)
        for j in range(d):
            dy = du_row[j]
            g = gamma_row[j] * dy if has_gamma else dy
            mean_g[j] += g
            mean_gu[j] += g * u_hat_row[j]
        if has_gamma:
            for j in range(d):
                dgamma_nodes[j] += u_hat_row[j] * du_row[j]
                dbeta_nodes[j] += du_row[j]
    count = dz.dtype.type(n)
    for j in range(d):
        mean_g[j] = mean_g[j] / count
        mean_gu[j] = mean_gu[j] / count
    for i in range(n):
        if recompute:
            normalise_row(u[i], mean, std, forward_gamma_row, forward_beta_row, False,
                          u_hat_scratch, y_scratch)
            u_hat_row = u_hat_scratch
        else:
            u_hat_row = u_hat[i]
        du_row = du[i]
        for j in range(d):
            dy = du_row[j]
            g = gamma_row[j] * dy if has_gamma else dy
            du_row[j] = (g - mean_g[j] - u_hat_row[j] * mean_gu[j]) / std[j]


@jit
def layer_parameter_grads(bn, dgamma_nodes, dbeta_nodes, dgamma, dbeta):
    """dgamma/dbeta from the node sums: as they are (BN(n)) or averaged over the nodes (BN)."""
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
        dgamma[:] = dgamma_nodes
        dbeta[:] = dbeta_nodes


# ---- affine, output, loss ----


@jit
def fill_rows(out, row):
    """Every row of out = row."""
    for i in range(out.shape[0]):
        out[i, :] = row


@jit
def affine(blas, x, w, b, u):
    """u = x W + b (u starts as the bias rows; BLAS adds the product to it)."""
    fill_rows(u, b)
    one = u.dtype.type(1.0)
    gemm(blas, False, False, one, x, w, one, u)


@jit
def column_sums(a, out):
    """out[j] = sum over rows of a[:, j], row by row."""
    out[:] = a.dtype.type(0.0)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[j] += a[i, j]


@jit
def affine_backward(blas, x, w, du, need_dx, dw, db, dx):
    """dW = x^T du, db = column sums of du, dx = du W^T when ``need_dx``."""
    one, zero = du.dtype.type(1.0), du.dtype.type(0.0)
    gemm(blas, True, False, one, x, du, zero, dw)
    column_sums(du, db)
    if need_dx:
        gemm(blas, False, True, one, du, w, zero, dx)


@jit
def affine_backward_update(blas, x, w, b, du, rate, decay, lam, need_dx, dx, dw, db):
    """A layer's last use in a step: dx = du W^T (the old W) when ``need_dx``, then
    W -= rate * (x^T du + weight-decay gradient) and b -= rate * column sums of du.

    Without weight decay BLAS adds -rate x^T du to W directly (``dw`` is not touched).
    """
    one, zero = du.dtype.type(1.0), du.dtype.type(0.0)
    if need_dx:
        gemm(blas, False, True, one, du, w, zero, dx)
    if decay == DECAY_NONE:
        gemm(blas, True, False, -rate, x, du, one, w)
    else:
        gemm(blas, True, False, one, x, du, zero, dw)
        sgd_weights(w, dw, rate, decay, lam)
    column_sums(du, db)
    sgd_vector(b, db, rate)


@jit
def output_forward(u, output, y):
    """Row softmax with the row maximum subtracted, or identity."""
    n, d = u.shape
    for i in range(n):
        if output == OUTPUT_IDENTITY:
            y[i, :] = u[i, :]
            continue
        top = u[i, 0]
        for j in range(1, d):
            top = max(top, u[i, j])
        total = u.dtype.type(0.0)
        for j in range(d):
            e = np.exp(u[i, j] - top)
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
def output_grad_from_u(u, t, output, du):
    """du = (output(u) - t) / N, row by row (y itself is not kept)."""
    n, d = u.shape
    count = u.dtype.type(n)
    output_forward(u, output, du)
    for i in range(n):
        for j in range(d):
            du[i, j] = (du[i, j] - t[i, j]) / count


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
def sgd_weights(w, dw, rate, decay, lam):
    """w -= rate * (dW + weight-decay gradient) (L1: lam * sign(W), L2: lam * W)."""
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
def update_running(running_mean, running_var, batch_mean, batch_var, momentum, momentum_rest):
    """In place: running = momentum * running + (1 - momentum) * batch statistic."""
    for j in range(running_mean.shape[0]):
        running_mean[j] = momentum * running_mean[j] + momentum_rest * batch_mean[j]
        running_var[j] = momentum * running_var[j] + momentum_rest * batch_var[j]
