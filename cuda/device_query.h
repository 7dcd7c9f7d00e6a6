// Host-side view of the CUDA devices, for `pagedlm info` and kernel dispatch. Plain C++:
// the bindings include this without seeing any CUDA header.
#pragma once

#include <string>
#include <vector>

namespace pagedlm::cuda {

struct DeviceInfo {
  int index = 0;
  std::string name;
  int major = 0, minor = 0;
  int multiprocessors = 0;
  size_t total_memory = 0;
  int l2_cache_bytes = 0;
  int kernel_architecture = 0;  // as current_kernel_architecture(), for this device
};

// The devices the CUDA runtime can see. With no driver or no GPU the list is empty and
// `error` (if given) says why; it never throws.
std::vector<DeviceInfo> visible_devices(std::string* error = nullptr);

// Streaming multiprocessors of the current device (cached per device).
int current_multiprocessors();

// The CUDA runtime version this module was built against (e.g. 13000).
int runtime_version();

// The architectures this module was compiled for, as CMAKE_CUDA_ARCHITECTURES spelled them
// (e.g. "80-real;90a-real;80-virtual").
const char* compiled_architectures();

// The virtual architecture (80 for compute_80, 90 for sm_90a, ...) of the kernel code the
// current device runs from this build: its own machine code or PTX the driver compiled for
// it. 0 when the build holds nothing the device can run. Cached per device.
int current_kernel_architecture();

// Why the kernels cannot run on the current device (older than compute capability 8.0, or
// not covered by this build), or nullptr when they can. Cached per device.
const char* unsupported_device_reason();

}  // namespace pagedlm::cuda
