// colstats.cu - per-node (column) sums over row blocks: the article's whole-set batch
// statistics for evaluation, and the bias gradient (column sums of du). Deterministic: each
// row block writes its own partial row, and the partials are added in a fixed order.
//
// col_partial_sums_{f32,f64}(const T* u, int n, int d, const T* center, T* partial)
//   u (n, d). Block row b of the grid sums the rows [b * ceil(n / R), (b + 1) * ceil(n / R))
//   (R = gridDim.y) into partial[b * d + j]: sums of u when center is null, sums of the
//   squared deviations (u - center[j])^2 when center is the (d,) mean. partial: (R, d); with
//   R = 1 it holds the column sums themselves (e.g. db = column sums of du).
//   Launch: block (32, 8, 1) (any blockDim.x * blockDim.y <= 1024, blockDim.z = 1), grid
//   (ceil(d / 32), R, 1), e.g. R = ceil(n / 512).
//
// col_stats_finalize_{f32,f64}(const T* partial, int blocks, int n, int d, T* out,
//                              T* std_dev)
//   out[j] = (sum over b < blocks of partial[b * d + j]) / n, added in order b = 0, 1, ...
//   std_dev (d,) = max(sqrt(out), 1e-7) when not null (pass it on the variance round).
//   Launch: 1-D, block (256, 1, 1), grid (ceil(d / 256), 1, 1) (any 1-D shape: grid-stride).
//
// The whole-set statistics of a hidden layer (Network.forward_eval with the article's
// evaluation batch norm), then the forward with stats = 1 over row blocks:
//   col_partial_sums(u, n, d, NULL, partial);  col_stats_finalize(partial, R, n, d, mean, NULL)
//   col_partial_sums(u, n, d, mean, partial);  col_stats_finalize(partial, R, n, d, var, std)
//   hidden_forward(..., stats = 1, mean, var, std, ...) with grid (ceil(d / 32), R', 1)
#include "fastnn_common.cuh"

namespace fastnn {

template <typename T>
__device__ __forceinline__ void col_partial_sums_impl(const T* u, int n, int d,
                                                      const T* center, T* partial) {
    __shared__ T scratch[FASTNN_MAX_THREADS];
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int rows_per_block = (n + gridDim.y - 1) / gridDim.y;
    const int row_begin = blockIdx.y * rows_per_block;
    const int row_end = min(n, row_begin + rows_per_block);
    T total = T(0);
    if (j < d) {
        const T c = center ? center[j] : T(0);
        for (int i = row_begin + threadIdx.y; i < row_end; i += blockDim.y) {
            const T value = u[(long long)i * d + j];
            if (center) {
                const T dev = value - c;
                total += dev * dev;
            } else {
                total += value;
            }
        }
    }
    total = column_sum(total, scratch);
    if (j < d && threadIdx.y == 0) partial[(long long)blockIdx.y * d + j] = total;
}

template <typename T>
__device__ __forceinline__ void col_stats_finalize_impl(const T* partial, int blocks, int n,
                                                        int d, T* out, T* std_dev) {
    const int stride = gridDim.x * blockDim.x;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        T total = T(0);
        for (int b = 0; b < blocks; ++b) total += partial[(long long)b * d + j];
        const T value = total / T(n);
        out[j] = value;
        if (std_dev) std_dev[j] = floored_std(value);
    }
}

}  // namespace fastnn

extern "C" __global__ void col_partial_sums_f32(const float* u, int n, int d,
                                                const float* center, float* partial) {
    fastnn::col_partial_sums_impl<float>(u, n, d, center, partial);
}

extern "C" __global__ void col_partial_sums_f64(const double* u, int n, int d,
                                                const double* center, double* partial) {
    fastnn::col_partial_sums_impl<double>(u, n, d, center, partial);
}

extern "C" __global__ void col_stats_finalize_f32(const float* partial, int blocks, int n, int d,
                                                  float* out, float* std_dev) {
    fastnn::col_stats_finalize_impl<float>(partial, blocks, n, d, out, std_dev);
}

extern "C" __global__ void col_stats_finalize_f64(const double* partial, int blocks, int n,
                                                  int d, double* out, double* std_dev) {
    fastnn::col_stats_finalize_impl<double>(partial, blocks, n, d, out, std_dev);
}
