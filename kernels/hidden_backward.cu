// hidden_backward.cu - the backward pass of hidden_forward.cu, fused: dropout multiplier,
// activation derivative, batch-norm backward and the gamma/beta node sums
// (Ops.hidden_backward + Ops.batch_norm_backward, op for op).
//
// hidden_backward_{f32,f64}(
//     const T* dz, int n, int d,                dz (n, d): the gradient at z
//     int act, T alpha,                         activation code and leaky_relu's alpha
//     const T* y,                               (n, d) activation input (forward's y_out)
//     int bn, const T* gamma,                   batch-norm code; gamma (1,) for 2, (d,) for
//                                               3, null for 0 and 1
//     const T* u_hat, const T* std_dev,         forward's u_hat_out (n, d) and std_dev (d,);
//                                               unused (may be null) when bn is 0
//     int drop, unsigned long long key,         the same dropout arguments as the forward
//     const unsigned long long* key_at,         call (key_at: null, or the key in device
//     int keep_count, double keep,              memory): the multiplier is made again from
//                                               the key, bit for bit
//     T* du,                                    (n, d) gradient at u (the layer's affine output)
//     T* dgamma_nodes, T* dbeta_nodes)          (d,) per-node sums of u_hat * dy and of dy
//                                               (bn 2 and 3; may be null otherwise)
//
// da = dz * multiplier; dy = da * act'(y); bn 0: du = dy. Otherwise g = gamma * dy (g = dy
// for bn 1) and du = (g - mean(g) - u_hat * mean(g * u_hat)) / std, means over the n rows.
// For bn 3 the node sums ARE dgamma and dbeta; for bn 2 (one scalar gamma/beta per layer)
// the article's gradient is the node sums averaged over the d nodes: run
// sum_reduce(dgamma_nodes, d, 0, 1, d, dgamma, 0) (reduce.cu) and the same for dbeta.
//
// Launch: block (32, 8, 1) (any blockDim.x * blockDim.y <= 1024, blockDim.z = 1), grid
// (ceil(d / 32), R, 1) as in hidden_forward.cu: block row b writes the rows
// [b * ceil(n / R), (b + 1) * ceil(n / R)) of du, every block reduces all n rows of its
// columns (R = 1 for a training batch). du must not alias dz when R > 1.
#include "fastnn_common.cuh"

namespace fastnn {

template <typename T>
__device__ __forceinline__ void hidden_backward_impl(
    const T* dz, int n, int d, int act, T alpha, const T* y, int bn, const T* gamma,
    const T* u_hat, const T* std_dev, int drop, u64 key, const u64* key_at, int keep_count,
    double keep, T* du, T* dgamma_nodes, T* dbeta_nodes) {
    key = key_from(key, key_at);
    __shared__ T scratch[FASTNN_MAX_THREADS];
    __shared__ int counts[FASTNN_MAX_THREADS];
    const int row = threadIdx.y, rows_step = blockDim.y;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const bool column = j < d;
    const int rows_per_block = (n + gridDim.y - 1) / gridDim.y;
    const int row_begin = blockIdx.y * rows_per_block;
    const int row_end = min(n, row_begin + rows_per_block);

    T node_factor = T(1);
    if (drop == DROP_ARTICLE)
        node_factor = article_keep_column(key, d, keep_count, j, counts) ? T(1) : T(0);
    else if (drop == DROP_ARTICLE_EVAL)
        node_factor = T(keep);
    const T on = T(1) / T(keep);
    const bool has_gamma = bn == BN_SCALAR || bn == BN_NODE;
    const int g_index = bn == BN_SCALAR ? 0 : j;
    const T gam = (has_gamma && column) ? gamma[g_index] : T(1);

    // pass 1: dy for every row of the column (this block's rows are stored in du), and the
    // column sums the batch-norm backward needs
    T sum_g = T(0), sum_gu = T(0), sum_dy = T(0), sum_dyu = T(0);
    const bool all_rows = bn != BN_OFF;  // the statistics need every row, not just ours
    if (column) {
        const int first = all_rows ? row : row_begin + row;
        const int last = all_rows ? n : row_end;
        for (int i = first; i < last; i += rows_step) {
            const long long idx = (long long)i * d + j;
            T da = dz[idx];
            if (drop != DROP_NONE) da *= dropout_factor(drop, node_factor, on, key, keep, idx);
            const T dy = da * activation_derivative(act, y[idx], alpha);
            if (i >= row_begin && i < row_end) du[idx] = dy;
            if (all_rows) {
                const T h = u_hat[idx];
                const T g = has_gamma ? gam * dy : dy;
                sum_g += g;
                sum_gu += g * h;
                sum_dy += dy;
                sum_dyu += h * dy;
            }
        }
    }
    if (!all_rows) return;  // uniform over the block

    const T mean_g = column_sum(sum_g, scratch) / T(n);
    const T mean_gu = column_sum(sum_gu, scratch) / T(n);
    if (has_gamma) {
        sum_dy = column_sum(sum_dy, scratch);
        sum_dyu = column_sum(sum_dyu, scratch);
        if (column && blockIdx.y == 0 && row == 0) {
            if (dgamma_nodes) dgamma_nodes[j] = sum_dyu;
            if (dbeta_nodes) dbeta_nodes[j] = sum_dy;
        }
    }
    if (!column) return;

    // pass 2: the batch-norm backward over this block's rows
    const T s = std_dev[j];
    for (int i = row_begin + row; i < row_end; i += rows_step) {
        const long long idx = (long long)i * d + j;
        const T dy = du[idx];
        const T g = has_gamma ? gam * dy : dy;
        du[idx] = (g - mean_g - u_hat[idx] * mean_gu) / s;
    }
}

}  // namespace fastnn

extern "C" __global__ void hidden_backward_f32(
    const float* dz, int n, int d, int act, float alpha, const float* y, int bn,
    const float* gamma, const float* u_hat, const float* std_dev, int drop,
    unsigned long long key, const unsigned long long* key_at, int keep_count, double keep,
    float* du, float* dgamma_nodes, float* dbeta_nodes) {
    fastnn::hidden_backward_impl<float>(dz, n, d, act, alpha, y, bn, gamma, u_hat, std_dev, drop,
                                        key, key_at, keep_count, keep, du, dgamma_nodes,
                                        dbeta_nodes);
}

extern "C" __global__ void hidden_backward_f64(
    const double* dz, int n, int d, int act, double alpha, const double* y, int bn,
    const double* gamma, const double* u_hat, const double* std_dev, int drop,
    unsigned long long key, const unsigned long long* key_at, int keep_count, double keep,
    double* du, double* dgamma_nodes, double* dbeta_nodes) {
    fastnn::hidden_backward_impl<double>(dz, n, d, act, alpha, y, bn, gamma, u_hat, std_dev,
                                         drop, key, key_at, keep_count, keep, du, dgamma_nodes,
                                         dbeta_nodes);
}
