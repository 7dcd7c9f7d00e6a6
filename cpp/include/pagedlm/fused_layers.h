// Fused elementwise layers of a Llama block, each one kernel where torch runs several:
// RMSNorm (optionally with the residual add before it). The parameter structs are shared by
// the CPU path (cpp/src/fused_layers.cpp) and the CUDA path (cuda/fused_layers.cu). Both
// round where the unfused torch code rounds (see python/pagedlm/models/layers.py), so
// results agree with it to the last bit or within a few ulps.
#pragma once

#include <cstdint>

#include "pagedlm/dtype.h"

namespace pagedlm {

// out = weight * to_dtype(x * rsqrt(mean(x^2) + eps)), x widened to f32 and the mean
// accumulated in f32 (double on the CPU), row by row of input [rows, hidden] (contiguous).
// With residual (the add before a norm between layers): residual = to_dtype(residual + input)
// first, in place, and x is that sum. out may be input itself (vLLM's fused_add_rms_norm
// writes the normed rows over the input); every element of a row is read before it is written.
struct RMSNormParams {
  const void* input = nullptr;
  void* residual = nullptr;  // optional, [rows, hidden]
  const void* weight = nullptr;  // [hidden]
  void* out = nullptr;  // [rows, hidden]
  int64_t rows = 0, hidden = 0;
  float eps = 0.0f;
  DType dtype = DType::f32;
};

void rms_norm_cpu(const RMSNormParams& p);

}  // namespace pagedlm
