// Queries the CUDA runtime (linked statically) for visible devices. On a machine without
// a driver the runtime reports an error instead of failing to load, so this returns an
// empty list and the module still imports.
#include "device_query.h"

#include <cuda_runtime.h>

#include <atomic>
#include <mutex>
#include <string>

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
    int previous = 0;
    if (cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(i) == cudaSuccess) {
      info.kernel_architecture = current_kernel_architecture();
      cudaSetDevice(previous);
    }
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

const char* compiled_architectures() { return PAGEDLM_CUDA_ARCHITECTURES; }

namespace {

__global__ void architecture_probe() {}

constexpr int kMaxDevices = 64;

int current_device() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();
    return -1;
  }
  return device;
}

}  // namespace

int current_kernel_architecture() {
  static std::atomic<int> known[kMaxDevices];  // 0 unknown, else architecture + 1
  const int device = current_device();
  if (device < 0) return 0;
  if (const int k = known[device].load(std::memory_order_relaxed)) return k - 1;
  cudaFuncAttributes attributes{};
  int arch = 0;
  if (cudaFuncGetAttributes(&attributes, architecture_probe) == cudaSuccess) {
    arch = attributes.ptxVersion;
  } else {
    cudaGetLastError();  // cudaErrorNoKernelImageForDevice: nothing here runs on this device
  }
  known[device].store(arch + 1, std::memory_order_relaxed);
  return arch;
}

const char* unsupported_device_reason() {
  static std::once_flag once[kMaxDevices];
  static std::string reason[kMaxDevices];  // empty: supported
  const int device = current_device();
  if (device < 0) return "no CUDA device is current";
  std::call_once(once[device], [device] {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    const std::string where = "cuda:" + std::to_string(device) + " has compute capability " +
                              std::to_string(major) + "." + std::to_string(minor);
    if (major < 8) {
      reason[device] = where + "; pagedlm's CUDA kernels need 8.0 (Ampere) or newer. Use CPU tensors instead";
    } else if (current_kernel_architecture() == 0) {
      reason[device] = where + ", which this build has no kernels for (built for " +
                       std::string(PAGEDLM_CUDA_ARCHITECTURES) + "); reinstall with CMAKE_CUDA_ARCHITECTURES=" +
                       std::to_string(major * 10 + minor) + " or let the build detect the GPU";
    }
  });
  return reason[device].empty() ? nullptr : reason[device].c_str();
}

}  // namespace pagedlm::cuda
