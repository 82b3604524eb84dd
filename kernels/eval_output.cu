// eval_output.cu - the output layer of a whole evaluation set in row blocks: loss sum,
// predicted classes and the count of correct predictions (the tail of Ops.evaluate).
//
// eval_output_{f32,f64}(
//     const T* u, const T* t, int n, int c,     u (n, c) output pre-activations, t (n, c)
//                                               one-hot targets
//     int output,                               0 softmax + cross-entropy, 1 identity + MSE
//     const int* labels,                        (n,) int32 class labels (may be null)
//     int* predicted,                           (n,) int32 argmax of each output row, the
//                                               first maximum like numpy.argmax (may be null)
//     double* loss_sum,                         (1,) += the set's loss SUM (not divided by n):
//                                               -sum(t * log(max(y, 1e-7))) or
//                                               0.5 * sum((y - t)^2); zero it before the first
//                                               block, divide by N after the last
//     unsigned long long* correct)              (1,) += rows whose argmax equals labels[i]
//                                               (unused, may be null, when labels is null)
//
// Each block reduces its rows (warp shuffles, then shared memory) and adds its sums with one
// atomicAdd per block, so the set may be split over several launches (row blocks of a large
// set) that accumulate into the same two counters. The argmax is taken over y (the softmax
// output), as Ops.predicted_classes does. The float atomics make the loss's last bits depend
// on the order blocks finish; the count is exact.
//
// Launch: 1-D blocks, a multiple of 32 threads (<= 1024), one row per thread, grid-stride:
// block (256, 1, 1), grid (ceil(n / 256), 1, 1).
#include "fastnn_common.cuh"

namespace fastnn {

template <typename T>
__device__ __forceinline__ void eval_output_impl(const T* u, const T* t, int n, int c,
                                                 int output, const int* labels, int* predicted,
                                                 double* loss_sum,
                                                 unsigned long long* correct) {
    __shared__ double loss_scratch[32];
    __shared__ unsigned long long count_scratch[32];
    const int stride = gridDim.x * blockDim.x;
    double block_loss = 0.0;
    unsigned long long hits = 0ULL;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T* u_row = u + (long long)i * c;
        const T* t_row = t + (long long)i * c;
        T term = T(0);
        int best = 0;
        if (output == OUT_IDENTITY_MSE) {
            T top = u_row[0];
            bool nan_seen = !(top == top);
            for (int k = 0; k < c; ++k) {
                const T value = u_row[k];
                const T diff = value - t_row[k];
                term += diff * diff;
                if (!nan_seen && (value > top || !(value == value))) {
                    best = k;
                    top = value;
                    nan_seen = !(value == value);
                }
            }
            term = T(0.5) * term;
        } else {
            T top = u_row[0];
            for (int k = 1; k < c; ++k) top = u_row[k] > top ? u_row[k] : top;
            T total = T(0);
            for (int k = 0; k < c; ++k) total += f_exp(u_row[k] - top);
            T best_y = T(0);
            bool nan_seen = false;
            for (int k = 0; k < c; ++k) {
                const T yk = f_exp(u_row[k] - top) / total;
                term += t_row[k] * f_log(yk < T(1e-7) ? T(1e-7) : yk);
                if (!nan_seen && (k == 0 || yk > best_y || !(yk == yk))) {
                    best = k;
                    best_y = yk;
                    nan_seen = !(yk == yk);
                }
            }
            term = -term;
        }
        block_loss += (double)term;
        if (predicted) predicted[i] = best;
        if (labels && best == labels[i]) hits += 1ULL;
    }
    block_loss = block_sum(block_loss, loss_scratch);
    hits = block_sum(hits, count_scratch);
    if (threadIdx.x == 0) {
        if (loss_sum) atomicAdd(loss_sum, block_loss);
        if (correct && labels) atomicAdd(correct, hits);
    }
}

}  // namespace fastnn

extern "C" __global__ void eval_output_f32(const float* u, const float* t, int n, int c,
                                           int output, const int* labels, int* predicted,
                                           double* loss_sum, unsigned long long* correct) {
    fastnn::eval_output_impl<float>(u, t, n, c, output, labels, predicted, loss_sum, correct);
}

extern "C" __global__ void eval_output_f64(const double* u, const double* t, int n, int c,
                                           int output, const int* labels, int* predicted,
                                           double* loss_sum, unsigned long long* correct) {
    fastnn::eval_output_impl<double>(u, t, n, c, output, labels, predicted, loss_sum, correct);
}
