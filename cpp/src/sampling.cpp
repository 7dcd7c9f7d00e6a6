// CPU path of argmax_logprob: the reference the CUDA kernel is tested against, and what the
// engine runs on the CPU. The sum of exponentials is accumulated in double.
#include "pagedlm/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "pagedlm/parallel.h"

namespace pagedlm {
namespace {

void argmax_logprob_row(const ArgmaxLogprobParams& p, int64_t r) {
  const int64_t base = r * p.vocab;
  float best = load_as_float(p.logits, base, p.dtype);
  int64_t index = 0;
  for (int64_t i = 1; i < p.vocab && !std::isnan(best); ++i) {
    const float x = load_as_float(p.logits, base + i, p.dtype);
    if (x > best || std::isnan(x)) best = x, index = i;
  }
  double logprob = std::numeric_limits<double>::quiet_NaN();
  if (std::isfinite(best)) {
    double sum = 0.0;
    for (int64_t i = 0; i < p.vocab; ++i) {
      sum += std::exp(static_cast<double>(load_as_float(p.logits, base + i, p.dtype)) - best);
    }
    logprob = 0.0 - std::log(sum);  // +0.0 for a certain token, as torch gives, not -0.0
  }
  p.out[2 * r] = static_cast<double>(index);
  p.out[2 * r + 1] = logprob;
}

}  // namespace

void argmax_logprob_cpu(const ArgmaxLogprobParams& p) {
  // Rows in chunks of about 32K elements, so a small call stays on the caller's thread.
  const int64_t per_chunk = std::max<int64_t>(1, (int64_t{1} << 15) / p.vocab);
  parallel_for((p.rows + per_chunk - 1) / per_chunk, [&](int64_t chunk) {
    const int64_t end = std::min(p.rows, (chunk + 1) * per_chunk);
    for (int64_t r = chunk * per_chunk; r < end; ++r) argmax_logprob_row(p, r);
  });
}

}  // namespace pagedlm
