// CUDA Gram accumulation: the same primitive as cpp/gram.hpp, on device pointers.
//
//   out[i, j, c1, c2] += alpha * w_j * sum_l scale_l sum_{s1, s2} (A1.A2 + beta_l) (D1.D2)
//
// Plain C++ interface (no pybind11, no torch): the binding validates and hands pointers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pathkernel {
namespace cuda {

enum class DType { f16, bf16, f32, f64 };
enum class Precision { tf32, tf32x3, exact };  // tensor-core TF32, 3xTF32, or CUDA cores

struct DTerm {
  const void* A = nullptr;  // [n, S, da] or nullptr
  const void* D = nullptr;  // [n, S, C, dd]
  int64_t S = 1, da = 0, dd = 0;
  double beta = 0.0;
  double scale = 1.0;
};

struct DSide {
  int64_t n = 0, C = 1;
  std::vector<DTerm> terms;
};

// Launches on `stream` (a cudaStream_t passed as an integer); never synchronizes the device.
// Returns the names of the kernels launched ("+"-separated). Throws std::runtime_error naming
// the kernel on a CUDA error.
std::string accumulate(void* out, DType out_t, DType in_t, const DSide& s1, const DSide& s2,
                bool symmetric, double alpha, const void* col_weights, Precision precision,
                std::uintptr_t stream);

// Runtime facts: device count (0 without a driver or GPU), compiled architectures.
int device_count();
std::string compiled_arches();

}  // namespace cuda
}  // namespace pathkernel
