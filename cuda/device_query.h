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
};

// The devices the CUDA runtime can see. With no driver or no GPU the list is empty and
// `error` (if given) says why; it never throws.
std::vector<DeviceInfo> visible_devices(std::string* error = nullptr);

// Streaming multiprocessors of the current device (cached per device).
int current_multiprocessors();

// The CUDA runtime version this module was built against (e.g. 13000).
int runtime_version();

}  // namespace pagedlm::cuda
