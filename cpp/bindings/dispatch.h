// Turning a CUDA launcher's return code, or a CUDA call on a build without CUDA, into a
// Python error naming the op.
#pragma once

#include <nanobind/nanobind.h>

#include <stdexcept>
#include <string>

#ifdef PAGEDLM_WITH_CUDA
#include "launchers.h"
#endif

namespace pagedlm::bindings {

inline void check_cuda(int code, const char* op) {
#ifdef PAGEDLM_WITH_CUDA
  if (code != 0) throw std::runtime_error(std::string(op) + ": CUDA error: " + cuda::error_string(code));
#else
  (void)code;
  (void)op;
#endif
}

[[noreturn]] inline void no_cuda(const char* op) {
  throw nanobind::value_error((std::string(op) + ": got CUDA tensors, but pagedlm was built without CUDA").c_str());
}

}  // namespace pagedlm::bindings
