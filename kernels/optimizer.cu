// optimizer.cu - one update of a parameter and its optimiser slots, in place, with the weight
// decay fused (Ops.optimizer_update, op for op).
//
// optimizer_update_{f32,f64}(T* param, const T* grad, T* first, T* second, long long count,
//                            int rule, T rate, int decay, T lam, T momentum, T beta1,
//                            T beta1_rest, T beta2, T beta2_rest, T eps, T correction_first,
//                            T correction_second, const double* rate_at,
//                            const double* corrections_at)
//   rule: OPT_* (fastnn_common.cuh). For each i < count, with old = param[i]:
//     decay_grad = lam * sign(old) (decay L1), lam * old (L2), none (decay 0); added to the
//     gradient g = grad[i], except for adamw, where it is added to the step (decoupled);
//     sgd       param = old - rate * g                       (first, second unused: may be null)
//     momentum  v = momentum * first + g; first = v; param = old - rate * v
//     nesterov  as momentum, param = old - rate * (g + momentum * v)
//     adam(w)   m = beta1 * first + beta1_rest * g; s = beta2 * second + beta2_rest * g * g;
//               param = old - rate * ((m / correction_first) / (sqrt(s / correction_second)
//               + eps) [+ decay_grad for adamw])
//   beta1_rest = 1 - beta1 and beta2_rest = 1 - beta2 as the host computes them (in float64,
//   then cast), correction_first/second = 1 - beta^t of this update t. rate 0: nothing
//   changes (the reference leaves such a parameter untouched even where its gradient is not
//   finite); rate, the corrections and nothing else change from step to step.
//   rate_at / corrections_at (each may be null): when given, the rate is T(rate_at[0]) and the
//   corrections T(corrections_at[0]), T(corrections_at[1]), read on the device (a training
//   step's values, written there by step_begin in step.cu, so that the launch's arguments
//   stay the same from step to step); the host-given rate / corrections are then unused.
//
// Launch: 1-D, any shape (grid-stride loop), e.g. block (256, 1, 1),
// grid (min(ceil(count / 256), 4096), 1, 1).
#include "fastnn_common.cuh"

namespace fastnn {

template <typename T>
__device__ __forceinline__ void optimizer_update_impl(
    T* param, const T* grad, T* first, T* second, long long count, int rule, T rate,
    int decay, T lam, T momentum, T beta1, T beta1_rest, T beta2, T beta2_rest, T eps,
    T correction_first, T correction_second, const double* rate_at,
    const double* corrections_at) {
    if (rate_at) rate = T(rate_at[0]);
    if (corrections_at) {
        correction_first = T(corrections_at[0]);
        correction_second = T(corrections_at[1]);
    }
    if (rate == T(0)) return;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
        const T old = param[i];
        T g = grad[i];
        T decay_grad = T(0);
        if (decay == DECAY_L1)
            decay_grad = lam * sign_of(old);
        else if (decay == DECAY_L2)
            decay_grad = lam * old;
        if (decay != DECAY_NONE && rule != OPT_ADAMW) g = g + decay_grad;
        if (rule == OPT_SGD) {
            param[i] = old - rate * g;
        } else if (rule == OPT_MOMENTUM || rule == OPT_NESTEROV) {
            const T velocity = momentum * first[i] + g;
            first[i] = velocity;
            param[i] = rule == OPT_NESTEROV ? old - rate * (g + momentum * velocity)
                                            : old - rate * velocity;
        } else {
            const T moment = beta1 * first[i] + beta1_rest * g;
            const T square = beta2 * second[i] + beta2_rest * (g * g);
            first[i] = moment;
            second[i] = square;
            T direction = (moment / correction_first) /
                          (f_sqrt(square / correction_second) + eps);
            if (decay != DECAY_NONE && rule == OPT_ADAMW) direction = direction + decay_grad;
            param[i] = old - rate * direction;
        }
    }
}

}  // namespace fastnn

extern "C" __global__ void optimizer_update_f32(
    float* param, const float* grad, float* first, float* second, long long count, int rule,
    float rate, int decay, float lam, float momentum, float beta1, float beta1_rest,
    float beta2, float beta2_rest, float eps, float correction_first, float correction_second,
    const double* rate_at, const double* corrections_at) {
    fastnn::optimizer_update_impl<float>(param, grad, first, second, count, rule, rate, decay,
                                         lam, momentum, beta1, beta1_rest, beta2, beta2_rest,
                                         eps, correction_first, correction_second, rate_at,
                                         corrections_at);
}

extern "C" __global__ void optimizer_update_f64(
    double* param, const double* grad, double* first, double* second, long long count,
    int rule, double rate, int decay, double lam, double momentum, double beta1,
    double beta1_rest, double beta2, double beta2_rest, double eps, double correction_first,
    double correction_second, const double* rate_at, const double* corrections_at) {
    fastnn::optimizer_update_impl<double>(param, grad, first, second, count, rule, rate, decay,
                                          lam, momentum, beta1, beta1_rest, beta2, beta2_rest,
                                          eps, correction_first, correction_second, rate_at,
                                          corrections_at);
}
