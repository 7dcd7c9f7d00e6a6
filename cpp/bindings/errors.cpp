// Maps the core's C++ exceptions to Python: OutOfBlocks -> pagedlm.OutOfBlocksError (a
// RuntimeError subclass), UnknownId -> KeyError, InvalidArgument -> ValueError.
#include <nanobind/nanobind.h>

#include "bindings.h"
#include "pagedlm/errors.h"

namespace nb = nanobind;

namespace pagedlm::bindings {

void bind_errors(nb::module_& m) {
  static nb::exception<OutOfBlocks> out_of_blocks(m, "OutOfBlocksError", PyExc_RuntimeError);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const UnknownId& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
}

}  // namespace pagedlm::bindings
