// gemm.cu - simple shared-memory tiled matrix products for the batch-sized products of a
// training step, so that a whole step can be captured in a CUDA graph without cuBLAS.
// Row-major throughout; lda, ldb, ldc are row strides in elements.
//
// gemm_nn_{f32,f64}(int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb,
//                   T beta, T* C, int ldc, const T* bias)
//   C (M, N) = alpha * A B + beta * C (+ bias[col]), A (M, K), B (K, N)   forward: x W + b
// gemm_nt_{f32,f64}(same arguments)
//   C (M, N) = alpha * A B^T + beta * C (+ bias), A (M, K), B (N, K)       dx = du W^T
// gemm_tn_{f32,f64}(same arguments)
//   C (M, N) = alpha * A^T B + beta * C (+ bias), A (K, M), B (K, N)       dW = x^T du
//
// beta == 0 does not read C (it may hold NaN, as with BLAS); bias (N,) may be null.
// C must not alias A or B.
// Launch: block (16, 16, 1) exactly (the tile size; any other block traps), grid
// (ceil(N / 16), ceil(M / 16), 1). Thread (x, y) of block (bx, by) computes
// C[by * 16 + y, bx * 16 + x], accumulating over K in tiles of 16 staged in shared memory.
#include "fastnn_common.cuh"

namespace fastnn {

#define FASTNN_TILE 16

template <typename T, bool TRANS_A, bool TRANS_B>
__device__ __forceinline__ void gemm_impl(int M, int N, int K, T alpha, const T* A, int lda,
                                          const T* B, int ldb, T beta, T* C, int ldc,
                                          const T* bias) {
    __shared__ T a_tile[FASTNN_TILE][FASTNN_TILE + 1];
    __shared__ T b_tile[FASTNN_TILE][FASTNN_TILE + 1];
    if (blockDim.x != FASTNN_TILE || blockDim.y != FASTNN_TILE || blockDim.z != 1) __trap();
    const int x = threadIdx.x, y = threadIdx.y;
    const int row = blockIdx.y * FASTNN_TILE + y, col = blockIdx.x * FASTNN_TILE + x;
    T acc = T(0);
    for (int k0 = 0; k0 < K; k0 += FASTNN_TILE) {
        const int ka = k0 + x, kb = k0 + y;
        T a = T(0), b = T(0);
        if (row < M && ka < K)
            a = TRANS_A ? A[(long long)ka * lda + row] : A[(long long)row * lda + ka];
        if (kb < K && col < N)
            b = TRANS_B ? B[(long long)col * ldb + kb] : B[(long long)kb * ldb + col];
        a_tile[y][x] = a;
        b_tile[y][x] = b;
        __syncthreads();
        const int width = min(FASTNN_TILE, K - k0);
        for (int k = 0; k < width; ++k) acc += a_tile[y][k] * b_tile[k][x];
        __syncthreads();  // the tiles are refilled next round
    }
    if (row < M && col < N) {
        const long long idx = (long long)row * ldc + col;
        T result = alpha * acc;
        if (beta != T(0)) result += beta * C[idx];
        if (bias) result += bias[col];
        C[idx] = result;
    }
}

}  // namespace fastnn

extern "C" __global__ void gemm_nn_f32(int M, int N, int K, float alpha, const float* A,
                                      int lda, const float* B, int ldb, float beta, float* C,
                                      int ldc, const float* bias) {
    fastnn::gemm_impl<float, false, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
}

extern "C" __global__ void gemm_nn_f64(int M, int N, int K, double alpha, const double* A,
                                      int lda, const double* B, int ldb, double beta, double* C,
                                      int ldc, const double* bias) {
    fastnn::gemm_impl<double, false, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
}

extern "C" __global__ void gemm_nt_f32(int M, int N, int K, float alpha, const float* A,
                                      int lda, const float* B, int ldb, float beta, float* C,
                                      int ldc, const float* bias) {
    fastnn::gemm_impl<float, false, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
}

extern "C" __global__ void gemm_nt_f64(int M, int N, int K, double alpha, const double* A,
                                      int lda, const double* B, int ldb, double beta, double* C,
                                      int ldc, const double* bias) {
    fastnn::gemm_impl<double, false, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
}

extern "C" __global__ void gemm_tn_f32(int M, int N, int K, float alpha, const float* A,
                                      int lda, const float* B, int ldb, float beta, float* C,
                                      int ldc, const float* bias) {
    fastnn::gemm_impl<float, true, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
}

extern "C" __global__ void gemm_tn_f64(int M, int N, int K, double alpha, const double* A,
                                      int lda, const double* B, int ldb, double beta, double* C,
                                      int ldc, const double* bias) {
    fastnn::gemm_impl<double, true, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
}
