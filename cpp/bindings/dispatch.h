// Running an op where its tensors live: the CPU path with the GIL released, or the CUDA
// launcher on the caller's stream, turning a launcher's error code (or CUDA tensors on a
// build without CUDA) into a Python error naming the op.
#pragma once

#include <nanobind/nanobind.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "tensor_checks.h"

#ifdef PAGEDLM_WITH_CUDA
#include "device_query.h"
#include "launchers.h"
// The CUDA launcher `fn` of namespace pagedlm::cuda, or nullptr on a build without CUDA.
#define PAGEDLM_CUDA_LAUNCHER(fn) (&::pagedlm::cuda::fn)
#else
#define PAGEDLM_CUDA_LAUNCHER(fn) nullptr
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

template <typename T>
struct NotDeduced {  // keeps a nullptr launcher from breaking template deduction
  using type = T;
};

template <typename Params>
void run_on(const Placement& where, const Params& p, void (*cpu)(const Params&),
            typename NotDeduced<int (*)(const Params&, void*)>::type launch, uintptr_t stream, const char* op) {
  if (!where.cuda) {
    nanobind::gil_scoped_release release;
    cpu(p);
    return;
  }
  if (!launch) no_cuda(op);
#ifdef PAGEDLM_WITH_CUDA
  if (const char* why = cuda::unsupported_device_reason()) throw std::runtime_error(std::string(op) + ": " + why);
#endif
  check_cuda(launch(p, reinterpret_cast<void*>(stream)), op);
}

}  // namespace pagedlm::bindings
