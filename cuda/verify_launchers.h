// Host entry points of the speculative-verification kernels (cuda/verify.cu). Plain C++, so
// the bindings can include it. Each launches on the given stream (a cudaStream_t), never
// synchronizes, never allocates, and returns 0 or a CUDA error code.
#pragma once

#include <cstdint>

#include "pagedlm/verify.h"

namespace pagedlm::cuda {

// Shared-memory bounds of the CUDA path (the bindings reject larger inputs with ValueError).
constexpr int32_t kMaxGreedyDraftTokens = 2048;  // k of verify_greedy
constexpr int32_t kMaxTreeNodes = 1024;          // T of the tree kernels

int verify_greedy(const ChainVerifyParams& p, void* stream);
int verify_speculative(const ChainVerifyParams& p, void* stream);
int verify_tree_greedy(const TreeVerifyParams& p, void* stream);
int verify_tree_speculative(const TreeVerifyParams& p, void* stream);

}  // namespace pagedlm::cuda
