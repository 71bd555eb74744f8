// Turning Python term lists into descriptors; shared by the CPU and CUDA bindings, which
// differ only in how one array becomes an ArrayDesc.
#pragma once

#include <pybind11/pybind11.h>

#include <functional>
#include <string>

#include "pathkernel/validate.hpp"

namespace pathkernel {

using ToDesc = std::function<ArrayDesc(const pybind11::handle&, const std::string&)>;

// A list of (A or None, D, beta[, scale]) tuples.
inline SideDesc parse_terms(const pybind11::handle& spec, const std::string& name, const ToDesc& to_desc) {
  namespace py = pybind11;
  if (!py::isinstance<py::list>(spec)) fail(name + ": expected a list of (A or None, D, beta[, scale]) terms");
  SideDesc side;
  const py::list terms = spec.cast<py::list>();
  for (size_t l = 0; l < terms.size(); ++l) {
    const std::string tn = name + "[" + std::to_string(l) + "]";
    if (!py::isinstance<py::tuple>(terms[l])) fail(tn + ": expected a tuple (A or None, D, beta[, scale])");
    const py::tuple t = terms[l].cast<py::tuple>();
    if (t.size() != 3 && t.size() != 4)
      fail(tn + ": expected a tuple (A or None, D, beta[, scale]) of length 3 or 4");
    TermDesc td;
    td.hasA = !t[0].is_none();
    if (td.hasA) td.A = to_desc(t[0], tn + ".A");
    td.D = to_desc(t[1], tn + ".D");
    try {
      td.beta = t[2].cast<double>();
      if (t.size() == 4) td.scale = t[3].cast<double>();
    } catch (const py::cast_error&) {
      fail(tn + ": beta and scale must be numbers");
    }
    if (!std::isfinite(td.beta) || !std::isfinite(td.scale)) fail(tn + ": beta and scale must be finite");
    side.terms.push_back(std::move(td));
  }
  return side;
}

}  // namespace pathkernel
