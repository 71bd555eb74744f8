// fused_mma_kernel: per tile, each term's A-Gram and D-Gram reduced on chip and fused into
// the running output, which is written once (see fused_config.cuh).
#pragma once

#include <cstdint>

#include "fused_config.cuh"
#include "fused_pipeline.cuh"
#include "kernel_args.cuh"
#include "pathkernel/tile_math.hpp"

namespace pathkernel {
namespace cuda {
namespace {

namespace fm {
// A thread's accumulator fragment into the shared result tile ct (row stride LDT); warp is
// its warp among the 8 that hold the tile. wgmma: warpgroup warp / 4, whose warp w = warp % 4
// owns rows 16 w + g (+ 8), n8 block mt NT + nt. mma.sync: warp (warp / 4, warp % 4) of a
// 2 x 4 grid of WM x WN warp tiles, mma tile (mt, nt).
template <bool WG>
__device__ __forceinline__ void fragment_to_tile(float* ct, const float (&acc)[MT][NT][4], int warp,
                                                 int lane) {
  const int g = lane / 4, t = lane % 4, wm = warp / 4, wn = warp % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int row = WG ? wm * 64 + wn * 16 + g : wm * WM + mt * 16 + g;
      const int col = WG ? (mt * NT + nt) * 8 + 2 * t : wn * WN + nt * 8 + 2 * t;
      ct[row * LDT + col] = acc[mt][nt][0];
      ct[row * LDT + col + 1] = acc[mt][nt][1];
      ct[(row + 8) * LDT + col] = acc[mt][nt][2];
      ct[(row + 8) * LDT + col + 1] = acc[mt][nt][3];
    }
}

// The finished tile ct (rows i0.., columns j0..) added into out by THREADS threads (this
// one is `tid`): direct writes along rows, and below the diagonal of a symmetric kernel the
// mirrored writes along columns, both coalesced.
template <int THREADS, typename TOut>
__device__ __forceinline__ void store_tile(TOut* out, const float* ct, int64_t i0, int64_t j0,
                                           int64_t M, int64_t N, bool sym, double alpha,
                                           const TOut* w, int tid) {
  for (int e = tid; e < BM * BM; e += THREADS) {
    const int li = e / BM, lj = e % BM;
    const int64_t gi = i0 + li, gj = j0 + lj;
    if (gi >= M || gj >= N || !tiles::owns(gi, gj, sym)) continue;
    const double v = alpha * static_cast<double>(ct[li * LDT + lj]);
    out[gi * N + gj] += static_cast<TOut>(v * (w ? static_cast<double>(w[gj]) : 1.0));
  }
  if (!sym) return;
  for (int e = tid; e < BM * BM; e += THREADS) {
    const int lj = e / BM, li = e % BM;
    const int64_t gi = i0 + li, gj = j0 + lj;
    if (gi >= M || gj >= N || !tiles::mirrors(gi, gj, sym)) continue;
    const double v = alpha * static_cast<double>(ct[li * LDT + lj]);
    out[gj * N + gi] += static_cast<TOut>(v * (w ? static_cast<double>(w[gi]) : 1.0));
  }
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
  zero(acc);
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
  fragment_to_tile<C::WG>(ct, acc, tid / 32, tid % 32);
  __syncthreads();
  store_tile<NTHREADS>(out, ct, i0, j0, args.M, args.N, sym, args.alpha,
                       static_cast<const TOut*>(args.w), tid);
}
}  // namespace fm

}  // namespace
}  // namespace cuda
}  // namespace pathkernel
