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

// Lists and tuples are checked for first: asking them for the array protocols is slow,
// and they are what most callers pass.
inline bool is_list_or_tuple(nb::handle obj) { return PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr()); }

// Converts any sequence of Python ints, checking that each fits in T.
template <typename T>
std::vector<T> read_int_sequence(nb::handle obj, const char* arg) {
  PyObject* seq = PySequence_Fast(obj.ptr(), "");
  if (!seq) {
    PyErr_Clear();
    throw nb::type_error((std::string(arg) + ": expected a sequence of ints or a 1-D int array").c_str());
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::vector<T> out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(items[i], &overflow);
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      Py_DECREF(seq);
      throw nb::type_error((std::string(arg) + "[" + std::to_string(i) + "]: expected an int").c_str());
    }
    if (overflow || v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max()) {
      Py_DECREF(seq);
      throw nb::value_error((std::string(arg) + "[" + std::to_string(i) + "]: expected an int that fits in " +
                             (sizeof(T) == 4 ? "int32" : "int64")).c_str());
    }
    out[i] = static_cast<T>(v);
  }
  Py_DECREF(seq);
  return out;
}

// A read-only view of int64 values, borrowed from an int64 array or owned after conversion.
class Int64Input {
 public:
  Int64Input(nb::handle obj, const char* arg) {
    CpuVector<int64_t> i64;
    CpuVector<int32_t> i32;
    if (!is_list_or_tuple(obj) && nb::try_cast(obj, i64, /*convert=*/false)) {
      data_ = i64.data();
      size_ = static_cast<int64_t>(i64.shape(0));
      keep_alive_ = nb::borrow(obj);
      return;
    }
    if (!is_list_or_tuple(obj) && nb::try_cast(obj, i32, /*convert=*/false)) {
      owned_.assign(i32.data(), i32.data() + i32.shape(0));
    } else {
      owned_ = read_int_sequence<int64_t>(obj, arg);
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
  if (!is_list_or_tuple(obj)) {
    CpuVector<int32_t> i32;
    if (nb::try_cast(obj, i32, /*convert=*/false)) return {i32.data(), i32.data() + i32.shape(0)};
    CpuVector<int64_t> i64;
    if (nb::try_cast(obj, i64, /*convert=*/false)) {
      std::vector<int32_t> out(i64.shape(0));
      for (size_t i = 0; i < out.size(); ++i) {
        int64_t v = i64.data()[i];
        if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
          throw nb::value_error((std::string(arg) + "[" + std::to_string(i) + "] = " + std::to_string(v) +
                                 " does not fit in int32").c_str());
        }
        out[i] = static_cast<int32_t>(v);
      }
      return out;
    }
  }
  return read_int_sequence<int32_t>(obj, arg);
}

}  // namespace pagedlm::bindings
