// pybind11 binding for pathkernel._native: validates everything it is handed, then calls the
// pure C++ core with the GIL released. Every rejection is std::invalid_argument (-> ValueError)
// naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "blas.hpp"
#include "gram.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using pathkernel::Side;
using pathkernel::Term;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

enum class Kind { f32, f64 };

Kind kind_of(const py::array& a, const std::string& name) {
  if (a.dtype().is(py::dtype::of<float>())) return Kind::f32;
  if (a.dtype().is(py::dtype::of<double>())) return Kind::f64;
  fail(name + ": expected dtype float32 or float64, got " + dtype_str(a));
}

void require_c_contiguous(const py::array& a, const std::string& name) {
  if (!(a.flags() & py::array::c_style)) fail(name + ": expected a C-contiguous array");
}

struct Span {
  const char* lo;
  const char* hi;
};
Span span_of(const py::array& a) {
  const char* p = static_cast<const char*>(a.data());
  return {p, p + a.nbytes()};
}
bool overlaps(const Span& x, const Span& y) { return x.lo < y.hi && y.lo < x.hi; }

constexpr int64_t kBlasMax = 2147483647;  // 32-bit BLAS dimensions

// A parsed side: shapes checked, pointers kept as void* until the dtype is fixed.
struct RawTerm {
  py::array A, D;  // A may be empty (no A factor)
  bool hasA;
  int64_t S, da, dd;
  double beta;
};
struct RawSide {
  int64_t n = -1, C = -1;
  std::vector<RawTerm> terms;
};

RawSide parse_side(const py::list& spec, const std::string& name, Kind& kind, bool& kind_set) {
  RawSide side;
  if (spec.size() == 0) fail(name + ": expected at least one term, got an empty list");
  for (size_t l = 0; l < spec.size(); ++l) {
    const std::string tn = name + "[" + std::to_string(l) + "]";
    py::tuple t;
    try {
      t = spec[l].cast<py::tuple>();
    } catch (const py::cast_error&) {
      fail(tn + ": expected a tuple (A or None, D, beta)");
    }
    if (t.size() != 3) fail(tn + ": expected a tuple (A or None, D, beta) of length 3");
    RawTerm rt;
    rt.hasA = !t[0].is_none();
    if (!py::isinstance<py::array>(t[1])) fail(tn + ".D: expected a numpy array");
    rt.D = t[1].cast<py::array>();
    rt.beta = t[2].cast<double>();
    if (rt.D.ndim() != 4) fail(tn + ".D: expected 4 dims [n, S, C, d], got shape " + shape_str(rt.D));
    require_c_contiguous(rt.D, tn + ".D");
    const Kind kd = kind_of(rt.D, tn + ".D");
    if (!kind_set) { kind = kd; kind_set = true; }
    if (kd != kind) fail(tn + ".D: all factors must share one dtype; got " + dtype_str(rt.D));
    const int64_t n = rt.D.shape(0), C = rt.D.shape(2);
    rt.S = rt.D.shape(1);
    rt.dd = rt.D.shape(3);
    if (rt.S < 1) fail(tn + ".D: expected S >= 1 positions, got shape " + shape_str(rt.D));
    if (C < 1) fail(tn + ".D: expected C >= 1 channels, got shape " + shape_str(rt.D));
    if (side.n < 0) { side.n = n; side.C = C; }
    if (n != side.n)
      fail(tn + ".D: expected " + std::to_string(side.n) + " examples like the first term, got " +
           std::to_string(n));
    if (C != side.C)
      fail(tn + ".D: expected " + std::to_string(side.C) + " channels like the first term, got " +
           std::to_string(C));
    rt.da = 0;
    if (rt.hasA) {
      if (!py::isinstance<py::array>(t[0])) fail(tn + ".A: expected a numpy array or None");
      rt.A = t[0].cast<py::array>();
      if (rt.A.ndim() != 3) fail(tn + ".A: expected 3 dims [n, S, d], got shape " + shape_str(rt.A));
      require_c_contiguous(rt.A, tn + ".A");
      if (kind_of(rt.A, tn + ".A") != kind)
        fail(tn + ".A: all factors must share one dtype; got " + dtype_str(rt.A));
      if (rt.A.shape(0) != n || rt.A.shape(1) != rt.S)
        fail(tn + ".A: expected leading dims (" + std::to_string(n) + ", " + std::to_string(rt.S) +
             ") matching D, got shape " + shape_str(rt.A));
      rt.da = rt.A.shape(2);
    }
    if (n * rt.S * C > kBlasMax || rt.dd > kBlasMax || rt.da > kBlasMax)
      fail(tn + ": dimensions exceed the 32-bit BLAS range; use smaller blocks");
    side.terms.push_back(std::move(rt));
  }
  return side;
}

template <typename T>
Side<T> typed(const RawSide& r) {
  Side<T> s;
  s.n = r.n;
  s.C = r.C;
  for (const auto& rt : r.terms) {
    Term<T> t;
    t.A = rt.hasA ? static_cast<const T*>(rt.A.data()) : nullptr;
    t.D = static_cast<const T*>(rt.D.data());
    t.S = rt.S;
    t.da = rt.da;
    t.dd = rt.dd;
    t.beta = rt.beta;
    s.terms.push_back(t);
  }
  return s;
}

template <typename Tin, typename Tout>
void run(py::array& out, const RawSide& r1, const RawSide& r2, bool symmetric, double alpha,
         const py::object& weights, int64_t tile, int threads) {
  const Side<Tin> s1 = typed<Tin>(r1);
  const Side<Tin> s2 = symmetric ? s1 : typed<Tin>(r2);
  const Tout* w = weights.is_none() ? nullptr
                                    : static_cast<const Tout*>(weights.cast<py::array>().data());
  Tout* o = static_cast<Tout*>(out.mutable_data());
  py::gil_scoped_release release;
  pathkernel::accumulate<Tin, Tout>(o, s1, s2, symmetric, alpha, w, tile, threads);
}

void accumulate(py::array out, const py::list& side1, const py::object& side2, double alpha,
                const py::object& col_weights, int64_t tile, int threads) {
  Kind kin = Kind::f32;
  bool kind_set = false;
  const RawSide r1 = parse_side(side1, "side1", kin, kind_set);
  const bool symmetric = side2.is_none();
  RawSide r2;
  if (!symmetric) {
    if (!py::isinstance<py::list>(side2)) fail("side2: expected a list of terms or None");
    r2 = parse_side(side2.cast<py::list>(), "side2", kin, kind_set);
    if (r2.terms.size() != r1.terms.size())
      fail("side2: expected " + std::to_string(r1.terms.size()) + " terms like side1, got " +
           std::to_string(r2.terms.size()));
    for (size_t l = 0; l < r1.terms.size(); ++l) {
      const std::string tn = "side2[" + std::to_string(l) + "]";
      const RawTerm &a = r1.terms[l], &b = r2.terms[l];
      if (a.hasA != b.hasA) fail(tn + ".A: must be None exactly when side1's A is None");
      if (a.da != b.da)
        fail(tn + ".A: expected feature size " + std::to_string(a.da) + " like side1, got " +
             std::to_string(b.da));
      if (a.dd != b.dd)
        fail(tn + ".D: expected feature size " + std::to_string(a.dd) + " like side1, got " +
             std::to_string(b.dd));
      if (a.beta != b.beta) fail(tn + ": beta differs from side1's");
    }
  } else {
    r2 = r1;
  }
  if (!std::isfinite(alpha)) fail("alpha: expected a finite number");
  if (tile < 1) fail("tile: expected a positive tile size, got " + std::to_string(tile));
  if (threads < 0) fail("threads: expected >= 0 (0 = all), got " + std::to_string(threads));

  // The output: [M, N, C1, C2], C-contiguous, writeable, not overlapping any input.
  const Kind kout = kind_of(out, "out");
  require_c_contiguous(out, "out");
  if (!out.writeable()) fail("out: expected a writeable array");
  const std::vector<int64_t> want = {r1.n, r2.n, r1.C, r2.C};
  bool ok = out.ndim() == 4;
  for (int d = 0; ok && d < 4; ++d) ok = out.shape(d) == want[d];
  if (!ok) {
    std::ostringstream s;
    s << "out: expected shape (" << want[0] << ", " << want[1] << ", " << want[2] << ", "
      << want[3] << "), got " << shape_str(out);
    fail(s.str());
  }
  const Span os = span_of(out);
  auto check_alias = [&](const RawSide& r, const std::string& name) {
    for (size_t l = 0; l < r.terms.size(); ++l) {
      const std::string tn = name + "[" + std::to_string(l) + "]";
      if (overlaps(os, span_of(r.terms[l].D))) fail("out: overlaps the memory of " + tn + ".D");
      if (r.terms[l].hasA && overlaps(os, span_of(r.terms[l].A)))
        fail("out: overlaps the memory of " + tn + ".A");
    }
  };
  check_alias(r1, "side1");
  if (!symmetric) check_alias(r2, "side2");
  if (!col_weights.is_none()) {
    if (!py::isinstance<py::array>(col_weights)) fail("col_weights: expected a numpy array or None");
    py::array w = col_weights.cast<py::array>();
    if (w.ndim() != 1 || w.shape(0) != r2.n)
      fail("col_weights: expected shape (" + std::to_string(r2.n) + ",), got " + shape_str(w));
    require_c_contiguous(w, "col_weights");
    if (kind_of(w, "col_weights") != kout)
      fail("col_weights: expected the dtype of out, got " + dtype_str(w));
    if (overlaps(os, span_of(w))) fail("out: overlaps the memory of col_weights");
  }

  if (kin == Kind::f32 && kout == Kind::f32)
    run<float, float>(out, r1, r2, symmetric, alpha, col_weights, tile, threads);
  else if (kin == Kind::f32)
    run<float, double>(out, r1, r2, symmetric, alpha, col_weights, tile, threads);
  else if (kout == Kind::f32)
    run<double, float>(out, r1, r2, symmetric, alpha, col_weights, tile, threads);
  else
    run<double, double>(out, r1, r2, symmetric, alpha, col_weights, tile, threads);
}

py::dict info() {
  py::dict d;
  d["blas"] = std::string(pathkernel::blas_config());
#ifdef _OPENMP
  d["openmp"] = true;
  d["threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["threads"] = 1;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "pathkernel native CPU core: tiled Gram accumulation with fused epilogues";
  pathkernel::blas_single_threaded();
  m.def("accumulate", &accumulate, py::arg("out"), py::arg("side1"), py::arg("side2") = py::none(),
        py::arg("alpha") = 1.0, py::arg("col_weights") = py::none(), py::arg("tile") = 512,
        py::arg("threads") = 0,
        "out[i,j,c1,c2] += alpha * w_j * sum_l sum_{s1,s2} (A1.A2 + beta_l) * (D1.D2); "
        "side2=None is the symmetric mode (side 2 = side 1).");
  m.def("info", &info, "What the native core was built with.");
  m.def(
      "_tasks",
      [](int64_t M, int64_t N, int64_t bm, int64_t bn, bool symmetric, int64_t panel) {
        if (M < 0 || N < 0 || bm < 1 || bn < 1) fail("_tasks: expected M, N >= 0 and bm, bn >= 1");
        std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> r;
        for (const auto& t : pathkernel::make_tasks(M, N, bm, bn, symmetric, panel))
          r.emplace_back(t.i0, t.m, t.j0, t.n);
        return r;
      },
      "The work list (i0, m, j0, n) of the tiled accumulation (exposed for tests).");
}
