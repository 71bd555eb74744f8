// Turning Python term lists into descriptors; shared by the CPU and CUDA bindings, which
// differ only in how one array becomes an ArrayDesc.
#pragma once

#include <pybind11/pybind11.h>

#include <functional>
#include <string>

#include "validate.hpp"

namespace pathkernel {

using ToDesc = std::function<ArrayDesc(const pybind11::handle&, const std::string&)>;

// A list of (A or None, D, beta) tuples.
inline SideDesc parse_terms(const pybind11::handle& spec, const std::string& name, const ToDesc& to_desc) {
  namespace py = pybind11;
  if (!py::isinstance<py::list>(spec)) fail(name + ": expected a list of (A or None, D, beta) terms");
  SideDesc side;
  const py::list terms = spec.cast<py::list>();
  for (size_t l = 0; l < terms.size(); ++l) {
    const std::string tn = name + "[" + std::to_string(l) + "]";
    if (!py::isinstance<py::tuple>(terms[l])) fail(tn + ": expected a tuple (A or None, D, beta)");
    const py::tuple t = terms[l].cast<py::tuple>();
    if (t.size() != 3) fail(tn + ": expected a tuple (A or None, D, beta) of length 3");
    TermDesc td;
    td.hasA = !t[0].is_none();
    if (td.hasA) td.A = to_desc(t[0], tn + ".A");
    td.D = to_desc(t[1], tn + ".D");
    try {
      td.beta = t[2].cast<double>();
    } catch (const py::cast_error&) {
      fail(tn + ": beta must be a number");
    }
    side.terms.push_back(std::move(td));
  }
  return side;
}

}  // namespace pathkernel
