// Kernel bindings: check every argument, then dispatch to the CPU path or the CUDA
// launcher by where the tensors live. Outputs are written in place (declared noconvert so
// that nanobind never hands a kernel a temporary copy).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bindings.h"
#include "dispatch.h"
#include "pagedlm/errors.h"
#include "pagedlm/kv_cache.h"
#include "pagedlm/paged_decode.h"
#include "pagedlm/paged_prefill.h"
#include "tensor_checks.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace pagedlm::bindings {
namespace {

// [num_blocks, block_size, num_kv_heads, head_dim], contiguous; returns its dtype.
template <typename T>
DType check_cache(const T& cache, const char* arg) {
  expect_rank(cache, 4, arg);
  expect_contiguous(cache, arg);
  return cache_dtype(cache, arg);
}

// k_scale / v_scale: a float (`value`, finite and > 0 in float32) or a float32 tensor, 0-d or one
// value per kv head, on the caches' device. Only FP8 caches take a scale other than 1.0. The values
// of a CPU tensor are checked here; those of a CUDA tensor with PAGEDLM_DEBUG=1 (pagedlm.ops).
KVScale check_scale(double value, const std::optional<Tensor>& tensor, DType kv_dtype, int64_t num_kv_heads,
                    const Placement& where, const char* arg) {
  KVScale s;
  if (!tensor) {
    if (!(value > 0.0) || !std::isfinite(static_cast<float>(value))) {
      fail(arg, "must be finite and > 0 (in float32), got " + std::to_string(value));
    }
    if (!is_fp8(kv_dtype) && value != 1.0) fail(arg, "only an FP8 cache takes a scale other than 1.0");
    s.value = static_cast<float>(value);
    return s;
  }
  if (!is_fp8(kv_dtype)) fail(arg, "only an FP8 cache takes a scale tensor");
  const nb::dlpack::dtype d = tensor->dtype();
  if (d.lanes != 1 || d.bits != 32 || d.code != static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) {
    throw nb::type_error((std::string(arg) + ": dtype must be float32").c_str());
  }
  if (tensor->ndim() == 1) {
    expect_dim(*tensor, 0, num_kv_heads, arg, "num_kv_heads");
  } else if (tensor->ndim() != 0) {
    fail(arg, "must be 0-d or [num_kv_heads], got shape " + shape_str(*tensor));
  }
  expect_contiguous(*tensor, arg);
  expect_same_placement(*tensor, where, arg, "the caches");
  s.data = static_cast<const float*>(tensor->data());
  s.count = tensor->ndim() == 0 ? 1 : static_cast<int32_t>(num_kv_heads);
  if (!where.cuda) check_kv_scale(s, arg);
  return s;
}

// What paged decode and prefill check alike: the caches, query [rows, num_heads, head_dim],
// out, lse [rows, num_heads], the options, and that all of them share the query's device.
struct AttentionShape {
  DType dtype, kv_dtype;  // query and out; the caches
  int64_t num_blocks, block_size, num_kv_heads, head_dim, rows, num_heads;
  Placement where;
};

AttentionShape check_attention(const Tensor& query, const Tensor& key_cache, const Tensor& value_cache,
                               const MutTensor& out, const std::optional<MutTensor>& lse) {
  AttentionShape a;
  a.kv_dtype = check_cache(key_cache, "key_cache");
  if (check_cache(value_cache, "value_cache") != a.kv_dtype) throw nb::type_error("value_cache: dtype must match key_cache");
  expect_same_shape(value_cache, key_cache, "value_cache", "key_cache");
  a.num_blocks = key_cache.shape(0), a.block_size = key_cache.shape(1);
  a.num_kv_heads = key_cache.shape(2), a.head_dim = key_cache.shape(3);
  if (a.block_size == 0) fail("key_cache", "block_size (dimension 1) must be at least 1, got shape " + shape_str(key_cache));
  expect_rank(query, 3, "query");
  expect_contiguous(query, "query");
  // The query's dtype is the output's; with an FP8 cache it may be any of f32, f16, bf16.
  a.dtype = float_dtype(query, "query");
  if (!is_fp8(a.kv_dtype) && a.dtype != a.kv_dtype) throw nb::type_error("query: dtype must match key_cache");
  a.rows = query.shape(0), a.num_heads = query.shape(1);
  expect_dim(query, 2, a.head_dim, "query", "head_dim of the cache");
  if (a.num_kv_heads == 0 || a.num_heads % a.num_kv_heads != 0) {
    fail("query", "num_heads (" + std::to_string(a.num_heads) + ") must be a multiple of the cache's num_kv_heads (" +
                      std::to_string(a.num_kv_heads) + ")");
  }
  expect_same_shape(out, query, "out", "query");
  expect_contiguous(out, "out");
  expect_float_like(out, a.dtype, "out", "query");
  if (lse) {
    expect_rank(*lse, 2, "lse");
    expect_dim(*lse, 0, a.rows, "lse", "query rows");
    expect_dim(*lse, 1, a.num_heads, "lse", "num_heads");
    expect_contiguous(*lse, "lse");
    if (float_dtype(*lse, "lse") != DType::f32) throw nb::type_error("lse: dtype must be float32");
  }
  a.where = placement_of(query);
  expect_same_placement(key_cache, a.where, "key_cache", "query");
  expect_same_placement(value_cache, a.where, "value_cache", "query");
  expect_same_placement(out, a.where, "out", "query");
  if (lse) expect_same_placement(*lse, a.where, "lse", "query");
  for (auto [t, arg] : {std::pair<const Tensor&, const char*>{query, "query"}, {key_cache, "key_cache"},
                        {value_cache, "value_cache"}}) {
    expect_apart(out, t, "out", arg);
    if (lse) expect_apart(*lse, t, "lse", arg);
  }
  if (lse) expect_apart(*lse, out, "lse", "out");
  return a;
}

// out and lse are written while the index tensors are read: they must not share memory.
void expect_outputs_apart(const MutTensor& out, const std::optional<MutTensor>& lse,
                          std::initializer_list<std::pair<const Tensor*, const char*>> inputs) {
  for (const auto& [t, arg] : inputs) {
    if (!t) continue;
    expect_apart(out, *t, "out", arg);
    if (lse) expect_apart(*lse, *t, "lse", arg);
  }
}

// Block tables int32 [batch, max_blocks] and an int32 (or `bits`) [n] vector, on the query's device.
void check_index(const Tensor& t, size_t rank, int64_t dim0, const char* arg, const char* meaning,
                 const Placement& where, int bits = 32) {
  expect_index(t, rank, bits, arg);
  expect_dim(t, 0, dim0, arg, meaning);
  expect_same_placement(t, where, arg, "query");
}

// A custom mask: flat, contiguous, on the query's device; bool, or (where `packed_allowed`) uint8
// bit-packed. Returns whether it is packed.
bool check_custom_mask(const Tensor& mask, const Placement& where, bool packed_allowed) {
  expect_rank(mask, 1, "custom_mask");
  expect_contiguous(mask, "custom_mask");
  const nb::dlpack::dtype d = mask.dtype();
  const bool is_bool = d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bool) && d.bits == 8;
  const bool is_u8 = d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::UInt) && d.bits == 8;
  if (!packed_allowed && !is_bool) throw nb::type_error("custom_mask: dtype must be bool (one element per key)");
  if (!is_bool && !is_u8) throw nb::type_error("custom_mask: dtype must be bool (flat) or uint8 (bit-packed)");
  expect_same_placement(mask, where, "custom_mask", "query");
  return is_u8;
}

// Sizes narrowed to the kernels' int32 (refused when they do not fit), the table's capacity
// bounded by kMaxSequenceTokens, and the options checked: scale and soft_cap finite and >= 0 in
// float32 (soft_cap 0: none), sliding_window >= 0 (0: none). A window at least the capacity
// hides nothing, so it becomes 0; that keeps it in int32 however large it was given.
template <typename Params>
void fill_attention(Params& p, const AttentionShape& a, const Tensor& query, const Tensor& key_cache,
                    const Tensor& value_cache, const Tensor& block_tables, const Tensor& seq_lens, MutTensor& out,
                    std::optional<MutTensor>& lse, double scale, int64_t sliding_window, double soft_cap,
                    double k_scale, double v_scale, const std::optional<Tensor>& k_scale_t,
                    const std::optional<Tensor>& v_scale_t) {
  for (auto [t, arg] : {std::pair<const std::optional<Tensor>*, const char*>{&k_scale_t, "k_scale"},
                        {&v_scale_t, "v_scale"}}) {
    if (!*t) continue;
    expect_apart(out, **t, "out", arg);
    if (lse) expect_apart(*lse, **t, "lse", arg);
  }
  p.k_scale = check_scale(k_scale, k_scale_t, a.kv_dtype, a.num_kv_heads, a.where, "k_scale");
  p.v_scale = check_scale(v_scale, v_scale_t, a.kv_dtype, a.num_kv_heads, a.where, "v_scale");
  p.kv_dtype = a.kv_dtype;
  const int64_t width = block_tables.shape(1);
  if (width * a.block_size > kMaxSequenceTokens) {
    fail("block_tables", "width x block_size = " + std::to_string(width) + " x " + std::to_string(a.block_size) +
                             " tokens per sequence is above 2^30");
  }
  if (sliding_window < 0) fail("sliding_window", "must be positive or None, got " + std::to_string(sliding_window));
  p.query = query.data();
  p.key_cache = key_cache.data();
  p.value_cache = value_cache.data();
  p.block_tables = static_cast<const int32_t*>(block_tables.data());
  p.seq_lens = static_cast<const int32_t*>(seq_lens.data());
  p.out = out.data();
  p.lse = lse ? static_cast<float*>(lse->data()) : nullptr;
  p.dtype = a.dtype;
  p.batch = narrow32(seq_lens.shape(0), "seq_lens", "batch");
  p.num_heads = narrow32(a.num_heads, "query", "num_heads");
  p.num_kv_heads = narrow32(a.num_kv_heads, "key_cache", "num_kv_heads");
  p.head_dim = narrow32(a.head_dim, "key_cache", "head_dim");
  p.block_size = narrow32(a.block_size, "key_cache", "block_size");
  p.num_blocks = narrow32(a.num_blocks, "key_cache", "num_blocks");
  p.max_blocks_per_seq = narrow32(width, "block_tables", "width");
  p.scale = finite_f32(scale, "scale");
  p.soft_cap = finite_f32(soft_cap, "soft_cap");
  p.sliding_window = sliding_window >= width * a.block_size ? 0 : static_cast<int32_t>(sliding_window);
}

// CUDA grids put sequences (decode) and heads on the y and z axes, at most 65535 each.
void expect_cuda_grid(int64_t size, const char* arg, const char* meaning) {
  if (size > 65535) fail(arg, std::string(meaning) + " (" + std::to_string(size) + ") must be at most 65535 on CUDA");
}

void expect_cuda_head_dim(int64_t head_dim) {
  if (head_dim != 64 && head_dim != 128 && head_dim != 256) {
    fail("query", "head_dim " + std::to_string(head_dim) + " is not supported on CUDA (64, 128 or 256)");
  }
}

// The CUDA FP8 kernels read cache rows in 16-byte loads.
void expect_fp8_aligned(const Tensor& key_cache, const Tensor& value_cache, DType kv_dtype) {
  if (!is_fp8(kv_dtype)) return;
  if (reinterpret_cast<uintptr_t>(key_cache.data()) % 16) fail("key_cache", "an FP8 cache must be 16-byte aligned on CUDA");
  if (reinterpret_cast<uintptr_t>(value_cache.data()) % 16) {
    fail("value_cache", "an FP8 cache must be 16-byte aligned on CUDA");
  }
}

void write_kv_cache(Tensor key, Tensor value, MutTensor key_cache, MutTensor value_cache, Tensor slot_mapping,
                    double k_scale, double v_scale, std::optional<Tensor> k_scale_t, std::optional<Tensor> v_scale_t,
                    uintptr_t stream) {
  const DType cache_type = check_cache(key_cache, "key_cache");
  if (check_cache(value_cache, "value_cache") != cache_type) throw nb::type_error("value_cache: dtype must match key_cache");
  expect_same_shape(value_cache, key_cache, "value_cache", "key_cache");
  // key and value are 16/32-bit; an FP8 cache takes any of those, another cache only its own.
  const DType dtype = is_fp8(cache_type) ? float_dtype(key, "key") : cache_type;
  const int64_t num_kv_heads = key_cache.shape(2), head_dim = key_cache.shape(3);
  for (auto [t, arg] : {std::pair<const Tensor&, const char*>{key, "key"}, {value, "value"}}) {
    expect_rank(t, 3, arg);
    expect_dim(t, 1, num_kv_heads, arg, "num_kv_heads of the cache");
    expect_dim(t, 2, head_dim, arg, "head_dim of the cache");
    expect_float_like(t, dtype, arg, "key_cache");
    if ((t.shape(2) > 1 && t.stride(2) != 1) || (t.shape(1) > 1 && t.stride(1) != head_dim)) {
      fail(arg, "each token's heads must be contiguous (strides [*, head_dim, 1])");
    }
  }
  expect_same_shape(value, key, "value", "key");
  expect_index(slot_mapping, 1, 64, "slot_mapping");
  expect_dim(slot_mapping, 0, key.shape(0), "slot_mapping", "num_tokens of key");

  const Placement where = placement_of(key_cache);
  expect_same_placement(value_cache, where, "value_cache", "key_cache");
  expect_same_placement(key, where, "key", "key_cache");
  expect_same_placement(value, where, "value", "key_cache");
  expect_same_placement(slot_mapping, where, "slot_mapping", "key_cache");
  for (auto [t, arg] : {std::pair<const Tensor&, const char*>{key, "key"}, {value, "value"},
                        {slot_mapping, "slot_mapping"}}) {
    expect_apart(key_cache, t, "key_cache", arg);
    expect_apart(value_cache, t, "value_cache", arg);
  }
  expect_apart(key_cache, value_cache, "key_cache", "value_cache");
  for (auto [t, arg] : {std::pair<const std::optional<Tensor>*, const char*>{&k_scale_t, "k_scale"},
                        {&v_scale_t, "v_scale"}}) {
    if (!*t) continue;
    expect_apart(key_cache, **t, "key_cache", arg);
    expect_apart(value_cache, **t, "value_cache", arg);
  }

  WriteKVCacheParams p;
  p.cache_dtype = cache_type;
  p.k_scale = check_scale(k_scale, k_scale_t, cache_type, num_kv_heads, where, "k_scale");
  p.v_scale = check_scale(v_scale, v_scale_t, cache_type, num_kv_heads, where, "v_scale");
  p.key = key.data();
  p.value = value.data();
  p.key_cache = key_cache.data();
  p.value_cache = value_cache.data();
  p.slot_mapping = static_cast<const int64_t*>(slot_mapping.data());
  p.num_tokens = key.shape(0);
  p.key_stride = key.shape(0) > 1 ? key.stride(0) : num_kv_heads * head_dim;
  p.value_stride = value.shape(0) > 1 ? value.stride(0) : num_kv_heads * head_dim;
  p.num_slots = static_cast<int64_t>(key_cache.shape(0)) * key_cache.shape(1);
  p.num_kv_heads = static_cast<int32_t>(num_kv_heads);
  p.head_dim = static_cast<int32_t>(head_dim);
  p.dtype = dtype;
  run_on(where, p, write_kv_cache_cpu, PAGEDLM_CUDA_LAUNCHER(write_kv_cache), stream, "write_kv_cache");
}

// One layer's caches, taken from a list without conversion (a kernel never writes into a copy).
MutTensor cache_at(nb::handle list, size_t i, const char* list_arg) {
  const std::string arg = std::string(list_arg) + "[" + std::to_string(i) + "]";
  MutTensor t;
  if (!nb::try_cast(list[i], t, /*convert=*/false)) fail(arg.c_str(), "expected a CPU or CUDA tensor");
  return t;
}

// Every layer is checked, and on the CPU every block id, before any layer is copied: a refused
// call leaves all caches as they were. The layers' caches share one shape (one block mapping
// serves them all).
void copy_blocks(nb::sequence key_caches, nb::sequence value_caches, Tensor block_mapping, uintptr_t stream) {
  const size_t layers = nb::len(key_caches);
  if (nb::len(value_caches) != layers) {
    fail("value_caches", std::to_string(nb::len(value_caches)) + " layers, key_caches has " + std::to_string(layers));
  }
  expect_index(block_mapping, 2, 64, "block_mapping");
  expect_dim(block_mapping, 1, 2, "block_mapping", "(src, dst)");
  std::vector<CopyBlocksParams> params;
  std::vector<std::string> names;
  for (size_t i = 0; i < layers; ++i) {
    MutTensor k = cache_at(key_caches, i, "key_caches"), v = cache_at(value_caches, i, "value_caches");
    names = {"key_caches[" + std::to_string(i) + "]", "value_caches[" + std::to_string(i) + "]"};
    const char *k_arg = names[0].c_str(), *v_arg = names[1].c_str();
    const DType dtype = check_cache(k, k_arg);
    if (check_cache(v, v_arg) != dtype) throw nb::type_error((std::string(v_arg) + ": dtype must match " + k_arg).c_str());
    expect_same_shape(v, k, v_arg, k_arg);
    if (i > 0) {
      MutTensor first = cache_at(key_caches, 0, "key_caches");
      expect_same_shape(k, first, k_arg, "key_caches[0]");
      if (placement_of(k).cuda != placement_of(first).cuda || placement_of(k).device != placement_of(first).device) {
        fail(k_arg, "must be on the same device as key_caches[0]");
      }
    }
    const Placement where = placement_of(k);
    expect_same_placement(v, where, v_arg, k_arg);
    expect_same_placement(block_mapping, where, "block_mapping", "the caches");
    expect_apart(k, v, k_arg, v_arg);
    expect_apart(k, block_mapping, k_arg, "block_mapping");
    expect_apart(v, block_mapping, v_arg, "block_mapping");
    CopyBlocksParams p;
    p.key_cache = k.data();
    p.value_cache = v.data();
    p.block_mapping = static_cast<const int64_t*>(block_mapping.data());
    p.num_pairs = block_mapping.shape(0);
    p.num_blocks = k.shape(0);
    p.block_elems = static_cast<int64_t>(k.shape(1)) * k.shape(2) * k.shape(3);
    p.dtype = dtype;
    params.push_back(p);
  }
  if (layers == 0) return;
  const Placement where = placement_of(block_mapping);
  if (!where.cuda) {
    nb::gil_scoped_release release;
    check_block_mapping(params[0].block_mapping, params[0].num_pairs, params[0].num_blocks);
    for (const CopyBlocksParams& p : params) copy_blocks_cpu(p);
    return;
  }
  for (const CopyBlocksParams& p : params) {
    run_on(where, p, copy_blocks_cpu, PAGEDLM_CUDA_LAUNCHER(copy_blocks), stream, "copy_blocks");
  }
}

void paged_decode(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor seq_lens,
                  MutTensor out, std::optional<MutTensor> lse, double scale, int64_t sliding_window, double soft_cap,
                  std::optional<Tensor> custom_mask, std::optional<Tensor> mask_offsets,
                  std::optional<MutTensor> workspace, double k_scale, double v_scale,
                  std::optional<Tensor> k_scale_t, std::optional<Tensor> v_scale_t, uintptr_t stream) {
  const AttentionShape a = check_attention(query, key_cache, value_cache, out, lse);
  const Placement where = a.where;
  check_index(block_tables, 2, a.rows, "block_tables", "batch", where);
  check_index(seq_lens, 1, a.rows, "seq_lens", "batch", where);
  expect_outputs_apart(out, lse, {{&block_tables, "block_tables"}, {&seq_lens, "seq_lens"},
                                  {custom_mask ? &*custom_mask : nullptr, "custom_mask"},
                                  {mask_offsets ? &*mask_offsets : nullptr, "mask_offsets"}});
  if (custom_mask.has_value() != mask_offsets.has_value()) fail("mask_offsets", "must be given with custom_mask");
  PagedDecodeParams p;
  fill_attention(p, a, query, key_cache, value_cache, block_tables, seq_lens, out, lse, scale, sliding_window,
                 soft_cap, k_scale, v_scale, k_scale_t, v_scale_t);
  if (custom_mask) {
    check_custom_mask(*custom_mask, where, false);
    check_index(*mask_offsets, 1, a.rows, "mask_offsets", "batch", where, 64);
    p.mask = static_cast<const uint8_t*>(custom_mask->data());
    p.mask_offsets = static_cast<const int64_t*>(mask_offsets->data());
    p.mask_size = static_cast<int64_t>(custom_mask->shape(0));
  }
  if (!where.cuda) {
    nb::gil_scoped_release release;
    paged_decode_cpu(p);
    return;
  }
  expect_cuda_head_dim(a.head_dim);
  expect_fp8_aligned(key_cache, value_cache, a.kv_dtype);
  expect_cuda_grid(a.rows, "query", "batch");
  expect_cuda_grid(a.num_heads, "query", "num_heads");
#ifdef PAGEDLM_WITH_CUDA
  cuda::DecodeWorkspace ws;
  if (workspace) {
    expect_same_placement(*workspace, where, "workspace", "query");
    expect_contiguous(*workspace, "workspace");
    ws.data = workspace->data();
    ws.bytes = workspace->nbytes();
  }
  if (const char* why = cuda::unsupported_device_reason()) {
    throw std::runtime_error(std::string("paged_decode_attention: ") + why);
  }
  check_cuda(cuda::paged_decode(p, ws, reinterpret_cast<void*>(stream)), "paged_decode_attention");
#else
  (void)workspace;
  (void)stream;
  no_cuda("paged_decode_attention");
#endif
}

void paged_prefill(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor cu_seqlens_q,
                   Tensor seq_lens, MutTensor out, std::optional<MutTensor> lse, std::optional<Tensor> custom_mask,
                   std::optional<Tensor> mask_indptr, bool causal, double scale, int64_t sliding_window,
                   double soft_cap, std::optional<MutTensor> tile_counter, double k_scale, double v_scale,
                   std::optional<Tensor> k_scale_t, std::optional<Tensor> v_scale_t, int64_t backend,
                   uintptr_t stream) {
  const AttentionShape a = check_attention(query, key_cache, value_cache, out, lse);
  const Placement where = a.where;
  expect_rank(seq_lens, 1, "seq_lens");
  const int64_t batch = seq_lens.shape(0);
  check_index(seq_lens, 1, batch, "seq_lens", "batch", where);
  check_index(cu_seqlens_q, 1, batch + 1, "cu_seqlens_q", "batch + 1", where);
  check_index(block_tables, 2, batch, "block_tables", "batch", where);
  if (custom_mask.has_value() != mask_indptr.has_value()) fail("mask_indptr", "must be given with custom_mask");
  bool packed = false;
  if (custom_mask) {
    packed = check_custom_mask(*custom_mask, where, true);
    check_index(*mask_indptr, 1, batch + 1, "mask_indptr", "batch + 1", where);
  }
  expect_outputs_apart(out, lse, {{&block_tables, "block_tables"}, {&seq_lens, "seq_lens"},
                                  {&cu_seqlens_q, "cu_seqlens_q"},
                                  {custom_mask ? &*custom_mask : nullptr, "custom_mask"},
                                  {mask_indptr ? &*mask_indptr : nullptr, "mask_indptr"}});

  PagedPrefillParams p;
  fill_attention(p, a, query, key_cache, value_cache, block_tables, seq_lens, out, lse, scale, sliding_window,
                 soft_cap, k_scale, v_scale, k_scale_t, v_scale_t);
  p.cu_seqlens_q = static_cast<const int32_t*>(cu_seqlens_q.data());
  p.total_q = narrow32(a.rows, "query", "total_q (rows)");
  p.causal = causal;
  if (custom_mask) {
    p.mask = static_cast<const uint8_t*>(custom_mask->data());
    p.mask_indptr = static_cast<const int32_t*>(mask_indptr->data());
    p.mask_packed = packed;
    p.mask_size = static_cast<int64_t>(custom_mask->shape(0));
  }
  if (tile_counter) {
    expect_rank(*tile_counter, 1, "tile_counter");
    expect_int(*tile_counter, 32, "tile_counter");
    expect_dim(*tile_counter, 0, 1, "tile_counter", "1");
    expect_same_placement(*tile_counter, where, "tile_counter", "query");
    p.tile_counter = static_cast<int32_t*>(tile_counter->data());
  }
  if (backend < 0 || backend > 2) fail("backend", "expected 0 (automatic), 1 (mma) or 2 (sm90)");
  p.backend = static_cast<PrefillBackend>(backend);
  if (where.cuda) {
    expect_cuda_head_dim(a.head_dim);
    expect_cuda_grid(a.num_heads, "query", "num_heads");
    expect_fp8_aligned(key_cache, value_cache, a.kv_dtype);
#ifdef PAGEDLM_WITH_CUDA
    if (p.backend == PrefillBackend::sm90 && !cuda::paged_prefill_sm90_supports(p)) {
      fail("backend", "'sm90' needs an sm_90 GPU and a build with sm_90a code, f16/bf16 queries, f16/bf16 or "
                      "FP8 caches, head_dim 64 or 128, 16-byte aligned tensors, and no custom mask");
    }
#endif
  }
  run_on(where, p, paged_prefill_cpu, PAGEDLM_CUDA_LAUNCHER(paged_prefill), stream, "paged_prefill_attention");
}

// Value checks on host copies (the CPU paths run them themselves; CUDA calls with
// PAGEDLM_DEBUG=1). Each takes CPU tensors.
template <typename T>
void expect_cpu(const T& t, const char* arg) {
  if (placement_of(t).cuda) fail(arg, "must be a CPU tensor (copy CUDA values to the host to check them)");
}

void check_paged_decode_mask(Tensor mask_offsets, Tensor seq_lens, int64_t mask_size) {
  expect_index(mask_offsets, 1, 64, "mask_offsets");
  expect_index(seq_lens, 1, 32, "seq_lens");
  expect_dim(mask_offsets, 0, seq_lens.shape(0), "mask_offsets", "batch");
  expect_cpu(mask_offsets, "mask_offsets");
  expect_cpu(seq_lens, "seq_lens");
  pagedlm::check_paged_decode_mask(static_cast<const int64_t*>(mask_offsets.data()),
                                   static_cast<const int32_t*>(seq_lens.data()),
                                   narrow32(seq_lens.shape(0), "seq_lens", "batch"), mask_size);
}

void check_paged_decode_values(Tensor block_tables, Tensor seq_lens, int64_t block_size, int64_t num_blocks) {
  expect_index(block_tables, 2, 32, "block_tables");
  expect_index(seq_lens, 1, 32, "seq_lens");
  expect_dim(seq_lens, 0, block_tables.shape(0), "seq_lens", "batch");
  expect_cpu(block_tables, "block_tables");
  expect_cpu(seq_lens, "seq_lens");
  pagedlm::check_paged_decode_values(static_cast<const int32_t*>(block_tables.data()),
                                     static_cast<const int32_t*>(seq_lens.data()),
                                     narrow32(block_tables.shape(0), "block_tables", "batch"),
                                     narrow32(block_tables.shape(1), "block_tables", "width"),
                                     narrow32(block_size, "block_size", "block_size"),
                                     narrow32(num_blocks, "num_blocks", "num_blocks"));
}

void check_paged_prefill_values(Tensor block_tables, Tensor cu_seqlens_q, Tensor seq_lens,
                                std::optional<Tensor> mask_indptr, int64_t mask_size, bool mask_packed,
                                int64_t total_q, int64_t block_size, int64_t num_blocks) {
  expect_index(seq_lens, 1, 32, "seq_lens");
  const int64_t batch = seq_lens.shape(0);
  expect_index(block_tables, 2, 32, "block_tables");
  expect_dim(block_tables, 0, batch, "block_tables", "batch");
  expect_index(cu_seqlens_q, 1, 32, "cu_seqlens_q");
  expect_dim(cu_seqlens_q, 0, batch + 1, "cu_seqlens_q", "batch + 1");
  for (auto [t, arg] : {std::pair<const Tensor&, const char*>{block_tables, "block_tables"},
                        {cu_seqlens_q, "cu_seqlens_q"}, {seq_lens, "seq_lens"}}) {
    expect_cpu(t, arg);
  }
  PagedPrefillParams p;
  if (mask_indptr) {
    expect_index(*mask_indptr, 1, 32, "mask_indptr");
    expect_dim(*mask_indptr, 0, batch + 1, "mask_indptr", "batch + 1");
    expect_cpu(*mask_indptr, "mask_indptr");
    static const uint8_t any_mask = 0;  // only whether there is a mask matters to the checks
    p.mask = &any_mask;
    p.mask_indptr = static_cast<const int32_t*>(mask_indptr->data());
    p.mask_packed = mask_packed;
    p.mask_size = mask_size;
  }
  p.block_tables = static_cast<const int32_t*>(block_tables.data());
  p.cu_seqlens_q = static_cast<const int32_t*>(cu_seqlens_q.data());
  p.seq_lens = static_cast<const int32_t*>(seq_lens.data());
  p.batch = narrow32(batch, "seq_lens", "batch");
  p.total_q = narrow32(total_q, "total_q", "total_q");
  p.block_size = narrow32(block_size, "block_size", "block_size");
  p.num_blocks = narrow32(num_blocks, "num_blocks", "num_blocks");
  p.max_blocks_per_seq = narrow32(block_tables.shape(1), "block_tables", "width");
  pagedlm::check_paged_prefill_values(p);
}

void check_slot_mapping(Tensor slot_mapping, int64_t num_slots) {
  expect_index(slot_mapping, 1, 64, "slot_mapping");
  expect_cpu(slot_mapping, "slot_mapping");
  pagedlm::check_slot_mapping(static_cast<const int64_t*>(slot_mapping.data()), slot_mapping.shape(0), num_slots);
}

void check_block_mapping(Tensor block_mapping, int64_t num_blocks) {
  expect_index(block_mapping, 2, 64, "block_mapping");
  expect_dim(block_mapping, 1, 2, "block_mapping", "(src, dst)");
  expect_cpu(block_mapping, "block_mapping");
  pagedlm::check_block_mapping(static_cast<const int64_t*>(block_mapping.data()), block_mapping.shape(0), num_blocks);
}

// A scale tensor's values (CUDA calls with PAGEDLM_DEBUG=1 copy it to the host first).
void check_kv_scale_values(Tensor scale, const std::string& name) {
  expect_cpu(scale, name.c_str());
  const nb::dlpack::dtype d = scale.dtype();
  if (d.lanes != 1 || d.bits != 32 || d.code != static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) {
    throw nb::type_error((name + ": dtype must be float32").c_str());
  }
  expect_contiguous(scale, name.c_str());
  KVScale s;
  s.data = static_cast<const float*>(scale.data());
  s.count = static_cast<int32_t>(scale.size());
  pagedlm::check_kv_scale(s, name.c_str());
}

}  // namespace

void bind_ops(nb::module_& m) {
  m.def("write_kv_cache", &write_kv_cache, "key"_a, "value"_a, "key_cache"_a.noconvert(), "value_cache"_a.noconvert(),
        "slot_mapping"_a, "k_scale"_a, "v_scale"_a, "k_scale_t"_a.none(), "v_scale_t"_a.none(), "stream"_a);
  m.def("copy_blocks", &copy_blocks, "key_caches"_a, "value_caches"_a, "block_mapping"_a, "stream"_a);
  m.def("paged_decode", &paged_decode, "query"_a, "key_cache"_a, "value_cache"_a, "block_tables"_a, "seq_lens"_a,
        "out"_a.noconvert(), "lse"_a.noconvert().none(), "scale"_a, "sliding_window"_a, "soft_cap"_a,
        "custom_mask"_a.none(), "mask_offsets"_a.none(), "workspace"_a.noconvert().none(), "k_scale"_a, "v_scale"_a,
        "k_scale_t"_a.none(), "v_scale_t"_a.none(), "stream"_a);
  m.def("paged_prefill", &paged_prefill, "query"_a, "key_cache"_a, "value_cache"_a, "block_tables"_a,
        "cu_seqlens_q"_a, "seq_lens"_a, "out"_a.noconvert(), "lse"_a.noconvert().none(), "custom_mask"_a.none(),
        "mask_indptr"_a.none(), "causal"_a, "scale"_a, "sliding_window"_a, "soft_cap"_a,
        "tile_counter"_a.noconvert().none(), "k_scale"_a, "v_scale"_a, "k_scale_t"_a.none(), "v_scale_t"_a.none(),
        "backend"_a, "stream"_a);
  m.def("check_paged_decode_mask", &check_paged_decode_mask, "mask_offsets"_a, "seq_lens"_a, "mask_size"_a);
  m.def("check_paged_decode_values", &check_paged_decode_values, "block_tables"_a, "seq_lens"_a, "block_size"_a,
        "num_blocks"_a);
  m.def("check_paged_prefill_values", &check_paged_prefill_values, "block_tables"_a, "cu_seqlens_q"_a, "seq_lens"_a,
        "mask_indptr"_a.none(), "mask_size"_a, "mask_packed"_a, "total_q"_a, "block_size"_a, "num_blocks"_a);
  m.def("check_slot_mapping", &check_slot_mapping, "slot_mapping"_a, "num_slots"_a);
  m.def("check_block_mapping", &check_block_mapping, "block_mapping"_a, "num_blocks"_a);
  m.def("check_kv_scale", &check_kv_scale_values, "scale"_a, "name"_a);
}

}  // namespace pagedlm::bindings
