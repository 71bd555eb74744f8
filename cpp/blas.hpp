// The one place that names the BLAS: row-major C[m, n] = A[m, k] * B[n, k]^T (leading
// dimensions ``lda`` / ``ldb`` where the operands are column slices of wider rows).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <cblas.h>  // scipy-openblas32: symbols carry the scipy_ prefix

namespace pathkernel {

template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, const T* A, const T* B, T* C, int64_t lda = 0,
             int64_t ldb = 0);

template <>
inline void gemm_nt<float>(int64_t m, int64_t n, int64_t k, const float* A, const float* B,
                           float* C, int64_t lda, int64_t ldb) {
  if (k == 0) { std::memset(C, 0, sizeof(float) * m * n); return; }
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)m, (blasint)n, (blasint)k,
                    1.0f, A, (blasint)(lda ? lda : k), B, (blasint)(ldb ? ldb : k), 0.0f, C,
                    (blasint)n);
}

template <>
inline void gemm_nt<double>(int64_t m, int64_t n, int64_t k, const double* A, const double* B,
                            double* C, int64_t lda, int64_t ldb) {
  if (k == 0) { std::memset(C, 0, sizeof(double) * m * n); return; }
  scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)m, (blasint)n, (blasint)k,
                    1.0, A, (blasint)(lda ? lda : k), B, (blasint)(ldb ? ldb : k), 0.0, C,
                    (blasint)n);
}

// The upper triangle of C[n, n] = A[n, k] * A[n, k]^T (the rest of C is left untouched).
template <typename T>
void gram_upper(int64_t n, int64_t k, const T* A, T* C, int64_t lda = 0);

template <>
inline void gram_upper<float>(int64_t n, int64_t k, const float* A, float* C, int64_t lda) {
  if (k == 0) { std::memset(C, 0, sizeof(float) * n * n); return; }
  scipy_cblas_sgemmt(CblasRowMajor, CblasUpper, CblasNoTrans, CblasTrans, (blasint)n, (blasint)k,
                     1.0f, A, (blasint)(lda ? lda : k), A, (blasint)(lda ? lda : k), 0.0f, C,
                     (blasint)n);
}

template <>
inline void gram_upper<double>(int64_t n, int64_t k, const double* A, double* C, int64_t lda) {
  if (k == 0) { std::memset(C, 0, sizeof(double) * n * n); return; }
  scipy_cblas_dgemmt(CblasRowMajor, CblasUpper, CblasNoTrans, CblasTrans, (blasint)n, (blasint)k,
                     1.0, A, (blasint)(lda ? lda : k), A, (blasint)(lda ? lda : k), 0.0, C,
                     (blasint)n);
}

// OpenMP parallelizes over tiles (or, with fewer tiles than threads, over slices of the inner
// dimension); each GEMM runs on one thread. A threaded BLAS would leave its workers spinning
// after each call, slowing the torch work that follows.
inline void blas_single_threaded() { scipy_openblas_set_num_threads(1); }
inline const char* blas_config() { return scipy_openblas_get_config(); }

}  // namespace pathkernel
