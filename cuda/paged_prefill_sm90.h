// The Hopper (sm_90a, wgmma) prefill launcher, called by paged_prefill() for the configurations
// paged_prefill_sm90_supports() accepts; everything else keeps the mma.sync kernel.
#pragma once

#include <cuda_runtime.h>

#include "pagedlm/paged_prefill.h"

namespace pagedlm::cuda {

// f16/bf16 queries and caches, head_dim 64 or 128, no custom mask, window or soft cap, positive scale, 16-byte aligned
// tensors, an sm_90 device and a build that compiled the kernel for sm_90a.
bool paged_prefill_sm90_supports(const PagedPrefillParams& p);
int paged_prefill_sm90(const PagedPrefillParams& p, cudaStream_t stream);

}  // namespace pagedlm::cuda
