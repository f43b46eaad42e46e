#pragma once

#include <pybind11/pybind11.h>

#include "adam_op.h"

namespace adamx {

// step_group's answer when a param with a grad has no (complete) state yet: nothing was
// checked or written, and the caller must make the state first.
constexpr int64_t kNeedsState = -1;

// Runs adamx::adam_ (or, with check_only, adamx::adam_check) on one param group of an
// adamx.Adam: `group` is the group dict, `state` the optimizer's state dict. Returns the
// number of params stepped, or kNeedsState.
int64_t step_group(pybind11::dict group, pybind11::dict state, bool check_only);

}  // namespace adamx
