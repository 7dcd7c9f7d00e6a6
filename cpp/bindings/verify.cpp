// Bindings of speculative verification: check every argument, then run the CPU path or the
// CUDA launcher by where the tensors live. Outputs are allocated by the Python layer and
// written in place (noconvert, so nanobind never hands a kernel a temporary copy).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "bindings.h"
#include "dispatch.h"
#include "pagedlm/philox.h"
#include "pagedlm/verify.h"
#include "tensor_checks.h"

#ifdef PAGEDLM_WITH_CUDA
#include "verify_launchers.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace pagedlm::bindings {
namespace {

using OptTensor = std::optional<Tensor>;

// An empty tensor (k = 0 drafts, say) counts as contiguous whatever strides DLPack reports.
template <typename T>
void expect_contiguous_rank(const T& t, size_t rank, const char* arg) {
  expect_rank(t, rank, arg);
  if (t.size() > 0) expect_contiguous(t, arg);
}

template <typename T>
void expect_f32(const T& t, const char* arg) {
  if (float_dtype(t, arg) != DType::f32) throw nb::type_error((std::string(arg) + ": dtype must be float32").c_str());
}

// The vocabulary (last) dimension of logits or probabilities.
template <typename T>
int32_t vocab_of(const T& t, const char* arg, int64_t limit) {
  const int64_t vocab = t.shape(2);
  if (vocab < 1 || vocab > limit) {
    fail(arg, "vocabulary size (dimension 2) must be in [1, " + std::to_string(limit) + "], got shape " + shape_str(t));
  }
  return static_cast<int32_t>(vocab);
}

template <typename T>
void expect_batch_and_size(const T& t, int64_t batch, int64_t size, const char* arg, const char* meaning) {
  expect_dim(t, 0, batch, arg, "batch");
  expect_dim(t, 1, size, arg, meaning);
}

void expect_int32_vector(const Tensor& t, int64_t batch, const char* arg) {
  expect_contiguous_rank(t, 1, arg);
  expect_int(t, 32, arg);
  expect_dim(t, 0, batch, arg, "batch");
}

RandomStream random_stream(uint64_t seed, uint64_t offset, const OptTensor& offset_tensor, const Placement& where) {
  RandomStream r;
  r.seed = seed;
  r.offset = offset;
  if (offset_tensor) {
    expect_int(*offset_tensor, 64, "offset");
    if (offset_tensor->size() != 1) fail("offset", "a tensor offset must hold exactly one element");
    expect_same_placement(*offset_tensor, where, "offset", "the probabilities");
    r.offset_tensor = static_cast<const int64_t*>(offset_tensor->data());
  }
  return r;
}

// Shapes, dtypes and placement shared by both chain ops; returns where they run.
Placement check_chain(const Tensor& draft_tokens, const Tensor& target, const char* target_arg,
                      const OptTensor& draft_lens, const MutTensor& output_tokens, const MutTensor& num_accepted,
                      ChainVerifyParams& p) {
  expect_contiguous_rank(draft_tokens, 2, "draft_tokens");
  expect_int(draft_tokens, 64, "draft_tokens");
  const int64_t batch = draft_tokens.shape(0), k = draft_tokens.shape(1);
  if (k > std::numeric_limits<int32_t>::max() - 1) fail("draft_tokens", "too many draft tokens");
  expect_contiguous_rank(target, 3, target_arg);
  expect_batch_and_size(target, batch, k + 1, target_arg, "k + 1 positions");
  if (draft_lens) expect_int32_vector(*draft_lens, batch, "draft_lens");
  expect_contiguous_rank(output_tokens, 2, "output_tokens");
  expect_int(output_tokens, 64, "output_tokens");
  expect_batch_and_size(output_tokens, batch, k + 1, "output_tokens", "k + 1");
  expect_contiguous_rank(num_accepted, 1, "num_accepted");
  expect_int(num_accepted, 32, "num_accepted");
  expect_dim(num_accepted, 0, batch, "num_accepted", "batch");

  const Placement where = placement_of(target);
  expect_same_placement(draft_tokens, where, "draft_tokens", target_arg);
  if (draft_lens) expect_same_placement(*draft_lens, where, "draft_lens", target_arg);
  expect_same_placement(output_tokens, where, "output_tokens", target_arg);
  expect_same_placement(num_accepted, where, "num_accepted", target_arg);

  p.draft_tokens = static_cast<const int64_t*>(draft_tokens.data());
  p.draft_lens = draft_lens ? static_cast<const int32_t*>(draft_lens->data()) : nullptr;
  p.target = target.data();
  p.output_tokens = static_cast<int64_t*>(output_tokens.data());
  p.num_accepted = static_cast<int32_t*>(num_accepted.data());
  p.batch = narrow32(batch, "draft_tokens", "batch");
  p.k = static_cast<int32_t>(k);
  return where;
}

void verify_greedy(Tensor draft_tokens, Tensor target_logits, OptTensor draft_lens, MutTensor output_tokens,
                   MutTensor num_accepted, uintptr_t stream) {
  ChainVerifyParams p;
  const Placement where =
      check_chain(draft_tokens, target_logits, "target_logits", draft_lens, output_tokens, num_accepted, p);
  p.target_dtype = float_dtype(target_logits, "target_logits");
  p.vocab = vocab_of(target_logits, "target_logits", std::numeric_limits<int32_t>::max());
#ifdef PAGEDLM_WITH_CUDA
  if (where.cuda && p.k > cuda::kMaxGreedyDraftTokens) {
    fail("draft_tokens", "at most " + std::to_string(cuda::kMaxGreedyDraftTokens) + " draft tokens per row on CUDA");
  }
#endif
  run_on(where, p, verify_greedy_cpu, PAGEDLM_CUDA_LAUNCHER(verify_greedy), stream, "verify_greedy");
}

void verify_speculative(Tensor draft_tokens, OptTensor draft_probs, Tensor target_probs, OptTensor draft_lens,
                        uint64_t seed, uint64_t offset, OptTensor offset_tensor, MutTensor output_tokens,
                        MutTensor num_accepted, uintptr_t stream) {
  ChainVerifyParams p;
  const Placement where =
      check_chain(draft_tokens, target_probs, "target_probs", draft_lens, output_tokens, num_accepted, p);
  expect_f32(target_probs, "target_probs");
  p.vocab = vocab_of(target_probs, "target_probs", kMaxSampledVocab);
  if (draft_probs) {
    expect_contiguous_rank(*draft_probs, 3, "draft_probs");
    expect_f32(*draft_probs, "draft_probs");
    expect_batch_and_size(*draft_probs, p.batch, p.k, "draft_probs", "k draft positions");
    expect_dim(*draft_probs, 2, p.vocab, "draft_probs", "vocabulary size of target_probs");
    expect_same_placement(*draft_probs, where, "draft_probs", "target_probs");
    p.draft_probs = static_cast<const float*>(draft_probs->data());
  }
  p.random = random_stream(seed, offset, offset_tensor, where);
  run_on(where, p, verify_speculative_cpu, PAGEDLM_CUDA_LAUNCHER(verify_speculative), stream, "verify_speculative");
}

// Shapes, dtypes and placement shared by both tree ops; returns where they run.
Placement check_tree(const Tensor& tree_tokens, const Tensor& parents, const Tensor& target, const char* target_arg,
                     const MutTensor& accepted_nodes, const MutTensor& num_accepted, const MutTensor& next_token,
                     TreeVerifyParams& p) {
  expect_contiguous_rank(tree_tokens, 2, "tree_tokens");
  expect_int(tree_tokens, 64, "tree_tokens");
  const int64_t batch = tree_tokens.shape(0), nodes = tree_tokens.shape(1);
  if (nodes < 1 || nodes > std::numeric_limits<int32_t>::max()) {
    fail("tree_tokens", "needs at least the root node (dimension 1), got shape " + shape_str(tree_tokens));
  }
  expect_contiguous_rank(parents, 2, "parents");
  expect_int(parents, 32, "parents");
  expect_batch_and_size(parents, batch, nodes, "parents", "nodes");
  expect_contiguous_rank(target, 3, target_arg);
  expect_batch_and_size(target, batch, nodes, target_arg, "nodes");
  expect_contiguous_rank(accepted_nodes, 2, "accepted_nodes");
  expect_int(accepted_nodes, 32, "accepted_nodes");
  expect_dim(accepted_nodes, 0, batch, "accepted_nodes", "batch");
  if (accepted_nodes.shape(1) < 1) fail("accepted_nodes", "needs room for the root (max_depth >= 0)");
  expect_contiguous_rank(num_accepted, 1, "num_accepted");
  expect_int(num_accepted, 32, "num_accepted");
  expect_dim(num_accepted, 0, batch, "num_accepted", "batch");
  expect_contiguous_rank(next_token, 1, "next_token");
  expect_int(next_token, 64, "next_token");
  expect_dim(next_token, 0, batch, "next_token", "batch");

  const Placement where = placement_of(target);
  expect_same_placement(tree_tokens, where, "tree_tokens", target_arg);
  expect_same_placement(parents, where, "parents", target_arg);
  expect_same_placement(accepted_nodes, where, "accepted_nodes", target_arg);
  expect_same_placement(num_accepted, where, "num_accepted", target_arg);
  expect_same_placement(next_token, where, "next_token", target_arg);

  p.tree_tokens = static_cast<const int64_t*>(tree_tokens.data());
  p.parents = static_cast<const int32_t*>(parents.data());
  p.target = target.data();
  p.accepted_nodes = static_cast<int32_t*>(accepted_nodes.data());
  p.num_accepted = static_cast<int32_t*>(num_accepted.data());
  p.next_token = static_cast<int64_t*>(next_token.data());
  p.batch = narrow32(batch, "tree_tokens", "batch");
  p.nodes = static_cast<int32_t>(nodes);
  if (static_cast<int64_t>(accepted_nodes.shape(1)) > nodes) fail("accepted_nodes", "can be at most nodes wide");
  p.width = static_cast<int32_t>(accepted_nodes.shape(1));
#ifdef PAGEDLM_WITH_CUDA
  if (where.cuda && nodes > cuda::kMaxTreeNodes) {
    fail("tree_tokens", "at most " + std::to_string(cuda::kMaxTreeNodes) + " nodes per tree on CUDA");
  }
#endif
  return where;
}

void verify_tree_greedy(Tensor tree_tokens, Tensor parents, Tensor target_logits, MutTensor accepted_nodes,
                        MutTensor num_accepted, MutTensor next_token, uintptr_t stream) {
  TreeVerifyParams p;
  const Placement where =
      check_tree(tree_tokens, parents, target_logits, "target_logits", accepted_nodes, num_accepted, next_token, p);
  p.target_dtype = float_dtype(target_logits, "target_logits");
  p.vocab = vocab_of(target_logits, "target_logits", std::numeric_limits<int32_t>::max());
  run_on(where, p, verify_tree_greedy_cpu, PAGEDLM_CUDA_LAUNCHER(verify_tree_greedy), stream, "verify_tree_greedy");
}

void verify_tree_speculative(Tensor tree_tokens, Tensor parents, Tensor target_probs, uint64_t seed, uint64_t offset,
                             OptTensor offset_tensor, MutTensor accepted_nodes, MutTensor num_accepted,
                             MutTensor next_token, uintptr_t stream) {
  TreeVerifyParams p;
  const Placement where =
      check_tree(tree_tokens, parents, target_probs, "target_probs", accepted_nodes, num_accepted, next_token, p);
  expect_f32(target_probs, "target_probs");
  p.vocab = vocab_of(target_probs, "target_probs", kMaxSampledVocab);
  p.random = random_stream(seed, offset, offset_tensor, where);
  run_on(where, p, verify_tree_speculative_cpu, PAGEDLM_CUDA_LAUNCHER(verify_tree_speculative), stream, "verify_tree_speculative");
}

template <typename T>
void expect_cpu(const T& t, const char* arg) {
  if (placement_of(t).cuda) fail(arg, "must be a CPU tensor (copy CUDA values to the host to check them)");
}

// Value checks on host copies (the CPU path runs them itself; CUDA calls with PAGEDLM_DEBUG=1).
void check_chain_values(Tensor draft_tokens, OptTensor draft_lens, int64_t vocab) {
  expect_contiguous_rank(draft_tokens, 2, "draft_tokens");
  expect_int(draft_tokens, 64, "draft_tokens");
  expect_cpu(draft_tokens, "draft_tokens");
  if (draft_lens) {
    expect_int32_vector(*draft_lens, draft_tokens.shape(0), "draft_lens");
    expect_cpu(*draft_lens, "draft_lens");
  }
  pagedlm::check_chain_values(static_cast<const int64_t*>(draft_tokens.data()),
                              draft_lens ? static_cast<const int32_t*>(draft_lens->data()) : nullptr,
                              narrow32(draft_tokens.shape(0), "draft_tokens", "batch"),
                              narrow32(draft_tokens.shape(1), "draft_tokens", "k"), narrow32(vocab, "vocab", "vocab"));
}

int32_t tree_max_depth(Tensor tree_tokens, Tensor parents, int64_t vocab) {
  expect_contiguous_rank(tree_tokens, 2, "tree_tokens");
  expect_int(tree_tokens, 64, "tree_tokens");
  expect_cpu(tree_tokens, "tree_tokens");
  expect_contiguous_rank(parents, 2, "parents");
  expect_int(parents, 32, "parents");
  expect_cpu(parents, "parents");
  expect_batch_and_size(parents, tree_tokens.shape(0), tree_tokens.shape(1), "parents", "nodes");
  if (tree_tokens.shape(1) < 1) fail("tree_tokens", "needs at least the root node");
  return pagedlm::check_tree_values(static_cast<const int64_t*>(tree_tokens.data()),
                                    static_cast<const int32_t*>(parents.data()),
                                    narrow32(tree_tokens.shape(0), "tree_tokens", "batch"),
                                    narrow32(tree_tokens.shape(1), "tree_tokens", "nodes"), narrow32(vocab, "vocab", "vocab"));
}

nb::tuple philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const PhiloxBlock block = philox4x32_10(c0, c1, c2, c3, k0, k1);
  return nb::make_tuple(block.word[0], block.word[1], block.word[2], block.word[3]);
}

}  // namespace

void bind_verify(nb::module_& m) {
  m.def("verify_greedy", &verify_greedy, "draft_tokens"_a, "target_logits"_a, "draft_lens"_a.none(),
        "output_tokens"_a.noconvert(), "num_accepted"_a.noconvert(), "stream"_a);
  m.def("verify_speculative", &verify_speculative, "draft_tokens"_a, "draft_probs"_a.none(), "target_probs"_a,
        "draft_lens"_a.none(), "seed"_a, "offset"_a, "offset_tensor"_a.none(), "output_tokens"_a.noconvert(),
        "num_accepted"_a.noconvert(), "stream"_a);
  m.def("verify_tree_greedy", &verify_tree_greedy, "tree_tokens"_a, "parents"_a, "target_logits"_a,
        "accepted_nodes"_a.noconvert(), "num_accepted"_a.noconvert(), "next_token"_a.noconvert(), "stream"_a);
  m.def("verify_tree_speculative", &verify_tree_speculative, "tree_tokens"_a, "parents"_a, "target_probs"_a, "seed"_a,
        "offset"_a, "offset_tensor"_a.none(), "accepted_nodes"_a.noconvert(), "num_accepted"_a.noconvert(),
        "next_token"_a.noconvert(), "stream"_a);
  m.def("check_chain_values", &check_chain_values, "draft_tokens"_a, "draft_lens"_a.none(), "vocab"_a);
  m.def("tree_max_depth", &tree_max_depth, "tree_tokens"_a, "parents"_a, "vocab"_a,
        "Checks parents and tree tokens (CPU tensors) and returns the deepest node's depth.");
  m.def("philox4x32_10", &philox, "c0"_a, "c1"_a, "c2"_a, "c3"_a, "k0"_a, "k1"_a,
        "One Philox-4x32-10 block: counter (c0..c3), key (k0, k1) -> four 32-bit words.");
}

}  // namespace pagedlm::bindings
