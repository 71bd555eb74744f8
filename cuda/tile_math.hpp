// Tile index arithmetic and the fused epilogue shared by the CUDA kernels and the host.
//
// Compiled by nvcc for the device and by the host compiler into pathkernel._native, where
// the tests check it on the CPU (no GPU needed to test the launch plan and the epilogue).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PK_HD __host__ __device__ __forceinline__
#else
#define PK_HD inline
#endif

namespace pathkernel {
namespace tiles {

// Number of tiles in a grid of rb x cb blocks; the upper triangle (diagonal included) when
// symmetric (then rb == cb).
PK_HD int64_t count(int64_t rb, int64_t cb, bool symmetric) {
  return symmetric ? rb * (rb + 1) / 2 : rb * cb;
}

// The (row block, column block) of linear tile t. Symmetric grids enumerate the upper
// triangle row by row: row r holds tiles (r, r), (r, r + 1), ..., (r, nb - 1).
PK_HD void coords(int64_t t, int64_t rb, int64_t cb, bool symmetric, int64_t* r, int64_t* c) {
  if (!symmetric) {
    *r = t / cb;
    *c = t % cb;
    return;
  }
  // Tiles before row r: r * nb - r (r - 1) / 2. Walk rows (nb is small: N / tile).
  int64_t row = 0, start = 0;
  while (start + (rb - row) <= t) {
    start += rb - row;
    ++row;
  }
  *r = row;
  *c = row + (t - start);
}

// Whether output element (i, j) of a symmetric kernel is owned by the tile it was computed
// in (written directly) and whether it is mirrored to (j, i): j > i both, j == i written once,
// j < i (left of the diagonal in a diagonal tile) neither.
PK_HD bool owns(int64_t i, int64_t j, bool symmetric) { return !symmetric || j >= i; }
PK_HD bool mirrors(int64_t i, int64_t j, bool symmetric) { return symmetric && j > i; }

// The fused epilogue of one term on one element: acc += (a . a' + beta) * (d . d'), or
// acc += d . d' for a term without A factors.
template <typename T>
PK_HD T fuse(T acc, T ag, T dg, T beta, bool has_a) {
  return has_a ? acc + (ag + beta) * dg : acc + dg;
}

}  // namespace tiles
}  // namespace pathkernel
