// pagedlm._C: the one extension module. Each part of the core is bound in its own file.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "bindings.h"

#ifdef PAGEDLM_WITH_CUDA
#include "device_query.h"
#endif

namespace nb = nanobind;

namespace pagedlm::bindings {

void bind_build_info(nb::module_& m) {
#ifdef PAGEDLM_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.attr("cuda_runtime_version") = pagedlm::cuda::runtime_version();
  m.attr("cuda_architectures") = pagedlm::cuda::compiled_architectures();
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_runtime_version") = nb::none();
  m.attr("cuda_architectures") = nb::none();
#endif
  m.def("cuda_devices", []() {
    nb::list devices;
    std::string error;
#ifdef PAGEDLM_WITH_CUDA
    for (const auto& d : pagedlm::cuda::visible_devices(&error)) {
      nb::dict info;
      info["index"] = d.index;
      info["name"] = d.name;
      info["compute_capability"] = nb::make_tuple(d.major, d.minor);
      info["multiprocessors"] = d.multiprocessors;
      info["total_memory"] = d.total_memory;
      info["l2_cache_bytes"] = d.l2_cache_bytes;
      info["kernel_architecture"] = d.kernel_architecture;
      devices.append(info);
    }
#else
    error = "pagedlm was built without CUDA";
#endif
    return nb::make_tuple(devices, error);
  }, "(devices, error): the CUDA devices visible to this module, and why none are if so.");
}

}  // namespace pagedlm::bindings

NB_MODULE(_C, m) {
  m.doc() = "pagedlm's compiled core: block manager and kernels";
  m.attr("__version__") = PAGEDLM_VERSION;
  pagedlm::bindings::bind_errors(m);
  pagedlm::bindings::bind_block_manager(m);
  pagedlm::bindings::bind_build_info(m);
  pagedlm::bindings::bind_ops(m);
  pagedlm::bindings::bind_fused_layers(m);
  pagedlm::bindings::bind_verify(m);
  pagedlm::bindings::bind_sampling(m);
}
