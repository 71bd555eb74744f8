// pybind11 binding for pathkernel._native_cuda. CUDA tensors cross as descriptors
// (pointer, shape, strides, dtype, device) plus the caller's stream; all are validated here
// (the same rules as the CPU binding, cpp/validate.hpp) and the pointers are checked to be
// device memory on the named device before any kernel is launched.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <set>
#include <string>

#include "pathkernel/pyparse.hpp"
#include "pathkernel/validate.hpp"
#include "gram_cuda.hpp"

namespace py = pybind11;
using pathkernel::ArrayDesc;
using pathkernel::fail;
using pathkernel::SideDesc;
namespace pc = pathkernel::cuda;

namespace {

const std::set<std::string> kIn = {"bfloat16", "float16", "float32", "float64"};
const std::set<std::string> kOut = {"float32", "float64"};

int64_t itemsize_of(const std::string& dtype) {
  if (dtype == "float16" || dtype == "bfloat16") return 2;
  if (dtype == "float32") return 4;
  if (dtype == "float64") return 8;
  return 1;
}

// (ptr, shape, strides, dtype, device) -> ArrayDesc, checking it is device memory there.
ArrayDesc describe(const py::handle& h, const std::string& name, int device) {
  if (!py::isinstance<py::tuple>(h) || py::len(h) != 5)
    fail(name + ": expected a CUDA tensor descriptor (ptr, shape, strides, dtype, device)");
  const py::tuple t = h.cast<py::tuple>();
  ArrayDesc d;
  d.ptr = t[0].cast<std::uintptr_t>();
  d.shape = t[1].cast<std::vector<int64_t>>();
  const auto strides = t[2].cast<std::vector<int64_t>>();
  d.dtype = t[3].cast<std::string>();
  d.itemsize = itemsize_of(d.dtype);
  const int dev = t[4].cast<int>();
  if (strides.size() != d.shape.size()) fail(name + ": strides and shape differ in length");
  d.contiguous = true;
  int64_t expect = 1;
  for (int k = static_cast<int>(d.shape.size()) - 1; k >= 0; --k) {
    if (d.shape[k] != 1 && strides[k] != expect) d.contiguous = false;
    expect *= d.shape[k];
  }
  if (dev != device)
    fail(name + ": is on cuda:" + std::to_string(dev) + ", expected cuda:" + std::to_string(device) +
         " like the other tensors");
  if (d.numel() > 0) {
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(d.ptr)) != cudaSuccess) {
      cudaGetLastError();
      fail(name + ": the pointer is not CUDA memory");
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      fail(name + ": expected device memory, got a host pointer");
    if (attr.device != device)
      fail(name + ": memory lives on cuda:" + std::to_string(attr.device) + ", expected cuda:" +
           std::to_string(device));
  }
  return d;
}

pc::DType dtype_of(const std::string& s) {
  if (s == "float16") return pc::DType::f16;
  if (s == "bfloat16") return pc::DType::bf16;
  if (s == "float32") return pc::DType::f32;
  return pc::DType::f64;
}

pc::DSide to_side(const SideDesc& r) {
  pc::DSide s;
  s.n = r.n;
  s.C = r.C;
  for (const auto& t : r.terms)
    s.terms.push_back(pc::DTerm{t.hasA ? reinterpret_cast<const void*>(t.A.ptr) : nullptr,
                                reinterpret_cast<const void*>(t.D.ptr), t.S, t.da, t.dd, t.beta,
                                t.scale});
  return s;
}

pc::Precision precision_of(const std::string& p) {
  if (p == "tf32") return pc::Precision::tf32;
  if (p == "3xtf32") return pc::Precision::tf32x3;
  if (p == "exact") return pc::Precision::exact;
  fail("precision: expected 'tf32', '3xtf32' or 'exact', got '" + p + "'");
}

std::string accumulate(const py::handle& out, const py::object& side1, const py::object& side2,
                       double alpha, const py::object& col_weights, const std::string& precision,
                       std::uintptr_t stream, int device) {
  const auto to_desc = [device](const py::handle& h, const std::string& n) { return describe(h, n, device); };
  std::string dtype;
  SideDesc r1 = pathkernel::parse_terms(side1, "side1", to_desc);
  pathkernel::check_side(r1, "side1", kIn, dtype);
  const bool symmetric = side2.is_none();
  SideDesc r2 = r1;
  if (!symmetric) {
    r2 = pathkernel::parse_terms(side2, "side2", to_desc);
    pathkernel::check_side(r2, "side2", kIn, dtype);
    pathkernel::check_pairing(r1, r2);
  }
  const ArrayDesc o = describe(out, "out", device);
  ArrayDesc w;
  if (!col_weights.is_none()) w = describe(col_weights, "col_weights", device);
  pathkernel::check_output(o, r1, r2, symmetric, col_weights.is_none() ? nullptr : &w, alpha, 1, kOut);
  const pc::Precision p = precision_of(precision);
  const pc::DSide s1 = to_side(r1), s2 = symmetric ? s1 : to_side(r2);
  std::string kernel;
  {
    py::gil_scoped_release release;
    int current = -1;
    cudaGetDevice(&current);
    if (current != device && cudaSetDevice(device) != cudaSuccess)
      fail("out: cannot select cuda:" + std::to_string(device));
    kernel = pc::accumulate(reinterpret_cast<void*>(o.ptr), dtype_of(o.dtype), dtype_of(dtype), s1, s2,
                   symmetric, alpha, col_weights.is_none() ? nullptr : reinterpret_cast<const void*>(w.ptr),
                   p, stream);
    if (current >= 0 && current != device) cudaSetDevice(current);
  }
  return kernel;
}

}  // namespace

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "pathkernel CUDA core: fused tensor-core Gram accumulation";
  m.def("accumulate", &accumulate, py::arg("out"), py::arg("side1"), py::arg("side2") = py::none(),
        py::arg("alpha") = 1.0, py::arg("col_weights") = py::none(), py::arg("precision") = "tf32",
        py::arg("stream") = 0, py::arg("device") = 0,
        "out += alpha * w_j * sum_l (A1.A2 + beta_l)(D1.D2) on the GPU; returns the kernel used.");
  m.def("info", []() {
    py::dict d;
    d["devices"] = pc::device_count();
    d["arches"] = pc::compiled_arches();
    return d;
  });
}
