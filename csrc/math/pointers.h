// What a kernel is given per tensor (`TensorPointers`, its `StepCount`) and per step
// (`Hyper`, the `ScalarOperand`s lr, grad_scale and found_inf): plain structs, copied by
// value into CUDA launch tables.
#pragma once

#include <cstdint>

#include "portable.h"
#include "switches.h"

namespace adamx {

// One tensor's buffers as a kernel sees them: all laid out alike (same sizes and strides,
// non-overlapping and dense), `numel` elements each.
struct TensorPointers {
  void* param;
  void* grad;            // written (the unscaled grad) only when unscale_grad
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // null unless amsgrad
  void* master_param;    // null unless master_weights (then float)
  float* code_scales;    // Codes8: exp_avg's block scales, then exp_avg_sq's; else null
  int64_t numel;
};

// A per-step scalar (the lr, grad_scale, found_inf) as a kernel gets it: a value, or
// memory the kernel reads (a device tensor; in the CUDA emulation, a CPU tensor standing
// in for one). One type from the operand layer to the kernel body.
struct ScalarOperand {
  double value;        // the value (or its default when absent), unless `memory` is set
  const void* memory;  // or null
  Dtype dtype;         // memory's dtype
};

// A param's step count as a kernel gets it: the count after this step's increment, as a
// value from the host, or memory the kernel reads (already incremented). One type from
// the operand layer to the CUDA planner (the launch table packs it: StepRef).
struct StepCount {
  double next;         // the count after this step's increment (host counts only)
  const void* memory;  // or null
  Dtype dtype;         // memory's dtype: Float32 or Float64
};

// A one-element tensor's value, widened to double (as the host's item<double>()).
ADAMX_HD double read_scalar(const void* ptr, Dtype dtype) {
  switch (dtype) {
    case Dtype::Float64: return *static_cast<const double*>(ptr);
    case Dtype::Float16: return static_cast<float>(*static_cast<const c10::Half*>(ptr));
    case Dtype::BFloat16: return static_cast<float>(*static_cast<const c10::BFloat16*>(ptr));
    case Dtype::Float32: break;
  }
  return *static_cast<const float*>(ptr);
}

// The scalar's value, read from memory when it is there.
ADAMX_HD double value_of(const ScalarOperand& s) {
  return s.memory ? read_scalar(s.memory, s.dtype) : s.value;
}

// Hyper-parameters of one step, as the user gave them (double, host or device), the grad
// scale when it is read on the host (only read when unscale_grad; the operand layer sets
// it), and the seed of stochastic rounding.
struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
  double grad_scale;
  int64_t seed;
  // With unscale_grad: leave the grads as they are (the step still divides each by
  // grad_scale as it reads it, but does not store the quotient back), a write of every
  // grad saved. The op's keep_grads; runtime, not a switch (no kernel of its own). (No
  // default member initializer: Hyper stays trivial, as LaunchTable's memset needs; an
  // aggregate initializer that leaves it out sets it false.)
  bool keep_grads;
};

}  // namespace adamx
