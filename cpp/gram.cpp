#include "gram.hpp"

#include <algorithm>
#include <cstring>

#include "blas.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pathkernel {

TilePlan plan_tiles(int64_t S1C1, int64_t S2C2, int64_t target, bool symmetric) {
  TilePlan p;
  p.rows_per_tile = std::max<int64_t>(1, target / std::max<int64_t>(1, S1C1));
  p.cols_per_tile = std::max<int64_t>(1, target / std::max<int64_t>(1, S2C2));
  if (symmetric) p.cols_per_tile = p.rows_per_tile;  // the grid must be square
  return p;
}

std::vector<Task> make_tasks(int64_t M, int64_t N, int64_t bm, int64_t bn, bool symmetric,
                             int64_t panel) {
  std::vector<Task> tasks;
  panel = std::max<int64_t>(1, panel);
  for (int64_t i0 = 0; i0 < M; i0 += bm) {
    const int64_t m = std::min(bm, M - i0);
    for (int64_t j0 = symmetric ? i0 : 0; j0 < N; j0 += bn) {
      const int64_t n = std::min(bn, N - j0);
      if (symmetric && j0 == i0) {
        for (int64_t r = 0; r < m; r += panel)
          tasks.push_back({i0 + r, std::min(panel, m - r), i0 + r, n - r});
      } else {
        tasks.push_back({i0, m, j0, n});
      }
    }
  }
  return tasks;
}

namespace {

template <typename Tin, typename Tout>
struct Workspace {
  std::vector<Tin> ag, dg, part;
  std::vector<Tout> acc;
};

constexpr int64_t kMinSlice = 1024;  // inner-dimension slices shorter than this are not cut

// C[m, n] = A B^T (``upper``: the upper triangle of A A^T, m == n), the inner dimension cut
// into ``parts`` slices whose products OpenMP threads compute, then summed in slice order
// (deterministic for a given number of threads). One part: a single GEMM.
template <typename Tin>
void product(bool upper, int64_t m, int64_t n, int64_t k, const Tin* A, const Tin* B, Tin* C,
             int parts, std::vector<Tin>& scratch) {
  parts = static_cast<int>(std::min<int64_t>(parts, k / kMinSlice));
  if (parts <= 1) {
    if (upper)
      gram_upper<Tin>(m, k, A, C);
    else
      gemm_nt<Tin>(m, n, k, A, B, C);
    return;
  }
  const int64_t slice = (k + parts - 1) / parts, mn = m * n;
  scratch.resize(static_cast<size_t>((parts - 1) * mn));
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static, 1)
#endif
  for (int p = 0; p < parts; ++p) {
    const int64_t k0 = p * slice, kk = std::min(k, k0 + slice) - k0;
    Tin* dst = p == 0 ? C : scratch.data() + (p - 1) * mn;
    if (upper)
      gram_upper<Tin>(m, kk, A + k0, dst, k);
    else
      gemm_nt<Tin>(m, n, kk, A + k0, B + k0, dst, k, k);
  }
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static)
#endif
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j0 = upper ? i : 0;  // gram_upper leaves the rest of each slice unset
    for (int p = 1; p < parts; ++p) {
      const Tin* src = scratch.data() + (p - 1) * mn + i * n;
      Tin* dst = C + i * n;
      for (int64_t j = j0; j < n; ++j) dst[j] += src[j];
    }
  }
}

// acc[i, j, c1, c2] += scale sum_{s1,s2} (AG[(i,s1),(j,s2)] + beta) DG[(i,s1,c1),(j,s2,c2)]
// for one term on an m x n tile. AG == nullptr means the A factor is 1.
template <typename Tin, typename Tout>
void epilogue(Tout* acc, const Tin* ag, const Tin* dg, Tout beta, Tout scale, int64_t m,
              int64_t n, int64_t S1, int64_t S2, int64_t C1, int64_t C2, bool upper) {
  const int64_t ld_ag = n * S2, ld_dg = n * S2 * C2, CC = C1 * C2;
  if (S1 == 1 && S2 == 1 && CC == 1) {  // the MLP case: a plain fused multiply-add
    for (int64_t i = 0; i < m; ++i) {
      Tout* a = acc + i * n;
      const Tin* d = dg + i * ld_dg;
      const int64_t j0 = upper ? i : 0;  // diagonal tiles: the upper triangle only
      if (ag) {
        const Tin* g = ag + i * ld_ag;
#pragma omp simd
        for (int64_t j = j0; j < n; ++j) a[j] += scale * (Tout(g[j]) + beta) * Tout(d[j]);
      } else {
#pragma omp simd
        for (int64_t j = j0; j < n; ++j) a[j] += scale * Tout(d[j]);
      }
    }
    return;
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t s1 = 0; s1 < S1; ++s1) {
      const Tin* g = ag ? ag + (i * S1 + s1) * ld_ag : nullptr;
      for (int64_t c1 = 0; c1 < C1; ++c1) {
        const Tin* d = dg + ((i * S1 + s1) * C1 + c1) * ld_dg;
        for (int64_t j = 0; j < n; ++j) {
          Tout* a = acc + (i * n + j) * CC + c1 * C2;
          for (int64_t s2 = 0; s2 < S2; ++s2) {
            const Tout f = g ? scale * (Tout(g[j * S2 + s2]) + beta) : scale;
            const Tin* dj = d + (j * S2 + s2) * C2;
            for (int64_t c2 = 0; c2 < C2; ++c2) a[c2] += f * Tout(dj[c2]);
          }
        }
      }
    }
}

// acc[i, j] += scale (AG[i, j] + beta) * d1[i] * d2[j]   (S = 1, C = 1, dd = 1)
template <typename Tin, typename Tout>
void rank_one_epilogue(Tout* acc, const Tin* ag, const Tin* d1, const Tin* d2, Tout beta,
                       Tout scale, int64_t m, int64_t n, bool upper) {
  for (int64_t i = 0; i < m; ++i) {
    Tout* a = acc + i * n;
    const Tout di = scale * Tout(d1[i]);
    const int64_t j0 = upper ? i : 0;
    if (ag) {
      const Tin* g = ag + i * n;
#pragma omp simd
      for (int64_t j = j0; j < n; ++j) a[j] += (Tout(g[j]) + beta) * di * Tout(d2[j]);
    } else {
#pragma omp simd
      for (int64_t j = j0; j < n; ++j) a[j] += di * Tout(d2[j]);
    }
  }
}

}  // namespace

namespace {

// One pass over the output for terms whose tiles agree (see accumulate).
template <typename Tin, typename Tout>
void accumulate_pass(Tout* out, const Side<Tin>& side1, const Side<Tin>& side2, bool symmetric,
                     double alpha, const Tout* col_weights, int64_t tile_target, int threads) {
  const int64_t M = side1.n, N = side2.n, C1 = side1.C, C2 = side2.C, CC = C1 * C2;
  if (M == 0 || N == 0) return;
  int64_t S1max = 1, S2max = 1;
  for (const auto& t : side1.terms) S1max = std::max(S1max, t.S);
  for (const auto& t : side2.terms) S2max = std::max(S2max, t.S);
  const TilePlan plan = plan_tiles(S1max * C1, S2max * C2, tile_target, symmetric);
  // Diagonal tiles of a symmetric S = C = 1 kernel are whole tasks computed as triangles
  // (gemmt); otherwise they are split into row panels that start at the diagonal.
  const bool triangular = symmetric && S1max == 1 && C1 == 1;
  const int64_t panel = triangular ? plan.rows_per_tile : std::max<int64_t>(1, plan.rows_per_tile / 4);
  const auto tasks = make_tasks(M, N, plan.rows_per_tile, plan.cols_per_tile, symmetric, panel);
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  const Tout a_out = static_cast<Tout>(alpha);

  // One task per thread at least: OpenMP over tiles, each GEMM single-threaded. Fewer tasks
  // than threads (a small kernel: one diagonal tile): the tasks in turn, each GEMM's inner
  // dimension cut over the threads, so no core idles.
#ifdef _OPENMP
  const int nthreads = threads > 0 ? threads : omp_get_max_threads();
#else
  const int nthreads = 1;
#endif
  const int split = ntasks < nthreads ? nthreads : 1;
  auto run_task = [&](int64_t t, Workspace<Tin, Tout>& ws) {
    const int64_t i0 = tasks[t].i0, j0 = tasks[t].j0, m = tasks[t].m, n = tasks[t].n;
    const bool tri = triangular && i0 == j0;  // a diagonal tile: upper triangle only
    ws.acc.assign(static_cast<size_t>(m * n * CC), Tout(0));
    for (size_t l = 0; l < side1.terms.size(); ++l) {
      const Term<Tin>& t1 = side1.terms[l];
      const Term<Tin>& t2 = side2.terms[l];
      const int64_t rows_a = m * t1.S, cols_a = n * t2.S;
      const Tin* agp = nullptr;
      if (t1.A) {
        ws.ag.resize(static_cast<size_t>(rows_a * cols_a));
        product<Tin>(tri, rows_a, cols_a, t1.da, t1.A + i0 * t1.S * t1.da,
                     t2.A + j0 * t2.S * t2.da, ws.ag.data(), split, ws.part);
        agp = ws.ag.data();
      }
      const Tin* d1 = t1.D + i0 * t1.S * C1 * t1.dd;
      const Tin* d2 = t2.D + j0 * t2.S * C2 * t2.dd;
      if (t1.dd == 1 && t1.S == 1 && t2.S == 1 && C1 * C2 == 1) {
        // A scalar output factor (a network with one output): D D'^T is rank one, so it is
        // applied in the epilogue instead of being formed by a GEMM.
        rank_one_epilogue<Tin, Tout>(ws.acc.data(), agp, d1, d2, static_cast<Tout>(t1.beta),
                                     static_cast<Tout>(t1.scale), m, n, tri);
        continue;
      }
      const int64_t rows_d = rows_a * C1, cols_d = cols_a * C2;
      ws.dg.resize(static_cast<size_t>(rows_d * cols_d));
      product<Tin>(tri, rows_d, cols_d, t1.dd, d1, d2, ws.dg.data(), split, ws.part);
      epilogue<Tin, Tout>(ws.acc.data(), agp, ws.dg.data(), static_cast<Tout>(t1.beta),
                          static_cast<Tout>(t1.scale), m, n, t1.S, t2.S, C1, C2, tri);
    }
    // One pass over the output tile, then its mirror image (symmetric mode), each walking
    // the output contiguously.
    for (int64_t i = 0; i < m; ++i) {
      const int64_t jstart = symmetric ? std::max<int64_t>(0, i0 + i - j0) : 0;
      for (int64_t j = jstart; j < n; ++j) {
        const Tout* a = ws.acc.data() + (i * n + j) * CC;
        const Tout s = a_out * (col_weights ? col_weights[j0 + j] : Tout(1));
        Tout* o = out + ((i0 + i) * N + (j0 + j)) * CC;
        for (int64_t c = 0; c < CC; ++c) o[c] += s * a[c];
      }
    }
    if (symmetric) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t iend = std::min<int64_t>(m, j0 + j - i0);  // rows strictly above j
        Tout* p = out + (j0 + j) * N * CC;
        for (int64_t i = 0; i < iend; ++i) {
          const Tout* a = ws.acc.data() + (i * n + j) * CC;
          const Tout s = a_out * (col_weights ? col_weights[i0 + i] : Tout(1));
          Tout* q = p + (i0 + i) * CC;
          for (int64_t c1 = 0; c1 < C1; ++c1)
            for (int64_t c2 = 0; c2 < C2; ++c2) q[c2 * C1 + c1] += s * a[c1 * C2 + c2];
        }
      }
    }
  };
  if (split > 1) {
    Workspace<Tin, Tout> ws;
    for (int64_t t = 0; t < ntasks; ++t) run_task(t, ws);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
  {
    Workspace<Tin, Tout> ws;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < ntasks; ++t) run_task(t, ws);
  }
}

}  // namespace

// Terms of one position a side (materialized gradients, dense terms) and terms over
// positions (factors) want different tiles: the first, long rows of features, whole
// triangles and as many examples per tile as the target allows; the second, target / S
// examples. Run together, the tiles of the second would cut the first's GEMMs into short
// row panels that each read the whole feature length again (3x slower for GPT-2's mix), so
// they run as two passes over the output, the one-position terms first.
template <typename Tin, typename Tout>
void accumulate(Tout* out, const Side<Tin>& side1, const Side<Tin>& side2, bool symmetric,
                double alpha, const Tout* col_weights, int64_t tile_target, int threads) {
  Side<Tin> one1{side1.n, side1.C, {}}, one2{side2.n, side2.C, {}};
  Side<Tin> many1{side1.n, side1.C, {}}, many2{side2.n, side2.C, {}};
  for (size_t l = 0; l < side1.terms.size(); ++l) {
    const bool one = side1.terms[l].S == 1 && side2.terms[l].S == 1;
    (one ? one1 : many1).terms.push_back(side1.terms[l]);
    (one ? one2 : many2).terms.push_back(side2.terms[l]);
  }
  if (one1.terms.empty() || many1.terms.empty()) {
    accumulate_pass(out, side1, side2, symmetric, alpha, col_weights, tile_target, threads);
    return;
  }
  accumulate_pass(out, one1, symmetric ? one1 : one2, symmetric, alpha, col_weights,
                  tile_target, threads);
  accumulate_pass(out, many1, symmetric ? many1 : many2, symmetric, alpha, col_weights,
                  tile_target, threads);
}

template void accumulate<float, float>(float*, const Side<float>&, const Side<float>&, bool,
                                       double, const float*, int64_t, int);
template void accumulate<float, double>(double*, const Side<float>&, const Side<float>&, bool,
                                        double, const double*, int64_t, int);
template void accumulate<double, float>(float*, const Side<double>&, const Side<double>&, bool,
                                        double, const float*, int64_t, int);
template void accumulate<double, double>(double*, const Side<double>&, const Side<double>&, bool,
                                         double, const double*, int64_t, int);

}  // namespace pathkernel
