// Argument checks for the kernel bindings: rank, shape, dtype, device and contiguity of
// DLPack tensors (torch tensors, numpy arrays). Each failure raises a Python ValueError
// or TypeError naming the argument.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "pagedlm/dtype.h"

namespace pagedlm::bindings {

namespace nb = nanobind;
using Tensor = nb::ndarray<nb::ro>;        // read by the kernel
using MutTensor = nb::ndarray<>;            // written by the kernel

[[noreturn]] inline void fail(const char* arg, const std::string& what) {
  throw nb::value_error((std::string(arg) + ": " + what).c_str());
}

// A size the kernels take as int32, refused (naming arg) when it does not fit.
inline int32_t narrow32(int64_t value, const char* arg, const char* meaning) {
  if (value < 0 || value > std::numeric_limits<int32_t>::max()) {
    fail(arg, std::string(meaning) + " (" + std::to_string(value) + ") must be below 2^31");
  }
  return static_cast<int32_t>(value);
}

// A float option the kernels take as float32: finite, >= 0, and still finite in float32.
inline float finite_f32(double value, const char* arg) {
  if (!(value >= 0.0) || !std::isfinite(static_cast<float>(value))) {
    fail(arg, "must be a finite number >= 0 (and below 3.4e38, float32's largest), got " + std::to_string(value));
  }
  return static_cast<float>(value);
}

template <typename T>
std::string shape_str(const T& t) {
  std::string s = "[";
  for (size_t i = 0; i < t.ndim(); ++i) s += (i ? ", " : "") + std::to_string(t.shape(i));
  return s + "]";
}

template <typename T>
void expect_rank(const T& t, size_t rank, const char* arg) {
  if (t.ndim() != rank) {
    fail(arg, "expected " + std::to_string(rank) + " dimensions, got shape " + shape_str(t));
  }
}

template <typename T>
void expect_dim(const T& t, size_t dim, int64_t size, const char* arg, const char* meaning) {
  if (static_cast<int64_t>(t.shape(dim)) != size) {
    fail(arg, "dimension " + std::to_string(dim) + " (" + meaning + ") must be " + std::to_string(size) +
                  ", got shape " + shape_str(t));
  }
}

template <typename T>
bool is_contiguous(const T& t) {
  if (t.size() == 0) return true;  // no element to misplace (torch gives empty tensors any strides)
  int64_t expected = 1;
  for (size_t i = t.ndim(); i-- > 0;) {
    if (t.shape(i) != 1 && t.stride(i) != expected) return false;
    expected *= static_cast<int64_t>(t.shape(i));
  }
  return true;
}

template <typename T>
void expect_contiguous(const T& t, const char* arg) {
  if (!is_contiguous(t)) fail(arg, "must be contiguous");
}

// The kernels' element types: f32, f16, bf16.
template <typename T>
DType float_dtype(const T& t, const char* arg) {
  const nb::dlpack::dtype d = t.dtype();
  if (d.lanes == 1 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) {
    if (d.bits == 32) return DType::f32;
    if (d.bits == 16) return DType::f16;
  }
  if (d.lanes == 1 && d.bits == 16 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat)) {
    return DType::bf16;
  }
  throw nb::type_error((std::string(arg) + ": dtype must be float32, float16 or bfloat16").c_str());
}

// A KV cache's element type: one of float_dtype's, or FP8 (float8_e4m3fn, float8_e5m2).
template <typename T>
DType cache_dtype(const T& t, const char* arg) {
  const nb::dlpack::dtype d = t.dtype();
  if (d.lanes == 1 && d.bits == 8 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float8_E4M3FN)) {
    return DType::e4m3;
  }
  if (d.lanes == 1 && d.bits == 8 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float8_E5M2)) {
    return DType::e5m2;
  }
  const bool wide = d.lanes == 1 && ((d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) &&
                                      (d.bits == 32 || d.bits == 16)) ||
                                     (d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && d.bits == 16));
  if (!wide) {
    throw nb::type_error(
        (std::string(arg) + ": dtype must be float32, float16, bfloat16, float8_e4m3fn or float8_e5m2").c_str());
  }
  return float_dtype(t, arg);
}

template <typename T>
void expect_float_like(const T& t, DType dtype, const char* arg, const char* reference) {
  if (float_dtype(t, arg) != dtype) {
    throw nb::type_error((std::string(arg) + ": dtype must match " + reference).c_str());
  }
}

template <typename A, typename B>
void expect_same_shape(const A& a, const B& b, const char* arg, const char* reference) {
  bool same = a.ndim() == b.ndim();
  for (size_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == b.shape(i);
  if (!same) fail(arg, "shape " + shape_str(a) + " must equal the shape of " + reference + " " + shape_str(b));
}

template <typename T>
void expect_int(const T& t, int bits, const char* arg) {
  const nb::dlpack::dtype d = t.dtype();
  if (d.lanes != 1 || d.bits != bits || d.code != static_cast<uint8_t>(nb::dlpack::dtype_code::Int)) {
    throw nb::type_error((std::string(arg) + ": dtype must be int" + std::to_string(bits)).c_str());
  }
}

// An index tensor of `rank` dimensions: contiguous `bits`-bit integers.
template <typename T>
void expect_index(const T& t, size_t rank, int bits, const char* arg) {
  expect_rank(t, rank, arg);
  expect_int(t, bits, arg);
  expect_contiguous(t, arg);
}

// The bytes [first, last] a tensor's elements span (strides may be negative); empty: first > last.
struct ByteSpan {
  uintptr_t first = 1, last = 0;
};

template <typename T>
ByteSpan byte_span(const T& t) {
  if (t.size() == 0) return {};
  int64_t lo = 0, hi = 0;
  for (size_t i = 0; i < t.ndim(); ++i) {
    const int64_t reach = (static_cast<int64_t>(t.shape(i)) - 1) * t.stride(i);
    (reach < 0 ? lo : hi) += reach;
  }
  const int64_t esize = (t.dtype().bits * t.dtype().lanes + 7) / 8;
  const auto base = reinterpret_cast<uintptr_t>(t.data());
  return {base + static_cast<uintptr_t>(lo * esize), base + static_cast<uintptr_t>(hi * esize + esize - 1)};
}

inline bool spans_meet(const ByteSpan& a, const ByteSpan& b) {
  return a.first <= a.last && b.first <= b.last && a.first <= b.last && b.first <= a.last;
}

// A tensor written by a kernel must not share memory with another argument: the result would
// depend on the order in which threads read and write (on CUDA, a race). Conservative: spans
// that meet are refused even where the elements themselves interleave.
template <typename A, typename B>
void expect_apart(const A& written, const B& other, const char* arg, const char* other_arg) {
  if (spans_meet(byte_span(written), byte_span(other))) {
    fail(arg, std::string("must not share memory with ") + other_arg);
  }
}

// Whether distinct indices of t can address the same element: with the dimensions sorted by
// stride, each stride must pass the span of the smaller ones (a sufficient test; it refuses
// broadcast views such as expand()).
template <typename T>
bool may_self_overlap(const T& t) {
  if (t.size() == 0) return false;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, size) of the dimensions of size > 1
  for (size_t i = 0; i < t.ndim(); ++i) {
    if (t.shape(i) > 1) dims.emplace_back(std::abs(static_cast<int64_t>(t.stride(i))), t.shape(i));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 1;  // elements covered by the smaller dimensions
  for (const auto& [stride, size] : dims) {
    if (stride < span) return true;
    span += stride * (size - 1);
  }
  return false;
}

// Where a kernel runs: every tensor of a call must be on the CPU or on one CUDA device.
struct Placement {
  bool cuda = false;
  int device = 0;
};

template <typename T>
Placement placement_of(const T& t) {
  const int type = t.device_type();
  if (type == nb::device::cpu::value) return {false, 0};
  if (type == nb::device::cuda::value) return {true, t.device_id()};
  throw nb::value_error("tensors must be on the CPU or a CUDA device");
}

template <typename T>
void expect_same_placement(const T& t, const Placement& where, const char* arg, const char* reference) {
  const Placement p = placement_of(t);
  if (p.cuda != where.cuda || p.device != where.device) {
    fail(arg, std::string("must be on the same device as ") + reference);
  }
}

}  // namespace pagedlm::bindings
