// Entry points of the binding layer: each file binds one part of the core into pagedlm._C.
#pragma once

#include <nanobind/nanobind.h>

namespace pagedlm::bindings {

void bind_errors(nanobind::module_& m);
void bind_block_manager(nanobind::module_& m);
void bind_build_info(nanobind::module_& m);
void bind_ops(nanobind::module_& m);
void bind_fused_layers(nanobind::module_& m);
void bind_verify(nanobind::module_& m);
void bind_sampling(nanobind::module_& m);

}  // namespace pagedlm::bindings
