// CPU path of speculative verification: the reference the CUDA kernels must match bit for bit.
// Rows run in parallel; within a row everything is sequential and written for clarity, with
// the decision rules of pagedlm/verify.h (integer weights, exact acceptance tests).
#include "pagedlm/verify.h"

#include <algorithm>
#include <string>
#include <vector>

#include "pagedlm/errors.h"
#include "pagedlm/parallel.h"

namespace pagedlm {
namespace {

std::string at(int64_t b, int64_t i) { return "[" + std::to_string(b) + ", " + std::to_string(i) + "]"; }

// Index of the largest value (NaN as -inf, lowest index on ties).
int64_t argmax_row(const void* rows, int64_t row, int32_t vocab, DType dtype) {
  const int64_t base = row * vocab;
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_index = 0;
  for (int32_t i = 0; i < vocab; ++i) {
    const float v = argmax_rank(load_as_float(rows, base + i, dtype));
    if (v > best) {
      best = v;
      best_index = i;
    }
  }
  return best_index;
}

// Smallest index whose running total of weight(i) exceeds sample_threshold(total, word); -1
// when every weight is zero.
template <typename Weight>
int64_t sample_by_weight(int32_t vocab, uint32_t sample_word, Weight weight) {
  uint64_t total = 0;
  for (int32_t i = 0; i < vocab; ++i) total += weight(i);
  if (total == 0) return -1;
  const uint64_t threshold = sample_threshold(total, sample_word);
  uint64_t running = 0;
  for (int32_t i = 0; i < vocab; ++i) {
    running += weight(i);
    if (running > threshold) return i;
  }
  return -1;  // unreachable: threshold < total
}

// Samples from `weight`; if that is all zero, from p alone; if p is too, token 0.
template <typename Weight>
int64_t sample_or_fall_back(const float* p, int32_t vocab, uint32_t sample_word, Weight weight) {
  int64_t token = sample_by_weight(vocab, sample_word, weight);
  if (token < 0) token = sample_by_weight(vocab, sample_word, [p](int32_t i) { return prob_weight(p[i]); });
  return token < 0 ? 0 : token;
}

int32_t draft_len(const ChainVerifyParams& p, int64_t b) { return p.draft_lens ? p.draft_lens[b] : p.k; }

void write_chain_row(const ChainVerifyParams& p, int64_t b, int32_t accepted, int64_t last_token) {
  int64_t* out = p.output_tokens + b * (p.k + 1);
  for (int32_t i = 0; i <= p.k; ++i) {
    out[i] = i < accepted ? p.draft_tokens[b * p.k + i] : i == accepted ? last_token : -1;
  }
  p.num_accepted[b] = accepted;
}

uint64_t offset_of(const RandomStream& r) {
  return r.offset_tensor ? static_cast<uint64_t>(*r.offset_tensor) : r.offset;
}

void write_tree_row(const TreeVerifyParams& p, int64_t b, const std::vector<int32_t>& path, int64_t next_token) {
  int32_t* out = p.accepted_nodes + b * p.width;
  for (int32_t i = 0; i < p.width; ++i) out[i] = i < static_cast<int32_t>(path.size()) ? path[i] : -1;
  p.num_accepted[b] = static_cast<int32_t>(path.size()) - 1;
  p.next_token[b] = next_token;
}

}  // namespace

void check_chain_values(const int64_t* draft_tokens, const int32_t* draft_lens, int32_t batch, int32_t k,
                        int32_t vocab) {
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t len = draft_lens ? draft_lens[b] : k;
    if (len < 0 || len > k) {
      throw InvalidArgument("draft_lens[" + std::to_string(b) + "] = " + std::to_string(len) + " is outside [0, " +
                            std::to_string(k) + "]");
    }
    for (int32_t i = 0; i < len; ++i) {
      const int64_t token = draft_tokens[b * k + i];
      if (token < 0 || token >= vocab) {
        throw InvalidArgument("draft_tokens" + at(b, i) + " = " + std::to_string(token) + " is outside [0, " +
                              std::to_string(vocab) + ")");
      }
    }
  }
}

int32_t check_tree_values(const int64_t* tree_tokens, const int32_t* parents, int32_t batch, int32_t nodes,
                          int32_t vocab) {
  int32_t max_depth = 0;
  std::vector<int32_t> depth(nodes);
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* parent = parents + b * nodes;
    if (parent[0] != -1) throw InvalidArgument("parents" + at(b, 0) + " must be -1 (node 0 is the root)");
    depth[0] = 0;
    for (int32_t c = 1; c < nodes; ++c) {
      if (parent[c] < -1 || parent[c] >= c) {
        throw InvalidArgument("parents" + at(b, c) + " = " + std::to_string(parent[c]) +
                              " must be -1 (padding) or an earlier node");
      }
      // A node hanging below a padding node is padding too.
      depth[c] = parent[c] < 0 || depth[parent[c]] < 0 ? -1 : depth[parent[c]] + 1;
      if (depth[c] < 0) continue;
      const int64_t token = tree_tokens[b * nodes + c];
      if (token < 0 || token >= vocab) {
        throw InvalidArgument("tree_tokens" + at(b, c) + " = " + std::to_string(token) + " is outside [0, " +
                              std::to_string(vocab) + ")");
      }
      max_depth = std::max(max_depth, depth[c]);
    }
  }
  return max_depth;
}

void verify_greedy_cpu(const ChainVerifyParams& p) {
  check_chain_values(p.draft_tokens, p.draft_lens, p.batch, p.k, p.vocab);
  parallel_for(p.batch, [&](int64_t b) {
    const int32_t len = draft_len(p, b);
    int32_t accepted = 0;
    int64_t token = argmax_row(p.target, b * (p.k + 1), p.vocab, p.target_dtype);
    while (accepted < len && p.draft_tokens[b * p.k + accepted] == token) {
      ++accepted;
      token = argmax_row(p.target, b * (p.k + 1) + accepted, p.vocab, p.target_dtype);
    }
    write_chain_row(p, b, accepted, token);
  });
}

void verify_speculative_cpu(const ChainVerifyParams& p) {
  check_chain_values(p.draft_tokens, p.draft_lens, p.batch, p.k, p.vocab);
  const uint64_t offset = offset_of(p.random);
  const float* target = static_cast<const float*>(p.target);
  parallel_for(p.batch, [&](int64_t b) {
    const int32_t len = draft_len(p, b);
    const auto target_row = [&](int32_t i) { return target + (b * (p.k + 1) + i) * p.vocab; };
    const auto draft_row = [&](int32_t i) { return p.draft_probs + (b * p.k + i) * p.vocab; };
    int32_t accepted = 0;
    for (; accepted < len; ++accepted) {
      const int64_t token = p.draft_tokens[b * p.k + accepted];
      const uint32_t word = philox_draws(p.random.seed, offset, static_cast<uint32_t>(b), accepted).word[kDrawAccept];
      const float q = p.draft_probs ? draft_row(accepted)[token] : 1.0f;
      if (!accept_draft(word, target_row(accepted)[token], q)) break;
    }
    const uint32_t sample_word =
        philox_draws(p.random.seed, offset, static_cast<uint32_t>(b), accepted).word[kDrawSample];
    const float* target_probs = target_row(accepted);
    int64_t token;
    if (accepted == len) {  // every draft accepted: the bonus token, from p
      token = sample_or_fall_back(target_probs, p.vocab, sample_word, [&](int32_t i) { return prob_weight(target_probs[i]); });
    } else if (p.draft_probs) {  // rejected: from the residual max(0, p - q)
      const float* draft_probs = draft_row(accepted);
      token = sample_or_fall_back(target_probs, p.vocab, sample_word,
                                  [&](int32_t i) { return prob_weight(target_probs[i] - draft_probs[i]); });
    } else {  // one-hot draft: the residual is p without the drafted token
      const int64_t drafted = p.draft_tokens[b * p.k + accepted];
      token = sample_or_fall_back(target_probs, p.vocab, sample_word, [&](int32_t i) {
        return prob_weight(i == drafted ? target_probs[i] - 1.0f : target_probs[i]);
      });
    }
    write_chain_row(p, b, accepted, token);
  });
}

void verify_tree_greedy_cpu(const TreeVerifyParams& p) {
  check_tree_values(p.tree_tokens, p.parents, p.batch, p.nodes, p.vocab);
  parallel_for(p.batch, [&](int64_t b) {
    const int32_t* parent = p.parents + b * p.nodes;
    const int64_t* tokens = p.tree_tokens + b * p.nodes;
    std::vector<int32_t> path{0};
    for (;;) {
      const int32_t node = path.back();
      const int64_t best = argmax_row(p.target, b * p.nodes + node, p.vocab, p.target_dtype);
      int32_t next = -1;
      if (static_cast<int32_t>(path.size()) < p.width) {
        for (int32_t c = node + 1; c < p.nodes && next < 0; ++c) {
          if (parent[c] == node && tokens[c] == best) next = c;  // children in ascending order: first match wins
        }
      }
      if (next < 0) {
        write_tree_row(p, b, path, best);
        return;
      }
      path.push_back(next);
    }
  });
}

void verify_tree_speculative_cpu(const TreeVerifyParams& p) {
  check_tree_values(p.tree_tokens, p.parents, p.batch, p.nodes, p.vocab);
  const uint64_t offset = offset_of(p.random);
  const float* target = static_cast<const float*>(p.target);
  parallel_for(p.batch, [&](int64_t b) {
    const int32_t* parent = p.parents + b * p.nodes;
    const int64_t* tokens = p.tree_tokens + b * p.nodes;
    const uint32_t row = static_cast<uint32_t>(b);
    std::vector<int32_t> path{0};
    std::vector<int64_t> rejected;  // tokens whose mass was removed at the current node
    for (;;) {
      const int32_t node = path.back();
      const float* probs = target + (b * p.nodes + node) * p.vocab;
      rejected.clear();
      int32_t next = -1;
      if (static_cast<int32_t>(path.size()) < p.width) {
        uint64_t remaining = 0;
        for (int32_t i = 0; i < p.vocab; ++i) remaining += prob_weight(probs[i]);
        for (int32_t c = node + 1; c < p.nodes && next < 0; ++c) {
          if (parent[c] != node) continue;
          const int64_t token = tokens[c];
          const bool seen = std::find(rejected.begin(), rejected.end(), token) != rejected.end();
          const uint64_t weight = seen ? 0 : prob_weight(probs[token]);
          const uint32_t word = philox_draws(p.random.seed, offset, row, c).word[kDrawAccept];
          if (accept_child(word, weight, remaining)) {
            next = c;
          } else if (weight > 0) {  // renormalise: the tried token leaves the distribution
            remaining -= weight;
            rejected.push_back(token);
          }
        }
      }
      if (next >= 0) {
        path.push_back(next);
        continue;
      }
      // No child accepted (or a leaf): sample from what is left of p at this node.
      const uint32_t sample_word = philox_draws(p.random.seed, offset, row, node).word[kDrawSample];
      const int64_t token = sample_or_fall_back(probs, p.vocab, sample_word, [&](int32_t i) {
        return std::find(rejected.begin(), rejected.end(), i) != rejected.end() ? 0 : prob_weight(probs[i]);
      });
      write_tree_row(p, b, path, token);
      return;
    }
  });
}

}  // namespace pagedlm
