// Bindings of the fused layers (RMSNorm with or without the residual add): check every
// argument, then run the CPU path or the CUDA launcher where the tensors live. Tensors
// written in place are declared noconvert, so a kernel never writes into a temporary copy.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "bindings.h"
#include "dispatch.h"
#include "pagedlm/fused_layers.h"
#include "tensor_checks.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace pagedlm::bindings {
namespace {

// A contiguous [rows, hidden] activation of the same shape, dtype and device as x.
template <typename T>
void expect_like_x(const T& t, const Tensor& x, DType dtype, const Placement& where, const char* arg) {
  expect_same_shape(t, x, arg, "x");
  expect_contiguous(t, arg);
  expect_float_like(t, dtype, arg, "x");
  expect_same_placement(t, where, arg, "x");
}

// out = weight * norm(x), or with residual: residual += x, out = weight * norm(residual).
void rms_norm(Tensor x, Tensor weight, MutTensor out, std::optional<MutTensor> residual, double eps,
              uintptr_t stream) {
  expect_rank(x, 2, "x");
  expect_contiguous(x, "x");
  const DType dtype = float_dtype(x, "x");
  const Placement where = placement_of(x);
  const int64_t rows = x.shape(0), hidden = x.shape(1);
  if (hidden == 0) fail("x", "hidden size (dimension 1) must be at least 1, got shape " + shape_str(x));
  expect_rank(weight, 1, "weight");
  expect_dim(weight, 0, hidden, "weight", "hidden size of x");
  expect_contiguous(weight, "weight");
  expect_float_like(weight, dtype, "weight", "x");
  expect_same_placement(weight, where, "weight", "x");
  expect_like_x(out, x, dtype, where, "out");
  if (residual) expect_like_x(*residual, x, dtype, where, "residual");
  if (!(eps >= 0.0) || !std::isfinite(eps)) fail("eps", "must be a finite number >= 0, got " + std::to_string(eps));

  RMSNormParams p;
  p.input = x.data();
  p.residual = residual ? residual->data() : nullptr;
  p.weight = weight.data();
  p.out = out.data();
  p.rows = rows;
  p.hidden = hidden;
  p.eps = static_cast<float>(eps);
  p.dtype = dtype;
  run_on(where, p, rms_norm_cpu, PAGEDLM_CUDA_LAUNCHER(rms_norm), stream, "rms_norm");
}

}  // namespace

void bind_fused_layers(nb::module_& m) {
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "out"_a.noconvert(), "residual"_a.noconvert().none(), "eps"_a,
        "stream"_a);
}

}  // namespace pagedlm::bindings
