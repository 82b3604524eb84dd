// masks.cu - dropout masks from their 64-bit keys, bit-identical to fastnn/rng.py and
// Ops.article_mask / Ops.bernoulli_mask, and the input layer's dropout multiply.
//
// article_mask_{f32,f64}(unsigned long long key, const unsigned long long* key_at, int d,
//                        int keep_count, T* mask)
//   mask (d,) = 1 at the keep_count nodes whose stream values mix64(key + i*GOLDEN) are the
//   smallest, else 0 (keep_count = rng.keep_count(keep, d) = round(keep * d), from the host).
//   Launch: block (256, 1, 1) (any 1-D size <= 1024), grid (ceil(d / 256), 1, 1).
//   Each thread ranks its own value against all d values, read in block-sized tiles
//   through shared memory: O(d) work per node, no sort. key_at (may be null): when given,
//   the key is *key_at, read on the device (a training step's key, see step.cu).
//
// bernoulli_mask_{f32,f64}(unsigned long long key, long long count, double keep, T on_value,
//                          T* out)
//   out (count,) = on_value where uniform01(key, i) < keep, else 0; uniform01 = (value >> 11)
//   * 2^-53 in double. on_value = 1 gives the 0/1 mask of Ops.bernoulli_mask (count = n * d
//   for an (n, d) mask); on_value = T(1) / T(keep) gives the inverted-dropout multiplier.
//   Launch: 1-D, any size (grid-stride loop), e.g. block (256,1,1), grid (ceil(count/256),1,1).
//
// dropout_input_{f32,f64}(const T* x, int n, int d, int drop, unsigned long long key,
//                         const unsigned long long* key_at, double keep, const T* mask,
//                         T* out)
//   out (n, d) = x * multiplier, the input layer's dropout: drop 0 copies, 1 (article
//   training) multiplies column j by mask[j] (a (d,) mask from article_mask), 2 (article
//   evaluation) by T(keep), 3 (inverted) element (i, j) by T(1)/T(keep) or 0 as drawn from
//   the key (mask unused, may be null; key_at as for article_mask). out must not alias x
//   partially (out == x is fine).
//   Launch: 1-D grid-stride over n * d elements, e.g. block (256,1,1), grid (ceil(n*d/256),1,1).
#include "fastnn_common.cuh"

namespace fastnn {

template <typename T>
__device__ __forceinline__ void article_mask_impl(u64 key, const u64* key_at, int d,
                                                  int keep_count, T* mask) {
    key = key_from(key, key_at);
    __shared__ u64 tile[FASTNN_MAX_THREADS];
    const int tid = threadIdx.x, threads = blockDim.x;
    const int j = blockIdx.x * threads + tid;
    const u64 mine = j < d ? stream_value(key, j) : 0ULL;
    int below = 0;
    for (int start = 0; start < d; start += threads) {
        const int i = start + tid;
        tile[tid] = i < d ? stream_value(key, i) : 0ULL;
        __syncthreads();
        const int count = min(threads, d - start);
        for (int k = 0; k < count; ++k) below += tile[k] < mine;
        __syncthreads();  // the tile is refilled next round
    }
    if (j < d) mask[j] = below < keep_count ? T(1) : T(0);
}

template <typename T>
__device__ __forceinline__ void bernoulli_mask_impl(u64 key, long long count, double keep,
                                                    T on_value, T* out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride)
        out[i] = uniform01(key, i) < keep ? on_value : T(0);
}

template <typename T>
__device__ __forceinline__ void dropout_input_impl(const T* x, int n, int d, int drop, u64 key,
                                                   const u64* key_at, double keep,
                                                   const T* mask, T* out) {
    key = key_from(key, key_at);
    const long long count = (long long)n * d;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const T on = T(1) / T(keep);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
        const T value = x[i];
        if (drop == DROP_NONE) {
            out[i] = value;
        } else if (drop == DROP_ARTICLE) {
            out[i] = value * mask[i % d];
        } else if (drop == DROP_ARTICLE_EVAL) {
            out[i] = value * T(keep);
        } else {
            out[i] = value * dropout_factor(drop, T(0), on, key, keep, i);
        }
    }
}

}  // namespace fastnn

extern "C" __global__ void article_mask_f32(unsigned long long key,
                                            const unsigned long long* key_at, int d,
                                            int keep_count, float* mask) {
    fastnn::article_mask_impl<float>(key, key_at, d, keep_count, mask);
}

extern "C" __global__ void article_mask_f64(unsigned long long key,
                                            const unsigned long long* key_at, int d,
                                            int keep_count, double* mask) {
    fastnn::article_mask_impl<double>(key, key_at, d, keep_count, mask);
}

extern "C" __global__ void bernoulli_mask_f32(unsigned long long key, long long count,
                                              double keep, float on_value, float* out) {
    fastnn::bernoulli_mask_impl<float>(key, count, keep, on_value, out);
}

extern "C" __global__ void bernoulli_mask_f64(unsigned long long key, long long count,
                                              double keep, double on_value, double* out) {
    fastnn::bernoulli_mask_impl<double>(key, count, keep, on_value, out);
}

extern "C" __global__ void dropout_input_f32(const float* x, int n, int d, int drop,
                                             unsigned long long key,
                                             const unsigned long long* key_at, double keep,
                                             const float* mask, float* out) {
    fastnn::dropout_input_impl<float>(x, n, d, drop, key, key_at, keep, mask, out);
}

extern "C" __global__ void dropout_input_f64(const double* x, int n, int d, int drop,
                                             unsigned long long key,
                                             const unsigned long long* key_at, double keep,
                                             const double* mask, double* out) {
    fastnn::dropout_input_impl<double>(x, n, d, drop, key, key_at, keep, mask, out);
}
