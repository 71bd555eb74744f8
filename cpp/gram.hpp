// Tiled Gram accumulation with a fused Hadamard epilogue.
//
// One call adds, into out[M, N, C1, C2],
//
//   out[i, j, c1, c2] += alpha * w_j * sum_l scale_l * sum_{s1, s2}
//                        (A1_l[i, s1] . A2_l[j, s2] + beta_l) * (D1_l[i, s1, c1] . D2_l[j, s2, c2])
//
// where a term without A factors (a dense per-example block G = D) uses 1 in place of
// (A . A' + beta). For every (row block, column block) tile the two factor Grams of each
// term are formed by BLAS GEMM in cache-sized workspaces, multiplied elementwise and summed
// into a tile accumulator; the output is touched once per tile. In symmetric mode (side 2 is
// side 1) only tiles on or above the diagonal are computed and mirrored; diagonal tiles are
// triangles (BLAS gemmt) when every term has S = C = 1, row panels otherwise.
//
// No Python or torch headers here: the binding validates and hands plain pointers.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace pathkernel {

template <typename T>
struct Term {
  const T* A = nullptr;  // [n, S, da] row-major, or nullptr for a dense (A-less) term
  const T* D = nullptr;  // [n, S, C, dd] row-major
  int64_t S = 1, da = 0, dd = 0;
  double beta = 0.0;
  double scale = 1.0;  // the term's weight (a checkpoint's learning rate, a quadrature weight)
};

template <typename T>
struct Side {
  int64_t n = 0;  // examples
  int64_t C = 1;  // output channels
  std::vector<Term<T>> terms;
};

struct TilePlan {
  int64_t rows_per_tile;  // examples of side 1 per tile
  int64_t cols_per_tile;  // examples of side 2 per tile
};

// Examples per tile so that each GEMM in the tile has about `target` rows/columns.
TilePlan plan_tiles(int64_t S1C1, int64_t S2C2, int64_t target, bool symmetric);

// A rectangle of the output to compute as one unit of work: rows [i0, i0 + m), columns
// [j0, j0 + n).
struct Task {
  int64_t i0, m, j0, n;
};

// The work list for an M x N output in tiles of bm x bn examples. Symmetric grids (M == N,
// bm == bn) keep tiles on or above the diagonal, and split each diagonal tile into row panels
// of `panel` rows that start at the diagonal, so little of the lower triangle is computed.
// Within a task of a symmetric grid, an element (i, j) with j > i is written with its mirror,
// j == i once, and j < i (left of the diagonal inside a panel) not at all: every output
// element is then written exactly once.
std::vector<Task> make_tasks(int64_t M, int64_t N, int64_t bm, int64_t bn, bool symmetric,
                             int64_t panel);

template <typename Tin, typename Tout>
void accumulate(Tout* out, const Side<Tin>& side1, const Side<Tin>& side2, bool symmetric,
                double alpha, const Tout* col_weights, int64_t tile_target, int threads);

}  // namespace pathkernel
