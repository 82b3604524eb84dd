// output_loss.cu - the output layer of a training batch, fused: output function, loss and
// the gradient at the output's pre-activation (Ops.output_loss_grad, op for op).
//
// output_loss_grad_{f32,f64}(
//     const T* u, const T* t, int n, int c,     u (n, c) output pre-activations, t (n, c)
//                                               one-hot targets
//     int output,                               0 softmax + cross-entropy, 1 identity + MSE
//     T* y,                                     (n, c) outputs (may be null)
//     T* du,                                    (n, c) du = (y - t) / n (may be null)
//     T* loss)                                  (gridDim.x,) the loss of the block's rows
//                                               (may be null)
//
// softmax: y = exp(u - max_row) / sum_row; cross-entropy -sum(t * log(max(y, 1e-7))) / n;
// MSE 0.5 * sum((y - t)^2) / n; each block writes its rows' share, already divided by n,
// to loss[blockIdx.x]: with one block loss[0] is the batch loss, with several the shares add
// up to it (sum_reduce in reduce.cu, or eval_output.cu for a whole set).
//
// Launch: 1-D blocks whose size is a multiple of 32 (<= 1024), one row per thread with a
// grid-stride loop: block (128, 1, 1), grid (1, 1, 1) for a training batch (n = 100).
#include "fastnn_common.cuh"

namespace fastnn {

// the output row i into y_row (softmax or identity); returns the row's loss term (before / n)
template <typename T>
__device__ __forceinline__ T output_row(const T* u_row, const T* t_row, int c, int output,
                                        T* y_row, T* du_row, T n) {
    T term = T(0);
    if (output == OUT_IDENTITY_MSE) {
        for (int k = 0; k < c; ++k) {
            const T diff = u_row[k] - t_row[k];
            term += diff * diff;
            if (y_row) y_row[k] = u_row[k];
            if (du_row) du_row[k] = diff / n;
        }
        return T(0.5) * term;
    }
    T top = u_row[0];
    for (int k = 1; k < c; ++k) top = u_row[k] > top ? u_row[k] : top;
    T total = T(0);
    for (int k = 0; k < c; ++k) total += f_exp(u_row[k] - top);
    for (int k = 0; k < c; ++k) {
        const T yk = f_exp(u_row[k] - top) / total;
        term += t_row[k] * f_log(yk < T(1e-7) ? T(1e-7) : yk);
        if (y_row) y_row[k] = yk;
        if (du_row) du_row[k] = (yk - t_row[k]) / n;
    }
    return -term;
}

template <typename T>
__device__ __forceinline__ void output_loss_grad_impl(const T* u, const T* t, int n, int c,
                                                      int output, T* y, T* du, T* loss) {
    __shared__ T scratch[32];
    const int stride = gridDim.x * blockDim.x;
    T sum = T(0);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long base = (long long)i * c;
        sum += output_row(u + base, t + base, c, output, y ? y + base : (T*)0,
                          du ? du + base : (T*)0, T(n));
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0 && loss) loss[blockIdx.x] = sum / T(n);
}

}  // namespace fastnn

extern "C" __global__ void output_loss_grad_f32(const float* u, const float* t, int n, int c,
                                                int output, float* y, float* du, float* loss) {
    fastnn::output_loss_grad_impl<float>(u, t, n, c, output, y, du, loss);
}

extern "C" __global__ void output_loss_grad_f64(const double* u, const double* t, int n, int c,
                                                int output, double* y, double* du,
                                                double* loss) {
    fastnn::output_loss_grad_impl<double>(u, t, n, c, output, y, du, loss);
}
