// ws_kernel (sm_90a, opt-in: PATHKERNEL_CUDA_FUSED=ws): the fused Gram tiles with Hopper's
// asynchronous units, for S = 1, C = 1 and 16-byte aligned rows.
//
// A persistent block of three warpgroups walks the tile set (the upper triangle when
// symmetric) in the L2-grouped order of tiles::coords, gridDim.x tiles apart. Warpgroup 0 is
// the producer: one thread streams K chunks of 128 bytes per row (one 128-byte swizzle atom)
// of both operands of every Gram of every term of every tile, by TMA (cp.async.bulk.tensor,
// 128-byte swizzle, zero fill past the matrix) into a ring of STAGES stages guarded by
// mbarriers (full: the bytes have landed; empty: both consumers are done with the stage). It
// runs ahead across Gram, term and tile boundaries, so small K costs no pipeline drain.
// Warpgroups 1 and 2 are the consumers: each owns 64 rows x 128 columns of the tile and
// reduces every Gram with wgmma (m64n128, both operands from shared memory, one chunk's
// MMAs in flight while the next is issued), keeping the A-Gram, the D-Gram and the running
// output in registers (same fragment layout, so the fused epilogue is elementwise). The
// producer gives up registers (setmaxnreg) so that the consumers can hold those 192
// accumulators. A finished tile goes through shared memory for coalesced direct and
// mirrored writes while the producer already loads the next tile.
//
// TF32 operands are truncated by the tensor cores (as in Wg32), no 3xTF32 path.
#pragma once

#include <cuda.h>  // CUtensorMap (the driver entry point is resolved at run time)

#include <cstddef>
#include <cstdint>

#include "fused_config.cuh"
#include "fused_kernel.cuh"
#include "fused_pipeline.cuh"
#include "kernel_args.cuh"
#include "pathkernel/tile_math.hpp"

namespace pathkernel {
namespace cuda {
namespace {
namespace ws {

using fm::BM;
constexpr int STAGES = 4;
constexpr int ROW_BYTES = 128;               // K bytes of a staged row: one swizzle atom
constexpr int OP_BYTES = BM * ROW_BYTES;     // 16 KB: one operand's rows of a chunk
constexpr int STAGE_BYTES = 2 * OP_BYTES;    // X1 rows i0.., X2 rows j0..
constexpr int NTHREADS = 384;                // producer + two consumer warpgroups
constexpr int CONSUMER_THREADS = 256;
constexpr int CONSUMER_WARPS = CONSUMER_THREADS / 32;  // each releases a stage it has read
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;  // 128 x 40 + 256 x 232 <= 64K
constexpr size_t SMEM_BYTES =
    1024 + static_cast<size_t>(STAGES) * STAGE_BYTES + sizeof(float) * BM * fm::LDT + 16 * STAGES;

// Operands of term l: maps[l][0..3] = A1, A2, D1, D2 (the A maps unset without A factors).
struct WsArgs {
  CUtensorMap maps[kMaxTerms][4];
  int64_t k[kMaxTerms][2];  // K of the A-Gram and of the D-Gram
  double beta[kMaxTerms], scale[kMaxTerms];
  int hasA[kMaxTerms];
  int nterms;
  int64_t M, N, rb, cb;
  int symmetric;
  double alpha;
  const void* w;
};

__device__ __forceinline__ uint32_t saddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#ifdef PK_WGMMA
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(saddr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(saddr(bar)), "r"(parity)
        : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(saddr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(saddr(bar)),
               "r"(bytes)
               : "memory");
}
// Box (K elements x 128 rows) at (k0, row0) of a 2-D tensor map into shared memory.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, int k0, int row0,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(saddr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(k0), "r"(row0), "r"(saddr(bar))
      : "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(CONSUMER_THREADS) : "memory");
}
#endif

// Shared-memory descriptor of K-major rows of 128 bytes in 128-byte swizzle atoms (8 rows,
// 1024 bytes apart; the stage is 1024-byte aligned), as TMA wrote them.
__device__ __forceinline__ uint64_t desc_sw128(const void* p) {
  return ((saddr(p) & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

__device__ __forceinline__ int64_t chunks(int64_t K, int elem) {
  return (K * elem + ROW_BYTES - 1) / ROW_BYTES;
}

template <typename TIn, typename TOut>
__global__ void __launch_bounds__(NTHREADS, 1) ws_kernel(TOut* out, const __grid_constant__ WsArgs a) {
#ifdef PK_WGMMA
  constexpr int ELEM = static_cast<int>(sizeof(TIn)), KE = ROW_BYTES / ELEM;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* stages = smem;
  float* ct = reinterpret_cast<float*>(smem + STAGES * STAGE_BYTES);
  uint64_t* full = reinterpret_cast<uint64_t*>(ct + BM * fm::LDT);
  uint64_t* empty = full + STAGES;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], CONSUMER_WARPS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const bool sym = a.symmetric != 0;
  const int64_t ntiles = tiles::count(a.rb, a.cb, sym);
  const int wg = threadIdx.x / 128;

  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
    if (threadIdx.x != 0) return;
    int s = 0;
    uint32_t phase = 0;
    for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
      int64_t r, c;
      tiles::coords(t, a.rb, a.cb, sym, fm::GROUP, &r, &c);
      const int i0 = static_cast<int>(r * BM), j0 = static_cast<int>(c * BM);
      for (int l = 0; l < a.nterms; ++l)
        for (int g = a.hasA[l] ? 0 : 1; g < 2; ++g) {
          const int64_t nk = chunks(a.k[l][g], ELEM);
          for (int64_t kc = 0; kc < nk; ++kc) {
            mbar_wait(&empty[s], phase ^ 1);  // a fresh barrier passes parity 1 at once
            mbar_expect(&full[s], STAGE_BYTES);
            uint8_t* st = stages + s * STAGE_BYTES;
            const int k0 = static_cast<int>(kc * KE);
            tma_load(st, &a.maps[l][2 * g], k0, i0, &full[s]);
            tma_load(st + OP_BYTES, &a.maps[l][2 * g + 1], k0, j0, &full[s]);
            if (++s == STAGES) s = 0, phase ^= 1;
          }
        }
    }
    return;
  }

  // consumers: warpgroup cw owns rows 64 cw .. 64 cw + 63 of the tile
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
  const int cw = wg - 1, ctid = threadIdx.x - 128, lane = threadIdx.x % 32;
  int s = 0;
  uint32_t phase = 0;
  using fm::MT;
  using fm::NT;
  float acc[MT][NT][4], ga[MT][NT][4], gd[MT][NT][4];

  // One Gram of the current tile into g: chunk kc's MMAs are issued, then chunk kc - 1's
  // are waited for and its stage released (one chunk in flight behind the issue).
  auto gram = [&](float (&g)[MT][NT][4], int64_t K) {
    fm::zero(g);
    const int64_t nk = chunks(K, ELEM);
    int prev = -1;
    for (int64_t kc = 0; kc < nk; ++kc) {
      mbar_wait(&full[s], phase);
      const uint8_t* st = stages + s * STAGE_BYTES;
      const uint64_t da = desc_sw128(st + cw * 64 * ROW_BYTES), db = desc_sw128(st + OP_BYTES);
      fm::wg_fence_regs(g);
      fm::wg_fence();
#pragma unroll
      for (int ks = 0; ks < ROW_BYTES / 32; ++ks)  // a k-step is 32 bytes of K: +2 in 16-byte units
        fm::wgmma_step<TIn>(g, da + 2 * ks, db + 2 * ks);
      wg_commit();
      wg_wait<1>();
      fm::wg_fence_regs(g);
      if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);
      prev = s;
      if (++s == STAGES) s = 0, phase ^= 1;
    }
    wg_wait<0>();
    fm::wg_fence_regs(g);
    if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);
  };

  const TOut* w = static_cast<const TOut*>(a.w);
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    int64_t r, c;
    tiles::coords(t, a.rb, a.cb, sym, fm::GROUP, &r, &c);
    const int64_t i0 = r * BM, j0 = c * BM;
    fm::zero(acc);
    for (int l = 0; l < a.nterms; ++l) {
      const bool hasA = a.hasA[l] != 0;
      if (hasA) gram(ga, a.k[l][0]);
      gram(gd, a.k[l][1]);
      const float beta = static_cast<float>(a.beta[l]), scale = static_cast<float>(a.scale[l]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc[mt][nt][e] = tiles::fuse<float>(acc[mt][nt][e], hasA ? ga[mt][nt][e] : 0.f,
                                                scale * gd[mt][nt][e], beta, hasA);
    }
    fm::fragment_to_tile<true>(ct, acc, ctid / 32, lane);
    consumers_sync();
    fm::store_tile<CONSUMER_THREADS>(out, ct, i0, j0, a.M, a.N, sym, a.alpha, w, ctid);
    consumers_sync();  // the result tile is free for the next tile
  }
#else
  __trap();  // built without sm_90a; the host never selects this kernel then
#endif
}

}  // namespace ws
}  // namespace
}  // namespace cuda
}  // namespace pathkernel
