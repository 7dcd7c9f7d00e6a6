// Kernel bindings: check every argument, then dispatch to the CPU path or the CUDA
// launcher by where the tensors live. Outputs are written in place (declared noconvert so
// that nanobind never hands a kernel a temporary copy).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>
#include <string>

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
  return float_dtype(cache, arg);
}

// What paged decode and prefill check alike: the caches, query [rows, num_heads, head_dim],
// out, lse [rows, num_heads], the options, and that all of them share the query's device.
struct AttentionShape {
  DType dtype;
  int64_t num_blocks, block_size, num_kv_heads, head_dim, rows, num_heads;
  Placement where;
};

AttentionShape check_attention(const Tensor& query, const Tensor& key_cache, const Tensor& value_cache,
                               const MutTensor& out, const std::optional<MutTensor>& lse, int64_t sliding_window,
                               double soft_cap) {
  AttentionShape a;
  a.dtype = check_cache(key_cache, "key_cache");
  check_cache(value_cache, "value_cache");
  expect_same_shape(value_cache, key_cache, "value_cache", "key_cache");
  expect_float_like(value_cache, a.dtype, "value_cache", "key_cache");
  a.num_blocks = key_cache.shape(0), a.block_size = key_cache.shape(1);
  a.num_kv_heads = key_cache.shape(2), a.head_dim = key_cache.shape(3);
  expect_rank(query, 3, "query");
  expect_contiguous(query, "query");
  expect_float_like(query, a.dtype, "query", "key_cache");
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
  if (sliding_window < 0) fail("sliding_window", "must be positive or None");
  if (soft_cap < 0) fail("soft_cap", "must be positive or None");
  a.where = placement_of(query);
  expect_same_placement(key_cache, a.where, "key_cache", "query");
  expect_same_placement(value_cache, a.where, "value_cache", "query");
  expect_same_placement(out, a.where, "out", "query");
  if (lse) expect_same_placement(*lse, a.where, "lse", "query");
  return a;
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

template <typename Params>
void fill_attention(Params& p, const AttentionShape& a, const Tensor& query, const Tensor& key_cache,
                    const Tensor& value_cache, const Tensor& block_tables, const Tensor& seq_lens, MutTensor& out,
                    std::optional<MutTensor>& lse, double scale, int64_t sliding_window, double soft_cap) {
  p.query = query.data();
  p.key_cache = key_cache.data();
  p.value_cache = value_cache.data();
  p.block_tables = static_cast<const int32_t*>(block_tables.data());
  p.seq_lens = static_cast<const int32_t*>(seq_lens.data());
  p.out = out.data();
  p.lse = lse ? static_cast<float*>(lse->data()) : nullptr;
  p.dtype = a.dtype;
  p.batch = static_cast<int32_t>(seq_lens.shape(0));
  p.num_heads = static_cast<int32_t>(a.num_heads);
  p.num_kv_heads = static_cast<int32_t>(a.num_kv_heads);
  p.head_dim = static_cast<int32_t>(a.head_dim);
  p.block_size = static_cast<int32_t>(a.block_size);
  p.num_blocks = static_cast<int32_t>(a.num_blocks);
  p.max_blocks_per_seq = static_cast<int32_t>(block_tables.shape(1));
  p.scale = static_cast<float>(scale);
  p.sliding_window = static_cast<int32_t>(sliding_window);
  p.soft_cap = static_cast<float>(soft_cap);
}

void expect_cuda_head_dim(int64_t head_dim) {
  if (head_dim != 64 && head_dim != 128 && head_dim != 256) {
    fail("query", "head_dim " + std::to_string(head_dim) + " is not supported on CUDA (64, 128 or 256)");
  }
}

void write_kv_cache(Tensor key, Tensor value, MutTensor key_cache, MutTensor value_cache, Tensor slot_mapping,
                    uintptr_t stream) {
  const DType dtype = check_cache(key_cache, "key_cache");
  check_cache(value_cache, "value_cache");
  expect_same_shape(value_cache, key_cache, "value_cache", "key_cache");
  expect_float_like(value_cache, dtype, "value_cache", "key_cache");
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

  WriteKVCacheParams p;
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

void copy_blocks(MutTensor key_cache, MutTensor value_cache, Tensor block_mapping, uintptr_t stream) {
  const DType dtype = check_cache(key_cache, "key_caches[i]");
  check_cache(value_cache, "value_caches[i]");
  expect_same_shape(value_cache, key_cache, "value_caches[i]", "key_caches[i]");
  expect_float_like(value_cache, dtype, "value_caches[i]", "key_caches[i]");
  expect_index(block_mapping, 2, 64, "block_mapping");
  expect_dim(block_mapping, 1, 2, "block_mapping", "(src, dst)");
  const Placement where = placement_of(key_cache);
  expect_same_placement(value_cache, where, "value_caches[i]", "key_caches[i]");
  expect_same_placement(block_mapping, where, "block_mapping", "the caches");

  CopyBlocksParams p;
  p.key_cache = key_cache.data();
  p.value_cache = value_cache.data();
  p.block_mapping = static_cast<const int64_t*>(block_mapping.data());
  p.num_pairs = block_mapping.shape(0);
  p.num_blocks = key_cache.shape(0);
  p.block_elems = static_cast<int64_t>(key_cache.shape(1)) * key_cache.shape(2) * key_cache.shape(3);
  p.dtype = dtype;
  run_on(where, p, copy_blocks_cpu, PAGEDLM_CUDA_LAUNCHER(copy_blocks), stream, "copy_blocks");
}

void paged_decode(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor seq_lens,
                  MutTensor out, std::optional<MutTensor> lse, double scale, int64_t sliding_window, double soft_cap,
                  std::optional<Tensor> custom_mask, std::optional<Tensor> mask_offsets,
                  std::optional<MutTensor> workspace, uintptr_t stream) {
  const AttentionShape a = check_attention(query, key_cache, value_cache, out, lse, sliding_window, soft_cap);
  const Placement where = a.where;
  check_index(block_tables, 2, a.rows, "block_tables", "batch", where);
  check_index(seq_lens, 1, a.rows, "seq_lens", "batch", where);
  if (custom_mask.has_value() != mask_offsets.has_value()) fail("mask_offsets", "must be given with custom_mask");
  PagedDecodeParams p;
  fill_attention(p, a, query, key_cache, value_cache, block_tables, seq_lens, out, lse, scale, sliding_window,
                 soft_cap);
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
                   double soft_cap, std::optional<MutTensor> tile_counter, uintptr_t stream) {
  const AttentionShape a = check_attention(query, key_cache, value_cache, out, lse, sliding_window, soft_cap);
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

  PagedPrefillParams p;
  fill_attention(p, a, query, key_cache, value_cache, block_tables, seq_lens, out, lse, scale, sliding_window,
                 soft_cap);
  p.cu_seqlens_q = static_cast<const int32_t*>(cu_seqlens_q.data());
  p.total_q = static_cast<int32_t>(a.rows);
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
  if (where.cuda) expect_cuda_head_dim(a.head_dim);
  run_on(where, p, paged_prefill_cpu, PAGEDLM_CUDA_LAUNCHER(paged_prefill), stream, "paged_prefill_attention");
}

void check_paged_decode_mask(Tensor mask_offsets, Tensor seq_lens, int64_t mask_size) {
  expect_index(mask_offsets, 1, 64, "mask_offsets");
  expect_index(seq_lens, 1, 32, "seq_lens");
  expect_dim(mask_offsets, 0, seq_lens.shape(0), "mask_offsets", "batch");
  if (placement_of(mask_offsets).cuda || placement_of(seq_lens).cuda) {
    throw nb::value_error("check_paged_decode_mask takes CPU tensors");
  }
  pagedlm::check_paged_decode_mask(static_cast<const int64_t*>(mask_offsets.data()),
                                   static_cast<const int32_t*>(seq_lens.data()),
                                   static_cast<int32_t>(seq_lens.shape(0)), mask_size);
}

void check_paged_decode_values(Tensor block_tables, Tensor seq_lens, int64_t block_size, int64_t num_blocks) {
  expect_index(block_tables, 2, 32, "block_tables");
  expect_index(seq_lens, 1, 32, "seq_lens");
  expect_dim(seq_lens, 0, block_tables.shape(0), "seq_lens", "batch");
  if (placement_of(block_tables).cuda || placement_of(seq_lens).cuda) {
    throw nb::value_error("check_paged_decode_values takes CPU tensors");
  }
  pagedlm::check_paged_decode_values(static_cast<const int32_t*>(block_tables.data()),
                                     static_cast<const int32_t*>(seq_lens.data()),
                                     static_cast<int32_t>(block_tables.shape(0)),
                                     static_cast<int32_t>(block_tables.shape(1)), static_cast<int32_t>(block_size),
                                     static_cast<int32_t>(num_blocks));
}

}  // namespace

void bind_ops(nb::module_& m) {
  m.def("write_kv_cache", &write_kv_cache, "key"_a, "value"_a, "key_cache"_a.noconvert(), "value_cache"_a.noconvert(),
        "slot_mapping"_a, "stream"_a);
  m.def("copy_blocks", &copy_blocks, "key_cache"_a.noconvert(), "value_cache"_a.noconvert(), "block_mapping"_a,
        "stream"_a);
  m.def("paged_decode", &paged_decode, "query"_a, "key_cache"_a, "value_cache"_a, "block_tables"_a, "seq_lens"_a,
        "out"_a.noconvert(), "lse"_a.noconvert().none(), "scale"_a, "sliding_window"_a, "soft_cap"_a,
        "custom_mask"_a.none(), "mask_offsets"_a.none(), "workspace"_a.noconvert().none(), "stream"_a);
  m.def("paged_prefill", &paged_prefill, "query"_a, "key_cache"_a, "value_cache"_a, "block_tables"_a,
        "cu_seqlens_q"_a, "seq_lens"_a, "out"_a.noconvert(), "lse"_a.noconvert().none(), "custom_mask"_a.none(),
        "mask_indptr"_a.none(), "causal"_a, "scale"_a, "sliding_window"_a, "soft_cap"_a,
        "tile_counter"_a.noconvert().none(), "stream"_a);
  m.def("check_paged_decode_mask", &check_paged_decode_mask, "mask_offsets"_a, "seq_lens"_a, "mask_size"_a);
  m.def("check_paged_decode_values", &check_paged_decode_values, "block_tables"_a, "seq_lens"_a, "block_size"_a,
        "num_blocks"_a);
}

}  // namespace pagedlm::bindings
