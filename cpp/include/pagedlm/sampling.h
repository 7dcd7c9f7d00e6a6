// Greedy choices of a batch of logits rows: each row's argmax with its log-probability, the
// token and log-probability a greedy request emits, in one pass over the row where torch runs
// an argmax, a log_softmax over the whole row, a gather and a concatenation. The parameter
// struct is shared by the CPU path (cpp/src/sampling.cpp) and the CUDA path (cuda/sampling.cu).
#pragma once

#include <cstdint>

#include "pagedlm/dtype.h"

namespace pagedlm {

// For each row r of logits [rows, vocab] (contiguous, vocab >= 1):
//   out[r, 0] = argmax, the first index of the row's maximum (a NaN counts as larger than any
//               number, as torch.argmax counts it), as a double (exact for any vocabulary);
//   out[r, 1] = its log-softmax, -log(sum_j exp(x_j - max)), NaN when the row holds a NaN or
//               its maximum is not finite (torch.log_softmax gives NaN there too).
// out is float64 [rows, 2], contiguous: the host reads tokens and log-probabilities in one copy.
struct ArgmaxLogprobParams {
  const void* logits = nullptr;
  double* out = nullptr;
  int64_t rows = 0, vocab = 0;
  DType dtype = DType::f32;
};

void argmax_logprob_cpu(const ArgmaxLogprobParams& p);

}  // namespace pagedlm
