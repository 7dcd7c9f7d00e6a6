// Bindings of the fused layers (RMSNorm with or without the residual add, SiLU-and-multiply,
// rotary embeddings): check every
// argument, then run the CPU path or the CUDA launcher where the tensors live. Tensors
// written in place are declared noconvert, so a kernel never writes into a temporary copy.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "bindings.h"
#include "dispatch.h"
#include "pagedlm/fused_layers.h"
#include "tensor_checks.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace pagedlm::bindings {
namespace {

// A contiguous [rows, hidden] activation of the same shape, dtype and device as x.
template <typename T>
void expect_like_x(const T& t, const Tensor& x, DType dtype, const Placement& where, const char* arg) {
  expect_same_shape(t, x, arg, "x");
  expect_contiguous(t, arg);
  expect_float_like(t, dtype, arg, "x");
  expect_same_placement(t, where, arg, "x");
}

// out = weight * norm(x), or with residual: residual += x, out = weight * norm(residual).
void rms_norm(Tensor x, Tensor weight, MutTensor out, std::optional<MutTensor> residual, double eps,
              uintptr_t stream) {
  expect_rank(x, 2, "x");
  expect_contiguous(x, "x");
  const DType dtype = float_dtype(x, "x");
  const Placement where = placement_of(x);
  const int64_t rows = x.shape(0), hidden = x.shape(1);
  if (hidden == 0) fail("x", "hidden size (dimension 1) must be at least 1, got shape " + shape_str(x));
  expect_rank(weight, 1, "weight");
  expect_dim(weight, 0, hidden, "weight", "hidden size of x");
  expect_contiguous(weight, "weight");
  expect_float_like(weight, dtype, "weight", "x");
  expect_same_placement(weight, where, "weight", "x");
  expect_like_x(out, x, dtype, where, "out");
  if (residual) expect_like_x(*residual, x, dtype, where, "residual");
  // out may be x itself (the residual form writes the norm over x); nothing else may alias.
  if (out.data() != x.data()) expect_apart(out, x, "out", "x");
  expect_apart(out, weight, "out", "weight");
  if (residual) {
    expect_apart(*residual, x, "residual", "x");
    expect_apart(*residual, weight, "residual", "weight");
    expect_apart(*residual, out, "residual", "out");
  }
  const float eps32 = finite_f32(eps, "eps");

  RMSNormParams p;
  p.input = x.data();
  p.residual = residual ? residual->data() : nullptr;
  p.weight = weight.data();
  p.out = out.data();
  p.rows = rows;
  p.hidden = hidden;
  p.eps = eps32;
  p.dtype = dtype;
  run_on(where, p, rms_norm_cpu, PAGEDLM_CUDA_LAUNCHER(rms_norm), stream, "rms_norm");
}

// out [rows, d] = silu(x[:, :d]) * x[:, d:], x [rows, 2 * d].
void silu_and_mul(Tensor x, MutTensor out, uintptr_t stream) {
  expect_rank(x, 2, "x");
  expect_contiguous(x, "x");
  const DType dtype = float_dtype(x, "x");
  const Placement where = placement_of(x);
  if (x.shape(1) % 2 != 0) fail("x", "dimension 1 must be even (gate and up halves), got shape " + shape_str(x));
  expect_rank(out, 2, "out");
  expect_dim(out, 0, x.shape(0), "out", "rows of x");
  expect_dim(out, 1, x.shape(1) / 2, "out", "half of dimension 1 of x");
  expect_contiguous(out, "out");
  expect_float_like(out, dtype, "out", "x");
  expect_same_placement(out, where, "out", "x");
  expect_apart(out, x, "out", "x");

  SiluAndMulParams p;
  p.input = x.data();
  p.out = out.data();
  p.rows = x.shape(0);
  p.d = x.shape(1) / 2;
  p.dtype = dtype;
  run_on(where, p, silu_and_mul_cpu, PAGEDLM_CUDA_LAUNCHER(silu_and_mul), stream, "silu_and_mul");
}

// [tokens, heads, head_dim] with a contiguous last dimension; returns its (token, head) strides.
std::pair<int64_t, int64_t> check_rope_heads(const MutTensor& t, int64_t tokens, int64_t head_dim, DType dtype,
                                             const Placement& where, const char* arg) {
  expect_rank(t, 3, arg);
  expect_dim(t, 0, tokens, arg, "tokens of query");
  expect_dim(t, 2, head_dim, arg, "head_dim of query");
  expect_float_like(t, dtype, arg, "query");
  expect_same_placement(t, where, arg, "query");
  if (t.stride(2) != 1) fail(arg, "the last dimension (head_dim) must be contiguous");
  if (t.stride(0) < 0 || t.stride(1) < 0) fail(arg, "strides must not be negative");
  if (may_self_overlap(t)) fail(arg, "its (token, head) rows must not overlap (a broadcast view, say)");
  return {t.stride(0), t.stride(1)};
}

// query and key are rotated in place, so they must not share an element. Their spans may meet
// when both are head slices of one fused qkv output: then, with one token stride, each token's
// key heads must lie after its query heads and end before the next token's query heads.
void expect_rope_views_apart(const MutTensor& query, const MutTensor& key, int64_t head_dim, int64_t esize) {
  if (!spans_meet(byte_span(query), byte_span(key))) return;
  const int64_t stride = query.stride(0);
  const int64_t q_len = (static_cast<int64_t>(query.shape(1)) - 1) * query.stride(1) + head_dim;  // elements per token
  const int64_t k_len = (static_cast<int64_t>(key.shape(1)) - 1) * key.stride(1) + head_dim;
  const int64_t gap = static_cast<int64_t>(reinterpret_cast<uintptr_t>(key.data()) -
                                           reinterpret_cast<uintptr_t>(query.data()));
  const bool fused = key.stride(0) == stride && stride > 0 && query.shape(0) > 1 && gap % esize == 0 &&
                     q_len <= stride && k_len <= stride;
  const int64_t r = fused ? (((gap / esize) % stride) + stride) % stride : 0;
  if (!fused || r < q_len || r + k_len > stride) fail("key", "must not share memory with query");
}

// query, key rotated in place by positions [tokens] (int64) and inv_freq [head_dim / 2] (float32);
// the query into query_out instead when given (contiguous, the query's shape and dtype).
void apply_rope(MutTensor query, MutTensor key, Tensor positions, Tensor inv_freq, std::optional<MutTensor> query_out,
                uintptr_t stream) {
  expect_rank(query, 3, "query");
  const DType dtype = float_dtype(query, "query");
  const Placement where = placement_of(query);
  const int64_t tokens = query.shape(0), head_dim = query.shape(2);
  if (head_dim == 0 || head_dim % 2 != 0) {
    fail("query", "head_dim (dimension 2) must be even and positive, got shape " + shape_str(query));
  }
  const auto [q_token_stride, q_head_stride] = check_rope_heads(query, tokens, head_dim, dtype, where, "query");
  const auto [k_token_stride, k_head_stride] = check_rope_heads(key, tokens, head_dim, dtype, where, "key");
  expect_index(positions, 1, 64, "positions");
  expect_dim(positions, 0, tokens, "positions", "tokens of query");
  expect_same_placement(positions, where, "positions", "query");
  expect_rank(inv_freq, 1, "inv_freq");
  if (float_dtype(inv_freq, "inv_freq") != DType::f32) throw nb::type_error("inv_freq: dtype must be float32");
  expect_contiguous(inv_freq, "inv_freq");
  expect_dim(inv_freq, 0, head_dim / 2, "inv_freq", "head_dim / 2");
  expect_same_placement(inv_freq, where, "inv_freq", "query");
  expect_rope_views_apart(query, key, head_dim, dtype_size(dtype));
  for (auto [t, arg] : {std::pair<const Tensor&, const char*>{positions, "positions"}, {inv_freq, "inv_freq"}}) {
    expect_apart(query, t, "query", arg);
    expect_apart(key, t, "key", arg);
  }
  if ((static_cast<int64_t>(query.shape(1)) + key.shape(1)) * head_dim >= (int64_t{1} << 31)) {
    fail("query", "(num_heads + num_kv_heads) * head_dim must be below 2^31");
  }
  if (query_out) {
    check_rope_heads(*query_out, tokens, head_dim, dtype, where, "query_out");
    expect_dim(*query_out, 1, query.shape(1), "query_out", "heads of query");
    expect_contiguous(*query_out, "query_out");
    expect_apart(*query_out, query, "query_out", "query");
    expect_apart(*query_out, key, "query_out", "key");
    expect_apart(*query_out, positions, "query_out", "positions");
    expect_apart(*query_out, inv_freq, "query_out", "inv_freq");
  }

  RopeParams p;
  p.query = query.data();
  p.key = key.data();
  p.query_out = query_out ? query_out->data() : nullptr;
  p.positions = static_cast<const int64_t*>(positions.data());
  p.inv_freq = static_cast<const float*>(inv_freq.data());
  p.tokens = tokens;
  p.query_token_stride = q_token_stride, p.query_head_stride = q_head_stride;
  p.key_token_stride = k_token_stride, p.key_head_stride = k_head_stride;
  p.num_heads = static_cast<int32_t>(query.shape(1));
  p.num_kv_heads = static_cast<int32_t>(key.shape(1));
  p.head_dim = static_cast<int32_t>(head_dim);
  p.dtype = dtype;
  run_on(where, p, apply_rope_cpu, PAGEDLM_CUDA_LAUNCHER(apply_rope), stream, "apply_rope");
}

}  // namespace

void bind_fused_layers(nb::module_& m) {
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "out"_a.noconvert(), "residual"_a.noconvert().none(), "eps"_a,
        "stream"_a);
  m.def("silu_and_mul", &silu_and_mul, "x"_a, "out"_a.noconvert(), "stream"_a);
  m.def("apply_rope", &apply_rope, "query"_a.noconvert(), "key"_a.noconvert(), "positions"_a, "inv_freq"_a,
        "query_out"_a.noconvert().none(), "stream"_a);
}

}  // namespace pagedlm::bindings
