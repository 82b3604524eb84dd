"""A sparse first layer: the input in CSR form, its zeros skipped rather than multiplied.

MNIST after min-max scaling is ~81% exact zeros. The first layer's product and its weight
gradient then run over the non-zero inputs only. Results match the dense path to rounding
(sums run in another order); inf/NaN weights take the dense path so they propagate as there.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from .common import DECAY_NONE, jit, jit_nogil
from .layers import sgd_weights


@jit_nogil
def count_nonzeros(x, counts):
    """counts[i] = the number of nonzero entries of row i (NaN counts: it is not zero)."""
    zero = x.dtype.type(0.0)
    total = 0
    for i in range(x.shape[0]):
        row = x[i]
        count = 0
        for j in range(x.shape[1]):
            if row[j] != zero:
                count += 1
        counts[i] = count
        total += count
    return total


@jit_nogil
def fill_csr(x, indptr, indices, values):
    """indices/values of x's nonzeros row by row, in column order (indptr already filled)."""
    zero = x.dtype.type(0.0)
    for i in range(x.shape[0]):
        row = x[i]
        p = indptr[i]
        for j in range(x.shape[1]):
            if row[j] != zero:
                indices[p] = j
                values[p] = row[j]
                p += 1


@jit
def sparse_row_product(indices, values, low, high, w, out):
    """out = the sum over p in low..high of values[p] * w[indices[p]] (four rows a pass)."""
    m = out.shape[0]
    out[:] = out.dtype.type(0.0)
    p = low
    while p + 4 <= high:
        v0, v1, v2, v3 = values[p], values[p + 1], values[p + 2], values[p + 3]
        w0, w1 = w[indices[p]], w[indices[p + 1]]
        w2, w3 = w[indices[p + 2]], w[indices[p + 3]]
        for k in range(m):
            out[k] += (v0 * w0[k] + v1 * w1[k]) + (v2 * w2[k] + v3 * w3[k])
        p += 4
    while p < high:
        v0, w0 = values[p], w[indices[p]]
        for k in range(m):
            out[k] += v0 * w0[k]
        p += 1


@jit
def sparse_affine_rows(indptr, indices, values, w, b, u):
    """u[i] = x[i] W + b for the CSR rows of x (indptr has len(u) + 1 entries)."""
    for i in range(u.shape[0]):
        row = u[i]
        sparse_row_product(indices, values, indptr[i], indptr[i + 1], w, row)
        for k in range(row.shape[0]):
            row[k] += b[k]


@jit
def sparse_block(indptr, indices, values, start, scale, w, b, u):
    """u[i] = (x[start + i] * scale) W + b for the CSR rows of x (the evaluation's layer 1)."""
    one = u.dtype.type(1.0)
    scaled = np.empty(w.shape[0] if scale != one else 0, u.dtype)
    for i in range(u.shape[0]):
        row = u[i]
        low, high = indptr[start + i], indptr[start + i + 1]
        if scale == one:
            sparse_row_product(indices, values, low, high, w, row)
        else:
            for p in range(low, high):
                scaled[p - low] = values[p] * scale
            sparse_row_product(indices[low:high], scaled, 0, high - low, w, row)
        for k in range(row.shape[0]):
            row[k] += b[k]


@jit
def sparse_batch(indptr, indices, values, order, start, multiplier, batch_ptr, batch_idx,
                 batch_val):
    """The CSR rows of x[order[start:start+n]] * multiplier (n = len(batch_ptr) - 1).

    Entries whose product is exactly 0 (a dropped input) are left out; the rest are the values
    the reference's dense x * multiplier holds.
    """
    n = batch_ptr.shape[0] - 1
    zero = batch_val.dtype.type(0.0)
    per_element = multiplier.shape[1] > 1
    per_row = multiplier.shape[0] > 1
    q = 0
    batch_ptr[0] = 0
    for i in range(n):
        source = order[start + i]
        mask_row = multiplier[i if per_row else 0]
        for p in range(indptr[source], indptr[source + 1]):
            j = indices[p]
            value = values[p] * (mask_row[j] if per_element else mask_row[0])
            if value != zero:
                batch_idx[q] = j
                batch_val[q] = value
                q += 1
        batch_ptr[i + 1] = q


@jit
def gather_targets(t, order, start, t_batch):
    """t_batch = t[order[start:start+n]]."""
    for i in range(t_batch.shape[0]):
        source, target = t[order[start + i]], t_batch[i]
        for j in range(target.shape[0]):
            target[j] = source[j]


@jit
def all_finite(a):
    """True when a (2-d) holds no inf or NaN."""
    zero = a.dtype.type(0.0)
    finite = True
    for i in range(a.shape[0]):
        row = a[i]
        for j in range(row.shape[0]):
            finite &= row[j] - row[j] == zero  # NaN (not 0) for inf and NaN
    return finite


#: the CSR rows of one part of a training batch (``span``: its first row in the batch and its
#: row count, set each step), the same rows by column (``col_*``, from `transpose_part`), and
#: the scratch its share of the weight update gathers one column of the whole batch into
SparseBatch = namedtuple(
    "SparseBatch", "span ptr idx val col_ptr col_fill col_row col_val merged_row merged_val acc")


@jit
def transpose_part(batch):
    """The part's rows by column: entries of column j are col_ptr[j] to col_ptr[j + 1] of
    col_row (the row in the whole batch) and col_val, in row order (a counting sort)."""
    col_ptr, fill = batch.col_ptr, batch.col_fill
    d = fill.shape[0]
    nnz = batch.ptr[batch.span[1]]
    col_ptr[:] = 0
    for q in range(nnz):
        col_ptr[batch.idx[q] + 1] += 1
    for j in range(d):
        col_ptr[j + 1] += col_ptr[j]
    fill[:] = col_ptr[:d]
    for i in range(batch.span[1]):
        for q in range(batch.ptr[i], batch.ptr[i + 1]):
            j = batch.idx[q]
            batch.col_row[fill[j]] = batch.span[0] + i
            batch.col_val[fill[j]] = batch.val[q]
            fill[j] += 1


@jit
def sparse_weight_update(parts, me, low, high, du, w, eta, decay, lam, dw):
    """Rows low..high-1 of W -= eta * (x^T du + weight-decay gradient of the old W), x the
    batch's CSR rows split between the two ``parts`` (`SparseBatch`, in row order, each
    transposed by `transpose_part`; part ``me``'s scratch is used).

    Row j of x^T du is summed once, over column j's entries of the whole batch in row order
    (the same sums whichever rows of W one call updates, however the rows are split). Without
    weight decay only the rows of W that the batch touches change (x^T du is 0 elsewhere); with
    it ``dw`` receives x^T du and `sgd_weights` updates every row of the range. True when those
    rows of W are finite afterwards.
    """
    first_part, second_part = parts[0], parts[1]
    both = first_part.span[1] > 0 and second_part.span[1] > 0
    single = first_part if first_part.span[1] > 0 else second_part
    ptr_a, row_a, val_a = first_part.col_ptr, first_part.col_row, first_part.col_val
    ptr_b, row_b, val_b = second_part.col_ptr, second_part.col_row, second_part.col_val
    ptr_s, row_s, val_s = single.col_ptr, single.col_row, single.col_val
    scratch = parts[me]
    merged_row, merged_val, acc = scratch.merged_row, scratch.merged_val, scratch.acc
    m = w.shape[1]
    zero = w.dtype.type(0.0)
    finite = True
    for j in range(low, high):
        if both:  # the column's entries of both parts, in row order
            last = 0
            for p in range(ptr_a[j], ptr_a[j + 1]):
                merged_row[last] = row_a[p]
                merged_val[last] = val_a[p]
                last += 1
            for p in range(ptr_b[j], ptr_b[j + 1]):
                merged_row[last] = row_b[p]
                merged_val[last] = val_b[p]
                last += 1
            first, rows, values = 0, merged_row, merged_val
        else:  # one part holds every row: its column is read where it is
            first, last, rows, values = ptr_s[j], ptr_s[j + 1], row_s, val_s
        if first == last:
            if decay != DECAY_NONE:
                dw[j, :] = zero
            continue
        sparse_row_product(rows, values, first, last, du, acc)  # x[:, j]^T du
        if decay != DECAY_NONE:
            dw[j, :] = acc
            continue
        row = w[j]
        for k in range(m):
            row[k] -= eta * acc[k]
            finite &= row[k] - row[k] == zero
    if decay != DECAY_NONE:
        sgd_weights(w[low:high], dw[low:high], eta, decay, lam)
        return all_finite(w[low:high])
    return finite
