// Host entry points of the CUDA kernels. Plain C++ (no CUDA headers), so the bindings can
// include it. Every launcher runs on the given stream (a cudaStream_t), never
// synchronizes, never allocates, and returns 0 or a CUDA error code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pagedlm/fused_layers.h"
#include "pagedlm/kv_cache.h"
#include "pagedlm/paged_decode.h"
#include "pagedlm/paged_prefill.h"
#include "pagedlm/sampling.h"

namespace pagedlm::cuda {

int write_kv_cache(const WriteKVCacheParams& p, void* stream);
int copy_blocks(const CopyBlocksParams& p, void* stream);

// Split-K workspace for paged decode: partial outputs and log-sum-exps, f32.
struct DecodeWorkspace {
  void* data = nullptr;
  size_t bytes = 0;
};
int paged_decode(const PagedDecodeParams& p, const DecodeWorkspace& workspace, void* stream);

// f16/bf16 on tensor cores, f32 on CUDA cores.
int paged_prefill(const PagedPrefillParams& p, void* stream);
// Whether the Hopper wgmma kernel covers this configuration on the current device and build.
bool paged_prefill_sm90_supports(const PagedPrefillParams& p);

// One thread block per token row.
int rms_norm(const RMSNormParams& p, void* stream);
int silu_and_mul(const SiluAndMulParams& p, void* stream);
// One thread block per token, query and key heads together.
int apply_rope(const RopeParams& p, void* stream);
// One thread block per logits row.
int argmax_logprob(const ArgmaxLogprobParams& p, void* stream);

const char* error_string(int code);

}  // namespace pagedlm::cuda
