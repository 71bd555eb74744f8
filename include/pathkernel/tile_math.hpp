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

// The (row block, column block) of linear tile t. Tiles are enumerated in groups of `group`
// row blocks, column by column inside a group, so that the blocks running at one time share
// a few row and column panels in L2. Symmetric grids cover the upper triangle (c >= r): in
// a group of h rows starting at r0, columns r0 .. r0 + h - 2 hold 1, 2, ..., h - 1 tiles
// (the triangle), every later column h tiles.
PK_HD void coords(int64_t t, int64_t rb, int64_t cb, bool symmetric, int64_t group, int64_t* r,
                  int64_t* c) {
  if (!symmetric) {
    const int64_t per = group * cb, g = t / per, r0 = g * group;
    const int64_t h = rb - r0 < group ? rb - r0 : group, u = t - g * per;
    *r = r0 + u % h;
    *c = u / h;
    return;
  }
  int64_t r0 = 0, start = 0;
  for (;;) {  // at most rb / group groups
    const int64_t h = rb - r0 < group ? rb - r0 : group;
    const int64_t tri = h * (h - 1) / 2, n = h * (rb - r0) - tri;
    if (t < start + n) {
      int64_t u = t - start;
      if (u < tri) {  // column k of the triangle holds k + 1 rows
        int64_t k = 0;
        while ((k + 1) * (k + 2) / 2 <= u) ++k;
        *c = r0 + k;
        *r = r0 + (u - k * (k + 1) / 2);
      } else {
        u -= tri;
        *c = r0 + h - 1 + u / h;
        *r = r0 + u % h;
      }
      return;
    }
    start += n;
    r0 += h;
  }
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
