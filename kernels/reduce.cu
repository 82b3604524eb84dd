// reduce.cu - a deterministic sum of a whole array in one block: the "bn" variant's scalar
// dgamma/dbeta (node sums averaged over the nodes), weight-decay penalties, loss shares.
//
// sum_reduce_{f32,f64}(const T* x, long long count, int transform, T scale, T divisor,
//                      T* out, int accumulate)
//   r = scale * (sum over i < count of f(x[i])) / divisor, f: x (transform 0,
//   TRANSFORM_IDENTITY), |x| (1, TRANSFORM_ABS), x^2 (2, TRANSFORM_SQUARE); out[0] = r, or
//   out[0] += r when accumulate is 1.
//   "bn" dgamma: sum_reduce(dgamma_nodes, d, 0, 1, d, dgamma, 0)     (sum / d)
//   L1 penalty:  sum_reduce(W, size, 1, lam, 1, penalty, 0)          (lam * sum |W|)
//   L2 penalty:  sum_reduce(W, size, 2, T(0.5 * lam), 1, penalty, 0) (0.5 lam sum W^2)
//   loss shares: sum_reduce(loss, gridDim of output_loss_grad, 0, 1, 1, loss_total, 0)
//   Pass scale and divisor as T (float for _f32): T(0.5 * lam) is what numpy computes.
//
// Launch: exactly ONE block (gridDim.x must be 1: blocks do not combine), 1-D, a multiple of
// 32 threads <= 1024: block (256, 1, 1), grid (1, 1, 1). The summation order depends only on
// count and blockDim, so the result is the same on every run.
#include "fastnn_common.cuh"

namespace fastnn {

template <typename T>
__device__ __forceinline__ void sum_reduce_impl(const T* x, long long count, int transform,
                                                T scale, T divisor, T* out, int accumulate) {
    __shared__ T scratch[32];
    T total = T(0);
    for (long long i = threadIdx.x; i < count; i += blockDim.x) {
        const T value = x[i];
        total += transform == TRANSFORM_ABS      ? f_abs(value)
                 : transform == TRANSFORM_SQUARE ? value * value
                                                 : value;
    }
    total = block_sum(total, scratch);
    if (threadIdx.x == 0) {
        const T result = scale * total / divisor;
        out[0] = accumulate ? out[0] + result : result;
    }
}

}  // namespace fastnn

extern "C" __global__ void sum_reduce_f32(const float* x, long long count, int transform,
                                          float scale, float divisor, float* out,
                                          int accumulate) {
    fastnn::sum_reduce_impl<float>(x, count, transform, scale, divisor, out, accumulate);
}

extern "C" __global__ void sum_reduce_f64(const double* x, long long count, int transform,
                                          double scale, double divisor, double* out,
                                          int accumulate) {
    fastnn::sum_reduce_impl<double>(x, count, transform, scale, divisor, out, accumulate);
}
