// fastnn_common.cuh - device helpers shared by every kernels/*.cu file.
//
// Not compiled on its own: fastnn.cuda.sources.read_source() pastes it in place of
// `#include "fastnn_common.cuh"`, so the text handed to cupy.RawModule (and to the CPU shim)
// is self-contained and CuPy's compile cache, keyed on the source text, sees header changes.
//
// Only builtin types and CUDA builtins are used: the files compile under NVRTC without any
// header, and under g++ with fastnn/cuda/cpu_shim.h force-included.
//
// Codes, the enums below: fastnn/backends/codes.py holds the same table (a test holds
// every enum here to it):
//   activation: 0 sigmoid, 1 tanh, 2 relu, 3 leaky_relu, 4 identity, 5 softplus, 6 softsign,
//               7 step
//   batch norm: 0 off, 1 "n" (normalise only), 2 "bn" (one scalar gamma/beta), 3 "node"
//   dropout:    0 none, 1 article training (per-node 0/1 mask, exactly keep_count ones),
//               2 article evaluation (times keep), 3 inverted training (per-element
//               Bernoulli(keep) mask times 1/keep)
//   statistics: 0 the batch's own (computed in the kernel), 1 given (mean, var)
//   output:     0 softmax + cross-entropy, 1 identity + MSE
//   decay:      0 none, 1 L1 (lam * sign(W)), 2 L2 (lam * W)
//   transform:  0 x, 1 |x|, 2 x^2 (what sum_reduce adds up)
//   optimizer:  0 sgd, 1 momentum, 2 nesterov, 3 adam, 4 adamw (adam, decay decoupled)
#ifndef FASTNN_COMMON_CUH
#define FASTNN_COMMON_CUH

namespace fastnn {

typedef unsigned long long u64;

enum { ACT_SIGMOID = 0, ACT_TANH = 1, ACT_RELU = 2, ACT_LEAKY_RELU = 3, ACT_IDENTITY = 4,
       ACT_SOFTPLUS = 5, ACT_SOFTSIGN = 6, ACT_STEP = 7 };
enum { BN_OFF = 0, BN_N = 1, BN_SCALAR = 2, BN_NODE = 3 };
enum { DROP_NONE = 0, DROP_ARTICLE = 1, DROP_ARTICLE_EVAL = 2, DROP_INVERTED = 3 };
enum { STATS_BATCH = 0, STATS_GIVEN = 1 };
enum { OUT_SOFTMAX_CE = 0, OUT_IDENTITY_MSE = 1 };
enum { DECAY_NONE = 0, DECAY_L1 = 1, DECAY_L2 = 2 };
enum { TRANSFORM_IDENTITY = 0, TRANSFORM_ABS = 1, TRANSFORM_SQUARE = 2 };
enum { OPT_SGD = 0, OPT_MOMENTUM = 1, OPT_NESTEROV = 2, OPT_ADAM = 3, OPT_ADAMW = 4 };

// the largest block any kernel accepts (the CUDA limit); sizes the __shared__ scratch arrays
#define FASTNN_MAX_THREADS 1024

// ---- counter-based random numbers: fastnn/rng.py, bit for bit ----
#define FASTNN_GOLDEN 0x9E3779B97F4A7C15ULL
#define FASTNN_MUL1 0xBF58476D1CE4E5B9ULL
#define FASTNN_MUL2 0x94D049BB133111EBULL

// SplitMix64 finaliser (rng.mix64)
__device__ __forceinline__ u64 mix64(u64 x) {
    x ^= x >> 30;
    x *= FASTNN_MUL1;
    x ^= x >> 27;
    x *= FASTNN_MUL2;
    return x ^ (x >> 31);
}

// element i of rng.uint64_stream(key, n): mix64(key + i * GOLDEN), wrapping
__device__ __forceinline__ u64 stream_value(u64 key, long long i) {
    return mix64(key + (u64)i * FASTNN_GOLDEN);
}

// rng.fold_key's step: one more counter folded into a key
__device__ __forceinline__ u64 fold_counter(u64 key, u64 counter) {
    return mix64((key ^ counter) + FASTNN_GOLDEN);
}

// A mask kernel's key: *key_at when the launch gives one (a step's key in device memory,
// written by step_begin: the launch's arguments then stay the same from step to step, as a
// CUDA graph needs), else the key argument.
__device__ __forceinline__ u64 key_from(u64 key, const u64* key_at) {
    return key_at ? *key_at : key;
}

// element i of rng.uniform01(key, n): the top 53 bits times 2^-53
__device__ __forceinline__ double uniform01(u64 key, long long i) {
    return (double)(stream_value(key, i) >> 11) * (1.0 / 9007199254740992.0);
}

// ---- math on float and double by overload ----
__device__ __forceinline__ float f_exp(float x) { return expf(x); }
__device__ __forceinline__ double f_exp(double x) { return exp(x); }
__device__ __forceinline__ float f_log(float x) { return logf(x); }
__device__ __forceinline__ double f_log(double x) { return log(x); }
__device__ __forceinline__ float f_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double f_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float f_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double f_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float f_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double f_abs(double x) { return fabs(x); }

template <typename T> __device__ __forceinline__ T quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() {
    return __int_as_float(0x7fc00000);
}
template <> __device__ __forceinline__ double quiet_nan<double>() {
    return __longlong_as_double(0x7ff8000000000000LL);
}

// numpy.sign: -1, 0 or 1 (NaN stays NaN)
template <typename T> __device__ __forceinline__ T sign_of(T w) {
    return w > T(0) ? T(1) : (w < T(0) ? T(-1) : w);
}

// max(sqrt(var), 1e-7) like numpy.maximum (a NaN root stays NaN)
template <typename T> __device__ __forceinline__ T floored_std(T var) {
    const T root = f_sqrt(var);
    return root < T(1e-7) ? T(1e-7) : root;
}

// ---- activations (fastnn/functions.py): value and derivative at the activation input u ----
template <typename T> __device__ __forceinline__ T activate(int act, T u, T alpha) {
    switch (act) {
    case ACT_SIGMOID: return T(1) / (T(1) + f_exp(-u));
    case ACT_TANH: return f_tanh(u);
    case ACT_RELU: return u < T(0) ? T(0) : u;
    case ACT_LEAKY_RELU: return u > T(0) ? u : alpha * u;
    case ACT_IDENTITY: return u;
    case ACT_SOFTPLUS: return f_log(T(1) + f_exp(u));
    case ACT_SOFTSIGN: return u / (T(1) + f_abs(u));
    case ACT_STEP: return u > T(0) ? T(1) : T(0);
    default: return quiet_nan<T>();  // an unknown code shows up as NaN, never as a silent value
    }
}

template <typename T> __device__ __forceinline__ T activation_derivative(int act, T u, T alpha) {
    switch (act) {
    case ACT_SIGMOID: {
        const T s = T(1) / (T(1) + f_exp(-u));
        return s * (T(1) - s);
    }
    case ACT_TANH: {
        const T t = f_tanh(u);
        return T(1) - t * t;
    }
    case ACT_RELU: return u > T(0) ? T(1) : T(0);
    case ACT_LEAKY_RELU: return u > T(0) ? T(1) : alpha;
    case ACT_IDENTITY: return T(1);
    case ACT_SOFTPLUS: return T(1) / (T(1) + f_exp(-u));
    case ACT_SOFTSIGN: {
        const T a = T(1) + f_abs(u);
        return T(1) / (a * a);
    }
    case ACT_STEP: return T(0);
    default: return quiet_nan<T>();
    }
}

// ---- block reductions ----

// For a (blockDim.x, blockDim.y) block where the threads of one threadIdx.x share a column:
// the sum of `value` over threadIdx.y, returned to every thread of the column. Holds barriers:
// every thread of the block must reach it. scratch: blockDim.x * blockDim.y elements.
template <typename T> __device__ __forceinline__ T column_sum(T value, T* scratch) {
    const int x = threadIdx.x, y = threadIdx.y, bx = blockDim.x, by = blockDim.y;
    scratch[y * bx + x] = value;
    __syncthreads();
    int stride = 1;
    while (stride < by) stride <<= 1;
    for (stride >>= 1; stride > 0; stride >>= 1) {
        if (y < stride && y + stride < by) scratch[y * bx + x] += scratch[(y + stride) * bx + x];
        __syncthreads();
    }
    const T total = scratch[x];
    __syncthreads();
    return total;
}

// Sum of `value` over a 1-D block whose size is a multiple of 32 (warp shuffles, then one
// warp over the per-warp sums); the result is valid in thread 0. Holds barriers: every
// thread of the block must reach it. scratch: 32 elements.
template <typename T> __device__ __forceinline__ T block_sum(T value, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_down_sync(0xffffffffu, value, offset);
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    if (warp == 0) {
        value = lane < warps ? scratch[lane] : T(0);
        for (int offset = 16; offset > 0; offset >>= 1)
            value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    __syncthreads();
    return value;
}

// Whether node j (< d) of the article mask of `key` is kept: fewer than keep_count of the d
// stream values are below its own (the values are distinct, so this is "among the keep_count
// smallest", the same set as the reference's argsort). The threadIdx.y rows of a column split
// the d comparisons. Holds barriers: every thread must reach it; threads with j >= d get false.
__device__ __forceinline__ bool article_keep_column(u64 key, int d, int keep_count, int j,
                                                    int* scratch) {
    if (keep_count <= 0) return false;  // uniform over the block: no barrier is skipped
    if (keep_count >= d) return j < d;
    const u64 mine = j < d ? stream_value(key, j) : 0ULL;
    int below = 0;
    if (j < d)
        for (int i = threadIdx.y; i < d; i += blockDim.y) below += stream_value(key, i) < mine;
    below = column_sum(below, scratch);
    return j < d && below < keep_count;
}

// The multiplier of element (i, j) (flat index idx) for the dropout modes; `column` is the
// per-node factor of the article modes, `on` the kept value 1/keep of the inverted mode.
template <typename T>
__device__ __forceinline__ T dropout_factor(int drop, T column, T on, u64 key, double keep,
                                            long long idx) {
    if (drop == DROP_INVERTED) return uniform01(key, idx) < keep ? on : T(0);
    return column;
}

}  // namespace fastnn

#endif  // FASTNN_COMMON_CUH
