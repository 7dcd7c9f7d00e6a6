// Argument checks for the kernel bindings: rank, shape, dtype, device and contiguity of
// DLPack tensors (torch tensors, numpy arrays). Each failure raises a Python ValueError
// or TypeError naming the argument.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "pagedlm/dtype.h"

namespace pagedlm::bindings {

namespace nb = nanobind;
using Tensor = nb::ndarray<nb::ro>;        // read by the kernel
using MutTensor = nb::ndarray<>;            // written by the kernel

[[noreturn]] inline void fail(const char* arg, const std::string& what) {
  throw nb::value_error((std::string(arg) + ": " + what).c_str());
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
