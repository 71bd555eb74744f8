// The fused kernel's K pipeline: cp.async staging, ldmatrix + mma.sync (sm_80) or wgmma
// (sm_90a) on each staged chunk, and gram(): one 128 x 128 Gram of a tile through it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "fused_config.cuh"
#include "kernel_args.cuh"

namespace pathkernel {
namespace cuda {
namespace {

namespace fm {
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

// A thread's accumulator fragment (either MMA path) set to zero.
__device__ __forceinline__ void zero(float (&c)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[mt][nt][e] = 0.f;
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
  zero(c);
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
}  // namespace fm

}  // namespace
}  // namespace cuda
}  // namespace pathkernel
