// CUDA kernels for the factored Gram accumulation (see gram_cuda.hpp).
//
// fused_mma_kernel: tensor cores (mma.sync, cp.async pipeline) for S = 1, C = 1; see below.
//
// generic_kernel: CUDA cores, any S and C, float64 accumulation; the reference path for
// positions / channels, float64 inputs and precision="exact".
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "gram_cuda.hpp"
#include "pathkernel/tile_math.hpp"

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

// ---------------------------------------------------------------------------------------
// fused_mma_kernel: tensor-core tiles (mma.sync) for the common case S = 1, C = 1. A block
// of 8 warps owns a 128 x 128 tile of examples; warps form a 2 x 4 grid of 64 x 32 warp tiles
// (4 x 4 mma tiles of m16 n8). Operands stream through a cp.async pipeline of K chunks of CW
// 32-bit words per row (rows padded by 16 bytes: conflict-free fragment loads). For each term
// the A-Gram is reduced into registers and parked in shared memory (thread-private slots),
// then the D-Gram is reduced into the same registers and fused into the running accumulator:
// neither Gram reaches global memory. The tile goes through shared memory once at the end so
// that both the direct and the mirrored (transposed) writes are coalesced.
//
// The Wg32 configuration (opt-in, sm_90a) reduces each Gram with wgmma instead: both operands
// read by the tensor cores from unswizzled K-major core matrices, one chunk's MMAs completed
// before the next barrier. Correct on an H200, but slower than Ldm32 as it stands (no
// swizzle, no MMA/copy overlap across chunks); TF32 operands are truncated, not rounded.
namespace fm {
constexpr int BM = 128;               // examples per tile side
constexpr int NTHREADS = 256;         // 8 warps
constexpr int WM = 64, WN = 32;       // warp tile
constexpr int MT = WM / 16, NT = WN / 8;
constexpr int PARK_WORDS = MT * NT * 4 * NTHREADS;
constexpr int LDT = BM + 1;           // row stride of the result tile (conflict-free columns)
constexpr int GROUP = 8;              // row blocks per L2 group

// Pipeline shape: CW words of K per staged row, STAGES chunks in flight.
template <int CW_, int STAGES_, bool WG_ = false>
struct Cfg {
  // WG: wgmma (sm_90a) reading K-major core matrices: operand tiles stored as
  // [16-byte K column][row][16 bytes], no padding. Otherwise rows padded by 16 bytes.
  static constexpr bool WG = WG_;
  static constexpr int CW = CW_, STAGES = STAGES_, SW = WG ? CW : CW + 4, OPW = BM * SW;
  static constexpr int STAGE_WORDS = STAGES * 2 * OPW;
  static constexpr size_t SMEM_BYTES = 4 * static_cast<size_t>(STAGE_WORDS + PARK_WORDS);
  // Where staged row r keeps its 16-byte chunk cc (in words) and its element k (in elements
  // of EPC per chunk): rows padded, or [chunk][row][16 bytes] for wgmma.
  __device__ static constexpr int word(int r, int cc) { return WG ? (cc * BM + r) * 4 : r * SW + cc * 4; }
  template <int EPC>
  __device__ static constexpr int elem(int r, int k) {
    return WG ? ((k / EPC) * BM + r) * EPC + k % EPC : r * SW * (EPC / 4) + k;
  }
  static_assert(BM * LDT <= STAGE_WORDS + PARK_WORDS, "result tile must fit the staging space");
};

__device__ __forceinline__ void cp_async16(uint32_t* dst, const void* src, bool valid) {
  const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8 x 8 matrices of 16-byte rows; lane l gives the address of row l % 8 of matrix l / 8
// and receives word l % 4 of row l / 4 of each matrix.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint32_t* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <typename T>
__device__ __forceinline__ void mma_16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                       const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Rows [r0, r0 + BM) x one K chunk from k0 of a row-major [n, K] matrix into one staged
// operand tile (laid out by C::word), zero outside the matrix. Aligned rows go by cp.async (completed by the
// pipeline's wait), others element by element.
template <typename C, typename TIn>
__device__ __forceinline__ void load_tile(uint32_t* dst, const TIn* X, int64_t n, int64_t K,
                                          int64_t r0, int64_t k0, bool aligned) {
  constexpr int KC = C::CW * 4 / static_cast<int>(sizeof(TIn));  // elements per staged row
  constexpr int EPC = 16 / static_cast<int>(sizeof(TIn));        // elements per 16-byte chunk
  constexpr int CPR = C::CW / 4;                                 // chunks per row
  if (aligned) {
#pragma unroll
    for (int it = 0; it < BM * CPR / NTHREADS; ++it) {
      const int id = threadIdx.x + it * NTHREADS, r = id / CPR, cc = id % CPR;
      const int64_t gr = r0 + r, gk = k0 + cc * EPC;
      const bool ok = gr < n && gk < K;
      cp_async16(dst + C::word(r, cc), ok ? X + gr * K + gk : X, ok);
    }
  } else {
    TIn* d = reinterpret_cast<TIn*>(dst);
    for (int id = threadIdx.x; id < BM * KC; id += NTHREADS) {
      const int r = id / KC, k = id % KC;
      const int64_t gr = r0 + r, gk = k0 + k;
      d[C::template elem<EPC>(r, k)] = (gr < n && gk < K) ? X[gr * K + gk] : from_f<TIn>(0.f);
    }
  }
}

// One staged K chunk into this warp's 64 x 32 accumulators. sa / sb point at the warp's
// first row of the staged X1 / X2 tiles. Every mma k-step spans 8 words of a row (16 halves
// or 8 floats); with g = lane / 4, t = lane % 4, fragment register e of A holds row g (+8
// for odd e), word t (+4 for e >= 2), and register e of B column g, word t (+4 for e = 1):
// exactly what ldmatrix gives from the row-major staging of X1 and X2, for 16-bit and
// 32-bit elements alike (an 8 x 4-word matrix).
template <typename C, typename TIn, bool X3>
__device__ __forceinline__ void mma_chunk(float (&c)[MT][NT][4], const uint32_t* sa,
                                          const uint32_t* sb, int lane) {
  constexpr int SW = C::SW;
  const int q = lane / 8, rq = lane % 8;  // ldmatrix: matrix q, row rq
#pragma unroll
  for (int ks = 0; ks < C::CW / 8; ++ks) {
    const int kw = ks * 8;
    uint32_t a[MT][4], b[NT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      ldsm_x4(a[mt], sa + (mt * 16 + rq + (q & 1) * 8) * SW + kw + (q >> 1) * 4);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t r[4];
      ldsm_x4(r, sb + ((2 * np + (q >> 1)) * 8 + rq) * SW + kw + (q & 1) * 4);
      b[2 * np][0] = r[0];
      b[2 * np][1] = r[1];
      b[2 * np + 1][0] = r[2];
      b[2 * np + 1][1] = r[3];
    }
    if constexpr (std::is_same<TIn, float>::value) {
      // m16n8k8 TF32 on single words. 3xTF32 splits each operand into a TF32 head and a TF32
      // tail and drops tail x tail.
      uint32_t ah[MT][4], bh[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = __uint_as_float(a[mt][e]);
          ah[mt][e] = to_tf32(x);
          if constexpr (X3) a[mt][e] = to_tf32(x - __uint_as_float(ah[mt][e]));
        }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = __uint_as_float(b[nt][e]);
          bh[nt][e] = to_tf32(x);
          if constexpr (X3) b[nt][e] = to_tf32(x - __uint_as_float(bh[nt][e]));
        }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if constexpr (X3) {
            mma_tf32(c[mt][nt], a[mt], bh[nt]);
            mma_tf32(c[mt][nt], ah[mt], b[nt]);
          }
          mma_tf32(c[mt][nt], ah[mt], bh[nt]);
        }
    } else {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_16<TIn>(c[mt][nt], a[mt], b[nt]);
    }
  }
}

// ---- wgmma path (sm_90a): two warpgroups, each m64 x n128 of the tile per instruction ----
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PK_WGMMA 1
#endif

// Shared-memory matrix descriptor, K-major, no swizzle: core matrices of 8 rows x 16 bytes;
// the next 16-byte K column is BM * 16 bytes further (leading byte offset), the next 8 rows
// 128 bytes further (stride byte offset).
__device__ __forceinline__ uint64_t wg_desc(const uint32_t* p) {
  const uint64_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return ((a & 0x3FFFF) >> 4) | (static_cast<uint64_t>((BM * 16) >> 4) << 16) |
         (static_cast<uint64_t>(128 >> 4) << 32);
}

__device__ __forceinline__ void wg_fence() {
#ifdef PK_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit_wait() {
#ifdef PK_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accumulator accesses across the asynchronous MMAs.
__device__ __forceinline__ void wg_fence_regs(float (&c)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(c[mt][nt][e])::"memory");
}

#define PK_D64(c)                                                                                  \
  "+f"(c[0][0][0]), "+f"(c[0][0][1]), "+f"(c[0][0][2]), "+f"(c[0][0][3]), "+f"(c[0][1][0]),        \
      "+f"(c[0][1][1]), "+f"(c[0][1][2]), "+f"(c[0][1][3]), "+f"(c[0][2][0]), "+f"(c[0][2][1]),    \
      "+f"(c[0][2][2]), "+f"(c[0][2][3]), "+f"(c[0][3][0]), "+f"(c[0][3][1]), "+f"(c[0][3][2]),    \
      "+f"(c[0][3][3]), "+f"(c[1][0][0]), "+f"(c[1][0][1]), "+f"(c[1][0][2]), "+f"(c[1][0][3]),    \
      "+f"(c[1][1][0]), "+f"(c[1][1][1]), "+f"(c[1][1][2]), "+f"(c[1][1][3]), "+f"(c[1][2][0]),    \
      "+f"(c[1][2][1]), "+f"(c[1][2][2]), "+f"(c[1][2][3]), "+f"(c[1][3][0]), "+f"(c[1][3][1]),    \
      "+f"(c[1][3][2]), "+f"(c[1][3][3]), "+f"(c[2][0][0]), "+f"(c[2][0][1]), "+f"(c[2][0][2]),    \
      "+f"(c[2][0][3]), "+f"(c[2][1][0]), "+f"(c[2][1][1]), "+f"(c[2][1][2]), "+f"(c[2][1][3]),    \
      "+f"(c[2][2][0]), "+f"(c[2][2][1]), "+f"(c[2][2][2]), "+f"(c[2][2][3]), "+f"(c[2][3][0]),    \
      "+f"(c[2][3][1]), "+f"(c[2][3][2]), "+f"(c[2][3][3]), "+f"(c[3][0][0]), "+f"(c[3][0][1]),    \
      "+f"(c[3][0][2]), "+f"(c[3][0][3]), "+f"(c[3][1][0]), "+f"(c[3][1][1]), "+f"(c[3][1][2]),    \
      "+f"(c[3][1][3]), "+f"(c[3][2][0]), "+f"(c[3][2][1]), "+f"(c[3][2][2]), "+f"(c[3][2][3]),    \
      "+f"(c[3][3][0]), "+f"(c[3][3][1]), "+f"(c[3][3][2]), "+f"(c[3][3][3])

// D[64 x 128] += A[64 x k] B[128 x k]^T, one k-step (32 bytes of K), D's 64 floats per thread
// in c (flat index = 4 * n8-block + e).
template <typename TIn>
__device__ __forceinline__ void wgmma_step(float (&c)[MT][NT][4], uint64_t da, uint64_t db) {
#ifdef PK_WGMMA
  if constexpr (std::is_same<TIn, float>::value) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, 1, 1, 1;\n"
                 : PK_D64(c)
                 : "l"(da), "l"(db));
  } else if constexpr (std::is_same<TIn, __nv_bfloat16>::value) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, 1, 1, 1, 0, 0;\n"
                 : PK_D64(c)
                 : "l"(da), "l"(db));
  } else {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, 1, 1, 1, 0, 0;\n"
                 : PK_D64(c)
                 : "l"(da), "l"(db));
  }
#else
  __trap();  // built without sm_90a; the host never selects this path then
#endif
}
#undef PK_D64

// One staged chunk into the warpgroup's accumulators with wgmma: warpgroup w computes rows
// 64 w .. 64 w + 63 against all 128 columns. The chunk's MMAs complete before returning, so a
// stage is free again one iteration after it was read.
template <typename C, typename TIn>
__device__ __forceinline__ void wg_chunk(float (&c)[MT][NT][4], const uint32_t* st) {
  const uint64_t da = wg_desc(st + (threadIdx.x / 128) * 64 * 4), db = wg_desc(st + C::OPW);
  wg_fence_regs(c);
  wg_fence();
#pragma unroll
  for (int ks = 0; ks < C::CW / 8; ++ks)  // a k-step is two 16-byte columns: 2 * BM * 16 bytes
    wgmma_step<TIn>(c, da + ks * ((2 * BM * 16) >> 4), db + ks * ((2 * BM * 16) >> 4));
  wg_commit_wait();
  wg_fence_regs(c);
}

// c = X1[i0 : i0 + 128] X2[j0 : j0 + 128]^T, this thread's part, through the cp.async
// pipeline; each chunk by mma.sync (this warp's 64 x 32) or wgmma (C::WG).
template <typename C, typename TIn, bool X3>
__device__ __forceinline__ void gram(float (&c)[MT][NT][4], const TIn* X1, int64_t n1, const TIn* X2,
                                     int64_t n2, int64_t K, int64_t i0, int64_t j0, bool aligned,
                                     uint32_t* stages) {
  constexpr int KC = C::CW * 4 / static_cast<int>(sizeof(TIn));
  constexpr int S = C::STAGES, OPW = C::OPW;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[mt][nt][e] = 0.f;
  const int64_t nk = (K + KC - 1) / KC;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < nk) {
      load_tile<C>(stages + (2 * s) * OPW, X1, n1, K, i0, s * KC, aligned);
      load_tile<C>(stages + (2 * s + 1) * OPW, X2, n2, K, j0, s * KC, aligned);
    }
    cp_commit();
  }
  for (int64_t kt = 0; kt < nk; ++kt) {
    cp_wait<S - 2>();  // chunk kt has landed (this thread's copies)
#ifdef PK_WGMMA
    // the tensor cores read shared memory through the async proxy: order this thread's
    // writes (cp.async and plain stores) before the barrier
    if constexpr (C::WG) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
    __syncthreads();   // ... everyone's; and chunk kt - 1's stage is free again
    const int64_t nxt = kt + S - 1;
    if (nxt < nk) {
      const int s = static_cast<int>(nxt % S);
      load_tile<C>(stages + (2 * s) * OPW, X1, n1, K, i0, nxt * KC, aligned);
      load_tile<C>(stages + (2 * s + 1) * OPW, X2, n2, K, j0, nxt * KC, aligned);
    }
    cp_commit();
    const uint32_t* st = stages + 2 * static_cast<int>(kt % S) * OPW;
    if constexpr (C::WG)
      wg_chunk<C, TIn>(c, st);
    else
      mma_chunk<C, TIn, X3>(c, st + wm * WM * C::SW, st + OPW + wn * WN * C::SW, lane);
  }
  cp_wait<0>();
  __syncthreads();  // the stages are reused by the next Gram
}

template <typename C, typename TIn, typename TOut, bool X3>
__global__ void __launch_bounds__(NTHREADS, 1) fused_mma_kernel(TOut* out, Args args) {
  extern __shared__ __align__(16) uint32_t smem[];
  uint32_t* stages = smem;
  float* park = reinterpret_cast<float*>(smem + C::STAGE_WORDS);
  const bool sym = args.symmetric != 0;
  int64_t r, c;
  tiles::coords(blockIdx.x, args.rb, args.cb, sym, GROUP, &r, &c);
  const int64_t i0 = r * BM, j0 = c * BM;
  const int tid = threadIdx.x;

  float acc[MT][NT][4], cur[MT][NT][4];
#define PK_SLOT(mt, nt, e) ((((mt) * NT + (nt)) * 4 + (e)) * NTHREADS + tid)  // conflict-free
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
  for (int l = 0; l < args.nterms; ++l) {
    const TermArgs& tm = args.t[l];
    if (tm.hasA) {
      gram<C, TIn, X3>(cur, static_cast<const TIn*>(tm.A1), args.M, static_cast<const TIn*>(tm.A2),
                       args.N, tm.da, i0, j0, tm.alignedA != 0, stages);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) park[PK_SLOT(mt, nt, e)] = cur[mt][nt][e];
    }
    gram<C, TIn, X3>(cur, static_cast<const TIn*>(tm.D1), args.M, static_cast<const TIn*>(tm.D2),
                     args.N, tm.dd, i0, j0, tm.alignedD != 0, stages);
    const float beta = static_cast<float>(tm.beta), scale = static_cast<float>(tm.scale);
    const bool hasA = tm.hasA != 0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float ag = hasA ? park[PK_SLOT(mt, nt, e)] : 0.f;
          acc[mt][nt][e] = tiles::fuse<float>(acc[mt][nt][e], ag, scale * cur[mt][nt][e], beta, hasA);
        }
  }
#undef PK_SLOT

  // Result tile through shared memory (it overlays the stages: wait for every warp).
  __syncthreads();
  float* ct = reinterpret_cast<float*>(smem);
  {
    const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int wm = warp / 4, wn = warp % 4;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        // mma.sync: warp (wm, wn), tile (mt, nt). wgmma: warpgroup wm, its warp w = warp % 4
        // owns rows 16 w .. 16 w + 15, n8 block mt * NT + nt.
        const int row = C::WG ? wm * 64 + (warp % 4) * 16 + g : wm * WM + mt * 16 + g;
        const int col = C::WG ? (mt * NT + nt) * 8 + 2 * t : wn * WN + nt * 8 + 2 * t;
        ct[row * LDT + col] = acc[mt][nt][0];
        ct[row * LDT + col + 1] = acc[mt][nt][1];
        ct[(row + 8) * LDT + col] = acc[mt][nt][2];
        ct[(row + 8) * LDT + col + 1] = acc[mt][nt][3];
      }
  }
  __syncthreads();
  const TOut* w = static_cast<const TOut*>(args.w);
  for (int e = tid; e < BM * BM; e += NTHREADS) {  // direct: consecutive threads along a row
    const int li = e / BM, lj = e % BM;
    const int64_t gi = i0 + li, gj = j0 + lj;
    if (gi >= args.M || gj >= args.N || !tiles::owns(gi, gj, sym)) continue;
    const double v = args.alpha * static_cast<double>(ct[li * LDT + lj]);
    out[gi * args.N + gj] += static_cast<TOut>(v * (w ? static_cast<double>(w[gj]) : 1.0));
  }
  if (!sym) return;
  for (int e = tid; e < BM * BM; e += NTHREADS) {  // mirrored: consecutive threads along a column
    const int lj = e / BM, li = e % BM;
    const int64_t gi = i0 + li, gj = j0 + lj;
    if (gi >= args.M || gj >= args.N || !tiles::mirrors(gi, gj, sym)) continue;
    const double v = args.alpha * static_cast<double>(ct[li * LDT + lj]);
    out[gj * args.N + gi] += static_cast<TOut>(v * (w ? static_cast<double>(w[gi]) : 1.0));
  }
}

// Measured on an H200 (bench/RESULTS.md): 128-byte chunks beat 64-byte ones by ~12%; other
// shapes tried (32-bit fragment loads instead of ldmatrix, the accumulator in shared memory)
// were no faster.
using Ldm16 = Cfg<16, 4>;  // 64-byte chunks, 4 stages: 144 KB (fits sm_80's 163 KB)
using Ldm32 = Cfg<32, 3>;  // 128-byte chunks, 3 stages: 172 KB (sm_90)
using Wg32 = Cfg<32, 3, true>;  // wgmma, 128-byte chunks, 3 stages: 160 KB (sm_90a; opt-in)
}  // namespace fm

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
