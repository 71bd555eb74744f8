// The one place that names the BLAS: row-major C[m, n] = A[m, k] * B[n, k]^T.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <cblas.h>  // scipy-openblas32: symbols carry the scipy_ prefix

namespace pathkernel {

template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, const T* A, const T* B, T* C);

template <>
inline void gemm_nt<float>(int64_t m, int64_t n, int64_t k, const float* A, const float* B,
                           float* C) {
  if (k == 0) { std::memset(C, 0, sizeof(float) * m * n); return; }
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)m, (blasint)n, (blasint)k,
                    1.0f, A, (blasint)k, B, (blasint)k, 0.0f, C, (blasint)n);
}

template <>
inline void gemm_nt<double>(int64_t m, int64_t n, int64_t k, const double* A, const double* B,
                            double* C) {
  if (k == 0) { std::memset(C, 0, sizeof(double) * m * n); return; }
  scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)m, (blasint)n, (blasint)k,
                    1.0, A, (blasint)k, B, (blasint)k, 0.0, C, (blasint)n);
}

// The upper triangle of C[n, n] = A[n, k] * A[n, k]^T (the rest of C is left untouched).
template <typename T>
void gram_upper(int64_t n, int64_t k, const T* A, T* C);

template <>
inline void gram_upper<float>(int64_t n, int64_t k, const float* A, float* C) {
  if (k == 0) { std::memset(C, 0, sizeof(float) * n * n); return; }
  scipy_cblas_sgemmt(CblasRowMajor, CblasUpper, CblasNoTrans, CblasTrans, (blasint)n, (blasint)k,
                     1.0f, A, (blasint)k, A, (blasint)k, 0.0f, C, (blasint)n);
}

template <>
inline void gram_upper<double>(int64_t n, int64_t k, const double* A, double* C) {
  if (k == 0) { std::memset(C, 0, sizeof(double) * n * n); return; }
  scipy_cblas_dgemmt(CblasRowMajor, CblasUpper, CblasNoTrans, CblasTrans, (blasint)n, (blasint)k,
                     1.0, A, (blasint)k, A, (blasint)k, 0.0, C, (blasint)n);
}

// OpenMP parallelizes over tiles; each tile's GEMM runs on its own thread.
inline void blas_single_threaded() { scipy_openblas_set_num_threads(1); }
inline const char* blas_config() { return scipy_openblas_get_config(); }

}  // namespace pathkernel
