// What a kernel is given per tensor (`TensorPointers`) and per step (`Hyper`): plain
// structs, copied by value into CUDA launch tables.
#pragma once

#include <cstdint>

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
