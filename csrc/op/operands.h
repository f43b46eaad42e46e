// The operand layer: what one step's kernels run on, prepared the same way for every
// backend (the CPU kernel, the CUDA kernel and its CPU emulation) after check_args.
//
// Per param: the pointers the kernel updates (the user's own tensors when they are laid
// out alike, the usual case, else dense temporaries copied back after the kernel), its
// dtype, and its step count (a value computed on the host, or memory the kernel reads);
// per step: the lr, grad_scale and found_inf (each a value, or memory). The step's writes
// happen in a fixed order, after everything that can fail but an allocation: host step
// counts, step counts in kernel memory, the kernel (the backend's), then, in `finish`,
// the found_inf correction of step counts in kernel memory and the copy-back of
// temporaries.
//
// found_inf (GradScaler): read on the host when it is a CPU tensor, and also when it is
// on the device but some step count is on the host: a host count decides the step's bias
// corrections before the kernel runs, so the host must know whether the step happens
// (one 4-byte read, a synchronization; keep step counts on the device, capturable=True
// or fused=True, to avoid it). A non-zero host value skips the step: `skipped()`, and
// nothing is prepared or written. In memory, the kernel's blocks read it at entry and
// write nothing when it is non-zero; the step counts get +1 before and -(found_inf != 0)
// after the kernel, on the device.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <vector>

#include "adam_op.h"

namespace adamx {

Dtype dtype_of(at::ScalarType t);  // float32, float64, float16 or bfloat16

// Which CPU scalars to hand to the kernel as memory to read, as device tensors are (the
// CUDA emulation's stand-in for device memory). Otherwise CPU ones are read on the host.
struct InKernel {
  bool steps = false;
  bool lr = false;
  bool scaler = false;  // grad_scale and found_inf
};

class StepOperands {
 public:
  explicit StepOperands(const AdamArgs& a, InKernel in_kernel = {});

  size_t size() const { return pointers_.size(); }
  const TensorPointers& pointers(size_t i) const { return pointers_[i]; }
  Dtype dtype(size_t i) const { return dtypes_[i]; }
  StateKind kind(size_t i) const { return kinds_[i]; }
  const StepCount& step(size_t i) const { return steps_[i]; }
  const ScalarOperand& lr() const { return lr_; }
  const ScalarOperand& grad_scale() const { return grad_scale_; }
  const ScalarOperand& found_inf() const { return found_inf_; }
  // The hyper-parameters with the host values of the lr and grad_scale.
  const Hyper& hyper() const { return hyper_; }
  // found_inf was read on the host and is non-zero: the step writes nothing (the
  // operands are empty).
  bool skipped() const { return !found_inf_.memory && found_inf_.value != 0; }

  // The writes before the kernel runs: every step count gets its increment (those in
  // kernel memory with a foreach add on their device's current stream).
  void increment_steps() const;
  // The writes after the kernel ran: step counts in kernel memory less (found_inf != 0)
  // when found_inf is in memory; temporaries into the user's tensors.
  void finish() const;

 private:
  // The tensors the kernel runs on for one param, indexed as written_lists (the grad is
  // read-only unless unscaled; max_exp_avg_sq undefined unless amsgrad, master_param
  // unless master_weights, code_scales unless 8-bit moments).
  using Used = std::array<at::Tensor, kStateSteps>;
  const AdamArgs& args_;
  std::vector<Used> used_;
  std::vector<size_t> copied_;  // params that run on temporaries
  std::vector<TensorPointers> pointers_;
  std::vector<Dtype> dtypes_;
  std::vector<StateKind> kinds_;
  std::vector<StepCount> steps_;
  std::vector<at::Tensor> kernel_steps_;  // incremented in place, before the kernel
  ScalarOperand lr_{}, grad_scale_{}, found_inf_{};
  Hyper hyper_{};
};

}  // namespace adamx
