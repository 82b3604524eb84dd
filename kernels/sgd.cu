// sgd.cu - the SGD update, in place, with the weight decay's gradient fused into the weights'
// update (Ops.weight_decay's gradient + Ops.sgd_update, op for op).
//
// sgd_weight_{f32,f64}(T* w, const T* dw, long long count, T rate, int decay, T lam)
//   w (count,) -= rate * (dw + decay_grad), decay_grad = lam * sign(w) (decay 1, L1),
//   lam * w (decay 2, L2), nothing (decay 0); sign(0) = 0 as numpy.sign. The gradient is
//   taken at the old w. Skip the launch when rate is 0 (the reference leaves such a
//   parameter untouched even when its gradient is not finite).
//
// sgd_vector_{f32,f64}(T* p, const T* g, long long count, T rate)
//   p (count,) -= rate * g: biases, gamma, beta.
//
// Launch (both): 1-D, any shape (grid-stride loop), e.g. block (256, 1, 1),
// grid (min(ceil(count / 256), 1024), 1, 1).
#include "fastnn_common.cuh"

namespace fastnn {

template <typename T>
__device__ __forceinline__ void sgd_weight_impl(T* w, const T* dw, long long count, T rate,
                                                int decay, T lam) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
        const T old = w[i];
        T grad = dw[i];
        if (decay == DECAY_L1)
            grad = grad + lam * sign_of(old);
        else if (decay == DECAY_L2)
            grad = grad + lam * old;
        w[i] = old - rate * grad;
    }
}

template <typename T>
__device__ __forceinline__ void sgd_vector_impl(T* p, const T* g, long long count, T rate) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride)
        p[i] = p[i] - rate * g[i];
}

}  // namespace fastnn

extern "C" __global__ void sgd_weight_f32(float* w, const float* dw, long long count, float rate,
                                          int decay, float lam) {
    fastnn::sgd_weight_impl<float>(w, dw, count, rate, decay, lam);
}

extern "C" __global__ void sgd_weight_f64(double* w, const double* dw, long long count,
                                          double rate, int decay, double lam) {
    fastnn::sgd_weight_impl<double>(w, dw, count, rate, decay, lam);
}

extern "C" __global__ void sgd_vector_f32(float* p, const float* g, long long count,
                                          float rate) {
    fastnn::sgd_vector_impl<float>(p, g, count, rate);
}

extern "C" __global__ void sgd_vector_f64(double* p, const double* g, long long count,
                                          double rate) {
    fastnn::sgd_vector_impl<double>(p, g, count, rate);
}
