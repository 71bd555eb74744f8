// Launch code of the factored Gram accumulation (see gram_cuda.hpp): which kernel, which
// configuration, the tile grid. The kernels:
//
//   fused_kernel.cuh    tensor cores (mma.sync or wgmma, cp.async pipeline) for S = 1, C = 1,
//                       configurations in fused_config.cuh, the K pipeline in
//                       fused_pipeline.cuh
//   hopper_ws.cuh       sm_90a, opt-in: TMA producer, two wgmma consumer warpgroups, persistent
//   generic_kernel.cuh  CUDA cores, any S and C, float64 accumulation
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
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
#include "hopper_ws.cuh"
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
// = ldm16, ldm32, wg32 or ws forces one (tests and benchmarks cover each on one GPU). wg32 and
// ws need sm_90a code on a compute-capability-9.0 device and have no 3xTF32 path, and fall
// back otherwise (ws also where a row is not 16-byte aligned). wg32 is correct but not faster
// (bench/RESULTS.md); ws has not yet run on a GPU. Neither is the default.
std::string fused_variant(int device_smem, bool sm90a, bool x3) {
  const char* v = std::getenv("PATHKERNEL_CUDA_FUSED");
  std::string r = v != nullptr ? v : "";
  if ((r == "wg32" || r == "ws") && (x3 || !sm90a)) r.clear();
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
std::string launch_mma(const char* name, TOut* out, const Args& a, cudaStream_t stream) {
  const int64_t blocks = tiles::count(a.rb, a.cb, a.symmetric != 0);
  if (blocks == 0) return name;
  auto kernel = fm::fused_mma_kernel<C, TIn, TOut, X3>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(C::SMEM_BYTES)) != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("pathkernel CUDA kernel ") + name + ": needs " +
                             std::to_string(C::SMEM_BYTES) + " bytes of shared memory per block");
  }
  kernel<<<static_cast<unsigned>(blocks), fm::NTHREADS, C::SMEM_BYTES, stream>>>(out, a);
  check_launch(name);
  return name;
}

template <typename C, typename TIn, typename TOut>
std::string launch_fused(Precision p, TOut* out, const Args& a, cudaStream_t stream) {
  if constexpr (std::is_same<TIn, float>::value) {
    if (p == Precision::tf32x3) return launch_mma<C, TIn, TOut, true>("fused_mma_kernel (3xTF32)", out, a, stream);
  }
  return launch_mma<C, TIn, TOut, false>("fused_mma_kernel", out, a, stream);
}

// ---- ws_kernel (hopper_ws.cuh): tensor maps resolved through the runtime, no libcuda link ----
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t e =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      p = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

template <typename TIn>
CUtensorMapDataType map_type() {
  if constexpr (std::is_same<TIn, __nv_bfloat16>::value) return CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  if constexpr (std::is_same<TIn, __half>::value) return CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
}

// A row-major [rows, K] operand as boxes of 128 bytes of K x 128 rows, 128-byte swizzle,
// zero outside the matrix. Needs 16-byte aligned rows (rows_aligned).
template <typename TIn>
bool encode_rows(CUtensorMap* map, const void* ptr, int64_t rows, int64_t K) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K) * sizeof(TIn)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(ws::ROW_BYTES / sizeof(TIn)), fm::BM};
  const cuuint32_t steps[2] = {1, 1};
  return encode(map, map_type<TIn>(), 2, const_cast<void*>(ptr), dims, strides, box, steps,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

int device_sms() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

// Launches ws_kernel on a's tiles; false (nothing launched) when an operand cannot be
// described by a tensor map, so that the caller runs another variant.
template <typename TIn, typename TOut>
bool launch_ws(TOut* out, const Args& a, cudaStream_t stream) {
  const int64_t tiles_n = tiles::count(a.rb, a.cb, a.symmetric != 0);
  if (tiles_n == 0) return true;
  const int sms = device_sms();
  if (sms == 0 || a.M > INT32_MAX || a.N > INT32_MAX) return false;
  ws::WsArgs w{};
  for (int l = 0; l < a.nterms; ++l) {
    const TermArgs& t = a.t[l];
    if (!t.alignedD || (t.hasA && !t.alignedA)) return false;
    if (t.hasA && !(encode_rows<TIn>(&w.maps[l][0], t.A1, a.M, t.da) &&
                    encode_rows<TIn>(&w.maps[l][1], t.A2, a.N, t.da)))
      return false;
    if (!(encode_rows<TIn>(&w.maps[l][2], t.D1, a.M, t.dd) &&
          encode_rows<TIn>(&w.maps[l][3], t.D2, a.N, t.dd)))
      return false;
    w.k[l][0] = t.hasA ? t.da : 0;
    w.k[l][1] = t.dd;
    w.beta[l] = t.beta;
    w.scale[l] = t.scale;
    w.hasA[l] = t.hasA;
  }
  w.nterms = a.nterms;
  w.M = a.M;
  w.N = a.N;
  w.rb = a.rb;
  w.cb = a.cb;
  w.symmetric = a.symmetric;
  w.alpha = a.alpha;
  w.w = a.w;
  auto kernel = ws::ws_kernel<TIn, TOut>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(ws::SMEM_BYTES)) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles_n, sms));
  kernel<<<grid, ws::NTHREADS, ws::SMEM_BYTES, stream>>>(out, w);
  check_launch("ws_kernel");
  return true;
}

// Launches the kernels of one call (kMaxTerms terms per launch); returns the names of the
// kernels that ran.
template <typename TIn, typename TOut>
std::string launch(void* out, const DSide& s1, const DSide& s2, bool symmetric, double alpha,
                   const void* w, Precision p, cudaStream_t stream, bool tc) {
  std::string used;
  const auto ran = [&used](const std::string& k) {
    if (("+" + used + "+").find("+" + k + "+") == std::string::npos) used += (used.empty() ? "" : "+") + k;
  };
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
        if (v == "ws" && launch_ws<TIn>(o, a, stream))
          ran("ws_kernel");  // else (unaligned rows, no tensor-map entry point): the default
        else if (v == "wg32")
          ran(launch_mma<fm::Wg32, TIn, TOut, false>("fused_mma_kernel (wgmma)", o, a, stream));
        else if (v == "ldm16")
          ran(launch_fused<fm::Ldm16, TIn>(p, o, a, stream));
        else if (v == "ldm32" || v == "ws")
          ran(launch_fused<fm::Ldm32, TIn>(p, o, a, stream));
        else
          throw std::runtime_error("PATHKERNEL_CUDA_FUSED: expected ws, wg32, ldm16 or ldm32, got " + v);
      }
    } else {
      const int64_t total = a.M * a.N * a.C1 * a.C2;
      if (total == 0) return used;
      const int64_t blocks = std::min<int64_t>((total + 255) / 256, 65535);
      generic_kernel<TIn, TOut><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
          static_cast<TOut*>(out), a);
      check_launch("generic_kernel");
      ran("generic_kernel");
    }
  }
  return used;
}

template <typename TIn>
std::string dispatch_out(void* out, DType out_t, const DSide& s1, const DSide& s2, bool symmetric,
                         double alpha, const void* w, Precision p, cudaStream_t stream, bool tc) {
  if (out_t == DType::f64) return launch<TIn, double>(out, s1, s2, symmetric, alpha, w, p, stream, tc);
  return launch<TIn, float>(out, s1, s2, symmetric, alpha, w, p, stream, tc);
}

}  // namespace

std::string accumulate(void* out, DType out_t, DType in_t, const DSide& s1, const DSide& s2,
                bool symmetric, double alpha, const void* col_weights, Precision precision,
                std::uintptr_t stream_handle) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const bool tc = tensor_core_case(in_t, s1, s2, precision);
  switch (in_t) {
    case DType::f16:
      return dispatch_out<__half>(out, out_t, s1, s2, symmetric, alpha, col_weights, precision, stream, tc);
    case DType::bf16:
      return dispatch_out<__nv_bfloat16>(out, out_t, s1, s2, symmetric, alpha, col_weights, precision,
                                         stream, tc);
    case DType::f32:
      return dispatch_out<float>(out, out_t, s1, s2, symmetric, alpha, col_weights, precision, stream, tc);
    case DType::f64:
      break;
  }
  return dispatch_out<double>(out, out_t, s1, s2, symmetric, alpha, col_weights, precision, stream, false);
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
