// running_stats.cu - the running batch-norm statistics after a training step, in place
// (Ops.update_running, op for op).
//
// update_running_{f32,f64}(T* mean, T* var, const T* batch_mean, const T* batch_var, int d,
//                          double momentum)
//   mean (d,) = T(momentum) * mean + T(1 - momentum) * batch_mean, and the same for var with
//   batch_var; batch_mean and batch_var are hidden_forward's mean and var outputs (stats 0).
//   1 - momentum is taken in double, then rounded to T, as numpy does with a Python float.
//
// Launch: 1-D, any shape (grid-stride loop), e.g. block (256, 1, 1), grid (ceil(d / 256), 1, 1).
#include "fastnn_common.cuh"

namespace fastnn {

template <typename T>
__device__ __forceinline__ void update_running_impl(T* mean, T* var, const T* batch_mean,
                                                    const T* batch_var, int d,
                                                    double momentum) {
    const T keep = T(momentum), take = T(1.0 - momentum);
    const int stride = gridDim.x * blockDim.x;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        mean[j] = keep * mean[j] + take * batch_mean[j];
        var[j] = keep * var[j] + take * batch_var[j];
    }
}

}  // namespace fastnn

extern "C" __global__ void update_running_f32(float* mean, float* var, const float* batch_mean,
                                              const float* batch_var, int d, double momentum) {
    fastnn::update_running_impl<float>(mean, var, batch_mean, batch_var, d, momentum);
}

extern "C" __global__ void update_running_f64(double* mean, double* var,
                                              const double* batch_mean, const double* batch_var,
                                              int d, double momentum) {
    fastnn::update_running_impl<double>(mean, var, batch_mean, batch_var, d, momentum);
}
