// Reading integer arguments (token ids, sequence ids, counts) from Python: a 1-D numpy
// array or CPU tensor of int64/int32 is read in place, any other sequence of ints is
// converted. Errors name the argument.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace pagedlm::bindings {

namespace nb = nanobind;

template <typename T>
using CpuVector = nb::ndarray<const T, nb::ndim<1>, nb::device::cpu, nb::c_contig>;

// A read-only view of int64 values, borrowed from an int64 array or owned after conversion.
class Int64Input {
 public:
  Int64Input(nb::handle obj, const char* arg) {
    CpuVector<int64_t> i64;
    if (nb::try_cast(obj, i64, /*convert=*/false)) {
      data_ = i64.data();
      size_ = static_cast<int64_t>(i64.shape(0));
      keep_alive_ = nb::borrow(obj);
      return;
    }
    CpuVector<int32_t> i32;
    if (nb::try_cast(obj, i32, /*convert=*/false)) {
      owned_.assign(i32.data(), i32.data() + i32.shape(0));
    } else {
      PyObject* seq = PySequence_Fast(obj.ptr(), "");
      if (!seq) {
        PyErr_Clear();
        throw nb::type_error((std::string(arg) + ": expected a sequence of ints or a 1-D int array").c_str());
      }
      const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
      PyObject** items = PySequence_Fast_ITEMS(seq);
      owned_.resize(n);
      for (Py_ssize_t i = 0; i < n; ++i) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(items[i], &overflow);
        if (overflow || (v == -1 && PyErr_Occurred())) {
          PyErr_Clear();
          Py_DECREF(seq);
          throw nb::type_error((std::string(arg) + "[" + std::to_string(i) + "]: expected an int64").c_str());
        }
        owned_[i] = v;
      }
      Py_DECREF(seq);
    }
    data_ = owned_.data();
    size_ = static_cast<int64_t>(owned_.size());
  }

  const int64_t* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  const int64_t* data_ = nullptr;
  int64_t size_ = 0;
  std::vector<int64_t> owned_;
  nb::object keep_alive_;
};

// Token ids: int32 in the core, checked to fit.
inline std::vector<int32_t> token_ids(nb::handle obj, const char* arg) {
  CpuVector<int32_t> i32;
  if (nb::try_cast(obj, i32, /*convert=*/false)) return {i32.data(), i32.data() + i32.shape(0)};
  Int64Input values(obj, arg);
  std::vector<int32_t> out(values.size());
  for (int64_t i = 0; i < values.size(); ++i) {
    int64_t v = values.data()[i];
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
      throw nb::value_error((std::string(arg) + "[" + std::to_string(i) + "] = " + std::to_string(v) +
                             " does not fit in int32").c_str());
    }
    out[i] = static_cast<int32_t>(v);
  }
  return out;
}

}  // namespace pagedlm::bindings
