// Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11): the one counter-based generator of every
// stochastic kernel. Header-only, compiled by the C++ core and by nvcc alike, so the CPU path
// and the CUDA path draw bit-identical numbers from the same (seed, offset, row, position).
//
// Key     = (seed bits 0-31, seed bits 32-63).
// Counter = (offset bits 0-31, offset bits 32-63, row, position).
// One block of ten rounds gives four 32-bit words, the draws of that (row, position). Every
// consumer uses kDrawAccept for an accept/reject test and kDrawSample for sampling a token,
// so no two decisions of one call ever share a number, and a caller that advances `offset`
// by one per call gets a fresh, independent stream for every row and position.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PAGEDLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PAGEDLM_HOST_DEVICE inline
#endif

namespace pagedlm {

struct PhiloxBlock {
  uint32_t word[4];
};

constexpr int kDrawAccept = 0;  // the uniform of an accept/reject test
constexpr int kDrawSample = 1;  // the 32-bit draw that picks a token by inverse CDF

namespace philox_detail {
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments

PAGEDLM_HOST_DEVICE void philox_round(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0];
  const uint64_t p1 = static_cast<uint64_t>(kM1) * c[2];
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
  c[0] = hi1 ^ c[1] ^ k0;
  c[1] = lo1;
  c[2] = hi0 ^ c[3] ^ k1;
  c[3] = lo0;
}
}  // namespace philox_detail

// The raw generator, as published (its known-answer vectors are tested).
PAGEDLM_HOST_DEVICE PhiloxBlock philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                              uint32_t k1) {
  uint32_t c[4] = {c0, c1, c2, c3};
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += philox_detail::kW0;
      k1 += philox_detail::kW1;
    }
    philox_detail::philox_round(c, k0, k1);
  }
  return PhiloxBlock{{c[0], c[1], c[2], c[3]}};
}

// The draws of one (row, position) of one call.
PAGEDLM_HOST_DEVICE PhiloxBlock philox_draws(uint64_t seed, uint64_t offset, uint32_t row, uint32_t position) {
  return philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), row, position,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The top 24 bits as a uniform float in [0, 1): every value is exact in f32, so a test like
// u < p/q means the same thing on every processor.
PAGEDLM_HOST_DEVICE float uniform24(uint32_t word) { return static_cast<float>(word >> 8) * 5.9604644775390625e-8f; }

}  // namespace pagedlm
