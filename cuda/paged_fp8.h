// CUDA paged attention over FP8 KV caches (float8_e4m3fn / float8_e5m2), decode and prefill.
#pragma once

#include <cuda_runtime.h>

#include "pagedlm/paged_decode.h"
#include "pagedlm/paged_prefill.h"

namespace pagedlm::cuda {

int paged_decode_fp8(const PagedDecodeParams& p, cudaStream_t stream);
int paged_prefill_fp8(const PagedPrefillParams& p, cudaStream_t stream);

}  // namespace pagedlm::cuda
