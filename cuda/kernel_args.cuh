// What a launch of the Gram kernels receives (the terms of one tile grid), and element
// conversions shared by the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace pathkernel {
namespace cuda {
namespace {

constexpr int kMaxTerms = 16; // terms per launch; more are split over launches (additive)

struct TermArgs {
  const void* A1;
  const void* D1;
  const void* A2;
  const void* D2;
  int64_t S1, S2, da, dd;
  double beta, scale;
  int hasA;
  int alignedA, alignedD;  // 16-byte rows: staged with cp.async, else element by element
};

struct Args {
  int nterms;
  TermArgs t[kMaxTerms];
  int64_t M, N, C1, C2;
  int64_t rb, cb;  // tile grid
  int symmetric;
  double alpha;
  const void* w;
};

template <typename T>
__device__ __forceinline__ float to_f(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ double to_d(T x) { return static_cast<double>(to_f(x)); }
template <>
__device__ __forceinline__ double to_d<double>(double x) { return x; }

template <typename S>
__device__ __forceinline__ S from_f(float v) { return static_cast<S>(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace
}  // namespace cuda
}  // namespace pathkernel
