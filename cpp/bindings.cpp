// pybind11 binding for pathkernel._native: validates everything it is handed, then calls the
// pure C++ core with the GIL released. Every rejection is std::invalid_argument (-> ValueError)
// naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "pathkernel/tile_math.hpp"
#include "blas.hpp"
#include "gram.hpp"
#include "pathkernel/pyparse.hpp"
#include "pathkernel/validate.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using pathkernel::ArrayDesc;
using pathkernel::fail;
using pathkernel::Side;
using pathkernel::SideDesc;
using pathkernel::Term;

namespace {

const std::set<std::string> kFloat = {"float32", "float64"};

ArrayDesc describe(const py::handle& h, const std::string& name) {
  if (!py::isinstance<py::array>(h)) fail(name + ": expected a numpy array");
  const py::array a = py::reinterpret_borrow<py::array>(h);
  ArrayDesc d;
  d.ptr = reinterpret_cast<std::uintptr_t>(a.data());
  for (py::ssize_t i = 0; i < a.ndim(); ++i) d.shape.push_back(a.shape(i));
  d.dtype = py::str(a.dtype()).cast<std::string>();
  d.itemsize = a.itemsize();
  d.contiguous = (a.flags() & py::array::c_style) != 0;
  d.writeable = a.writeable();
  return d;
}

template <typename T>
Side<T> typed(const SideDesc& r) {
  Side<T> s;
  s.n = r.n;
  s.C = r.C;
  for (const auto& rt : r.terms) {
    Term<T> t;
    t.A = rt.hasA ? reinterpret_cast<const T*>(rt.A.ptr) : nullptr;
    t.D = reinterpret_cast<const T*>(rt.D.ptr);
    t.S = rt.S;
    t.da = rt.da;
    t.dd = rt.dd;
    t.beta = rt.beta;
    t.scale = rt.scale;
    s.terms.push_back(t);
  }
  return s;
}

template <typename Tin, typename Tout>
void run(const ArrayDesc& out, const SideDesc& r1, const SideDesc& r2, bool symmetric,
         double alpha, const ArrayDesc* w, int64_t tile, int threads) {
  const Side<Tin> s1 = typed<Tin>(r1);
  const Side<Tin> s2 = symmetric ? s1 : typed<Tin>(r2);
  py::gil_scoped_release release;
  pathkernel::accumulate<Tin, Tout>(reinterpret_cast<Tout*>(out.ptr), s1, s2, symmetric, alpha,
                                    w ? reinterpret_cast<const Tout*>(w->ptr) : nullptr, tile,
                                    threads);
}

// The arrays stay alive: the caller's list holds them for the duration of the call.
void accumulate(py::array out, const py::object& side1, const py::object& side2, double alpha,
                const py::object& col_weights, int64_t tile, int threads) {
  std::string dtype;
  SideDesc r1 = pathkernel::parse_terms(side1, "side1", describe);
  pathkernel::check_side(r1, "side1", kFloat, dtype);
  const bool symmetric = side2.is_none();
  SideDesc r2 = r1;
  if (!symmetric) {
    r2 = pathkernel::parse_terms(side2, "side2", describe);
    pathkernel::check_side(r2, "side2", kFloat, dtype);
    pathkernel::check_pairing(r1, r2);
  }
  if (threads < 0) fail("threads: expected >= 0 (0 = all), got " + std::to_string(threads));
  const ArrayDesc o = describe(out, "out");
  ArrayDesc w;
  if (!col_weights.is_none()) w = describe(col_weights, "col_weights");
  pathkernel::check_output(o, r1, r2, symmetric, col_weights.is_none() ? nullptr : &w, alpha, tile,
                           kFloat);
  const ArrayDesc* wp = col_weights.is_none() ? nullptr : &w;
  const bool in32 = dtype == "float32", out32 = o.dtype == "float32";
  if (in32 && out32) run<float, float>(o, r1, r2, symmetric, alpha, wp, tile, threads);
  else if (in32) run<float, double>(o, r1, r2, symmetric, alpha, wp, tile, threads);
  else if (out32) run<double, float>(o, r1, r2, symmetric, alpha, wp, tile, threads);
  else run<double, double>(o, r1, r2, symmetric, alpha, wp, tile, threads);
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
        "out[i,j,c1,c2] += alpha * w_j * sum_l scale_l sum_{s1,s2} (A1.A2 + beta_l) * (D1.D2); "
        "side2=None is the symmetric mode (side 2 = side 1).");
  m.def("info", &info, "What the native core was built with.");
  m.attr("__version__") = PATHKERNEL_VERSION;
  // Hooks for the tests only: the CPU work list, and the CUDA launch plan's index arithmetic
  // and epilogue compiled for the host.
  py::module_ t = m.def_submodule("_testing", "internals exposed for the tests");
  t.def(
      "tasks",
      [](int64_t M, int64_t N, int64_t bm, int64_t bn, bool symmetric, int64_t panel) {
        if (M < 0 || N < 0 || bm < 1 || bn < 1) fail("tasks: expected M, N >= 0 and bm, bn >= 1");
        std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> r;
        for (const auto& t : pathkernel::make_tasks(M, N, bm, bn, symmetric, panel))
          r.emplace_back(t.i0, t.m, t.j0, t.n);
        return r;
      },
      "The work list (i0, m, j0, n) of the tiled accumulation.");
  t.def("cuda_tile_coords", [](int64_t t, int64_t rb, int64_t cb, bool symmetric, int64_t group) {
    int64_t r = 0, c = 0;
    pathkernel::tiles::coords(t, rb, cb, symmetric, group, &r, &c);
    return std::make_pair(r, c);
  });
  t.def("cuda_tile_count", &pathkernel::tiles::count);
  t.def("cuda_owns", &pathkernel::tiles::owns);
  t.def("cuda_mirrors", &pathkernel::tiles::mirrors);
  t.def("cuda_fuse", &pathkernel::tiles::fuse<double>);
}
