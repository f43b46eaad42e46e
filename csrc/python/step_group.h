// adamx.Adam's eager fast path (step_group.cpp), bound in bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

#include <optional>

#include "../op/adam_op.h"

namespace adamx {

// step_group's answer when it leaves a group to the Python step: a param with a grad has
// no (complete) state yet, or is listed twice. Nothing was checked or written.
constexpr int64_t kNotHandled = -1;

// The fewest elements a param has for its moments to be stored compactly (state_dtype
// "bfloat16" or "int8"); smaller ones keep torch's layout. Exported as
// adamx._C.COMPACT_MIN_NUMEL, which adamx/_state.py's spec() reads.
constexpr int64_t kCompactMinNumel = 4096;

// The param-group keys step_group reads, besides "params": torch's hyper-parameters,
// then one per switch. Exported as adamx._C.GROUP_KEYS, which the Python step reads.
pybind11::tuple group_keys();

// Runs adamx::adam_ (or, with check_only, adamx::adam_check) on one param group of an
// adamx.Adam: `group` is the group dict, `state` the optimizer's state dict, grad_scale and
// found_inf GradScaler's (or none), keep_grads the op's (the grads are not written back),
// first_param_id the op's param_ids of the group's first param (the others follow: a
// param's id is its index in the optimizer, as state_dict numbers it). Returns the number
// of params stepped, or kNotHandled.
int64_t step_group(pybind11::dict group, pybind11::dict state, bool check_only,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, bool keep_grads,
                   int64_t first_param_id);

}  // namespace adamx
