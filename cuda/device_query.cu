// Queries the CUDA runtime (linked statically) for visible devices. On a machine without
// a driver the runtime reports an error instead of failing to load, so this returns an
// empty list and the module still imports.
#include "device_query.h"

#include <cuda_runtime.h>

#include <atomic>

namespace pagedlm::cuda {

std::vector<DeviceInfo> visible_devices(std::string* error) {
  std::vector<DeviceInfo> devices;
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    if (error) *error = cudaGetErrorString(status);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return devices;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    DeviceInfo info;
    info.index = i;
    info.name = prop.name;
    info.major = prop.major;
    info.minor = prop.minor;
    info.multiprocessors = prop.multiProcessorCount;
    info.total_memory = prop.totalGlobalMem;
    info.l2_cache_bytes = prop.l2CacheSize;
    devices.push_back(info);
  }
  return devices;
}

int current_multiprocessors() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0 until queried
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return 132;
  if (device < kMaxDevices && (count = known[device].load(std::memory_order_relaxed)) > 0) return count;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) count = 132;
  if (device < kMaxDevices) known[device].store(count, std::memory_order_relaxed);
  return count;
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace pagedlm::cuda
