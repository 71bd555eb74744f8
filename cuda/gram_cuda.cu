// Launch code of the factored Gram accumulation (see gram_cuda.hpp): which kernel, which
// configuration, the tile grid. The kernels:
//
//   fused_kernel.cuh    tensor cores (mma.sync or wgmma, cp.async pipeline) for S = 1, C = 1,
//                       configurations in fused_config.cuh, the K pipeline in
//                       fused_pipeline.cuh
//   generic_kernel.cuh  CUDA cores, any S and C, float64 accumulation
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fused_config.cuh"
#include "fused_kernel.cuh"
#include "generic_kernel.cuh"
#include "gram_cuda.hpp"
#include "kernel_args.cuh"
#include "pathkernel/tile_math.hpp"

namespace pathkernel {
namespace cuda {
namespace {

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

// Rows of a row-major [n, K] operand can go by 16-byte cp.async when the base is 16-byte
// aligned and a row is a whole number of 16-byte chunks.
bool rows_aligned(const void* p, int64_t K, size_t itemsize) {
  return p != nullptr && reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (K * static_cast<int64_t>(itemsize)) % 16 == 0;
}

// The largest mma.sync pipeline that fits the device's shared memory. PATHKERNEL_CUDA_FUSED
// = ldm16, ldm32 or wg32 forces one (tests and benchmarks cover each on one GPU); wg32 (wgmma)
// needs sm_90a code on a compute-capability-9.0 device and has no 3xTF32 path, and falls back
// otherwise. It is correct but not yet faster (bench/RESULTS.md), so it is not the default.
std::string fused_variant(int device_smem, bool sm90a, bool x3) {
  const char* v = std::getenv("PATHKERNEL_CUDA_FUSED");
  std::string r = v != nullptr ? v : "";
  if (r == "wg32" && (x3 || !sm90a)) r.clear();
  if (r.empty()) r = device_smem >= static_cast<int>(fm::Ldm32::SMEM_BYTES) ? "ldm32" : "ldm16";
  return r;
}

bool device_runs_sm90a() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 9 && minor == 0 && compiled_arches().find("90a") != std::string::npos;
}

int device_smem_optin() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

template <typename C, typename TIn, typename TOut, bool X3>
void launch_mma(const char* name, TOut* out, const Args& a, cudaStream_t stream) {
  const int64_t blocks = tiles::count(a.rb, a.cb, a.symmetric != 0);
  if (blocks == 0) return;
  auto kernel = fm::fused_mma_kernel<C, TIn, TOut, X3>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(C::SMEM_BYTES)) != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("pathkernel CUDA kernel ") + name + ": needs " +
                             std::to_string(C::SMEM_BYTES) + " bytes of shared memory per block");
  }
  kernel<<<static_cast<unsigned>(blocks), fm::NTHREADS, C::SMEM_BYTES, stream>>>(out, a);
  check_launch(name);
}

template <typename C, typename TIn, typename TOut>
void launch_fused(Precision p, TOut* out, const Args& a, cudaStream_t stream) {
  if constexpr (std::is_same<TIn, float>::value) {
    if (p == Precision::tf32x3) return launch_mma<C, TIn, TOut, true>("fused_mma_kernel (3xTF32)", out, a, stream);
  }
  launch_mma<C, TIn, TOut, false>("fused_mma_kernel", out, a, stream);
}

template <typename TIn, typename TOut>
void launch(void* out, const DSide& s1, const DSide& s2, bool symmetric, double alpha,
            const void* w, Precision p, cudaStream_t stream, bool tc) {
  for (size_t first = 0; first < s1.terms.size(); first += kMaxTerms) {
    Args a{};
    a.nterms = static_cast<int>(std::min<size_t>(kMaxTerms, s1.terms.size() - first));
    for (int l = 0; l < a.nterms; ++l) {
      const DTerm &t1 = s1.terms[first + l], &t2 = s2.terms[first + l];
      const bool hasA = t1.A != nullptr;
      a.t[l] = TermArgs{t1.A, t1.D, t2.A, t2.D, t1.S, t2.S, t1.da, t1.dd, t1.beta, t1.scale, hasA,
                        hasA && rows_aligned(t1.A, t1.da, sizeof(TIn)) && rows_aligned(t2.A, t1.da, sizeof(TIn)),
                        rows_aligned(t1.D, t1.dd, sizeof(TIn)) && rows_aligned(t2.D, t1.dd, sizeof(TIn))};
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
        a.rb = (a.M + fm::BM - 1) / fm::BM;
        a.cb = (a.N + fm::BM - 1) / fm::BM;
        TOut* o = static_cast<TOut*>(out);
        const bool x3 = std::is_same<TIn, float>::value && p == Precision::tf32x3;
        const std::string v = fused_variant(device_smem_optin(), device_runs_sm90a(), x3);
        if (v == "wg32")
          launch_mma<fm::Wg32, TIn, TOut, false>("fused_mma_kernel (wgmma)", o, a, stream);
        else if (v == "ldm16")
          launch_fused<fm::Ldm16, TIn>(p, o, a, stream);
        else if (v == "ldm32")
          launch_fused<fm::Ldm32, TIn>(p, o, a, stream);
        else
          throw std::runtime_error("PATHKERNEL_CUDA_FUSED: expected wg32, ldm16 or ldm32, got " + v);
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
  return p == Precision::tf32x3 && in == DType::f32 ? "fused_mma_kernel (3xTF32)" : "fused_mma_kernel";
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
