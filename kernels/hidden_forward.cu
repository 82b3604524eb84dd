// hidden_forward.cu - one hidden layer after its affine step, fused: batch norm, activation,
// dropout multiplier (Ops.hidden_forward, op for op).
//
// hidden_forward_{f32,f64}(
//     const T* u, int n, int d,                 u (n, d) row-major: the affine output x W + b
//     int act, T alpha,                         activation code; alpha of leaky_relu
//     int bn, const T* gamma, const T* beta,    batch-norm code; gamma/beta: (1,) for 2 "bn",
//                                               (d,) for 3 "node", null for 0 "off" / 1 "n"
//     int stats, T* mean, T* var,               stats 0: the batch's own per-node mean and
//                                               population variance are computed over the n
//                                               rows and WRITTEN to mean, var (d,) (each may
//                                               be null); stats 1: mean, var (d,) are READ
//     T* std_dev,                               (d,) max(sqrt(var), 1e-7), written (may be
//                                               null). All four unused when bn is 0.
//     int drop, unsigned long long key,         dropout code and the mask's 64-bit key
//     const unsigned long long* key_at,         null, or the key in device memory (then *key_at
//                                               replaces key: a training step's, step.cu)
//     int keep_count, double keep,              round(keep * d) (article) and the keep ratio
//     T* mask_out,                              the multiplier Ops keeps in HiddenCache.mask:
//                                               drop 1: the (d,) 0/1 mask; drop 3: the (n, d)
//                                               multiplier (1/keep or 0); may be null
//     T* y_out, T* u_hat_out,                   (n, d) activation input y and normalised u
//                                               (HiddenCache.pre_activation / u_hat); null to
//                                               skip; y_out and u_hat_out may be the same
//                                               array (they are equal for bn 1)
//     T* z)                                     (n, d) output act(y) * multiplier
//
// u_hat = (u - mean) / std; y = u_hat (bn 1), gamma[0] * u_hat + beta[0] (bn 2),
// gamma[j] * u_hat + beta[j] (bn 3), u itself (bn 0). No epsilon: std is floored at 1e-7.
// Dropout: drop 1 multiplies node j by its article mask bit (made here from the key), drop 2
// by T(keep), drop 3 element (i, j) by T(1)/T(keep) where uniform01(key, i*d + j) < keep.
//
// Launch: block (32, 8, 1) (any blockDim.x * blockDim.y <= 1024, blockDim.z = 1): threadIdx.x
// picks the node (column) j = blockIdx.x * blockDim.x + threadIdx.x, the blockDim.y threads of
// a column share its rows; grid (ceil(d / 32), R, 1). Block row b writes rows
// [b * ceil(n / R), (b + 1) * ceil(n / R)). With stats 0 every block reduces all n rows for
// its columns (R = 1 is the natural choice for a training batch); with stats 1 use R > 1 to
// spread a whole evaluation set over the device. Outputs must not alias u.
#include "fastnn_common.cuh"

namespace fastnn {

template <typename T>
__device__ __forceinline__ void hidden_forward_impl(
    const T* u, int n, int d, int act, T alpha, int bn, const T* gamma, const T* beta,
    int stats, T* mean, T* var, T* std_dev, int drop, u64 key, const u64* key_at,
    int keep_count, double keep, T* mask_out, T* y_out, T* u_hat_out, T* z) {
    key = key_from(key, key_at);
    __shared__ T scratch[FASTNN_MAX_THREADS];
    __shared__ int counts[FASTNN_MAX_THREADS];
    const int y = threadIdx.y, rows_step = blockDim.y;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const bool column = j < d;
    const bool writer = column && blockIdx.y == 0 && y == 0;  // one thread per node
    const int rows_per_block = (n + gridDim.y - 1) / gridDim.y;
    const int row_begin = blockIdx.y * rows_per_block;
    const int row_end = min(n, row_begin + rows_per_block);

    // per-node statistics (every thread of the block takes part in the reductions)
    T m = T(0), s = T(1);
    if (bn != BN_OFF) {
        if (stats == STATS_BATCH) {
            T total = T(0);
            if (column)
                for (int i = y; i < n; i += rows_step) total += u[(long long)i * d + j];
            m = column_sum(total, scratch) / T(n);
            T squares = T(0);
            if (column)
                for (int i = y; i < n; i += rows_step) {
                    const T c = u[(long long)i * d + j] - m;
                    squares += c * c;
                }
            const T v = column_sum(squares, scratch) / T(n);
            s = floored_std(v);
            if (writer) {
                if (mean) mean[j] = m;
                if (var) var[j] = v;
            }
        } else if (column) {
            m = mean[j];
            s = floored_std(var[j]);
        }
        if (writer && std_dev) std_dev[j] = s;
    }

    // the per-node part of the dropout multiplier
    T node_factor = T(1);
    if (drop == DROP_ARTICLE) {
        node_factor = article_keep_column(key, d, keep_count, j, counts) ? T(1) : T(0);
        if (writer && mask_out) mask_out[j] = node_factor;
    } else if (drop == DROP_ARTICLE_EVAL) {
        node_factor = T(keep);
    }
    const T on = T(1) / T(keep);

    if (!column) return;  // no barrier below
    const int g = bn == BN_SCALAR ? 0 : j;
    for (int i = row_begin + y; i < row_end; i += rows_step) {
        const long long idx = (long long)i * d + j;
        T pre = u[idx];
        if (bn != BN_OFF) {
            const T u_hat = (pre - m) / s;
            if (u_hat_out) u_hat_out[idx] = u_hat;
            pre = bn == BN_N ? u_hat : gamma[g] * u_hat + beta[g];
        }
        if (y_out) y_out[idx] = pre;
        const T out = activate(act, pre, alpha);
        if (drop == DROP_NONE) {
            z[idx] = out;
        } else {
            const T factor = dropout_factor(drop, node_factor, on, key, keep, idx);
            if (drop == DROP_INVERTED && mask_out) mask_out[idx] = factor;
            z[idx] = out * factor;
        }
    }
}

}  // namespace fastnn

extern "C" __global__ void hidden_forward_f32(
    const float* u, int n, int d, int act, float alpha, int bn, const float* gamma,
    const float* beta, int stats, float* mean, float* var, float* std_dev, int drop,
    unsigned long long key, const unsigned long long* key_at, int keep_count, double keep,
    float* mask_out, float* y_out, float* u_hat_out, float* z) {
    fastnn::hidden_forward_impl<float>(u, n, d, act, alpha, bn, gamma, beta, stats, mean, var,
                                       std_dev, drop, key, key_at, keep_count, keep, mask_out,
                                       y_out, u_hat_out, z);
}

extern "C" __global__ void hidden_forward_f64(
    const double* u, int n, int d, int act, double alpha, int bn, const double* gamma,
    const double* beta, int stats, double* mean, double* var, double* std_dev, int drop,
    unsigned long long key, const unsigned long long* key_at, int keep_count, double keep,
    double* mask_out, double* y_out, double* u_hat_out, double* z) {
    fastnn::hidden_forward_impl<double>(u, n, d, act, alpha, bn, gamma, beta, stats, mean, var,
                                        std_dev, drop, key, key_at, keep_count, keep, mask_out,
                                        y_out, u_hat_out, z);
}
