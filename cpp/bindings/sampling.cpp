// Binding of argmax_logprob, the greedy choices of a batch of logits rows: check every
// argument, then run the CPU path or the CUDA launcher where the tensors live.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>

#include "bindings.h"
#include "dispatch.h"
#include "pagedlm/sampling.h"
#include "tensor_checks.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace pagedlm::bindings {
namespace {

// out [rows, 2] float64 = each row's argmax and its log-probability, logits [rows, vocab].
void argmax_logprob(Tensor logits, MutTensor out, uintptr_t stream) {
  expect_rank(logits, 2, "logits");
  const int64_t rows = logits.shape(0), vocab = logits.shape(1);
  if (vocab == 0) fail("logits", "the vocabulary (dimension 1) must not be empty, got shape " + shape_str(logits));
  expect_contiguous(logits, "logits");
  const DType dtype = float_dtype(logits, "logits");
  const Placement where = placement_of(logits);
  if (rows >= (int64_t{1} << 31)) fail("logits", "must have fewer than 2^31 rows");
  expect_rank(out, 2, "out");
  expect_dim(out, 0, rows, "out", "rows of logits");
  expect_dim(out, 1, 2, "out", "token and log-probability");
  expect_contiguous(out, "out");
  const nb::dlpack::dtype d = out.dtype();
  if (d.lanes != 1 || d.bits != 64 || d.code != static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) {
    throw nb::type_error("out: dtype must be float64");
  }
  expect_same_placement(out, where, "out", "logits");
  expect_apart(out, logits, "out", "logits");

  ArgmaxLogprobParams p;
  p.logits = logits.data();
  p.out = static_cast<double*>(out.data());
  p.rows = rows;
  p.vocab = vocab;
  p.dtype = dtype;
  run_on(where, p, argmax_logprob_cpu, PAGEDLM_CUDA_LAUNCHER(argmax_logprob), stream, "argmax_logprob");
}

}  // namespace

void bind_sampling(nb::module_& m) {
  m.def("argmax_logprob", &argmax_logprob, "logits"_a, "out"_a.noconvert(), "stream"_a);
}

}  // namespace pagedlm::bindings
