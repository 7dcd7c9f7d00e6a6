// CPU path of the fused layers: the reference the CUDA kernels are tested against, and what
// the model runs on the CPU. Each step rounds as the unfused torch code does (this file is
// compiled with -ffp-contract=off so no product is fused into an FMA that torch would round).
#include "pagedlm/fused_layers.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "pagedlm/parallel.h"

namespace pagedlm {
namespace {

// Rows in chunks of about 32K elements, so a small call stays on the caller's thread
// (parallel_for starts threads on every call).
template <typename Fn>
void for_rows(int64_t rows, int64_t row_elems, Fn&& fn) {
  const int64_t per_chunk = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, row_elems));
  parallel_for((rows + per_chunk - 1) / per_chunk, [&](int64_t chunk) {
    const int64_t end = std::min(rows, (chunk + 1) * per_chunk);
    for (int64_t r = chunk * per_chunk; r < end; ++r) fn(r);
  });
}

// v rounded to the dtype and widened back.
float round_to(DType t, float v) {
  if (t == DType::f16) return f16_to_float(float_to_f16(v));
  if (t == DType::bf16) return bf16_to_float(float_to_bf16(v));
  return v;
}

}  // namespace

void rms_norm_cpu(const RMSNormParams& p) {
  const int64_t n = p.hidden;
  for_rows(p.rows, n, [&](int64_t r) {
    thread_local std::vector<float> x;
    x.resize(n);
    const int64_t base = r * n;
    for (int64_t i = 0; i < n; ++i) x[i] = load_as_float(p.input, base + i, p.dtype);
    if (p.residual) {
      for (int64_t i = 0; i < n; ++i) {
        x[i] = round_to(p.dtype, load_as_float(p.residual, base + i, p.dtype) + x[i]);
        store_from_float(p.residual, base + i, p.dtype, x[i]);
      }
    }
    // Squares rounded to f32 as torch's x.pow(2) rounds them, summed in double.
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i] * x[i]);
    const float mean = static_cast<float>(sum) / static_cast<float>(n);
    const float inv_rms = 1.0f / std::sqrt(mean + p.eps);
    for (int64_t i = 0; i < n; ++i) {
      // Normalized in f32, rounded to the dtype, then times the weight, rounded again.
      const float normed = round_to(p.dtype, x[i] * inv_rms);
      store_from_float(p.out, base + i, p.dtype, normed * load_as_float(p.weight, i, p.dtype));
    }
  });
}

void silu_and_mul_cpu(const SiluAndMulParams& p) {
  for_rows(p.rows, 2 * p.d, [&](int64_t r) {
    for (int64_t i = 0; i < p.d; ++i) {
      const float gate = load_as_float(p.input, r * 2 * p.d + i, p.dtype);
      const float up = load_as_float(p.input, r * 2 * p.d + p.d + i, p.dtype);
      const float silu = round_to(p.dtype, gate / (1.0f + std::exp(-gate)));
      store_from_float(p.out, r * p.d + i, p.dtype, silu * up);
    }
  });
}

void apply_rope_cpu(const RopeParams& p) {
  const int half = p.head_dim / 2;
  for_rows(p.tokens, static_cast<int64_t>(p.num_heads + p.num_kv_heads) * p.head_dim, [&](int64_t t) {
    thread_local std::vector<float> cos, sin;
    cos.resize(half);
    sin.resize(half);
    const float position = static_cast<float>(p.positions[t]);
    for (int i = 0; i < half; ++i) {
      const float angle = position * p.inv_freq[i];
      cos[i] = std::cos(angle);
      sin[i] = std::sin(angle);
    }
    // Head h of x (at its strides) rotated into head h of out (at out's).
    auto rotate = [&](const void* x, int64_t token_stride, int64_t head_stride, void* out, int64_t out_token_stride,
                      int64_t out_head_stride, int heads) {
      for (int h = 0; h < heads; ++h) {
        const int64_t from = t * token_stride + h * head_stride, to = t * out_token_stride + h * out_head_stride;
        for (int i = 0; i < half; ++i) {
          const float x1 = load_as_float(x, from + i, p.dtype), x2 = load_as_float(x, from + half + i, p.dtype);
          store_from_float(out, to + i, p.dtype, x1 * cos[i] - x2 * sin[i]);
          store_from_float(out, to + half + i, p.dtype, x2 * cos[i] + x1 * sin[i]);
        }
      }
    };
    if (p.query_out != nullptr) {
      rotate(p.query, p.query_token_stride, p.query_head_stride, p.query_out,
             static_cast<int64_t>(p.num_heads) * p.head_dim, p.head_dim, p.num_heads);
    } else {
      rotate(p.query, p.query_token_stride, p.query_head_stride, p.query, p.query_token_stride, p.query_head_stride,
             p.num_heads);
    }
    rotate(p.key, p.key_token_stride, p.key_head_stride, p.key, p.key_token_stride, p.key_head_stride,
           p.num_kv_heads);
  });
}

}  // namespace pagedlm
