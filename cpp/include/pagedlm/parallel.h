// A minimal parallel-for for the CPU kernels: items are handed out to a few threads
// through an atomic counter. PAGEDLM_NUM_THREADS caps the threads (default: all cores).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace pagedlm {

inline int cpu_threads() {
  static const int n = [] {
    int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    if (const char* env = std::getenv("PAGEDLM_NUM_THREADS")) {
      int requested = std::atoi(env);
      if (requested > 0) return std::min(requested, hw);
    }
    return hw;
  }();
  return n;
}

// Calls fn(i) for every i in [0, n), on up to cpu_threads() threads (the caller's included).
template <typename Fn>
void parallel_for(int64_t n, Fn&& fn) {
  const int threads = static_cast<int>(std::min<int64_t>(cpu_threads(), n));
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&] {
    try {
      for (int64_t i = next++; i < n; i = next++) fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next = n;
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace pagedlm
