// generic_kernel: CUDA cores, any S and C, float64 accumulation; the reference path for
// positions / channels, float64 inputs and precision="exact".
#pragma once

#include <cstdint>

#include "kernel_args.cuh"
#include "pathkernel/tile_math.hpp"

namespace pathkernel {
namespace cuda {
namespace {

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

}  // namespace
}  // namespace cuda
}  // namespace pathkernel
