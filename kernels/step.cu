// step.cu - what changes from one training step to the next, made on the device, so that every
// launch of a step takes the same arguments at every step (what a CUDA graph replays).
//
// step_begin_{f32,f64}(unsigned long long* counter, const double* table, int n_values,
//                      long long* current, unsigned long long* keys, int n_keys,
//                      double* values)
//   counter (2,): the epoch's dropout key (Plan.epoch_key = rng.fold_key(seed, STREAM_DROPOUT,
//   epoch)) and the index s of the step about to run; the host sets both before the epoch's
//   first step. Writes current[0] = s; keys[l] = rng.dropout_key(seed, epoch, s, l) for
//   l < n_keys (the key epoch key, s and l fold into, bit for bit); values[i] =
//   table[s * n_values + i] for i < n_values (the step's rates and Adam's corrections, made
//   on the host; table may be null when n_values is 0); then counter[1] = s + 1.
//   The mask kernels read their layer's key from keys (key_at), optimizer_update its rate
//   and corrections from values (rate_at, corrections_at), gather_batch the step from
//   current. The two dtype variants are the same kernel (the launch helpers name every
//   kernel by its dtype). Launch: grid (1, 1, 1), block (1, 1, 1).
//
// gather_batch_{f32,f64}(const T* x, const T* t, const long long* order,
//                        const long long* current, int batch_size, int n, int d, int c,
//                        T* x_out, T* t_out)
//   The batch of step s = current[0]: row i < n of x_out (n, d) and t_out (n, c) is row
//   order[s * batch_size + i] of x (rows, d) and t (rows, c), copied (numpy.take's rows).
//   The host has checked every order entry against the rows of x. Launch: 1-D grid-stride,
//   e.g. block (256, 1, 1), grid (min(ceil(n * (d + c) / 256), 4096), 1, 1).
#include "fastnn_common.cuh"

namespace fastnn {

__device__ __forceinline__ void step_begin_impl(u64* counter, const double* table, int n_values,
                                                long long* current, u64* keys, int n_keys,
                                                double* values) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const u64 step = counter[1];
    const u64 step_key = fold_counter(counter[0], step);
    current[0] = (long long)step;
    for (int layer = 0; layer < n_keys; ++layer) keys[layer] = fold_counter(step_key, layer);
    for (int i = 0; i < n_values; ++i) values[i] = table[(long long)step * n_values + i];
    counter[1] = step + 1;
}

template <typename T>
__device__ __forceinline__ void gather_batch_impl(const T* x, const T* t, const long long* order,
                                                  const long long* current, int batch_size,
                                                  int n, int d, int c, T* x_out, T* t_out) {
    const long long* rows = order + current[0] * batch_size;
    const long long width = (long long)d + c;
    const long long count = (long long)n * width;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
        const long long row = i / width, column = i % width;
        const long long source = rows[row];
        if (column < d)
            x_out[row * d + column] = x[source * d + column];
        else
            t_out[row * c + (column - d)] = t[source * c + (column - d)];
    }
}

}  // namespace fastnn

extern "C" __global__ void step_begin_f32(unsigned long long* counter, const double* table,
                                          int n_values, long long* current,
                                          unsigned long long* keys, int n_keys, double* values) {
    fastnn::step_begin_impl(counter, table, n_values, current, keys, n_keys, values);
}

extern "C" __global__ void step_begin_f64(unsigned long long* counter, const double* table,
                                          int n_values, long long* current,
                                          unsigned long long* keys, int n_keys, double* values) {
    fastnn::step_begin_impl(counter, table, n_values, current, keys, n_keys, values);
}

extern "C" __global__ void gather_batch_f32(const float* x, const float* t,
                                            const long long* order, const long long* current,
                                            int batch_size, int n, int d, int c, float* x_out,
                                            float* t_out) {
    fastnn::gather_batch_impl<float>(x, t, order, current, batch_size, n, d, c, x_out, t_out);
}

extern "C" __global__ void gather_batch_f64(const double* x, const double* t,
                                            const long long* order, const long long* current,
                                            int batch_size, int n, int d, int c, double* x_out,
                                            double* t_out) {
    fastnn::gather_batch_impl<double>(x, t, order, current, batch_size, n, d, c, x_out, t_out);
}
