// Fused elementwise layers of a Llama block, each one kernel where torch runs several:
// RMSNorm (optionally with the residual add before it), SiLU-and-multiply of the SwiGLU MLP
// and the rotary embedding of queries and keys. The parameter structs are shared by
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

// out[r, i] = to_dtype(to_dtype(silu(gate)) * up), gate = input[r, i] and up = input[r, d + i]
// widened to f32, silu(g) = g / (1 + exp(-g)): torch's silu(gate) * up, each rounded.
// input [rows, 2 * d], out [rows, d], both contiguous.
struct SiluAndMulParams {
  const void* input = nullptr;
  void* out = nullptr;
  int64_t rows = 0, d = 0;
  DType dtype = DType::f32;
};

void silu_and_mul_cpu(const SiluAndMulParams& p);

// Rotary embedding, rotate-half convention (Hugging Face's Llama), in place on query
// [tokens, num_heads, head_dim] and key [tokens, num_kv_heads, head_dim], whose last dimension
// is contiguous and whose token and head strides are free (views of one fused qkv output).
// For i < head_dim / 2: angle = f32(positions[t]) * inv_freq[i], cos and sin in f32, and
// (x1, x2) = (x[i], x[i + head_dim / 2]) become (x1 cos - x2 sin, x2 cos + x1 sin), each
// product and sum rounded to f32, the result to the dtype. query and key must not overlap.
// query_out, when set, receives the rotated query instead, contiguous [tokens, num_heads,
// head_dim] (query is then only read): the attention kernels take a contiguous query, and a
// query head slice of a fused qkv output would otherwise be copied once more.
struct RopeParams {
  void* query = nullptr;
  void* key = nullptr;
  void* query_out = nullptr;
  const int64_t* positions = nullptr;  // [tokens]
  const float* inv_freq = nullptr;  // [head_dim / 2]
  int64_t tokens = 0;
  int64_t query_token_stride = 0, query_head_stride = 0;  // in elements
  int64_t key_token_stride = 0, key_head_stride = 0;
  int32_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  DType dtype = DType::f32;
};

void apply_rope_cpu(const RopeParams& p);

}  // namespace pagedlm
