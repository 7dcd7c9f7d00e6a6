// pagedlm.BlockManager: the C++ block manager with arguments checked and the batched
// builders returning numpy arrays.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>

#include "bindings.h"
#include "int_arrays.h"
#include "pagedlm/block_manager.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace pagedlm::bindings {
namespace {

// A numpy array owning a fresh buffer of `size` elements.
template <typename T, size_t Rank>
nb::ndarray<nb::numpy, T, nb::ndim<Rank>> new_numpy(const size_t (&shape)[Rank], T** data) {
  size_t size = 1;
  for (size_t extent : shape) size *= extent;
  std::unique_ptr<T[]> buffer(new T[size == 0 ? 1 : size]);  // not zeroed: the caller fills it
  *data = buffer.get();
  nb::capsule owner(buffer.release(), [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return nb::ndarray<nb::numpy, T, nb::ndim<Rank>>(*data, Rank, shape, owner);
}

nb::dict stats_dict(const BlockManagerStats& s) {
  nb::dict d;
  d["num_blocks"] = s.num_blocks;
  d["block_size"] = s.block_size;
  d["used_blocks"] = s.used_blocks;
  d["free_blocks"] = s.free_blocks;
  d["cached_blocks"] = s.cached_blocks;
  d["num_seqs"] = s.num_seqs;
  d["tokens_stored"] = s.tokens_stored;
  d["utilization"] = s.utilization;
  d["prefix_query_tokens"] = s.prefix_query_tokens;
  d["prefix_hit_tokens"] = s.prefix_hit_tokens;
  d["evictions"] = s.evictions;
  return d;
}

}  // namespace

void bind_block_manager(nb::module_& m) {
  nb::class_<BlockManager>(m, "BlockManager",
      "KV-cache block manager: fixed-size blocks, refcounted copy-on-write forks and\n"
      "optional prefix caching. Every operation is atomic: one that cannot complete\n"
      "raises and changes nothing.")
      .def(nb::init<int32_t, int32_t, bool, int32_t>(), "num_blocks"_a, "block_size"_a,
           "enable_prefix_caching"_a = false, nb::kw_only(), "hash_bits"_a = 64,
           "hash_bits (a test hook): keep only the low hash_bits bits of each block's prefix-cache\n"
           "hash, forcing collisions (0: every full block hashes alike); sharing stays exact.")
      .def("allocate",
           [](BlockManager& bm, int64_t seq_id, nb::handle token_ids) {
             std::vector<TokenId> tokens = pagedlm::bindings::token_ids(token_ids, "token_ids");
             return bm.allocate(seq_id, tokens.data(), static_cast<int64_t>(tokens.size()));
           },
           "seq_id"_a, "token_ids"_a,
           "Create a sequence holding the prompt; returns how many prompt tokens were\n"
           "already cached (prefix hit, whole blocks, never the last token).")
      .def("append",
           [](BlockManager& bm, int64_t seq_id, nb::handle token_ids) {
             std::vector<TokenId> tokens = pagedlm::bindings::token_ids(token_ids, "token_ids");
             return bm.append(seq_id, tokens.data(), static_cast<int64_t>(tokens.size()));
           },
           "seq_id"_a, "token_ids"_a,
           "Reserve slots for new tokens; returns the (src, dst) block copies that\n"
           "copy-on-write requires the caller to perform before writing.")
      .def("set_token", &BlockManager::set_token, "seq_id"_a, "position"_a, "token"_a,
           "Set the token at position (in the last block) once known: a slot reserved with a\n"
           "placeholder token; a full block's prefix-cache entry is redone.")
      .def("truncate", &BlockManager::truncate, "seq_id"_a, "num_tokens"_a,
           "Keep only the first num_tokens tokens (drop rejected draft tokens).")
      .def("fork", &BlockManager::fork, "parent_id"_a, "child_id"_a,
           "Create child_id sharing every block of parent_id.")
      .def("free", &BlockManager::free, "seq_id"_a)
      .def("block_table", &BlockManager::block_table, "seq_id"_a)
      .def("num_tokens", &BlockManager::num_tokens, "seq_id"_a)
      .def("block_tables",
           [](const BlockManager& bm, nb::handle seq_ids) {
             Int64Input ids(seq_ids, "seq_ids");
             const int32_t width = bm.max_blocks(ids.data(), ids.size());
             int32_t* out;
             auto array = new_numpy<int32_t, 2>({static_cast<size_t>(ids.size()), static_cast<size_t>(width)}, &out);
             bm.block_tables(ids.data(), ids.size(), width, out);
             return array;
           },
           "seq_ids"_a, "int32 [len(seq_ids), max_blocks] block tables, padded with -1.")
      .def("slot_mapping",
           [](const BlockManager& bm, nb::handle seq_ids, nb::handle counts) {
             Int64Input ids(seq_ids, "seq_ids");
             Int64Input cnt(counts, "counts");
             if (cnt.size() != ids.size()) {
               throw nb::value_error(("counts: has " + std::to_string(cnt.size()) + " entries, seq_ids has " +
                                      std::to_string(ids.size())).c_str());
             }
             const int64_t total = bm.slot_mapping_size(ids.data(), cnt.data(), ids.size());
             int64_t* out;
             auto array = new_numpy<int64_t, 1>({static_cast<size_t>(total)}, &out);
             bm.slot_mapping(ids.data(), cnt.data(), ids.size(), out);
             return array;
           },
           "seq_ids"_a, "counts"_a,
           "int64 slots of the last counts[i] tokens of each sequence, in order.")
      .def("can_allocate", &BlockManager::can_allocate, "num_tokens"_a)
      .def_prop_ro("num_free_blocks", &BlockManager::num_free_blocks,
                   "Blocks that can be handed out: free plus cached-but-evictable.")
      .def_prop_ro("num_blocks", &BlockManager::num_blocks)
      .def_prop_ro("block_size", &BlockManager::block_size)
      .def_prop_ro("enable_prefix_caching", &BlockManager::prefix_caching)
      .def("ref_count", &BlockManager::ref_count, "block_id"_a)
      .def("stats", [](const BlockManager& bm) { return stats_dict(bm.stats()); })
      .def("__contains__", &BlockManager::contains, "seq_id"_a)
      .def("__len__", &BlockManager::num_seqs)
      .def("__repr__", [](const BlockManager& bm) {
        return "BlockManager(num_blocks=" + std::to_string(bm.num_blocks()) +
               ", block_size=" + std::to_string(bm.block_size()) +
               ", enable_prefix_caching=" + (bm.prefix_caching() ? "True" : "False") +
               ", num_seqs=" + std::to_string(bm.num_seqs()) +
               ", num_free_blocks=" + std::to_string(bm.num_free_blocks()) + ")";
      });
}

}  // namespace pagedlm::bindings
