// Speculative verification: chains (verify_greedy, verify_speculative) and token trees
// (verify_tree_greedy, verify_tree_speculative). The parameter structs and the per-element
// decision rules below are shared by the CPU path (cpp/src/verify.cpp) and the CUDA path
// (cuda/verify.cu), which is what makes the two bit-identical.
#pragma once

#include <cstdint>
#include <limits>

#include "pagedlm/dtype.h"
#include "pagedlm/philox.h"

namespace pagedlm {

// Where the random numbers come from. offset_tensor, when set, points to one int64 on the
// device the kernel runs on and replaces `offset` (read by the kernel, so a CUDA-graph replay
// sees the value the caller wrote before it).
struct RandomStream {
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* offset_tensor = nullptr;
};

// Chains. Row b drafts draft_lens[b] (or k) tokens; position i of target_* is the target
// model's prediction for the token after draft i - 1, so position draft_lens[b] gives the bonus.
struct ChainVerifyParams {
  const int64_t* draft_tokens = nullptr;  // [batch, k]
  const int32_t* draft_lens = nullptr;    // [batch], each in [0, k]; null: every row drafts k tokens
  const void* target = nullptr;           // [batch, k + 1, vocab]: logits (greedy) or f32 probabilities
  DType target_dtype = DType::f32;
  const float* draft_probs = nullptr;     // [batch, k, vocab] (speculative); null: one-hot drafts
  int64_t* output_tokens = nullptr;       // [batch, k + 1], padded with -1
  int32_t* num_accepted = nullptr;        // [batch]
  int32_t batch = 0, k = 0, vocab = 0;
  RandomStream random;                    // speculative only
};

// Trees. Node 0 is the root; parents[b, c] < c for every other node, or -1 for a padding node
// that is not part of row b's tree. The walk accepts at most width - 1 nodes below the root.
struct TreeVerifyParams {
  const int64_t* tree_tokens = nullptr;  // [batch, nodes]
  const int32_t* parents = nullptr;      // [batch, nodes]
  const void* target = nullptr;          // [batch, nodes, vocab]: logits (greedy) or f32 probabilities
  DType target_dtype = DType::f32;
  int32_t* accepted_nodes = nullptr;     // [batch, width], padded with -1
  int32_t* num_accepted = nullptr;       // [batch]
  int64_t* next_token = nullptr;         // [batch]
  int32_t batch = 0, nodes = 0, vocab = 0, width = 0;
  RandomStream random;                   // speculative only
};

// Weights are fixed point: probability x becomes floor(clamp(x, 0, 1) * 2^40). Sums of integers
// do not depend on the order of addition, so a CUDA block scan and a CPU loop agree exactly;
// 2^-40 is far below the 2^-32 resolution of the sampling draw. With vocab <= kMaxSampledVocab
// a row's total stays below 2^63.
constexpr int kWeightBits = 40;
constexpr int32_t kMaxSampledVocab = 1 << 23;

// NaN and negatives weigh 0, values above 1 weigh as 1.
PAGEDLM_HOST_DEVICE uint64_t prob_weight(float x) {
  const float clamped = x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f;
  return static_cast<uint64_t>(clamped * 1099511627776.0f);  // * 2^40: exact, then truncated
}

// floor(total * draw / 2^bits) for draw < 2^bits <= 2^32 and total < 2^63, in 64-bit integers.
PAGEDLM_HOST_DEVICE uint64_t scale_by_draw(uint64_t total, uint32_t draw, int bits) {
  const uint64_t high = total >> 32, low = total & 0xffffffffu;
  return ((high * draw) << (32 - bits)) + ((low * draw) >> bits);
}

// Inverse-CDF sampling: the token is the smallest index whose running weight exceeds this.
PAGEDLM_HOST_DEVICE uint64_t sample_threshold(uint64_t total, uint32_t sample_word) {
  return scale_by_draw(total, sample_word, 32);
}

// Chain acceptance of a drafted token: u < p / q, with q = 0 a rejection. u has 24 significant
// bits and q 24, so the double product u * q is exact and the test means the same everywhere.
PAGEDLM_HOST_DEVICE bool accept_draft(uint32_t accept_word, float p, float q) {
  return q > 0.0f && static_cast<double>(uniform24(accept_word)) * static_cast<double>(q) < static_cast<double>(p);
}

// Tree acceptance of a child whose token weighs `weight` in the remaining mass `total`:
// u < weight / total, decided exactly on the integers.
PAGEDLM_HOST_DEVICE bool accept_child(uint32_t accept_word, uint64_t weight, uint64_t total) {
  return scale_by_draw(total, accept_word >> 8, 24) < weight;
}

// Greedy ranks logits by value, NaN as -inf, and the lowest index wins ties (-0 equals +0).
PAGEDLM_HOST_DEVICE float argmax_rank(float x) { return x == x ? x : -std::numeric_limits<float>::infinity(); }

// CPU path. Each checks the values it depends on first (InvalidArgument naming the argument),
// then runs multithreaded over rows.
void verify_greedy_cpu(const ChainVerifyParams& p);
void verify_speculative_cpu(const ChainVerifyParams& p);
void verify_tree_greedy_cpu(const TreeVerifyParams& p);
void verify_tree_speculative_cpu(const TreeVerifyParams& p);

// Host-side value checks (the CPU path always runs them, CUDA calls with PAGEDLM_DEBUG=1 on
// copies): draft lengths in [0, k], the tokens a row drafts in [0, vocab).
void check_chain_values(const int64_t* draft_tokens, const int32_t* draft_lens, int32_t batch, int32_t k,
                        int32_t vocab);
// parents[b, 0] == -1, every other parent -1 or an earlier node, the tokens of tree nodes below
// the root in [0, vocab). Returns the deepest node's depth over all rows (0: roots only).
int32_t check_tree_values(const int64_t* tree_tokens, const int32_t* parents, int32_t batch, int32_t nodes,
                          int32_t vocab);

}  // namespace pagedlm
