"""A sparse first layer: the input in CSR form, its zeros skipped rather than multiplied.

MNIST after min-max scaling is ~81% exact zeros. The first layer's product and its weight
gradient then run over the non-zero inputs only. Results match the dense path to rounding
(sums run in another order); inf/NaN weights take the dense path so they propagate as there.

Both products are sums of rows scaled by the non-zeros (`product_chunks`): one output row is
held in vector registers (`simd`) while the rows it sums stream past, so a row of W1 is read
once per input non-zero and nothing else touches memory. Each element is summed from +0 in the
order of the non-zeros, so how rows or columns are grouped never changes a bit.
"""

from __future__ import annotations

import numpy as np

from ...codes import DECAY_NONE
from .common import Update, copy_into, jit, jit_inline, jit_nogil
from .layers import sgd_weights
from .simd import lanes, load, load_row, muladd, prefetch, store, zeros


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
def count_nonzero_codes(raw, table, counts):
    """`count_nonzeros` of the normalised inputs, from their raw bytes: entry (i, j) is
    nonzero when table[j or 0, raw[i, j]] is (see `Csr`)."""
    per_column = table.shape[0] > 1
    zero = table.dtype.type(0.0)
    total = 0
    for i in range(raw.shape[0]):
        row = raw[i]
        count = 0
        for j in range(raw.shape[1]):
            if table[j if per_column else 0, row[j]] != zero:
                count += 1
        counts[i] = count
        total += count
    return total


@jit_nogil
def fill_csr_codes(raw, table, indptr, indices, codes):
    """indices/codes of the nonzero normalised entries (`count_nonzero_codes`) row by row, in
    column order (indptr already filled): the compact CSR form of `Csr`."""
    per_column = table.shape[0] > 1
    zero = table.dtype.type(0.0)
    for i in range(raw.shape[0]):
        row = raw[i]
        p = indptr[i]
        for j in range(raw.shape[1]):
            code = row[j]
            if table[j if per_column else 0, code] != zero:
                indices[p] = j
                codes[p] = code
                p += 1


@jit_inline
def csr_value(csr, p):
    """Entry p's value of a `Csr`: values[p], or in the compact form its code's normalised
    value in its column."""
    if csr.table.shape[1] == 1:
        return csr.values[p]
    return csr.table[csr.indices[p] if csr.table.shape[0] > 1 else 0, csr.codes[p]]


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
def csr_row(csr, index, row):
    """Row ``index`` of the matrix a `Csr` holds, written densely into ``row`` (zeros where it
    has no entry) and returned."""
    zero = row.dtype.type(0.0)
    for j in range(row.shape[0]):
        row[j] = zero
    for p in range(csr.indptr[index], csr.indptr[index + 1]):
        row[csr.indices[p]] = csr_value(csr, p)
    return row


@jit_inline
def chunk_start(chunk, size, step):
    """Where chunk ``chunk`` of ``step`` elements of a row of ``size`` starts: the last chunk
    ends at the row's end, overlapping the one before (its lanes come out the same twice)."""
    return min(chunk * step, size - step)


@jit_inline
def product_chunks(indices, values, low, high, w, out, chunk):
    """Chunks chunk..chunk+7 of out = the sum over p in low..high of values[p] * w[indices[p]]
    (a chunk: `simd.lanes` elements; chunks past the row's end are its last chunk again: the
    same lanes, the same bits). Each element is summed from +0 in the order of p, product and
    sum rounded apart; the 8 chunks stay in vector registers, each w row is read once."""
    m, step = out.shape[0], lanes(out)
    s0, s1 = chunk_start(chunk, m, step), chunk_start(chunk + 1, m, step)
    s2, s3 = chunk_start(chunk + 2, m, step), chunk_start(chunk + 3, m, step)
    s4, s5 = chunk_start(chunk + 4, m, step), chunk_start(chunk + 5, m, step)
    s6, s7 = chunk_start(chunk + 6, m, step), chunk_start(chunk + 7, m, step)
    a0, a1, a2, a3 = zeros(out), zeros(out), zeros(out), zeros(out)
    a4, a5, a6, a7 = zeros(out), zeros(out), zeros(out), zeros(out)
    for p in range(low, high):
        v, j = values[p], indices[p]
        a0, a1 = muladd(a0, v, load_row(w, j, s0)), muladd(a1, v, load_row(w, j, s1))
        a2, a3 = muladd(a2, v, load_row(w, j, s2)), muladd(a3, v, load_row(w, j, s3))
        a4, a5 = muladd(a4, v, load_row(w, j, s4)), muladd(a5, v, load_row(w, j, s5))
        a6, a7 = muladd(a6, v, load_row(w, j, s6)), muladd(a7, v, load_row(w, j, s7))
    store(out, s0, a0)
    store(out, s1, a1)
    store(out, s2, a2)
    store(out, s3, a3)
    store(out, s4, a4)
    store(out, s5, a5)
    store(out, s6, a6)
    store(out, s7, a7)


@jit_inline
def narrow_product(indices, values, low, high, w, out):
    """`product_chunks` for a row narrower than one chunk, element by element (the same
    sums)."""
    out[:] = out.dtype.type(0.0)
    for p in range(low, high):
        v, row = values[p], w[indices[p]]
        for k in range(out.shape[0]):
            out[k] += v * row[k]


@jit
def sparse_rows_product(indptr, first, base, indices, values, w, u):
    """u[i] = the sum over p in indptr[first + i] - base .. indptr[first + i + 1] - base of
    values[p] * w[indices[p]], for each row of u (`product_chunks`' sums)."""
    n, m = u.shape
    step = lanes(w[0])
    if m < step:
        for i in range(n):
            narrow_product(indices, values, indptr[first + i] - base,
                           indptr[first + i + 1] - base, w, u[i])
        return
    chunks = (m + step - 1) // step
    for i in range(n):
        low, high = indptr[first + i] - base, indptr[first + i + 1] - base
        row = u[i]
        for chunk in range(0, chunks, 8):
            product_chunks(indices, values, low, high, w, row, chunk)


@jit
def add_bias(u, b):
    """u[i] += b for each row."""
    for i in range(u.shape[0]):
        row = u[i]
        for k in range(row.shape[0]):
            row[k] += b[k]


@jit
def sparse_affine_rows(indptr, indices, values, w, b, u):
    """u[i] = x[i] W + b for the CSR rows of x (indptr has len(u) + 1 entries)."""
    sparse_rows_product(indptr, 0, 0, indices, values, w, u)
    add_bias(u, b)


@jit
def sparse_block(csr, start, scale, w, b, u):
    """u[i] = (x[start + i] * scale) W + b for the CSR rows of x (a `Csr`; the evaluation's
    layer 1)."""
    indptr, indices = csr.indptr, csr.indices
    if scale == u.dtype.type(1.0) and csr.table.shape[1] == 1:
        sparse_rows_product(indptr, start, 0, indices, csr.values, w, u)
    else:  # the rows' values, decoded and scaled (x * 1 is x)
        base, end = indptr[start], indptr[start + u.shape[0]]
        scaled = np.empty(end - base, u.dtype)
        for p in range(base, end):
            scaled[p - base] = csr_value(csr, p) * scale
        sparse_rows_product(indptr, start, base, indices[base:end], scaled, w, u)
    add_bias(u, b)


#: how many rows ahead `sparse_batch` prefetches the source rows (a batch's rows are scattered
#: over the set: without it each row's first lines come from memory while the copy waits)
PREFETCH_ROWS_AHEAD = 4


@jit_inline
def prefetch_csr_row(csr, source):
    """Hint that CSR row ``source``'s indices and values (or codes) will be read (a line
    every 16 entries: every line of the int32 indices and float32 values, every other of
    float64's; every 64 of the byte codes)."""
    low, high = csr.indptr[source], csr.indptr[source + 1]
    for p in range(low, high, 16):
        prefetch(csr.indices, p)
    if csr.table.shape[1] == 1:
        for p in range(low, high, 16):
            prefetch(csr.values, p)
    else:
        for p in range(low, high, 64):
            prefetch(csr.codes, p)


@jit
def sparse_batch(csr, order, start, multiplier, batch_ptr, batch_idx, batch_val):
    """The CSR rows of x[order[start:start+n]] * multiplier (n = len(batch_ptr) - 1; x a
    `Csr`, the batch's values decoded from a compact one).

    Entries whose product is exactly 0 (a dropped input) are left out; the rest are the values
    the reference's dense x * multiplier holds. A multiplier of one 1 (no input dropout) copies
    the rows as they are.
    """
    indptr, indices, values = csr.indptr, csr.indices, csr.values
    compact = csr.table.shape[1] > 1
    n = batch_ptr.shape[0] - 1
    zero = batch_val.dtype.type(0.0)
    per_element = multiplier.shape[1] > 1
    per_row = multiplier.shape[0] > 1
    unmasked = n > 0 and not per_element and not per_row and multiplier[0, 0] == 1
    last = min(start + n, order.shape[0])
    for i in range(min(PREFETCH_ROWS_AHEAD, n)):
        prefetch_csr_row(csr, order[start + i])
    q = 0
    batch_ptr[0] = 0
    for i in range(n):
        if start + i + PREFETCH_ROWS_AHEAD < last:
            prefetch_csr_row(csr, order[start + i + PREFETCH_ROWS_AHEAD])
        source = order[start + i]
        low, high = indptr[source], indptr[source + 1]
        if unmasked and not compact:  # x * 1 is x, and its entries are nonzero
            copy_into(indices[low:high], batch_idx[q:q + high - low])
            copy_into(values[low:high], batch_val[q:q + high - low])
            q += high - low
        elif unmasked:
            for p in range(low, high):
                batch_idx[q] = indices[p]
                batch_val[q] = csr_value(csr, p)
                q += 1
        else:
            mask_row = multiplier[i if per_row else 0]
            for p in range(low, high):
                j = indices[p]
                value = csr_value(csr, p) * (mask_row[j] if per_element else mask_row[0])
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
    copy_into(col_ptr[:d], fill)
    for i in range(batch.span[1]):
        for q in range(batch.ptr[i], batch.ptr[i + 1]):
            j = batch.idx[q]
            batch.col_row[fill[j]] = batch.span[0] + i
            batch.col_val[fill[j]] = batch.val[q]
            fill[j] += 1


@jit_inline
def subtract_scaled(row, eta, acc):
    """row -= eta * acc (each element rounded as ``row[k] - eta * acc[k]``, eta in row's
    dtype); True when row is finite afterwards."""
    m, step = row.shape[0], lanes(row)
    zero, eta = row.dtype.type(0.0), row.dtype.type(eta)  # vector lanes and tail alike
    check = zeros(row)  # + 0 * each new value: stays 0 while every value is finite
    vectors = m // step
    for start in range(0, vectors * step, step):
        updated = muladd(load(row, start), -eta, load(acc, start))
        store(row, start, updated)
        check = muladd(check, zero, updated)
    finite = True
    for k in range(vectors * step, m):
        row[k] -= eta * acc[k]
        finite &= row[k] - row[k] == zero
    if vectors > 0:  # acc is spent: it holds the check's lanes
        store(acc, 0, check)
        for k in range(step):
            finite &= acc[k] == zero
    return finite


@jit_inline
def gather_column(parts, j, rows, values):
    """Column j's entries of the whole batch (both ``parts``, in row order) into rows/values;
    returns how many."""
    count = 0
    for batch in (parts[0], parts[1]):
        if batch.span[1] == 0:  # (else col_ptr is stale)
            continue
        for p in range(batch.col_ptr[j], batch.col_ptr[j + 1]):
            rows[count] = batch.col_row[p]
            values[count] = batch.col_val[p]
            count += 1
    return count


@jit
def sparse_weight_grad(parts, me, low, high, du, dw):
    """Rows low..high-1 of dW = x^T du, x the batch's CSR rows split between the two
    ``parts`` (`SparseBatch`, in row order, each transposed by `transpose_part`; part ``me``'s
    scratch is used). Row j is summed once, over column j's entries in row order (the same
    sums whichever rows one call computes, however the rows are split)."""
    scratch = parts[me]
    rows, values, acc = scratch.merged_row, scratch.merged_val, scratch.acc
    m, step = acc.shape[0], lanes(acc)
    for j in range(low, high):
        count = gather_column(parts, j, rows, values)
        if count == 0:  # x^T du is 0 there
            dw[j, :] = dw.dtype.type(0.0)
            continue
        if m < step:
            narrow_product(rows, values, 0, count, du, acc)
        else:
            for chunk in range(0, (m + step - 1) // step, 8):
                product_chunks(rows, values, 0, count, du, acc, chunk)
        copy_into(acc, dw[j])


@jit
def sparse_weight_update(parts, me, low, high, du, w, eta, decay, lam, dw):
    """Rows low..high-1 of W -= eta * (x^T du + weight-decay gradient of the old W), x^T du
    as `sparse_weight_grad` sums it. Without weight decay only the rows of W that the batch
    touches change (x^T du is 0 elsewhere); with it ``dw`` receives x^T du and `sgd_weights`
    updates every row of the range. True when those rows of W are finite afterwards.
    """
    if decay != DECAY_NONE:
        sparse_weight_grad(parts, me, low, high, du, dw)
        sgd_weights(w[low:high], dw[low:high], Update(eta, decay, lam))
        return all_finite(w[low:high])
    scratch = parts[me]
    rows, values, acc = scratch.merged_row, scratch.merged_val, scratch.acc
    m, step = acc.shape[0], lanes(acc)
    finite = True
    for j in range(low, high):
        count = gather_column(parts, j, rows, values)
        if count == 0:  # x^T du is 0 there: W's row stays
            continue
        if m < step:
            narrow_product(rows, values, 0, count, du, acc)
        else:
            for chunk in range(0, (m + step - 1) // step, 8):
                product_chunks(rows, values, 0, count, du, acc, chunk)
        finite &= subtract_scaled(w[j], eta, acc)
    return finite
