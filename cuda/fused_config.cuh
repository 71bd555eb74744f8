// The fused tensor-core kernel's tile shape and pipeline configurations.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pathkernel {
namespace cuda {
namespace {

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

// Measured on an H200 (bench/RESULTS.md): 128-byte chunks beat 64-byte ones by ~12%; other
// shapes tried (32-bit fragment loads instead of ldmatrix, the accumulator in shared memory)
// were no faster.
using Ldm16 = Cfg<16, 4>;  // 64-byte chunks, 4 stages: 144 KB (fits sm_80's 163 KB)
using Ldm32 = Cfg<32, 3>;  // 128-byte chunks, 3 stages: 172 KB (sm_90)
using Wg32 = Cfg<32, 3, true>;  // wgmma, 128-byte chunks, 3 stages: 160 KB (sm_90a; opt-in)
}  // namespace fm

}  // namespace
}  // namespace cuda
}  // namespace pathkernel
