// The f32 prefill launcher (CUDA cores), called by paged_prefill() for f32 caches.
#pragma once

#include <cuda_runtime.h>

#include "pagedlm/paged_prefill.h"

namespace pagedlm::cuda {

int paged_prefill_f32(const PagedPrefillParams& p, cudaStream_t stream);

}  // namespace pagedlm::cuda
