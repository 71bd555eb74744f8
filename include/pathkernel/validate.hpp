// Argument checks shared by the CPU and CUDA bindings. Both describe what Python handed them
// as ArrayDesc (pointer, shape, dtype, contiguity) and let these functions apply one set of
// rules; every rejection is std::invalid_argument naming the argument.
#pragma once

#include <cmath>
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace pathkernel {

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

struct ArrayDesc {
  std::uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  std::string dtype;  // "float16", "bfloat16", "float32", "float64", or what was given
  int64_t itemsize = 0;
  bool contiguous = false;
  bool writeable = true;

  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  std::uintptr_t end() const { return ptr + static_cast<std::uintptr_t>(numel() * itemsize); }
};

// Plain string building, no iostreams: an ostringstream in _native_cuda crashed (SIGSEGV in
// basic_ostream::_M_insert<long>) inside the GPU image's torch process.
inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "(";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + (s.size() == 1 ? ",)" : ")");
}

struct TermDesc {
  bool hasA = false;
  ArrayDesc A, D;
  double beta = 0.0, scale = 1.0;
  int64_t S = 1, da = 0, dd = 0;
};

struct SideDesc {
  int64_t n = -1, C = -1;
  std::string dtype;
  std::vector<TermDesc> terms;
};

constexpr int64_t kBlasMax = 2147483647;  // 32-bit BLAS dimensions

inline void check_array(const ArrayDesc& a, const std::string& name,
                        const std::set<std::string>& dtypes, const std::string& dtype_want) {
  if (!dtypes.count(a.dtype)) {
    std::string want;
    for (const auto& d : dtypes) want += (want.empty() ? "" : " or ") + d;
    fail(name + ": expected dtype " + want + ", got " + a.dtype);
  }
  if (!dtype_want.empty() && a.dtype != dtype_want)
    fail(name + ": all factors must share one dtype (" + dtype_want + "); got " + a.dtype);
  if (!a.contiguous) fail(name + ": expected a C-contiguous array");
}

// Check one side's terms (A may be absent) and fill n, C, S, da, dd.
inline void check_side(SideDesc& side, const std::string& name, const std::set<std::string>& dtypes,
                       std::string& dtype) {
  if (side.terms.empty()) fail(name + ": expected at least one term, got an empty list");
  for (size_t l = 0; l < side.terms.size(); ++l) {
    TermDesc& t = side.terms[l];
    const std::string tn = name + "[" + std::to_string(l) + "]";
    if (t.D.shape.size() != 4)
      fail(tn + ".D: expected 4 dims [n, S, C, d], got shape " + shape_str(t.D.shape));
    check_array(t.D, tn + ".D", dtypes, dtype);
    if (dtype.empty()) dtype = t.D.dtype;
    const int64_t n = t.D.shape[0], C = t.D.shape[2];
    t.S = t.D.shape[1];
    t.dd = t.D.shape[3];
    if (t.S < 1) fail(tn + ".D: expected S >= 1 positions, got shape " + shape_str(t.D.shape));
    if (C < 1) fail(tn + ".D: expected C >= 1 channels, got shape " + shape_str(t.D.shape));
    if (side.n < 0) {
      side.n = n;
      side.C = C;
    }
    if (n != side.n)
      fail(tn + ".D: expected " + std::to_string(side.n) + " examples like the first term, got " +
           std::to_string(n));
    if (C != side.C)
      fail(tn + ".D: expected " + std::to_string(side.C) + " channels like the first term, got " +
           std::to_string(C));
    t.da = 0;
    if (t.hasA) {
      if (t.A.shape.size() != 3)
        fail(tn + ".A: expected 3 dims [n, S, d], got shape " + shape_str(t.A.shape));
      check_array(t.A, tn + ".A", dtypes, dtype);
      if (t.A.shape[0] != n || t.A.shape[1] != t.S)
        fail(tn + ".A: expected leading dims (" + std::to_string(n) + ", " + std::to_string(t.S) +
             ") matching D, got shape " + shape_str(t.A.shape));
      t.da = t.A.shape[2];
    }
    if (n * t.S * C > kBlasMax || t.dd > kBlasMax || t.da > kBlasMax)
      fail(tn + ": dimensions exceed the 32-bit BLAS range; use smaller blocks");
  }
  side.dtype = dtype;
}

// Side 2 must pair term by term with side 1.
inline void check_pairing(const SideDesc& s1, const SideDesc& s2) {
  if (s2.terms.size() != s1.terms.size())
    fail("side2: expected " + std::to_string(s1.terms.size()) + " terms like side1, got " +
         std::to_string(s2.terms.size()));
  for (size_t l = 0; l < s1.terms.size(); ++l) {
    const std::string tn = "side2[" + std::to_string(l) + "]";
    const TermDesc &a = s1.terms[l], &b = s2.terms[l];
    if (a.hasA != b.hasA) fail(tn + ".A: must be None exactly when side1's A is None");
    if (a.da != b.da)
      fail(tn + ".A: expected feature size " + std::to_string(a.da) + " like side1, got " +
           std::to_string(b.da));
    if (a.dd != b.dd)
      fail(tn + ".D: expected feature size " + std::to_string(a.dd) + " like side1, got " +
           std::to_string(b.dd));
    if (a.beta != b.beta) fail(tn + ": beta differs from side1's");
    if (a.scale != b.scale) fail(tn + ": scale differs from side1's");
  }
}

inline bool overlaps(const ArrayDesc& x, const ArrayDesc& y) {
  return x.ptr < y.end() && y.ptr < x.end();
}

// The output [M, N, C1, C2]; no overlap with any input; optional column weights [N].
inline void check_output(const ArrayDesc& out, const SideDesc& s1, const SideDesc& s2,
                         bool symmetric, const ArrayDesc* weights, double alpha, int64_t tile,
                         const std::set<std::string>& out_dtypes) {
  if (!std::isfinite(alpha)) fail("alpha: expected a finite number");
  if (tile < 1) fail("tile: expected a positive tile size, got " + std::to_string(tile));
  check_array(out, "out", out_dtypes, "");
  if (!out.writeable) fail("out: expected a writeable array");
  const std::vector<int64_t> want = {s1.n, s2.n, s1.C, s2.C};
  if (out.shape != want)
    fail("out: expected shape " + shape_str(want) + ", got " + shape_str(out.shape));
  auto check_alias = [&](const SideDesc& s, const std::string& name) {
    for (size_t l = 0; l < s.terms.size(); ++l) {
      const std::string tn = name + "[" + std::to_string(l) + "]";
      if (overlaps(out, s.terms[l].D)) fail("out: overlaps the memory of " + tn + ".D");
      if (s.terms[l].hasA && overlaps(out, s.terms[l].A))
        fail("out: overlaps the memory of " + tn + ".A");
    }
  };
  check_alias(s1, "side1");
  if (!symmetric) check_alias(s2, "side2");
  if (weights) {
    if (weights->shape.size() != 1 || weights->shape[0] != s2.n)
      fail("col_weights: expected shape (" + std::to_string(s2.n) + ",), got " +
           shape_str(weights->shape));
    if (weights->dtype != out.dtype)
      fail("col_weights: expected the dtype of out, got " + weights->dtype);
    if (!weights->contiguous) fail("col_weights: expected a C-contiguous array");
    if (overlaps(out, *weights)) fail("out: overlaps the memory of col_weights");
  }
}

}  // namespace pathkernel
