// CUDA kernels for the factored Gram accumulation (see gram_cuda.hpp).
//
// fused_tc_kernel: tensor-core tiles (WMMA) for the common case S = 1, C = 1. One block of
// four warps owns a 32 x 32 tile of examples; for every term it reduces both factor Grams
// A_I A_J^T and D_I D_J^T on chip into accumulator fragments (inputs staged through shared
// memory, zero-padded, converted to fp16 / bf16 / TF32), multiplies them elementwise into a
// running accumulator fragment (accumulator fragments of one type share their element
// mapping), and touches the output once at the end. Neither Gram ever reaches global memory.
//
// generic_kernel: CUDA cores, any S and C, float64 accumulation; the reference path for
// positions / channels, float64 inputs and precision="exact".
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "gram_cuda.hpp"
#include "tile_math.hpp"

namespace pathkernel {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int BT = 32;        // examples per tile side
constexpr int KC = 32;        // K chunk staged in shared memory
constexpr int LDS = KC + 8;   // shared-memory row stride (elements), keeps 32-byte alignment
constexpr int LDC = BT + 4;   // row stride of the staged result tile
constexpr int kMaxTerms = 16; // terms per launch; more are split over launches (additive)

struct TermArgs {
  const void* A1;
  const void* D1;
  const void* A2;
  const void* D2;
  int64_t S1, S2, da, dd;
  double beta, scale;
  int hasA;
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

// Tensor-core shapes per input type: fp16 / bf16 use m16n16k16, float uses TF32 m16n16k8.
template <typename TIn>
struct Tc;
template <>
struct Tc<__half> {
  using S = __half;
  static constexpr int WK = 16;
  using AF = wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major>;
  using BF = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major>;
  using CF = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};
template <>
struct Tc<__nv_bfloat16> {
  using S = __nv_bfloat16;
  static constexpr int WK = 16;
  using AF = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  using BF = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
  using CF = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};
template <>
struct Tc<float> {
  using S = float;
  static constexpr int WK = 8;
  using AF = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using BF = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using CF = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
};

// Rows [r0, r0 + BT) x columns [k0, k0 + KC) of a row-major [rows, K] matrix into shared
// memory, converted and zero-padded outside the matrix.
template <typename TIn, typename S>
__device__ __forceinline__ void stage(S* dst, const TIn* src, int64_t rows, int64_t K, int64_t r0,
                                      int64_t k0) {
  for (int e = threadIdx.x; e < BT * KC; e += blockDim.x) {
    const int r = e / KC, k = e % KC;
    const int64_t gr = r0 + r, gk = k0 + k;
    const float v = (gr < rows && gk < K) ? to_f(src[gr * K + gk]) : 0.f;
    dst[r * LDS + k] = from_f<S>(v);
  }
}

// acc = X1[i0:i0+32] X2[j0:j0+32]^T on this warp's 16 x 16 quarter (wr, wc).
template <typename TIn, bool X3>
__device__ void gram(typename Tc<TIn>::CF& acc, const TIn* X1, int64_t n1, const TIn* X2,
                     int64_t n2, int64_t K, int64_t i0, int64_t j0, typename Tc<TIn>::S* s1,
                     typename Tc<TIn>::S* s2, int wr, int wc) {
  using T = Tc<TIn>;
  wmma::fill_fragment(acc, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    stage(s1, X1, n1, K, i0, k0);
    stage(s2, X2, n2, K, j0, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KC; kk += T::WK) {
      typename T::AF a;
      typename T::BF b;
      wmma::load_matrix_sync(a, s1 + wr * 16 * LDS + kk, LDS);
      wmma::load_matrix_sync(b, s2 + wc * 16 * LDS + kk, LDS);
      if constexpr (std::is_same<TIn, float>::value) {
        if constexpr (X3) {  // 3xTF32: x = big + small, drop small * small
          typename T::AF a_small;
          typename T::BF b_small;
#pragma unroll
          for (int t = 0; t < a.num_elements; ++t) {
            const float big = wmma::__float_to_tf32(a.x[t]);
            a_small.x[t] = wmma::__float_to_tf32(a.x[t] - big);
            a.x[t] = big;
          }
#pragma unroll
          for (int t = 0; t < b.num_elements; ++t) {
            const float big = wmma::__float_to_tf32(b.x[t]);
            b_small.x[t] = wmma::__float_to_tf32(b.x[t] - big);
            b.x[t] = big;
          }
          wmma::mma_sync(acc, a_small, b, acc);
          wmma::mma_sync(acc, a, b_small, acc);
        } else {
#pragma unroll
          for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
#pragma unroll
          for (int t = 0; t < b.num_elements; ++t) b.x[t] = wmma::__float_to_tf32(b.x[t]);
        }
      }
      wmma::mma_sync(acc, a, b, acc);
    }
    __syncthreads();
  }
}

template <typename TIn, typename TOut, bool X3>
__global__ void __launch_bounds__(128) fused_tc_kernel(TOut* out, Args args) {
  using T = Tc<TIn>;
  __shared__ __align__(32) typename T::S s1[BT * LDS];
  __shared__ __align__(32) typename T::S s2[BT * LDS];
  __shared__ __align__(32) float cst[BT * LDC];
  int64_t r, c;
  tiles::coords(blockIdx.x, args.rb, args.cb, args.symmetric != 0, &r, &c);
  const int64_t i0 = r * BT, j0 = c * BT;
  const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;

  typename T::CF acc, ag, dg;
  wmma::fill_fragment(acc, 0.f);
  for (int l = 0; l < args.nterms; ++l) {
    const TermArgs& t = args.t[l];
    if (t.hasA)
      gram<TIn, X3>(ag, static_cast<const TIn*>(t.A1), args.M, static_cast<const TIn*>(t.A2),
                    args.N, t.da, i0, j0, s1, s2, wr, wc);
    gram<TIn, X3>(dg, static_cast<const TIn*>(t.D1), args.M, static_cast<const TIn*>(t.D2),
                  args.N, t.dd, i0, j0, s1, s2, wr, wc);
    const float beta = static_cast<float>(t.beta), scale = static_cast<float>(t.scale);
#pragma unroll
    for (int e = 0; e < acc.num_elements; ++e)
      acc.x[e] = tiles::fuse<float>(acc.x[e], t.hasA ? ag.x[e] : 0.f, scale * dg.x[e], beta,
                                    t.hasA != 0);
  }
  wmma::store_matrix_sync(cst + wr * 16 * LDC + wc * 16, acc, LDC, wmma::mem_row_major);
  __syncthreads();
  const TOut* w = static_cast<const TOut*>(args.w);
  const bool sym = args.symmetric != 0;
  for (int e = threadIdx.x; e < BT * BT; e += blockDim.x) {
    const int li = e / BT, lj = e % BT;
    const int64_t gi = i0 + li, gj = j0 + lj;
    if (gi >= args.M || gj >= args.N || !tiles::owns(gi, gj, sym)) continue;
    const double v = args.alpha * static_cast<double>(cst[li * LDC + lj]);
    out[gi * args.N + gj] += static_cast<TOut>(v * (w ? static_cast<double>(w[gj]) : 1.0));
    if (tiles::mirrors(gi, gj, sym))
      out[gj * args.N + gi] += static_cast<TOut>(v * (w ? static_cast<double>(w[gi]) : 1.0));
  }
}

template <typename TIn, typename TOut>
__global__ void __launch_bounds__(256) generic_kernel(TOut* out, Args args) {
  const int64_t total = args.M * args.N * args.C1 * args.C2;
  const bool sym = args.symmetric != 0;
  const TOut* w = static_cast<const TOut*>(args.w);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c2 = idx % args.C2, c1 = (idx / args.C2) % args.C1;
    const int64_t j = (idx / (args.C1 * args.C2)) % args.N, i = idx / (args.N * args.C1 * args.C2);
    if (!tiles::owns(i, j, sym)) continue;
    double acc = 0.0;
    for (int l = 0; l < args.nterms; ++l) {
      const TermArgs& t = args.t[l];
      const TIn* A1 = static_cast<const TIn*>(t.A1);
      const TIn* A2 = static_cast<const TIn*>(t.A2);
      const TIn* D1 = static_cast<const TIn*>(t.D1);
      const TIn* D2 = static_cast<const TIn*>(t.D2);
      for (int64_t s1 = 0; s1 < t.S1; ++s1)
        for (int64_t s2 = 0; s2 < t.S2; ++s2) {
          double ag = 0.0, dg = 0.0;
          if (t.hasA) {
            const TIn* a = A1 + (i * t.S1 + s1) * t.da;
            const TIn* b = A2 + (j * t.S2 + s2) * t.da;
            for (int64_t k = 0; k < t.da; ++k) ag += to_d(a[k]) * to_d(b[k]);
          }
          const TIn* d = D1 + ((i * t.S1 + s1) * args.C1 + c1) * t.dd;
          const TIn* e = D2 + ((j * t.S2 + s2) * args.C2 + c2) * t.dd;
          for (int64_t k = 0; k < t.dd; ++k) dg += to_d(d[k]) * to_d(e[k]);
          acc = tiles::fuse<double>(acc, ag, t.scale * dg, t.beta, t.hasA != 0);
        }
    }
    const double v = args.alpha * acc;
    out[((i * args.N + j) * args.C1 + c1) * args.C2 + c2] +=
        static_cast<TOut>(v * (w ? static_cast<double>(w[j]) : 1.0));
    if (tiles::mirrors(i, j, sym))
      out[((j * args.N + i) * args.C1 + c2) * args.C2 + c1] +=
          static_cast<TOut>(v * (w ? static_cast<double>(w[i]) : 1.0));
  }
}

void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("pathkernel CUDA kernel ") + kernel + ": " +
                             cudaGetErrorString(e));
}

bool tensor_core_case(DType in, const DSide& s1, const DSide& s2, Precision p) {
  if (p == Precision::exact || in == DType::f64 || s1.C != 1 || s2.C != 1) return false;
  for (size_t l = 0; l < s1.terms.size(); ++l)
    if (s1.terms[l].S != 1 || s2.terms[l].S != 1) return false;
  return true;
}

template <typename TIn, typename TOut>
void launch(void* out, const DSide& s1, const DSide& s2, bool symmetric, double alpha,
            const void* w, Precision p, cudaStream_t stream, bool tc) {
  for (size_t first = 0; first < s1.terms.size(); first += kMaxTerms) {
    Args a{};
    a.nterms = static_cast<int>(std::min<size_t>(kMaxTerms, s1.terms.size() - first));
    for (int l = 0; l < a.nterms; ++l) {
      const DTerm &t1 = s1.terms[first + l], &t2 = s2.terms[first + l];
      a.t[l] = TermArgs{t1.A, t1.D, t2.A, t2.D, t1.S, t2.S, t1.da, t1.dd, t1.beta, t1.scale,
                        t1.A != nullptr};
    }
    a.M = s1.n;
    a.N = s2.n;
    a.C1 = s1.C;
    a.C2 = s2.C;
    a.symmetric = symmetric;
    a.alpha = alpha;
    a.w = w;
    if (tc) {
      if constexpr (std::is_same<TIn, double>::value) {
        throw std::logic_error("tensor-core path for float64 inputs");
      } else {
        a.rb = (a.M + BT - 1) / BT;
        a.cb = (a.N + BT - 1) / BT;
        const int64_t blocks = tiles::count(a.rb, a.cb, symmetric);
        if (blocks == 0) return;
        if (p == Precision::tf32x3 && std::is_same<TIn, float>::value) {
          fused_tc_kernel<TIn, TOut, true><<<static_cast<unsigned>(blocks), 128, 0, stream>>>(
              static_cast<TOut*>(out), a);
          check_launch("fused_tc_kernel (3xTF32)");
        } else {
          fused_tc_kernel<TIn, TOut, false><<<static_cast<unsigned>(blocks), 128, 0, stream>>>(
              static_cast<TOut*>(out), a);
          check_launch("fused_tc_kernel");
        }
      }
    } else {
      const int64_t total = a.M * a.N * a.C1 * a.C2;
      if (total == 0) return;
      const int64_t blocks = std::min<int64_t>((total + 255) / 256, 65535);
      generic_kernel<TIn, TOut><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
          static_cast<TOut*>(out), a);
      check_launch("generic_kernel");
    }
  }
}

template <typename TIn>
void dispatch_out(void* out, DType out_t, const DSide& s1, const DSide& s2, bool symmetric,
                  double alpha, const void* w, Precision p, cudaStream_t stream, bool tc) {
  if (out_t == DType::f64)
    launch<TIn, double>(out, s1, s2, symmetric, alpha, w, p, stream, tc);
  else
    launch<TIn, float>(out, s1, s2, symmetric, alpha, w, p, stream, tc);
}

}  // namespace

std::string kernel_for(DType in, const DSide& s1, const DSide& s2, Precision p) {
  if (!tensor_core_case(in, s1, s2, p)) return "generic_kernel";
  return p == Precision::tf32x3 && in == DType::f32 ? "fused_tc_kernel (3xTF32)" : "fused_tc_kernel";
}

void accumulate(void* out, DType out_t, DType in_t, const DSide& s1, const DSide& s2,
                bool symmetric, double alpha, const void* col_weights, Precision precision,
                std::uintptr_t stream_handle) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const bool tc = tensor_core_case(in_t, s1, s2, precision);
  switch (in_t) {
    case DType::f16:
      dispatch_out<__half>(out, out_t, s1, s2, symmetric, alpha, col_weights, precision, stream, tc);
      break;
    case DType::bf16:
      dispatch_out<__nv_bfloat16>(out, out_t, s1, s2, symmetric, alpha, col_weights, precision, stream, tc);
      break;
    case DType::f32:
      dispatch_out<float>(out, out_t, s1, s2, symmetric, alpha, col_weights, precision, stream, tc);
      break;
    case DType::f64:
      dispatch_out<double>(out, out_t, s1, s2, symmetric, alpha, col_weights, precision, stream, false);
      break;
  }
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string compiled_arches() {
#ifdef PATHKERNEL_CUDA_ARCHES
  return PATHKERNEL_CUDA_ARCHES;
#else
  return "";
#endif
}

}  // namespace cuda
}  // namespace pathkernel
