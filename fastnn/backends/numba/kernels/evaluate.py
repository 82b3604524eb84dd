"""Evaluation of a whole set, a block of rows at a time (blocks may run on several threads).

Without batch norm, or with running statistics, a block goes from the input to the loss on its
own. With the article's whole-set statistics, hidden layer k's pre-activations of every row go
to a (N, d_k) buffer first (`pre_activation_block`), its statistics are taken over all rows
(`whole_set_statistics`), and only then does the next layer start.
"""

from __future__ import annotations

import numpy as np

from ...codes import BN_OFF, OUTPUT_IDENTITY
from .blas import gemm
from .common import LOG_FLOOR, Activation, EvalLayer, Statistics, jit, jit_driver
from .layers import (
    activate_row,
    argmax_row,
    batch_statistics,
    fill_rows,
    normalise_row,
    output_forward,
    std_columns,
)
from .sparse import csr_row, sparse_block


@jit
def hidden_eval_rows(u, activation, bn, has_gamma, layer, u_hat_scratch, y_scratch, z):
    """z = act(BN(u)) * scale row by row with fixed statistics (z may be u itself).

    ``activation``: an `Activation`; ``layer``: the layer's `EvalLayer` rows."""
    d = u.shape[1]
    act, alpha = activation.code, activation.alpha
    mean, std, gamma_row, beta_row = layer.mean, layer.std, layer.gamma, layer.beta
    scale_row = layer.scale
    u_hat_scratch, y_scratch = u_hat_scratch[:d], y_scratch[:d]
    for i in range(u.shape[0]):
        if bn == BN_OFF:
            activate_row(u[i], act, alpha, scale_row, z[i])
        else:
            normalise_row(u[i], mean, std, gamma_row, beta_row, has_gamma, u_hat_scratch,
                          y_scratch)
            activate_row(y_scratch if has_gamma else u_hat_scratch, act, alpha, scale_row, z[i])


@jit
def layer_activation(plan, h):
    """Hidden layer h + 1's `Activation` (h: its index in the plan's ``acts``/``alphas``)."""
    return Activation(plan.acts[h], plan.alphas[h])


@jit
def eval_layer(rows, h, d):
    """Hidden layer h + 1's `EvalLayer`: row h of the `EvalRows` ``rows`` (row h + 1 of the
    scales), its first d entries."""
    return EvalLayer(rows.means[h, :d], rows.stds[h, :d], rows.gammas[h, :d],
                     rows.betas[h, :d], rows.scales[h + 1, :d])


@jit
def output_rows(u, t, output, predicted, start):
    """Output function of u in place; predicted[start + i] = argmax of row i; the summed loss
    terms (float64: sum of t log max(y, 1e-7), or of (y - t)^2)."""
    n, d = u.shape
    floor = u.dtype.type(LOG_FLOOR)
    total = 0.0
    if output != OUTPUT_IDENTITY:
        output_forward(u, output, u)
    for i in range(n):
        row, target = u[i], t[i]
        predicted[start + i] = argmax_row(row)
        if output == OUTPUT_IDENTITY:
            for j in range(d):
                diff = row[j] - target[j]
                total += diff * diff
        else:
            for j in range(d):
                if target[j] != 0 or not np.isfinite(row[j]):  # 0 * log(...) is 0 unless NaN
                    value = floor if row[j] < floor else row[j]
                    total += target[j] * np.log(value)
    return total


@jit
def input_rows(x, csr, start, n, scale):
    """Rows start..start+n of x times the input scale (x's own rows, uncopied, for scale 1).
    An x of no rows (a set kept only in CSR form) has its rows made from ``csr``."""
    from_csr = x.shape[0] == 0
    if scale == x.dtype.type(1.0) and not from_csr:
        return x[start:start + n]
    z = np.empty((n, x.shape[1]), x.dtype)
    for i in range(n):
        source = csr_row(csr, start + i, z[i]) if from_csr else x[start + i]
        target = z[i]
        for j in range(x.shape[1]):
            target[j] = source[j] * scale
    return z


@jit_driver
def evaluate_block(data, start, n, layers, first, full, plan, rows, blas, predicted):
    """Rows start..start+n from layer ``first`` on: the summed loss terms (float64) of their
    outputs; predicted[start:start+n] receives their classes.

    ``data``: the `Data` (x, t and x's CSR form: layer 1 then skips x's zeros);
    ``layers``: the `Layers` record. ``first`` is 1 (from the input x) or L (the output
    layer): then hidden layer L - 1's pre-activations of these rows are in full[L - 2], and
    are normalised and activated here (in place). ``plan`` is an `EvalPlan`, ``rows`` the
    `EvalRows` of `fastnn.backends.numba.evaluation.eval_rows`. Blocks are independent:
    threads may run them at once (the GIL is released).
    """
    x, t, csr = data.x, data.t, data.csr
    weights, biases = layers.weights, layers.biases
    bn, has_gamma = plan.bn, plan.has_gamma
    scales = rows.scales
    n_layers = len(weights)
    dtype = x.dtype
    one = dtype.type(1.0)
    widest = max(scales.shape[1], x.shape[1])
    u_hat_scratch, y_scratch = np.empty(widest, dtype), np.empty(widest, dtype)
    if first == 1 and csr.sparse:
        d = weights[0].shape[1]
        z = np.empty((n, d), dtype)
        sparse_block(csr, start, scales[0, 0], weights[0], biases[0], z)
        if n_layers > 1:
            hidden_eval_rows(z, layer_activation(plan, 0), bn, has_gamma, eval_layer(rows, 0, d),
                             u_hat_scratch, y_scratch, z)
        first = 2
    elif first == 1:
        z = input_rows(x, csr, start, n, scales[0, 0])
    else:
        h, d = first - 2, weights[first - 2].shape[1]
        z = full[first - 2][start:start + n]
        hidden_eval_rows(z, layer_activation(plan, h), bn, has_gamma, eval_layer(rows, h, d),
                         u_hat_scratch, y_scratch, z)
    for k in range(first, n_layers + 1):
        d = weights[k - 1].shape[1]
        u = np.empty((n, d), dtype)
        fill_rows(u, biases[k - 1])
        gemm(blas, False, False, one, z, weights[k - 1], one, u)
        if k < n_layers:
            h = k - 1
            hidden_eval_rows(u, layer_activation(plan, h), bn, has_gamma,
                             eval_layer(rows, h, d), u_hat_scratch, y_scratch, u)
        z = u
    return output_rows(z, t[start:start + n], plan.output, predicted, start)


@jit_driver
def pre_activation_block(data, start, n, k, layers, full, plan, rows, blas):
    """full[k - 1][start:start+n] = hidden layer k's pre-activations of those rows; for k > 1
    full[k - 2]'s rows are first normalised and activated in place (their statistics known).
    With a CSR form (``data.csr``) layer 1 skips x's zeros (see `evaluate_block`)."""
    x, csr = data.x, data.csr
    weights, biases = layers.weights, layers.biases
    bn, has_gamma = plan.bn, plan.has_gamma
    scale_rows = rows.scales
    dtype = x.dtype
    one = dtype.type(1.0)
    if k == 1 and csr.sparse:
        sparse_block(csr, start, scale_rows[0, 0], weights[0], biases[0],
                     full[0][start:start + n])
        return
    if k == 1:
        z = input_rows(x, csr, start, n, scale_rows[0, 0])
    else:
        h, d = k - 2, weights[k - 2].shape[1]
        z = full[k - 2][start:start + n]
        hidden_eval_rows(z, layer_activation(plan, h), bn, has_gamma, eval_layer(rows, h, d),
                         np.empty(d, dtype), np.empty(d, dtype), z)
    u = full[k - 1][start:start + n]
    fill_rows(u, biases[k - 1])
    gemm(blas, False, False, one, z, weights[k - 1], one, u)


@jit
def whole_set_statistics(u, rows, h):
    """Row h of the `EvalRows` ``rows``' means and stds (their first d = u.shape[1] entries):
    the mean (row by row, in the dtype: the reference's axis-0 mean) and floored std of u."""
    d = u.shape[1]
    stats = Statistics(rows.means[h, :d], np.empty(d, u.dtype), rows.stds[h, :d])
    batch_statistics(u, stats)
    std_columns(stats, 0, d)
